"""Checkpoint conversion with torch only: outputs, round trips, inflation, BN starts, bad input.

The fixture network (tests/test_checkpoints_fixtures.py) is the authors' ResNet-v1 + SN
in the released layout; "ours" is the same architecture with our SwitchNorm2d,
whose module names are those of mmdet's ResNet. The toolkits' own ResNets are
tested in test_checkpoints_toolkits.py.
"""
import functools
import hashlib
import re

import pytest
import torch
import torchvision
from torch import nn

from sn_plugin import SwitchNorm2d, convert_to_sn
from sn_plugin.checkpoints import (DEFAULT_BN_START_WEIGHT, CheckpointError, bn_to_sn, i3d_temporal_kernels,
                                   released_to, to_released)
from sn_plugin.checkpoints.resnet import ResNetSpec
from test_checkpoints_fixtures import (ReleasedResNetV1, max_rel_err, randomize, released_checkpoint,
                                      synthetic_released)

INPUT = (2, 3, 64, 64)


def _ours(using_bn=True, num_classes=10, unbiased_instance_var=False):
    def norm(channels):
        return SwitchNorm2d(channels, using_bn=using_bn, unbiased_instance_var=unbiased_instance_var)

    return ReleasedResNetV1(50, num_classes, norm=norm).eval()


@functools.lru_cache(maxsize=None)
def _released(using_bn):
    """(fixture network in the released layout, its checkpoint, using_bn); built once per variant."""
    torch.manual_seed(0)
    net = randomize(ReleasedResNetV1(50, using_bn=using_bn, unbiased=True))
    return net, released_checkpoint(net), using_bn


@pytest.fixture(scope="module", params=[True, False], ids=["with_bn", "without_bn"])
def released(request):
    return _released(request.param)


@pytest.fixture(scope="module")
def one_released():
    """For the tests one variant is enough for."""
    return _released(True)


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ outputs

def test_converted_network_reproduces_the_fixture(released):
    """Population-variance fixture: 1e-4. Released (unbiased IN variance) fixture: the measured gap."""
    net, ckpt, using_bn = released
    converted, summary = released_to(ckpt, "mmdet")
    assert summary.missing == [] and summary.depth == 50
    ours = _ours(using_bn)
    missing, unexpected = ours.load_state_dict(converted["state_dict"], strict=False)
    assert missing == ["fc.weight", "fc.bias"] and unexpected == []
    assert converted["meta"]["sn_plugin"]["using_bn"] is using_bn
    assert converted["meta"]["sn_plugin"]["unbiased_instance_var"] is True

    population = ReleasedResNetV1(50, using_bn=using_bn, unbiased=False).eval()
    population.load_state_dict(net.state_dict())
    x = torch.randn(INPUT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = ours.features(x)
        for got, want in zip(features, population.features(x)):
            assert max_rel_err(got, want) < 1e-4
        # The released H*W-1 convention is visible on small maps (layer4 is 2x2 here): documented.
        gap = max_rel_err(features[-1], net.features(x)[-1])
    assert gap > 1e-3


def test_released_convention_reproduces_the_released_network(released):
    """With unbiased_instance_var=True our SN layers compute the released ones: logits to 1e-4."""
    net, ckpt, using_bn = released
    converted, _ = released_to(ckpt, "mmpretrain")
    ours = _ours(using_bn, unbiased_instance_var=True)
    ours.load_state_dict({k.replace("backbone.", "").replace("head.", ""): v
                          for k, v in converted["state_dict"].items()})
    x = torch.randn(INPUT, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert max_rel_err(ours(x), net(x)) < 1e-4


def test_segmentation_repo_format_without_prefix(released):
    """The (8, 2) file of SwitchNorm_Segmentation: 'module.' already stripped; also a bare state dict."""
    _, ckpt, _ = released
    stripped = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}
    reference, _ = released_to(ckpt, "mmdet")
    for source in ({"state_dict": stripped}, stripped):
        converted, summary = released_to(source, "mmdet")
        assert summary.missing == []
        assert converted["state_dict"].keys() == reference["state_dict"].keys()
        assert all(torch.equal(v, reference["state_dict"][k]) for k, v in converted["state_dict"].items())


def test_summary_reports_dropped_fc_and_optimizer(released):
    _, ckpt, _ = released
    _, summary = released_to(ckpt, "detectron2")
    dropped = dict(summary.dropped)
    assert set(dropped) == {"module.fc.weight", "module.fc.bias", "optimizer"}
    assert len(summary.mapped) == len(ckpt["state_dict"]) - 2 + (53 if "module.sn1.running_var" in
                                                                  ckpt["state_dict"] else 0)
    text = summary.report()
    assert "dropped  module.fc.weight" in text and "0 missing" in text


# ------------------------------------------------------------------------------------ round trips

def test_round_trip_through_mmpretrain_is_exact(released, tmp_path):
    _, ckpt, _ = released
    mid = tmp_path / "mmpretrain.pth"
    released_to(ckpt, "mmpretrain", str(mid))
    back, summary = to_released(str(mid), "mmpretrain")
    assert summary.missing == []
    original = ckpt["state_dict"]
    assert list(back["state_dict"]) == list(original)
    for key, value in original.items():
        got = back["state_dict"][key]
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), key
    assert back["epoch"] == 100 and back["best_prec1"] == 76.92


@pytest.mark.parametrize("layout", ["mmdet", "detectron2"])
def test_round_trip_through_a_backbone_layout_is_exact_but_for_fc(released, layout, tmp_path):
    _, ckpt, _ = released
    out = tmp_path / ("d2.pkl" if layout == "detectron2" else "mmdet.pth")
    released_to(ckpt, layout, str(out))
    back, summary = to_released(str(out), layout)
    assert summary.missing == ["module.fc.weight", "module.fc.bias"]
    original = {k: v for k, v in ckpt["state_dict"].items() if ".fc." not in k}
    assert list(back["state_dict"]) == list(original)
    assert all(torch.equal(back["state_dict"][k], v) for k, v in original.items())


# ------------------------------------------------------------------------------------ I3D inflation

def _i3d_name(released_module: str) -> str:
    """mmaction2 ResNet3d's name for a released module (every conv is a ConvModule with .conv and .sn)."""
    for pattern, replacement in ((r"^conv1$", "conv1.conv"), (r"^sn1$", "conv1.sn"),
                                 (r"\.conv(\d)$", r".conv\1.conv"), (r"\.sn(\d)$", r".conv\1.sn"),
                                 (r"\.downsample\.0$", ".downsample.conv"), (r"\.downsample\.1$", ".downsample.sn")):
        if re.search(pattern, released_module):
            return re.sub(pattern, replacement, released_module)
    raise AssertionError(released_module)


def test_i3d_inflation_carries_sn_and_sums_kernels_over_time(released):
    net, ckpt, using_bn = released
    state = released_to(ckpt, "mmaction2")[0]["state_dict"]
    kernels = i3d_temporal_kernels(ResNetSpec(50))
    assert kernels["conv1"] == 5 and kernels["layer1.0.conv1"] == 3 and kernels["layer2.1.conv1"] == 1
    assert state["conv1.conv.weight"].shape == (64, 3, 5, 7, 7)
    assert state["layer1.0.conv1.conv.weight"].shape == (64, 64, 3, 1, 1)
    sn_layers = 0
    for key, value in net.state_dict().items():
        module, _, param = key.rpartition(".")
        if module == "fc":
            continue
        target = state[f"{_i3d_name(module)}.{param}"]
        if target.dim() == 5:  # a conv: inflated, summing over time to the 2D kernel
            assert torch.allclose(target.sum(2), value, atol=1e-6), key
        else:  # an SN parameter or statistic: carried unchanged
            assert torch.equal(target, value.reshape(target.shape)), key
            sn_layers += param == "weight"
    assert sn_layers == 53
    assert sum(k.endswith(".sn.num_batches_tracked") for k in state) == (53 if using_bn else 0)
    assert len(state) == len(net.state_dict()) - 2 + (53 if using_bn else 0)


def test_inflated_kernels_on_a_still_clip_give_the_2d_output(one_released):
    """Why kernels sum to the 2D one: on identical frames (away from the temporal padding) a 3D conv
    computes the 2D conv of a frame."""
    _, ckpt, _ = one_released
    state = released_to(ckpt, "mmaction2")[0]["state_dict"]
    frame = torch.randn(1, 64, 8, 8)
    clip = frame.unsqueeze(2).repeat(1, 1, 5, 1, 1)
    w2d = ckpt["state_dict"]["module.layer1.0.conv1.weight"]
    out3d = nn.functional.conv3d(clip, state["layer1.0.conv1.conv.weight"], padding=(1, 0, 0))
    out2d = nn.functional.conv2d(frame, w2d)
    for t in (1, 2, 3):
        assert torch.allclose(out3d[:, :, t], out2d, atol=1e-5)


# ------------------------------------------------------------------------------------ BN -> SN

@pytest.fixture(scope="module")
def bn_resnet50():
    """A torchvision BN ResNet-50 with a trained network's kind of affine and statistics that fit its data."""
    torch.manual_seed(0)
    bn_net = torchvision.models.resnet50(num_classes=10)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in bn_net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
                m.momentum = None
        bn_net.train()
        for _ in range(2):
            bn_net(torch.randn(INPUT, generator=g))
    return bn_net.eval()


def _as_ours(state):
    return {k.replace("backbone.", "").replace("head.", ""): v for k, v in state.items()}


def test_bn_resnet50_starts_as_its_bn_network(bn_resnet50, tmp_path):
    path = tmp_path / "resnet50_bn.pth"
    torch.save(bn_resnet50.state_dict(), path)
    converted, summary = bn_to_sn(str(path), "torchvision", "mmpretrain", str(tmp_path / "sn.pth"),
                                  bn_start_weight=1 - 1e-7)
    assert summary.missing == [] and any("starts as its BN" in n for n in summary.notes)
    ours = _ours()
    ours.load_state_dict(_as_ours(converted["state_dict"]))
    x = torch.randn(INPUT)
    with torch.no_grad():
        assert max_rel_err(ours(x), bn_resnet50(x)) < 1e-4


def test_bn_checkpoint_conversion_equals_the_model_level_conversion(bn_resnet50):
    """Default start: the very tensors sn_plugin.convert_to_sn gives the loaded BN model."""
    converted, _ = bn_to_sn({"state_dict": bn_resnet50.state_dict()}, "torchvision", "mmdet")
    model_level = convert_to_sn(bn_resnet50).state_dict()
    state = converted["state_dict"]
    assert set(state) == {k.replace("bn", "sn") for k in model_level if not k.startswith("fc.")}
    for key, value in model_level.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key.replace("bn", "sn")], value), key
    w = state["sn1.mean_weight"].softmax(0)
    assert abs(float(w[2]) - DEFAULT_BN_START_WEIGHT) < 1e-6


def test_detectron2_frozen_bn_checkpoint_to_sn():
    """detectron2 names (stem.conv1.norm, res2.0.shortcut.norm), FrozenBN entries without num_batches_tracked."""
    bn_state = torchvision.models.resnet50().state_dict()
    converted, summary = bn_to_sn({"state_dict": bn_state}, "torchvision", "detectron2")
    frozen = {k: v for k, v in converted["model"].items()
              if not k.endswith(("mean_weight", "var_weight", "num_batches_tracked"))}
    d2_converted, summary = bn_to_sn({"model": frozen, "__author__": "torchvision"}, "detectron2", "detectron2")
    state = d2_converted["model"]
    assert summary.missing == []
    assert torch.equal(state["res2.0.shortcut.norm.running_var"], bn_state["layer1.0.downsample.1.running_var"])
    assert state["stem.conv1.norm.num_batches_tracked"] == 1  # frozen statistics count as estimated
    assert state["res5.2.conv3.norm.mean_weight"].shape == (3,)


# ------------------------------------------------------------------------------------ bad input

def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a checkpoint that torch.load"):
        released_to(str(path), "mmdet")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        released_to(str(tmp_path / "absent.pth"), "mmdet")


def test_v2_checkpoint_is_refused(one_released):
    _, ckpt, _ = one_released
    state = dict(ckpt["state_dict"])
    state["module.layer1.0.sn_out.weight"] = torch.ones(1, 256, 1, 1)
    with pytest.raises(CheckpointError, match="pre-activation ResNet v2.*sn_out"):
        released_to({"state_dict": state}, "mmdet")
    state = {k: v for k, v in ckpt["state_dict"].items() if "downsample.0" not in k}
    state["module.layer1.0.downsample.weight"] = torch.ones(256, 64, 1, 1)
    with pytest.raises(CheckpointError, match="v2.*downsample"):
        released_to({"state_dict": state}, "mmdet")


def test_non_resnet_checkpoint_is_refused():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(CheckpointError, match="not a ResNet v1 checkpoint.*found keys like: 0.weight"):
        released_to({"state_dict": mlp.state_dict()}, "mmdet")


def test_depth_mismatch(one_released):
    _, ckpt, _ = one_released
    with pytest.raises(CheckpointError, match=r"depth mismatch: asked for ResNet-101.*holds a ResNet-50"):
        released_to(ckpt, "mmdet", depth=101)


def test_shape_mismatch_names_key_expected_and_found(one_released):
    _, ckpt, _ = one_released
    state = dict(ckpt["state_dict"])
    state["module.layer2.0.conv2.weight"] = torch.zeros(128, 64, 3, 3)
    with pytest.raises(CheckpointError, match=r"'module.layer2.0.conv2.weight': expected \(128, 128, 3, 3\), "
                                              r"found \(128, 64, 3, 3\)"):
        released_to({"state_dict": state}, "mmdet")
    state = dict(ckpt["state_dict"])
    state["module.sn1.weight"] = torch.ones(64)
    with pytest.raises(CheckpointError, match=r"'module.sn1.weight': expected \(1, 64, 1, 1\), found \(64,\)"):
        released_to({"state_dict": state}, "mmdet")


def test_shape_mismatch_with_the_target_model(one_released):
    _, ckpt, using_bn = one_released
    model_state = _ours(using_bn).state_dict()
    model_state["layer3.0.sn2.weight"] = torch.ones(7)
    with pytest.raises(CheckpointError, match=r"'layer3.0.sn2.weight': the model expects \(7,\), the checkpoint has "
                                              r"\(256,\)"):
        released_to(ckpt, "mmdet", target_state=model_state)


def test_bn_and_sn_checkpoints_are_told_apart(one_released):
    _, ckpt, _ = one_released
    with pytest.raises(CheckpointError, match="has SN layers.*without --from-bn"):
        bn_to_sn(ckpt, "mmdet", "mmdet")
    bn_state = torchvision.models.resnet50().state_dict()
    with pytest.raises(CheckpointError, match="no SN layers.*--from-bn"):
        to_released({"state_dict": bn_state}, "mmdet")


def test_input_is_never_modified_and_output_is_atomic(one_released, tmp_path, monkeypatch):
    _, ckpt, _ = one_released
    src = tmp_path / "released.pth"
    torch.save(ckpt, src)
    before = _sha(src)
    out = tmp_path / "out.pth"
    released_to(str(src), "mmdet", str(out))
    assert _sha(src) == before
    good = _sha(out)
    with pytest.raises(CheckpointError, match="is the input file"):
        released_to(str(src), "mmdet", str(src))

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        released_to(str(src), "mmdet", str(out))
    assert _sha(out) == good and _sha(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.pth", "released.pth"]


def test_inflate_argument_errors(one_released):
    _, ckpt, _ = one_released
    with pytest.raises(CheckpointError, match="inflate for layer2 has 3 entries but ResNet-50 has 4"):
        released_to(ckpt, "mmaction2", inflate=((1, 1, 1), (1, 0, 1), (1,) * 6, (0, 1, 0)))


# ------------------------------------------------------------------------------------ structure

def test_resnet101_is_found_and_round_trips_in_half_precision():
    ckpt = synthetic_released(101, torch.float16)
    converted, summary = released_to(ckpt, "mmpretrain")
    assert summary.depth == 101 and summary.missing == []
    assert converted["state_dict"]["backbone.layer3.22.sn3.weight"].dtype == torch.float16
    back, _ = to_released(converted, "mmpretrain")
    assert all(torch.equal(back["state_dict"][k], v) and back["state_dict"][k].dtype == v.dtype
               for k, v in ckpt["state_dict"].items())
    with pytest.raises(CheckpointError, match=r"asked for ResNet-50.*holds a ResNet-101 \(bottleneck blocks "
                                              r"\(3, 4, 23, 3\) per stage\)"):
        released_to(ckpt, "mmdet", depth=50)


def test_missing_and_unknown_keys_are_reported():
    ckpt = synthetic_released(50)
    del ckpt["state_dict"]["module.layer3.1.sn2.running_var"]
    ckpt["state_dict"]["module.extra_head.weight"] = torch.ones(3)
    _, summary = released_to(ckpt, "detectron2")
    assert summary.missing == ["res4.1.conv2.norm.running_var"]
    assert ("module.extra_head.weight", "not a module of a ResNet v1 in the released layout") in summary.dropped


def test_mmpretrain_bn_classifier_to_sn():
    """An mmpretrain BN ResNet-50 classifier ('backbone.bn1', 'head.fc') as an SN checkpoint for mmdet."""
    bn = torchvision.models.resnet50().state_dict()
    state = {("head." if k.startswith("fc.") else "backbone.") + k: v for k, v in bn.items()}
    converted, summary = bn_to_sn({"meta": {}, "state_dict": state}, "mmpretrain", "mmdet")
    assert summary.missing == [] and ("head.fc.weight", "the mmdet backbone has no 'fc'") in summary.dropped
    assert torch.equal(converted["state_dict"]["layer4.2.sn3.running_mean"], bn["layer4.2.bn3.running_mean"])
    assert converted["state_dict"]["layer4.2.sn3.mean_weight"].shape == (3,)


def test_mmaction2_temporal_kernels_from_the_target_model():
    ckpt = synthetic_released(50)
    default = released_to(ckpt, "mmaction2")[0]["state_dict"]
    target = {k: torch.empty(v.shape) for k, v in default.items()}
    target["layer2.1.conv1.conv.weight"] = torch.empty(128, 512, 3, 1, 1)  # inflated in this model
    converted, _ = released_to(ckpt, "mmaction2", target_state=target)
    weight = converted["state_dict"]["layer2.1.conv1.conv.weight"]
    assert weight.shape == (128, 512, 3, 1, 1)
    assert torch.allclose(weight.sum(2), ckpt["state_dict"]["module.layer2.1.conv1.weight"], atol=1e-5)


def test_i3d_kernels_of_basic_blocks():
    """mmaction2's BasicBlock3d inflates both 3x3 convs (3x3x3), whatever the style."""
    kernels = i3d_temporal_kernels(ResNetSpec(18), conv1_kernel_t=3, inflate=(1, 0, (1, 0), 0))
    assert kernels["conv1"] == 3
    assert kernels["layer1.1.conv1"] == kernels["layer1.1.conv2"] == 3
    assert kernels["layer2.0.conv1"] == kernels["layer2.0.conv2"] == 1
    assert kernels["layer3.0.conv2"] == 3 and kernels["layer3.1.conv1"] == 1
    assert kernels["layer3.0.downsample.0"] == 1
