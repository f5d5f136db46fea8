# Mask R-CNN, ResNet-50-FPN, 2x schedule, SN everywhere: SN backbone (fine-tuned; stem and
# res2 frozen as in detectron2), SN FPN, SN 4conv1fc box head, SN mask head. LazyConfig
# version of mask_rcnn_R_50_FPN_2x_sn.yaml; train with tools/lazyconfig_train_net_d2.py.
#
# Paper (Luo et al., ICLR 2019), Table 4 "Mask R-CNN using ResNet50 and FPN with 2x LR
# schedule": backbone SN, head SN: 41.0 box AP / 36.5 mask AP. Appendix D: "All models of
# SN are finetuned from (8, 2) in ImageNet"; "In setting-3, the LR schedule is twice as
# long as the 1x schedule with the LR decay points scaled twofold proportionally, referred
# as 2x schedule." (8 GPUs x 2 images, LR 0.02.)
#
# train.init_checkpoint: the released SN ResNet-50 (8, 2) ImageNet model converted to
# detectron2's format (see docs/detectron2.md). It was trained on RGB inputs normalized by
# the ImageNet mean/std, with the stride in the 3x3 convolution.
from .mask_rcnn_R_50_FPN_2x_frozenbn_snhead import dataloader, lr_multiplier, model, optimizer, train

# The frozen-BN setting with SN in the backbone and the FPN: the heads' SN layers
# (using_moving_average=False). FREEZE_AT 2 makes the stem's and res2's FrozenSwitchNorm.
model.backbone.bottom_up.stem.norm = \
    model.backbone.bottom_up.stages.norm = \
    model.backbone.norm = model.roi_heads.box_head.conv_norm
model.backbone.bottom_up.stages.stride_in_1x1 = False

model.input_format = "RGB"
model.pixel_mean = [123.675, 116.280, 103.530]
model.pixel_std = [58.395, 57.120, 57.375]
dataloader.train.mapper.image_format = "RGB"  # the test mapper takes the train mapper's

train.init_checkpoint = "checkpoints/sn_resnet50_v1_8x2_d2.pkl"
