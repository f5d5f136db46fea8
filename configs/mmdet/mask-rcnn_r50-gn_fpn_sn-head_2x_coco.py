# Mask R-CNN R50-FPN, 2x schedule, GN backbone (the ImageNet GN ResNet50 of
# Detectron, finetuned with GN, as in the toolkit's gn-all config), SN in the
# FPN, the 4conv1fc box head and the mask head.
# Paper, Table 4 "GN | SN" (8 GPUs x 2 images, 2x): 40.4 box AP / 36.0 mask AP.
_base_ = [
    'mmdet::gn/mask-rcnn_r50_fpn_gn-all_2x_coco.py',
    '../_base_/sn_runtime.py',
]

# _delete_ drops the base's GN arguments (num_groups) from the merged dicts.
norm_cfg = dict(_delete_=True, type='SN', using_moving_average=False, requires_grad=True)
model = dict(
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg), mask_head=dict(norm_cfg=norm_cfg)))

# The one line that sets weight decay for SN (gamma, beta, importance logits) and every other norm layer.
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=0.))
