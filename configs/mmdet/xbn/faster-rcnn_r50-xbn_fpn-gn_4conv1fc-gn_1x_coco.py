# Faster R-CNN R50-FPN, 1x schedule, XBNBlock-ResNet50 backbone fine-tuned with frozen BNs and
# trainable GNs (as faster-rcnn_r50-xbn_fpn_1x_coco.py), GroupNorm (32 groups) in the FPN and in
# a 4conv1fc box head.
# Paper (Huang et al., CVPR 2022), Table 5, "4conv1fc head box" (GN applied to the FPN and the
# box head, following the GN paper): 38.47 box AP on COCO val2017 (frozen-BN ResNet-50: 36.85,
# GN: 37.86); 8 GPUs x 2 images, 1x (90k iterations).
# Here: mmdet's 1x schedule (12 epochs).
_base_ = './faster-rcnn_r50-xbn_fpn_1x_coco.py'

norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg)))
