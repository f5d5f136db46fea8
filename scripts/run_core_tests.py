#!/usr/bin/env python
"""The torch-only test suite: pytest with the toolkits made unimportable (`make test-core`).

The toolkit tests skip themselves when their toolkit does not import
(``pytest.importorskip``), so blocking the toolkits runs exactly the tests that need
torch alone, in a core set-up (``SN_PROFILE=core``) as in a full one, and checks on
the way that the core and its tests never import a toolkit.

    python scripts/run_core_tests.py [pytest arguments]     # default: -q tests
"""
import sys

import pytest

TOOLKITS = ("mmcv", "mmengine", "mmdet", "mmseg", "mmpretrain", "mmaction", "detectron2")


def main(argv) -> int:
    for name in TOOLKITS:
        sys.modules[name] = None  # `import name` raises ImportError from now on
    return pytest.main(argv or ["-q", "tests"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
