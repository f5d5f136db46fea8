# XBNBlock-ResNet50 (XBNBlockGN-P2) on ImageNet-1k: in every bottleneck the BN after the
# 3x3 conv is GroupNorm with 64 groups, as is the stem's BN (as in the authors' code); the
# other BNs, the shortcut BNs included, stay BN; every gamma starts at 1 (no zero-gamma init).
# Paper (Huang et al., "Delving into the Estimation Shift of Batch Normalization in a Network",
# CVPR 2022), Sec. 5.2.1, Tables 1 and 2: SGD, batch 256, momentum 0.9, weight decay 1e-4,
# 100 epochs, LR 0.1 divided by 10 after 30, 60 and 90 epochs: 77.4 top-1 (BN 76.29, GN 75.73).
# This is mmpretrain's ResNet-50 recipe, which is that protocol. Its checkpoints are the
# backbones the XBN detection configs (configs/mmdet/xbn/) fine-tune.
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py']

custom_imports = dict(imports=['sn_plugin.integrations.openmmlab'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        type='XBNResNet',  # mmpretrain's ResNet, converted (sn_plugin.integrations.openmmlab.family)
        bfn_cfg=dict(type='GN', num_groups=64),
        bfn_position=2,
        xbn_every=1,
        stem_bfn=True))
