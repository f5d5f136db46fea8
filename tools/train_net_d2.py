#!/usr/bin/env python
"""Detectron2's standard training/evaluation entry point, with Switchable Normalization.

The same arguments as detectron2's ``tools/train_net.py``, plus ``--num-processes`` for CPU processes::

    python tools/train_net_d2.py --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.yaml \
        --num-gpus 8 [--resume] [KEY VALUE ...]
    python tools/train_net_d2.py --config-file ... --eval-only MODEL.WEIGHTS path/to/model_final.pth
    python tools/train_net_d2.py --config-file ... --num-processes 4   # 4 CPU processes (gloo), no GPU needed

The command lives in :mod:`sn_plugin.integrations.detectron2.train_net`.
"""
from sn_plugin.integrations.detectron2.train_net import main

if __name__ == "__main__":
    main()
