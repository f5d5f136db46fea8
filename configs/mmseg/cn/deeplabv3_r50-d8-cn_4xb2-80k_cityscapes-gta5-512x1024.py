# DeepLabV3 with a dilated ResNet-50 (output stride 8) and Consistent Normalization, trained on
# Cityscapes and GTA5 together with one CN branch per dataset.
# Paper (Zhou, Ma, Li, Zhang, Luo, "Towards Improving Generalization of Deep Networks via
# Consistent Normalization"), Sec. 5.2 and Table 6: DeepLab, ResNet-50, output stride 8 (atrous
# rates 2 and 4 in the last two stages), poly learning rate (power 0.9), auxiliary loss weight
# 0.4; Cityscapes' 2975 training images plus as many GTA5 images; Cityscapes val mIoU: 70.7 with
# CN (BN on Cityscapes only: 69.8; BN on Cityscapes + GTA5: 60.9).
# Here: mmseg's DeepLabV3 R50-D8 Cityscapes recipe (4 GPUs x 2 images, 512x1024 crops, 80k
# iterations; the paper cites DeepLab v2's ASPP, mmseg has V3's). CN replaces every BN, the
# stem's and the shortcuts' too, in the backbone, the ASPP head and the auxiliary head; every
# sample is tagged with its dataset (CNBranchTag) and normalized by that dataset's branch, each
# batch drawn from one dataset (the paper does not say how it mixed them); evaluation on
# Cityscapes uses the Cityscapes branch (0). The BN branches take per-GPU
# statistics: SyncBN cannot work per branch, because a GPU whose batch has no sample of a
# dataset does not run that branch, which the other GPUs would wait for.
# GTA5 (data/gta5/images/*.png, data/gta5/labels/*.png): its labels are Cityscapes label ids;
# convert them to Cityscapes train ids first (e.g. with cityscapesscripts' id2label), saved as
# labels/<name>_labelTrainIds.png. The first 2975 images are used.
_base_ = ['mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py']

custom_imports = dict(imports=['sn_plugin.integrations.openmmlab'], allow_failed_imports=False)

crop_size = (512, 1024)
norm_cfg = dict(type='CN', num_branches=2, requires_grad=True)
model = dict(
    _delete_=True,
    type='ConsistentNormModel',  # a branch per sample by its 'cn_tag'; evaluates with test_branch
    model=dict(
        type='EncoderDecoder',  # its data_preprocessor: the base's (ConsistentNormModel hands it over)
        backbone=dict(
            type='ResNetV1c',
            depth=50,
            num_stages=4,
            out_indices=(0, 1, 2, 3),
            dilations=(1, 1, 2, 4),
            strides=(1, 2, 1, 1),
            norm_cfg=norm_cfg,
            norm_eval=False,
            style='pytorch',
            contract_dilation=True,
            # An ImageNet BN checkpoint: every CN branch starts from its BN.
            init_cfg=dict(type='Pretrained', checkpoint='open-mmlab://resnet50_v1c')),
        decode_head=dict(
            type='ASPPHead',
            in_channels=2048,
            in_index=3,
            channels=512,
            dilations=(1, 12, 24, 36),
            dropout_ratio=0.1,
            num_classes=19,
            norm_cfg=norm_cfg,
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
        auxiliary_head=dict(
            type='FCNHead',
            in_channels=1024,
            in_index=2,
            channels=256,
            num_convs=1,
            concat_input=False,
            dropout_ratio=0.1,
            num_classes=19,
            norm_cfg=norm_cfg,
            align_corners=False,
            loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
        train_cfg=dict(),
        test_cfg=dict(mode='whole')),
    branch_of=dict(cityscapes=0, gta5=1),
    test_branch=0)

# The base's training pipeline with the dataset's tag, packed into every data sample.
pack_keys = ('img_path', 'seg_map_path', 'ori_shape', 'img_shape', 'pad_shape', 'scale_factor', 'flip',
             'flip_direction', 'reduce_zero_label', 'cn_tag')
augmentation = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(2048, 1024), ratio_range=(0.5, 2.0), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
]
cityscapes_train = dict(
    type='CityscapesDataset',
    data_root='data/cityscapes/',
    data_prefix=dict(img_path='leftImg8bit/train', seg_map_path='gtFine/train'),
    pipeline=augmentation + [dict(type='CNBranchTag', tag='cityscapes'),
                             dict(type='PackSegInputs', meta_keys=pack_keys)])
gta5_train = dict(
    type='CityscapesDataset',  # GTA5's classes are Cityscapes'
    data_root='data/gta5/',
    data_prefix=dict(img_path='images', seg_map_path='labels'),
    img_suffix='.png',
    seg_map_suffix='_labelTrainIds.png',
    indices=2975,  # as many images as Cityscapes' training set
    pipeline=augmentation + [dict(type='CNBranchTag', tag='gta5'),
                             dict(type='PackSegInputs', meta_keys=pack_keys)])
train_dataloader = dict(
    dataset=dict(_delete_=True, type='ConcatDataset', datasets=[cityscapes_train, gta5_train]),
    # Each batch from one dataset: a batch split between the two branches would give a BN branch a
    # single image, whose 1x1 ASPP image-pooling features BN cannot normalize in training.
    batch_sampler=dict(type='SourceBatchSampler'))

# A batch without a GTA5 (or Cityscapes) sample leaves that branch unused.
find_unused_parameters = True
