# The model every SN detection config here starts from (the LazyConfig counterpart of
# Base-SN-RCNN-FPN.yaml's MODEL part): detectron2's Mask R-CNN R50-FPN
# (common/models/mask_rcnn_fpn.py in its model zoo) with SN in the RoI heads, a 4conv1fc
# box head and the 4conv mask head. The backbone is detectron2's (frozen BN, stem and res2
# frozen: FREEZE_AT 2); the leaf configs change it.
#
# Paper (Luo et al., ICLR 2019, Sec. 2.1): "When applying SN in test, the statistics of IN
# and LN are computed independently for each sample, while BN uses batch average after
# training without computing moving average in each iteration." Hence
# using_moving_average=False, and the train config's SNBatchStatsHook.
from detectron2.config import LazyCall as L
from detectron2.model_zoo import get_config

from sn_plugin.integrations.detectron2 import sn_norm

model = get_config("common/models/mask_rcnn_fpn.py").model

model.backbone.bottom_up.freeze_at = 2

model.roi_heads.box_head.conv_dims = [256, 256, 256, 256]
model.roi_heads.box_head.fc_dims = [1024]
model.roi_heads.box_head.conv_norm = \
    model.roi_heads.mask_head.conv_norm = L(sn_norm)(using_moving_average=False)
