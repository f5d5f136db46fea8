#!/usr/bin/env python
"""Train an OpenMMLab model (mmdet, mmseg, mmpretrain, mmaction2 config) with Switchable Normalization.

The toolkits' tools/train.py arguments; under torchrun also on CPU processes (gloo)::

    python tools/train.py configs/mmdet/mask-rcnn_r50_fpn_sn-all_2x_coco.py [--work-dir DIR] [--resume]
    torchrun --nproc_per_node=8 tools/train.py CONFIG --launcher pytorch

The command lives in :mod:`sn_plugin.integrations.openmmlab.train`.
"""
from sn_plugin.integrations.openmmlab.train import main

if __name__ == "__main__":
    main()
