# Mask R-CNN with Switchable Normalization everywhere, trained from scratch at
# 2 images per batch on the built-in synthetic shapes dataset, on CPU.
#
# A miniature of the paper's Appendix D setting (detectors trained from scratch
# with small per-device batches): a ResNet-18 layout at half width, an FPN and
# heads whose convs all carry SN layers, 128x128 images. tools/demo.py (make
# demo) and tools/train_coco_detector.py start from it and fill in the dataset
# and its classes, the backbone's depth and width, the norm layer, the image
# size and the schedule (sn_plugin/apps/coco_detector.py). To run it by hand:
#   python -c "from sn_plugin.data import generate_shapes_dataset as g; g('data/sn_shapes')"
#   python -m mmdet.tools.train configs/demo/mask_rcnn_r18_fpn_sn_shapes.py   # or mmdet's tools/train.py
# The norm layer is one variable: benchmarks/bench_scratch_detection.py swaps
# it for BN and GN with the rest unchanged.
_base_ = ['../_base_/sn_runtime.py']  # custom_imports of the SN adapter, the SN hooks
default_scope = 'mmdet'

# The paper evaluates SN with batch-average statistics (Sec. 2.1):
# SNBatchStatsHook estimates them before every validation and checkpoint.
norm_cfg = dict(type='SN', using_moving_average=False)
classes = ('circle', 'triangle', 'square', 'star', 'cross')  # sn_plugin.data.CLASSES
data_root = 'data/sn_shapes/'
image_size = 128
max_iters = 3000
batch_size = 2

model = dict(
    type='MaskRCNN',
    data_preprocessor=dict(
        type='DetDataPreprocessor', mean=[127.5, 127.5, 127.5], std=[64.0, 64.0, 64.0],
        bgr_to_rgb=True, pad_mask=True, pad_size_divisor=32),
    backbone=dict(
        type='ResNet', depth=18, base_channels=32, num_stages=4, out_indices=(0, 1, 2, 3),
        frozen_stages=-1, norm_cfg=norm_cfg, norm_eval=False, style='pytorch', init_cfg=None),
    neck=dict(type='FPN', in_channels=[32, 64, 128, 256], out_channels=64, num_outs=5, norm_cfg=norm_cfg),
    rpn_head=dict(
        type='RPNHead', in_channels=64, feat_channels=64,
        # objects are 15-51 px: anchors of 16 px at stride 4 up to 256 px at stride 64
        anchor_generator=dict(type='AnchorGenerator', scales=[4], ratios=[0.5, 1.0, 2.0],
                              strides=[4, 8, 16, 32, 64]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
                        target_stds=[1.0, 1.0, 1.0, 1.0]),
        loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0),
        loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
    roi_head=dict(
        type='StandardRoIHead',
        bbox_roi_extractor=dict(
            type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=7, sampling_ratio=0),
            out_channels=64, featmap_strides=[4, 8, 16, 32]),
        # The RoI heads' convs cost most of the compute on CPU (they run once per
        # sampled RoI), hence two narrow convs in each head.
        bbox_head=dict(
            type='ConvFCBBoxHead', num_shared_convs=2, num_shared_fcs=1, in_channels=64, conv_out_channels=32,
            fc_out_channels=128, roi_feat_size=7, num_classes=len(classes), norm_cfg=norm_cfg,
            bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[0.0, 0.0, 0.0, 0.0],
                            target_stds=[0.1, 0.1, 0.2, 0.2]),
            reg_class_agnostic=False,
            loss_cls=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0),
            loss_bbox=dict(type='L1Loss', loss_weight=1.0)),
        mask_roi_extractor=dict(
            type='SingleRoIExtractor', roi_layer=dict(type='RoIAlign', output_size=14, sampling_ratio=0),
            out_channels=64, featmap_strides=[4, 8, 16, 32]),
        mask_head=dict(
            type='FCNMaskHead', num_convs=2, in_channels=64, conv_out_channels=32,
            num_classes=len(classes), norm_cfg=norm_cfg,
            loss_mask=dict(type='CrossEntropyLoss', use_mask=True, loss_weight=1.0))),
    train_cfg=dict(
        rpn=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.7, neg_iou_thr=0.3, min_pos_iou=0.3,
                          match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type='RandomSampler', num=128, pos_fraction=0.5, neg_pos_ub=-1,
                         add_gt_as_proposals=False),
            allowed_border=-1, pos_weight=-1, debug=False),
        rpn_proposal=dict(nms_pre=1000, max_per_img=500, nms=dict(type='nms', iou_threshold=0.7),
                          min_bbox_size=0),
        rcnn=dict(
            assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.5, min_pos_iou=0.5,
                          match_low_quality=True, ignore_iof_thr=-1),
            sampler=dict(type='RandomSampler', num=64, pos_fraction=0.25, neg_pos_ub=-1,
                         add_gt_as_proposals=True),
            mask_size=28, pos_weight=-1, debug=False)),
    test_cfg=dict(
        rpn=dict(nms_pre=500, max_per_img=100, nms=dict(type='nms', iou_threshold=0.7), min_bbox_size=0),
        rcnn=dict(score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=20,
                  mask_thr_binary=0.5)))

dataset_type = 'CocoDataset'
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True, with_mask=True),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(image_size, image_size), keep_ratio=True),
    dict(type='PackDetInputs', meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor')),
]
train_dataloader = dict(
    batch_size=batch_size, num_workers=0, persistent_workers=False,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    batch_sampler=dict(type='AspectRatioBatchSampler'),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=dict(classes=classes),
        ann_file='annotations/instances_train.json', data_prefix=dict(img='train/'),
        filter_cfg=dict(filter_empty_gt=True, min_size=4), pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=4, num_workers=0, persistent_workers=False, drop_last=False,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type, data_root=data_root, metainfo=dict(classes=classes),
        ann_file='annotations/instances_val.json', data_prefix=dict(img='val/'),
        test_mode=True, pipeline=test_pipeline))
test_dataloader = val_dataloader
# One CocoMetric per kind: with both kinds in one metric, CocoMetric's per-class
# keys ('<class>_precision') of the mask AP overwrite those of the box AP.
val_evaluator = [
    dict(type='CocoMetric', ann_file=data_root + 'annotations/instances_val.json', metric=kind,
         classwise=True, format_only=False, prefix=kind)
    for kind in ('bbox', 'segm')
]
test_evaluator = val_evaluator

train_cfg = dict(type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')

optim_wrapper = dict(
    type='OptimWrapper', constructor='SNOptimWrapperConstructor',
    optimizer=dict(type='SGD', lr=0.02, momentum=0.9, weight_decay=1e-4),
    paramwise_cfg=dict(norm_decay_mult=0.0),  # the paper: no weight decay on gamma/beta (and SN's logits)
    clip_grad=dict(max_norm=10.0, norm_type=2))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=200),
    dict(type='CosineAnnealingLR', by_epoch=False, begin=200, end=max_iters, T_max=max_iters - 200,
         eta_min=2e-4),
]

custom_hooks = [  # the base's hooks, with statistics averaged over 50 batches (100 of the 1000 images)
    dict(type='SNBatchStatsHook', num_batches=50),
    dict(type='SNWeightLoggerHook', interval=50),
]
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=max_iters, max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='DetVisualizationHook'))
env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
               dist_cfg=dict(backend='gloo'))
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='DetLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(type='LogProcessor', window_size=20, by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=0, deterministic=False)
