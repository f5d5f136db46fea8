# SN-ResNet50 on ImageNet-1k, batch setting (8, 32): 8 GPUs x 32 images.
# Paper (Luo et al., ICLR 2019), Appendix C.1: SGD with momentum 0.9, weight
# decay 1e-4 on all parameters including gamma and beta, 100 epochs, LR 0.1
# for a batch of 256 divided by 10 after 30, 60 and 90 epochs, gamma 1, beta 0
# and the SN logits 1 at initialization, SN statistics per GPU, batch-average
# statistics for inference: 76.9 top-1 (Table 2).
# This is how SN-ResNet50 backbone checkpoints are produced: every saved
# checkpoint carries batch-average statistics computed by SNBatchStatsHook
# just before it is written (and before each validation and at the end).
_base_ = [
    'mmpretrain::resnet/resnet50_8xb32_in1k.py',
    '../_base_/sn_runtime.py',
]

model = dict(
    backbone=dict(
        norm_cfg=dict(type='SN', using_moving_average=False, requires_grad=True),
        # C.1 initializes every gamma to 1; mmpretrain's default would zero the last one of each block.
        zero_init_residual=False))

# The one line that sets weight decay for SN (gamma, beta, importance logits) and every other norm
# layer: 1.0, i.e. the paper's 1e-4 on all parameters.
optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=1.))
