"""scikit-learn's handwritten digits and small networks, shared by the normalization-family miniatures
(bench_consistent_norm, bench_estimation_shift, bench_xbn_perturbation).

The 1797 8x8 digits ship inside scikit-learn, so these runs need no download.
"""
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as F


@dataclass
class Digits:
    """A fixed train/test split of the digits, standardised with the training images' mean and std."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float  # of the raw [0, 1] training pixels, to undo the standardisation
    std: float


def load_digits(size: int = 16, test_fraction: float = 0.3, flat: bool = False) -> Digits:
    """The digits as (N, 1, size, size) images in [0, 1] (bilinear upsampling of the 8x8 originals),
    or as (N, 64) vectors of the originals with ``flat``; split with a fixed permutation (seed 0)."""
    try:
        from sklearn.datasets import load_digits as sklearn_digits
    except ImportError as error:
        raise SystemExit("this benchmark needs scikit-learn (its digits dataset ships inside it): "
                         "run `make setup`, or `pip install scikit-learn`") from error
    digits = sklearn_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if flat:
        images = images.flatten(1)
    elif size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    test, train = order[: int(len(labels) * test_fraction)], order[int(len(labels) * test_fraction):]
    mean, std = float(images[train].mean()), float(images[train].std())
    images = (images - mean) / std
    return Digits(images[train], labels[train], images[test], labels[test], mean, std)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, chunk: int = 512) -> float:
    """Top-1 (%) of ``model`` in eval mode."""
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(part).argmax(1) for part in x.split(chunk)])
    return float((predictions == y).float().mean()) * 100


Norm = Callable[[int], nn.Module]


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block (torchvision's attribute names), projection shortcut on a shape change."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: Norm) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = norm(out_channels)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                            norm(out_channels))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(self.bn2(self.conv2(out)) + shortcut)


class SmallResNet(nn.Module):
    """A 3x3 stem (``conv1``/``bn1``) and three stages of residual blocks for 16x16 single-channel images.

    ``block(in_channels, width, stride)`` builds one block and has an ``expansion`` attribute
    (1 for :class:`BasicBlock`, 4 for torchvision's ``Bottleneck``).
    """

    def __init__(self, block: Callable[..., nn.Module], expansion: int, widths=(16, 32, 64), blocks_per_stage=1,
                 stem_channels: int = 16, norm: Norm = nn.BatchNorm2d, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, stem_channels, 3, 1, 1, bias=False)
        self.bn1 = norm(stem_channels)
        channels = stem_channels
        for stage, width in enumerate(widths, start=1):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if stage > 1 and i == 0 else 1
                blocks.append(block(channels, width, stride))
                channels = width * expansion
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.stages = len(widths)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        for stage in range(1, self.stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def basic_resnet(norm: Norm = nn.BatchNorm2d) -> SmallResNet:
    """Stem and three stages of one BasicBlock each (16, 32, 64 channels): 9 norm layers."""
    return SmallResNet(lambda c_in, width, stride: BasicBlock(c_in, width, stride, norm), 1, norm=norm)


def bottleneck_resnet(blocks_per_stage: int = 2) -> SmallResNet:
    """Stem and three stages of torchvision Bottlenecks (widths 16, 32, 64; outputs 64, 128, 256), BN everywhere."""
    from torchvision.models.resnet import Bottleneck

    def block(c_in, width, stride):
        downsample = None
        if stride != 1 or c_in != width * Bottleneck.expansion:
            downsample = nn.Sequential(nn.Conv2d(c_in, width * Bottleneck.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(width * Bottleneck.expansion))
        return Bottleneck(c_in, width, stride, downsample)

    return SmallResNet(block, Bottleneck.expansion, blocks_per_stage=blocks_per_stage)
