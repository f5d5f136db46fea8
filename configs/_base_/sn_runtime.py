# What every OpenMMLab config here shares (mmdet, mmseg, mmaction2, mmpretrain):
# the adapter that registers SN, and the paper's batch-average statistics.
# A leaf inherits it next to its toolkit's base:
#     _base_ = ['mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/sn_runtime.py']
# mmengine refuses a key defined in two bases, so what the toolkit bases define
# too stays in the leaf: `optim_wrapper` (the SN optimizer constructor) and `norm_cfg`.
custom_imports = dict(imports=['sn_plugin.integrations.openmmlab'], allow_failed_imports=False)

custom_hooks = [
    # Paper, Sec. 2.1: at test time BN uses the batch average of its statistics after
    # training, not a moving average (build SN with using_moving_average=False).
    dict(type='SNBatchStatsHook', num_batches=200),
    # The per-stage importance weights (the paper's Fig. 7), to the visualizer.
    dict(type='SNWeightLoggerHook', interval=50),
]
