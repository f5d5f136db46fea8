# SN-ResNet50 on ImageNet-1k, batch setting (8, 2): 8 GPUs x 2 images.
# Paper, Appendix C.1 and Table 2: the (8, 32) recipe with the learning rate
# scaled linearly with the batch (0.1 x 16 / 256 = 0.00625): 75.6 top-1 (Table 2).
# The (8, 2) model is the one the paper finetunes for detection,
# segmentation and video (the checkpoints the other configs here load).
_base_ = './resnet50-sn_8xb32_in1k.py'

train_dataloader = dict(batch_size=2)
optim_wrapper = dict(optimizer=dict(lr=0.1 * 16 / 256))
auto_scale_lr = dict(base_batch_size=16)
