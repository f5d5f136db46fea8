#!/usr/bin/env python
"""Detectron2's LazyConfig training/evaluation entry point (its tools/lazyconfig_train_net.py), with SN.

The same arguments as detectron2's script::

    python tools/lazyconfig_train_net_d2.py --num-gpus 8 \
        --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.py [key=value ...]
    python tools/lazyconfig_train_net_d2.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth

The command lives in :mod:`sn_plugin.integrations.detectron2.lazy_train_net`.
"""
from sn_plugin.integrations.detectron2.lazy_train_net import main

if __name__ == "__main__":
    main()
