# Faster R-CNN R50-FPN trained from scratch at 2 images per GPU, 1x schedule: XBNBlock-ResNet50
# backbone (XBNBlockGN-P2, stem GN) with ordinary trainable BNs, no pretrained weights, no frozen
# stage; GroupNorm in the FPN and the 4conv1fc box head.
# Paper (Huang et al., CVPR 2022), Sec. 5.3.2 and Table 6, training from scratch with normal
# (not frozen) BN, 1x (90k iterations) on 8 GPUs, best of learning rates {0.01, 0.02, 0.04}:
# 27.45 box AP at 2 images per GPU (BN: 25.35, GN: 28.19); at 4 and 8 images per GPU 30.51 and
# 30.58 (BN: 29.33 / 29.56, GN: 27.36 / 28.22).
# Here: mmdet's 1x schedule (12 epochs) with its learning rate 0.02; the paper does not say which
# norm the FPN and the head use when training from scratch: this config keeps the GN FPN and
# 4conv1fc head of its fine-tuning setting, as mmdet's own scratch configs do; no weight decay on
# norm parameters, as those. For 4 images per GPU: train_dataloader=dict(batch_size=4) and
# optim_wrapper=dict(optimizer=dict(lr=...)) from the paper's grid.
_base_ = './faster-rcnn_r50-xbn_fpn-gn_4conv1fc-gn_1x_coco.py'

model = dict(
    backbone=dict(
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=False,
        frozen_stages=-1,
        init_cfg=None))

optim_wrapper = dict(paramwise_cfg=dict(norm_decay_mult=0.))
