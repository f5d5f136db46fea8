"""A ResNet v1 + SN in the authors' released layout, built from the facts of the released code.

The other checkpoint tests import the builders here; the tests in this file check
the fixture itself: its SN layer is the authors' formula (population-variance
version = our SwitchNorm2d; unbiased version = the released one) and its
checkpoint has the released shapes and the ``module.`` prefix.
"""
import math

import pytest
import torch
from torch import nn

from sn_plugin import SwitchNorm2d
from sn_plugin.checkpoints.resnet import ResNetSpec


class ReleasedSwitchNorm(nn.Module):
    """The released SN layer: (1, C, 1, 1) affine, (1, C, 1) statistics, logits [IN, LN(, BN)].

    ``unbiased=True`` is the released convention: the IN variance divides by H*W - 1
    and the LN/BN variances are derived from it (Eq. 4 of the paper on that variance).
    Only eval mode is needed here.
    """

    def __init__(self, channels: int, using_bn: bool = True, unbiased: bool = True):
        super().__init__()
        self.unbiased, self.using_bn, self.eps = unbiased, using_bn, 1e-5
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3 if using_bn else 2))
        self.var_weight = nn.Parameter(torch.ones(3 if using_bn else 2))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(1, channels, 1))
            self.register_buffer("running_var", torch.zeros(1, channels, 1))

    def forward(self, x):
        n, c, h, w = x.shape
        x = x.reshape(n, c, -1).double()
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True, unbiased=self.unbiased)
        mean_ln = mean_in.mean(1, keepdim=True)
        var_ln = (var_in + mean_in ** 2).mean(1, keepdim=True) - mean_ln ** 2
        means, variances = [mean_in, mean_ln], [var_in, var_ln]
        if self.using_bn:
            means.append(self.running_mean.double())
            variances.append(self.running_var.double())
        mw = self.mean_weight.double().softmax(0)
        vw = self.var_weight.double().softmax(0)
        mean = sum(w * m for w, m in zip(mw, means))
        var = sum(w * v for w, v in zip(vw, variances))
        x = ((x - mean) / (var + self.eps).sqrt()).reshape(n, c, h, w)
        return (x * self.weight.double() + self.bias.double()).float()


class ReleasedBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride, downsample, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.sn1 = norm(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.sn2 = norm(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.sn3 = norm(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        out = self.sn1(self.conv1(x)).relu()
        out = self.sn2(self.conv2(out)).relu()
        out = self.sn3(self.conv3(out))
        return (out + (x if self.downsample is None else self.downsample(x))).relu()


class ReleasedResNetV1(nn.Module):
    """resnetv1sn50/101 of the authors' code (torchvision-style v1, stride on the 3x3 conv).

    ``norm`` (channels -> module) replaces the released SN layer, e.g. by our
    SwitchNorm2d: the module names stay the released ones (= mmdet's ResNet's).
    """

    def __init__(self, depth=50, num_classes=10, using_bn=True, unbiased=True, norm=None):
        super().__init__()
        blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
        if norm is None:
            def norm(c):
                return ReleasedSwitchNorm(c, using_bn, unbiased)

        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.sn1 = norm(64)
        inplanes = 64
        for stage, (planes, count) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
            stride = 1 if stage == 1 else 2
            downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride, bias=False), norm(planes * 4))
            layers = [ReleasedBottleneck(inplanes, planes, stride, downsample, norm)]
            layers += [ReleasedBottleneck(planes * 4, planes, 1, None, norm) for _ in range(1, count)]
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
            inplanes = planes * 4
        self.fc = nn.Linear(2048, num_classes)

    def features(self, x):
        """The outputs of layer1..4 (what a detection backbone returns)."""
        x = nn.functional.max_pool2d(self.sn1(self.conv1(x)).relu(), 3, 2, 1)
        outs = []
        for stage in range(1, 5):
            x = getattr(self, f"layer{stage}")(x)
            outs.append(x)
        return outs

    def forward(self, x):
        return self.fc(self.features(x)[-1].mean((2, 3)))


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights everywhere, including SN logits and statistics (positive variances)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
            elif name.endswith("running_mean") or name.endswith("bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
            elif name.endswith("mean_weight") or name.endswith("var_weight"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.dim() == 4 and t.shape[0] == 1:  # SN gamma (1, C, 1, 1)
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif t.dim() >= 2:
                fan_in = math.prod(t.shape[1:])
                t.copy_(torch.randn(t.shape, generator=g) * math.sqrt(2.0 / fan_in))
    return model.eval()


def released_checkpoint(model: nn.Module) -> dict:
    """The dict the authors' training script saved: DataParallel ``module.`` keys plus training state."""
    state = {f"module.{k}": v.clone() for k, v in model.state_dict().items()}
    return {"epoch": 100, "best_prec1": 76.92, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}}


def synthetic_released(depth, dtype=torch.float32):
    """A released-layout state dict of any depth, shapes from the canonical spec (no model needed)."""
    state = {}
    for m in ResNetSpec(depth).modules():
        if m.kind == "conv":
            state[f"module.{m.name}.weight"] = torch.randn(m.out_channels, m.in_channels, m.kernel, m.kernel)
        elif m.kind == "norm":
            c = m.out_channels
            layer = {"weight": torch.rand(1, c, 1, 1), "bias": torch.rand(1, c, 1, 1), "mean_weight": torch.randn(3),
                     "var_weight": torch.randn(3), "running_mean": torch.randn(1, c, 1),
                     "running_var": torch.rand(1, c, 1)}
            state.update({f"module.{m.name}.{p}": t for p, t in layer.items()})
        else:
            state["module.fc.weight"] = torch.randn(1000, m.in_channels)
            state["module.fc.bias"] = torch.randn(1000)
    return {"state_dict": {k: v.to(dtype) for k, v in state.items()}}


@torch.no_grad()
def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b|: the relative error of a feature map, robust to zero entries."""
    return float((a - b).abs().max() / b.abs().max()) if a.numel() else 0.0


@pytest.mark.parametrize("using_bn", [True, False])
def test_population_variance_fixture_equals_our_switchnorm(using_bn):
    torch.manual_seed(0)
    ref = randomize(ReleasedSwitchNorm(8, using_bn, unbiased=False))
    ours = SwitchNorm2d(8, using_bn=using_bn).eval()
    ours.load_state_dict({k: v.reshape(-1) if k not in ("mean_weight", "var_weight") else v
                          for k, v in ref.state_dict().items()}, strict=False)
    if using_bn:
        ours.num_batches_tracked.fill_(1)
    x = torch.randn(2, 8, 5, 6) * 3 + 1
    assert max_rel_err(ours(x), ref(x)) < 1e-5


def test_unbiased_fixture_differs_by_the_in_variance_factor():
    torch.manual_seed(0)
    biased = randomize(ReleasedSwitchNorm(4, using_bn=False, unbiased=False))
    unbiased = ReleasedSwitchNorm(4, using_bn=False, unbiased=True).eval()
    unbiased.load_state_dict(biased.state_dict())
    with torch.no_grad():  # IN only, gamma 1, beta 0: the outputs differ by sqrt((S-1)/S)
        for m in (biased, unbiased):
            m.mean_weight.copy_(torch.tensor([30.0, 0.0]))
            m.var_weight.copy_(torch.tensor([30.0, 0.0]))
            m.weight.fill_(1)
            m.bias.zero_()
    x = torch.randn(1, 4, 3, 3)
    ratio = unbiased(x) / biased(x)
    assert torch.allclose(ratio, torch.full_like(ratio, math.sqrt(8 / 9)), atol=1e-4)


def test_released_checkpoint_has_the_released_shapes():
    ckpt = released_checkpoint(ReleasedResNetV1(50))
    state = ckpt["state_dict"]
    assert all(k.startswith("module.") for k in state)
    assert state["module.sn1.weight"].shape == (1, 64, 1, 1)
    assert state["module.layer1.0.downsample.1.running_var"].shape == (1, 256, 1)
    assert state["module.layer4.2.sn3.mean_weight"].shape == (3,)
    assert sum(k.endswith(".mean_weight") for k in state) == 53
    no_bn = released_checkpoint(ReleasedResNetV1(50, using_bn=False))["state_dict"]
    assert no_bn["module.sn1.var_weight"].shape == (2,)
    assert not any("running" in k for k in no_bn)
