# Faster R-CNN R50-FPN, 1x schedule, SN in the backbone, the FPN and the
# 4conv1fc box head.
# Paper (Luo et al., ICLR 2019), Table 3 "SN | SN" and Appendix D setting-2:
# 8 GPUs x 2 images, shorter side 800, LR 0.02 dropped x0.1 at 60k and 80k of
# 90k iterations (1x), weight decay 1e-4 but 0 for the norm layers' gamma/beta,
# backbone finetuned from the (8,2) ImageNet SN-ResNet50: 39.3 box AP on COCO.
# Here: the toolkit's 1x schedule (12 epochs, steps at 8 and 11), SN with the
# paper's batch-average statistics (SNBatchStatsHook) instead of moving averages.
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    '../_base_/sn_runtime.py',
]

norm_cfg = dict(type='SN', using_moving_average=False, requires_grad=True)
model = dict(
    backbone=dict(
        norm_cfg=norm_cfg,
        norm_eval=False,
        # An SN-ResNet50 (8,2) checkpoint in the OpenMMLab ResNet layout (layers
        # named conv1/sn1/layer1.0.sn1...), made by sn_plugin's checkpoint converter.
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/sn_resnet50_v1_8x2_mmdet.pth')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg)))

# The one line that sets weight decay for SN (gamma, beta, importance logits) and every other norm layer.
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=0.))
