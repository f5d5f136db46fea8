# Mask R-CNN R50-FPN, 1x schedule, XBNBlock-ResNet50 backbone fine-tuned with frozen BNs and
# trainable GNs (XBNBlockGN-P2, stem GN too), GroupNorm (32 groups) in the FPN, the 4conv1fc box
# head and the mask head.
# Paper (Huang et al., CVPR 2022), Table 4 / A4, "4conv1fc head box": 39.57 box AP / 34.86 mask
# AP on COCO val2017 (frozen-BN ResNet-50: 37.51 / 33.68, GN: 39.02 / 34.37); 8 GPUs x 2 images,
# 1x (90k iterations), backbone fine-tuned from the XBNBlockGN ImageNet model.
# Here: mmdet's 1x schedule (12 epochs); the mask head's GN as in the GN configs of
# maskrcnn-benchmark, the paper's codebase; the backbone from a checkpoint of
# configs/mmpretrain/xbn/resnet50-xbn_8xb32_in1k.py.
_base_ = ['mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py']

custom_imports = dict(imports=['sn_plugin.integrations.openmmlab'], allow_failed_imports=False)

norm_cfg = dict(type='GN', num_groups=32, requires_grad=True)
model = dict(
    backbone=dict(
        type='XBNResNet',
        bfn_cfg=dict(type='GN', num_groups=64),
        bfn_position=2,
        stem_bfn=True,
        norm_cfg=dict(type='BN', requires_grad=False),
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='checkpoints/xbn-resnet50_8xb32_in1k.pth', prefix='backbone.')),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(
        bbox_head=dict(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))
