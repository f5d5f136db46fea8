# I3D ResNet50 with 3D SN on Kinetics-400, 4 clips per GPU.
# Paper, Table 6: as the 8-clips-per-GPU setting with 4 clips per GPU:
# 73.3 top-1 / 91.2 top-5 (BN drops to 72.1 / 90.0 at this batch size).
# The learning rate is halved with the batch (linear scaling rule).
_base_ = './i3d_imagenet-pretrained-r50-sn_8xb8-32x2x1-100e_kinetics400-rgb.py'

train_dataloader = dict(batch_size=4)
optim_wrapper = dict(optimizer=dict(lr=0.005))
auto_scale_lr = dict(base_batch_size=32)
