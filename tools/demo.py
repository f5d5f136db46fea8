#!/usr/bin/env python
"""The main job (`make demo`): Mask R-CNN with Switchable Normalization, from scratch, 2 images per batch, on CPU,
on the built-in synthetic shapes dataset.

The same command as tools/train_coco_detector.py with `--dataset shapes` and
the output in work_dirs/sn_demo/ (AP table, Fig. 7 importance weights,
predictions picture, training curve, checkpoint):

    make demo                              # = .venv/bin/python tools/demo.py
    .venv/bin/python tools/demo.py --quick # a 1-minute smoke test (CI)
    .venv/bin/python tools/demo.py --norm GN --out work_dirs/gn_demo

`--norm BN|GN` swaps every SN layer for BatchNorm or GroupNorm (16 groups),
the rest unchanged. Every option of tools/train_coco_detector.py works here.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {
    "dataset": "shapes",
    "data": os.path.join(REPO, "work_dirs", "data"),
    "out": os.path.join(REPO, "work_dirs", "sn_demo"),
}

if __name__ == "__main__":
    try:
        from sn_plugin.apps.coco_detector import main
    except ImportError as missing:  # e.g. a Python without torch, outside the project's environment
        sys.exit(f"demo: error: {missing}. Run `make demo` (it sets up .venv first) or use .venv/bin/python.")
    sys.exit(main(prog="demo", defaults=DEFAULTS))
