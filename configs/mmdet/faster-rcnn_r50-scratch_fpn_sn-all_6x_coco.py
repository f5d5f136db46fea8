# Faster R-CNN R50-FPN trained from scratch with SN everywhere (backbone, FPN,
# 4conv1fc box head): no pretrained weights, all stages trainable, 6x schedule,
# as the toolkit's scratch GN config it inherits.
# Paper, Appendix D / Table 7 ("SN | SN" trained from scratch): SN makes COCO
# trainable without ImageNet pre-training; 29.5 AP in the paper's setting-1
# (Faster R-CNN C4 in PyTorch, 4 GPUs x 3 images, 600px), which this FPN
# config does not replicate exactly.
_base_ = [
    'mmdet::scratch/faster-rcnn_r50-scratch_fpn_gn-all_6x_coco.py',
    '../_base_/sn_runtime.py',
]

norm_cfg = dict(_delete_=True, type='SN', using_moving_average=False, requires_grad=True)
model = dict(
    # norm_eval=False: the base's norm_eval=True (meant for frozen BN) would also freeze SN.
    backbone=dict(norm_cfg=norm_cfg, norm_eval=False),
    neck=dict(norm_cfg=norm_cfg),
    roi_head=dict(bbox_head=dict(norm_cfg=norm_cfg)))

# The one line that sets weight decay for SN (gamma, beta, importance logits) and every other norm layer.
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=0.))
