# I3D ResNet50 with 3D SN (statistics over T, H and W) on Kinetics-400,
# 8 clips per GPU.
# Paper (Luo et al., ICLR 2019), Table 6 and Sec. 4.4: the ResNet50 I3D
# baseline of Wu & He (2018), 32-frame clips sampled with a frame interval of
# 2, 8 clips per GPU, statistics not synchronized across GPUs, finetuned from
# the (8,2) ImageNet SN-ResNet50 inflated to 3D, 10-clip testing:
# 73.5 top-1 / 91.3 top-5.
# Here: the toolkit's I3D schedule (100 epochs) and test pipeline; SN
# statistics are batch averages (SNBatchStatsHook).
_base_ = [
    'mmaction::recognition/i3d/i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb.py',
    '../_base_/sn_runtime.py',
]

model = dict(
    backbone=dict(
        norm_cfg=dict(type='SN3d', using_moving_average=False, requires_grad=True),
        # The SN-ResNet50 (8,2) checkpoint already inflated to this I3D layout
        # (ConvModule names conv1.conv/conv1.sn, 3D kernels), made by sn_plugin's
        # checkpoint converter; mmaction2's own 2D->3D inflation only knows BN names.
        pretrained2d=False,
        pretrained='checkpoints/sn_resnet50_v1_8x2_mmaction2_i3d.pth'))

# The one line that sets weight decay for SN (gamma, beta, importance logits) and every other norm
# layer; 1.0 keeps the toolkit's decay on them.
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=1.))
