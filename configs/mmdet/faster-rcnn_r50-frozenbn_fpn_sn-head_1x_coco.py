# Faster R-CNN R50-FPN, 1x schedule, frozen-BN backbone (ImageNet BN ResNet50,
# BN statistics and affine parameters frozen), SN in the FPN and the 4conv1fc
# box head.
# Paper, Table 3 "BN* | SN" (setting-2 of Appendix D: 8 GPUs x 2 images, 1x,
# weight decay 0 for gamma/beta): 38.0 box AP on COCO.
_base_ = './faster-rcnn_r50_fpn_sn-all_1x_coco.py'

model = dict(
    backbone=dict(
        norm_cfg=dict(_delete_=True, type='BN', requires_grad=False),
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')))
