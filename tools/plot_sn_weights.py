#!/usr/bin/env python
"""Plot every SN layer's importance weights (the paper's Fig. 7) and write them as CSV.

    python tools/plot_sn_weights.py work_dirs/mask_rcnn_sn/epoch_12.pth --out weights.png
    python tools/plot_sn_weights.py my_package.models:build_model --out weights.png

The command lives in :func:`sn_plugin.plotting.main` (``--help`` for the options).
"""
from sn_plugin.plotting import main

if __name__ == "__main__":
    main()
