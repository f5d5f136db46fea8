# ResNet-50 with Consistent Normalization (CN) on ImageNet-1k, trained at three resolutions.
# Paper (Zhou, Ma, Li, Zhang, Luo, "Towards Improving Generalization of Deep Networks via
# Consistent Normalization"), Sec. 5.1.2 and Table 2: every BN becomes a CN layer with one
# branch per input size; every 224x224 training crop is also scaled to 192x192 and 128x128,
# each size runs through its own branch and the three losses are summed (Algorithm 1,
# lambda_k = 1) before one SGD step; 8 GPUs, batch 256, 120 epochs, 5 warm-up epochs, then a
# cosine decay of the learning rate from 0.1 to 0; evaluated on the 224x224 centre crop with the
# 224 branch: 78.3 top-1 / 94.1 top-5 (BN at 224 only: 77.1 / 93.3; BN on the same three sizes:
# 77.3 / 93.4). Table 5 ("dynamic inference", the 192 and 128 branches on images of those
# sizes): 76.8 top-1 at 192 px and 73.0 at 128 px.
# Here: mmpretrain's ResNet-50 data pipeline with that schedule. CN replaces every BN, the
# stem's and the shortcuts' too; the views are made on the preprocessed batch (antialiased
# bilinear resize). To evaluate a branch at its size, set model.test_branch (1: 192 px, 2: 128 px)
# and resize the test images to that size.
_base_ = ['mmpretrain::resnet/resnet50_8xb32_in1k.py']

custom_imports = dict(imports=['sn_plugin.integrations.openmmlab'], allow_failed_imports=False)

model = dict(
    _delete_=True,
    type='ConsistentNormModel',  # trains by Algorithm 1, evaluates with test_branch
    model=dict(
        type='ImageClassifier',
        backbone=dict(
            type='ResNet',
            depth=50,
            num_stages=4,
            out_indices=(3, ),
            style='pytorch',
            norm_cfg=dict(type='CN', num_branches=3, requires_grad=True),
            # mmpretrain zero-initialises norm3 by setting its `weight`, which a CN layer (its
            # parameters are in its branches) does not have: every branch starts at gamma = 1.
            zero_init_residual=False),
        neck=dict(type='GlobalAveragePooling'),
        head=dict(
            type='LinearClsHead',
            num_classes=1000,
            in_channels=2048,
            loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
            topk=(1, 5))),
    # branch 0: the 224 px crop itself; branches 1 and 2: it scaled to 192 and 128 px
    views=[None, dict(type='Resize', size=192), dict(type='Resize', size=128)],
    test_branch=0)

param_scheduler = [
    dict(type='LinearLR', start_factor=0.001, by_epoch=True, begin=0, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', T_max=115, eta_min=0., by_epoch=True, begin=5, end=120),
]
train_cfg = dict(by_epoch=True, max_epochs=120, val_interval=1)
