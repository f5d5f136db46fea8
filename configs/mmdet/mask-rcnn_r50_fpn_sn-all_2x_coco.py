# Mask R-CNN R50-FPN, 2x schedule, SN everywhere: backbone, FPN, 4conv1fc box
# head and mask head.
# Paper, Table 4 "SN | SN" and Appendix D setting-3: 8 GPUs x 2 images,
# shorter side 800, the 1x schedule twice as long (2x), weight decay 0 for the
# norm layers' gamma/beta, backbone finetuned from the (8,2) ImageNet
# SN-ResNet50: 41.0 box AP / 36.5 mask AP on COCO.
# Here: the toolkit's 2x schedule (24 epochs, steps at 16 and 22).
_base_ = [
    'mmdet::mask_rcnn/mask-rcnn_r50_fpn_2x_coco.py',
    '../_base_/sn_runtime.py',
]

norm_cfg = dict(type='SN', using_moving_average=False, requires_grad=True)
model = dict(
    backbone=dict(
        norm_cfg=norm_cfg,
        norm_eval=False,
        # An SN-ResNet50 (8,2) checkpoint in the OpenMMLab ResNet layout, made by
        # sn_plugin's checkpoint converter.
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/sn_resnet50_v1_8x2_mmdet.pth')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

# The one line that sets weight decay for SN (gamma, beta, importance logits) and every other norm layer.
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=0.))
