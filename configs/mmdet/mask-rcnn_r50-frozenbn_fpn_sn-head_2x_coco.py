# Mask R-CNN R50-FPN, 2x schedule, frozen-BN backbone (ImageNet BN ResNet50,
# frozen), SN in the FPN, the 4conv1fc box head and the mask head.
# Paper, Table 4 "BN* | SN" (8 GPUs x 2 images, 2x): 40.0 box AP / 34.8 mask AP.
_base_ = './mask-rcnn_r50_fpn_sn-all_2x_coco.py'

model = dict(
    backbone=dict(
        norm_cfg=dict(_delete_=True, type='BN', requires_grad=False),
        norm_eval=True,
        init_cfg=dict(type='Pretrained', checkpoint='torchvision://resnet50')))
