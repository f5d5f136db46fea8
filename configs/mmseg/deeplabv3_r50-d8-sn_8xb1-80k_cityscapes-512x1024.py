# DeepLabV3 with a dilated SN-ResNet50 (output stride 8), SN in the ASPP and
# auxiliary heads, on Cityscapes.
# Paper (Luo et al., ICLR 2019), Table 5 and Appendix E: 1 image per GPU,
# batch 8, ResNet50 with atrous rates 2 and 4 in the last two stages,
# auxiliary loss weight 0.4, poly LR (power 0.9), 713x713 crops, finetuned from
# the (8,2) ImageNet SN-ResNet50: 71.2 mIoU single-scale / 75.1 multi-scale
# (scales 1.0, 1.25, 1.5, 1.75).
# Here: the paper's batch (8x1) and test scales with the toolkit's 512x1024
# crops and 80k schedule; SN statistics are batch averages (SNBatchStatsHook).
#
# Backbone: mmseg's ResNetV1c default has a deep 3x3 stem; the paper's
# ResNet50 (and every SN ImageNet checkpoint) has the 7x7 stem, so we use
# mmseg's 'ResNet' (ResNetV1b) so that the whole backbone loads pretrained.
_base_ = [
    'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py',
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

train_dataloader = dict(batch_size=1)

# The one line that sets weight decay for SN (gamma, beta, importance logits) and every other norm
# layer; 1.0 keeps the toolkit's decay on them (the paper changed only the normalization layers
# of its segmentation code, Appendix E).
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=1.))

img_ratios = [1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadImageFromFile', backend_args=None),
    dict(
        type='TestTimeAug',
        transforms=[
            [dict(type='Resize', scale_factor=r, keep_ratio=True) for r in img_ratios],
            [dict(type='RandomFlip', prob=0., direction='horizontal'),
             dict(type='RandomFlip', prob=1., direction='horizontal')],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
