# Mask R-CNN, ResNet-50-FPN, 2x schedule: frozen-BN backbone (ImageNet BN ResNet-50, FPN
# without norm) + SN 4conv1fc box head + SN mask head. LazyConfig version of
# mask_rcnn_R_50_FPN_2x_frozenbn_snhead.yaml; train with tools/lazyconfig_train_net_d2.py.
#
# Paper (Luo et al., ICLR 2019), Table 4 "Mask R-CNN using ResNet50 and FPN with 2x LR
# schedule. BN† represents BN is frozen without finetuning": backbone BN†, head SN:
# 40.0 box AP / 34.8 mask AP. (8 GPUs x 2 images, LR 0.02; 2x = 180k iterations, LR
# decays at 120k and 160k.)
from detectron2.model_zoo import get_config

from ..common.models.mask_rcnn_fpn_sn import model
from ..common.optim import SGD as optimizer
from ..common.train import train

dataloader = get_config("common/data/coco.py").dataloader
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_2x
train.max_iter = 180000

train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
