#!/usr/bin/env python
"""Train a detector with Switchable Normalization from scratch on your COCO-format dataset, and report its AP.

    .venv/bin/python tools/train_coco_detector.py \
        --train-ann data/train.json --train-images data/train/ \
        --val-ann data/val.json --val-images data/val/ \
        [--model mask_rcnn|faster_rcnn] [--depth 18|34|50|101|152] [--width 32] [--norm SN|BN|GN] \
        [--image-size N] [--max-iters 1200] [--out work_dirs/sn_detector]
    .venv/bin/python tools/train_coco_detector.py --dataset nuclei   # real microscopy tiles (stardist's wheel)
    .venv/bin/python tools/train_coco_detector.py --dataset shapes   # the synthetic shapes (= make demo)

The classes come from the annotation files; every input is checked before
training starts. Outputs (AP table, Fig. 7 importance weights, predictions
picture, training curve, checkpoint): see sn_plugin/apps/coco_detector.py
or `--help`.
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = {
    "data": os.path.join(REPO, "work_dirs", "data"),
    "out": os.path.join(REPO, "work_dirs", "sn_detector"),
}

if __name__ == "__main__":
    try:
        from sn_plugin.apps.coco_detector import main
    except ImportError as missing:  # e.g. a Python without torch, outside the project's environment
        sys.exit(f"train_coco_detector: error: {missing}. Run `make setup` and use .venv/bin/python.")
    sys.exit(main(prog="train_coco_detector", defaults=DEFAULTS))
