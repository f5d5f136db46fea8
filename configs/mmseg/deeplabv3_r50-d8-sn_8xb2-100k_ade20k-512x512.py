# DeepLabV3 with a dilated SN-ResNet50 (output stride 8), SN in the ASPP and
# auxiliary heads, on ADE20K.
# Paper (Luo et al., ICLR 2019), Table 5 and Appendix E: 8 GPUs x 2 images,
# ResNet50 with atrous rates 2 and 4 in the last two stages, auxiliary loss
# weight 0.4, poly LR (power 0.9), 100k iterations, finetuned from the (8,2)
# ImageNet SN-ResNet50: 38.7 mIoU single-scale / 39.2 multi-scale.
# Here: the paper's batch (8x2) and schedule (100k) with the toolkit's
# 512x512 crops and multi-scale test pipeline (the paper resized to 450x450
# and tested at 300-600 pixels); SN statistics are batch averages (SNBatchStatsHook).
#
# Backbone: mmseg's ResNetV1c default has a deep 3x3 stem; the paper's
# ResNet50 (and every SN ImageNet checkpoint, the released one and the ones the
# mmpretrain configs here produce) has the 7x7 stem, so we use mmseg's 'ResNet'
# (ResNetV1b) so that the whole backbone, stem included, loads pretrained.
_base_ = [
    'mmseg::deeplabv3/deeplabv3_r50-d8_4xb4-80k_ade20k-512x512.py',
    '../_base_/sn_runtime.py',
]

norm_cfg = dict(type='SN', using_moving_average=False, requires_grad=True)
model = dict(
    pretrained=None,
    backbone=dict(
        type='ResNet',
        norm_cfg=norm_cfg,
        # An SN-ResNet50 (8,2) checkpoint in the OpenMMLab ResNet layout, made by
        # sn_plugin's checkpoint converter.
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/sn_resnet50_v1_8x2_mmseg.pth')),
    decode_head=dict(norm_cfg=norm_cfg),
    auxiliary_head=dict(norm_cfg=norm_cfg))

train_dataloader = dict(batch_size=2)

# The one line that sets weight decay for SN (gamma, beta, importance logits) and every other norm
# layer; 1.0 keeps the toolkit's decay on them (the paper changed only the normalization layers
# of its segmentation code, Appendix E).
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=1.))

iters = 100000
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end=iters, by_epoch=False)]
train_cfg = dict(max_iters=iters, val_interval=10000)
default_hooks = dict(checkpoint=dict(interval=10000))
