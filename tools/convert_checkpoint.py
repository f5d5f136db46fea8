#!/usr/bin/env python
"""Convert SN-ResNet checkpoints between the authors' released files and the toolkits' layouts.

``python tools/convert_checkpoint.py --help`` lists the formats, options and
examples; the command lives in :mod:`sn_plugin.checkpoints.cli`.
"""
import sys

from sn_plugin.checkpoints.cli import main

if __name__ == "__main__":
    sys.exit(main())
