# Faster R-CNN, ResNet-50-FPN, 1x schedule, SN everywhere: SN backbone (fine-tuned; stem and
# res2 frozen as in detectron2), SN FPN, SN 4conv1fc box head. LazyConfig version of
# faster_rcnn_R_50_FPN_1x_sn.yaml; train with tools/lazyconfig_train_net_d2.py.
#
# Paper (Luo et al., ICLR 2019), Table 3 "Faster R-CNN+FPN using ResNet50 and FPN with 1x
# LR schedule": backbone SN, head SN: 39.3 AP. "When finetuning the SN backbone, SN obtains
# a significant improvement of 1.1 AP over GN (39.3 v.s. 38.2)." Appendix D: "All models of
# SN are finetuned from (8, 2) in ImageNet" (8 GPUs x 2 images, 1x = LR 0.02, steps
# 60k/80k, 90k iterations).
#
# train.init_checkpoint: the released SN ResNet-50 (8, 2) ImageNet model converted to
# detectron2's format (see docs/detectron2.md); RGB inputs, ImageNet mean/std.
from detectron2.config import LazyConfig
from detectron2.model_zoo import get_config

# The Mask R-CNN config of the same setting, without the mask branch, on the 1x schedule.
dataloader, model, optimizer, train = LazyConfig.load_rel(
    "../COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.py", ("dataloader", "model", "optimizer", "train"))
for key in ("mask_in_features", "mask_pooler", "mask_head"):
    model.roi_heads.pop(key)
dataloader.train.mapper.use_instance_mask = False
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train.max_iter = 90000
