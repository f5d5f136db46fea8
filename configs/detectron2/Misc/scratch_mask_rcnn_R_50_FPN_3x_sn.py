# Mask R-CNN, ResNet-50-FPN, SN everywhere, trained from random initialization with a 3x
# schedule, like detectron2's Misc/scratch_mask_rcnn_R_50_FPN_3x_gn.yaml (nothing frozen).
# LazyConfig version of scratch_mask_rcnn_R_50_FPN_3x_sn.yaml; train with
# tools/lazyconfig_train_net_d2.py.
#
# Paper (Luo et al., ICLR 2019), Appendix D: "SN and GN allow us to train COCO from scratch
# without pretraining on ImageNet, and they still achieve competitive results. For
# instance, 29.5 of SN outperforms BN by a large margin of 9.5 AP and GN by 1.2 AP."
# (Table 7, Faster R-CNN; this config applies the same idea to Mask R-CNN R50-FPN, for which
# the paper gives no number.) 3x = 270k iterations, LR decays at 210k and 250k.
from detectron2.config import LazyConfig
from detectron2.model_zoo import get_config

dataloader, model, optimizer, train = LazyConfig.load_rel(
    "../COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.py", ("dataloader", "model", "optimizer", "train"))
model.backbone.bottom_up.freeze_at = 0
train.init_checkpoint = ""
lr_multiplier = get_config("common/coco_schedule.py").lr_multiplier_3x
train.max_iter = 270000
