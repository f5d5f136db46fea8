# Faster R-CNN, ResNet-50-FPN, 1x schedule: frozen-BN backbone (ImageNet BN ResNet-50, FPN
# without norm, as detectron2's baseline) + SN 4conv1fc box head. LazyConfig version of
# faster_rcnn_R_50_FPN_1x_frozenbn_snhead.yaml; train with tools/lazyconfig_train_net_d2.py.
#
# Paper (Luo et al., ICLR 2019), Table 3 "Faster R-CNN+FPN using ResNet50 and FPN with 1x
# LR schedule. BN† represents BN is frozen": backbone BN†, head SN: 38.0 AP. "When using SN
# and GN in the head and BN in the backbone, BN†+SN improves the AP of BN†+GN by 0.8 (from
# 37.2 to 38.0)." (8 GPUs x 2 images; 1x = LR 0.02, steps 60k/80k, 90k iterations.)
from detectron2.config import LazyConfig
from detectron2.model_zoo import get_config

# The Mask R-CNN config of the same setting, without the mask branch, on the 1x schedule.
dataloader, model, optimizer, train = LazyConfig.load_rel(
    "../COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_frozenbn_snhead.py",
    ("dataloader", "model", "optimizer", "train"))
for key in ("mask_in_features", "mask_pooler", "mask_head"):
    model.roi_heads.pop(key)
dataloader.train.mapper.use_instance_mask = False
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_1x
train.max_iter = 90000
