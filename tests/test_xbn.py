"""XBNBlock: which norm becomes the batch-free normalizer, in torchvision, mmdet and detectron2 ResNets."""
import pytest
import torch
from torch import nn

from sn_plugin import (
    SwitchNorm2d, build_bfn, convert_to_xbn, load_bn_state_dict, register_xbn_block, residual_blocks, xbn_plan,
)

torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50(num_classes=10)


def _bottleneck_names(stages=(3, 4, 6, 3)):
    """torchvision ResNet-50's blocks in forward order, numbered from 1 across the network."""
    return [f"layer{s}.{i}" for s, count in enumerate(stages, start=1) for i in range(count)]


@pytest.mark.parametrize("every", [1, 2, 4, 8])
@pytest.mark.parametrize("position", [1, 2, 3])
def test_plan_picks_the_position_in_every_dth_block_counted_across_the_network(resnet50, position, every):
    blocks = _bottleneck_names()
    expected = [f"{b}.bn{position}" for number, b in enumerate(blocks, start=1) if number % every == 0]
    assert xbn_plan(resnet50, position, every) == expected
    assert len(expected) == 16 // every  # D2: 8 blocks, D4: 4, D8: 2 (the paper's 16-block ResNet-50)
    assert xbn_plan(resnet50, position, every, stem=True) == ["bn1"] + expected


def test_conversion_puts_gn64_at_p2_and_keeps_every_other_bn(resnet50):
    converted = convert_to_xbn(resnet50)
    for block in residual_blocks(converted):
        m = block.module
        assert isinstance(m.bn2, nn.GroupNorm) and m.bn2.num_groups == 64
        assert m.bn2.num_channels == m.conv2.out_channels
        assert type(m.bn1) is nn.BatchNorm2d and type(m.bn3) is nn.BatchNorm2d
        if m.downsample is not None:
            assert type(m.downsample[1]) is nn.BatchNorm2d  # shortcut BNs stay BN
    assert type(converted.bn1) is nn.BatchNorm2d  # stem untouched by default
    assert all(type(m) is nn.BatchNorm2d for m in resnet50.modules() if isinstance(m, nn.BatchNorm2d))
    assert not any(isinstance(m, nn.GroupNorm) for m in resnet50.modules())  # the original is unchanged
    assert converted(torch.randn(2, 3, 64, 64)).shape == (2, 10)


@pytest.mark.parametrize("position", [1, 3])
def test_other_positions_and_the_stem(resnet50, position):
    converted = convert_to_xbn(resnet50, position=position, every=4, stem=True)
    assert isinstance(converted.bn1, nn.GroupNorm)
    gn = {name for name, m in converted.named_modules() if isinstance(m, nn.GroupNorm)}
    assert gn == {"bn1", *(f"{b}.bn{position}" for b in ("layer2.0", "layer3.0", "layer3.4", "layer4.2"))}


def test_no_zero_gamma_initialisation_for_the_bfn():
    model = torchvision.models.resnet50(zero_init_residual=True)
    assert not model.layer1[0].bn3.weight.any()
    converted = convert_to_xbn(model, position=3)
    assert torch.equal(converted.layer1[0].bn3.weight, torch.ones(256))
    assert torch.equal(converted.layer1[0].bn3.bias, torch.zeros(256))


@pytest.mark.parametrize("position, norm", [(1, "bn1"), (2, "bn1"), (3, "bn2")])
def test_basic_block_positions(position, norm):
    model = torchvision.models.resnet18()
    assert xbn_plan(model, position)[:2] == [f"layer1.0.{norm}", f"layer1.1.{norm}"]
    converted = convert_to_xbn(model, {"type": "GN", "num_groups": 32}, position=position)
    assert isinstance(converted.layer4[1].get_submodule(norm), nn.GroupNorm)
    assert converted(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


def test_resnext_and_instance_norm_and_sn_bfns():
    model = torchvision.models.resnext50_32x4d()
    converted = convert_to_xbn(model, {"type": "IN"}, every=8)
    bfn = converted.layer3[0].bn2
    assert isinstance(bfn, nn.InstanceNorm2d) and not bfn.affine and not bfn.track_running_stats
    sn = convert_to_xbn(model, {"type": "SN"}, every=8).layer3[0].bn2
    assert isinstance(sn, SwitchNorm2d) and not sn.using_bn and sn.running_mean is None


@pytest.mark.parametrize("cfg", [{"type": "GN", "num_groups": 4}, {"type": "IN"}, {"type": "SN"}])
def test_a_bfn_output_for_one_sample_does_not_depend_on_the_rest_of_the_batch(cfg):
    bfn = build_bfn(cfg, nn.BatchNorm2d(8)).train()
    x = torch.randn(5, 8, 4, 4)
    alone = bfn(x[:1])
    with_others = bfn(torch.cat([x[:1], 100 * x[1:] + 7]))
    torch.testing.assert_close(with_others[:1], alone)


def test_channels_not_divisible_by_the_groups_is_a_clear_error():
    model = nn.Sequential(nn.Conv2d(3, 40, 1), nn.BatchNorm2d(40), nn.ReLU(), nn.Sequential(
        torchvision.models.resnet.Bottleneck(40, 12, downsample=nn.Sequential(nn.Conv2d(40, 48, 1),
                                                                             nn.BatchNorm2d(48)))))
    with pytest.raises(ValueError, match=r"3\.0\.bn2 has 12 channels, which GroupNorm cannot split into "
                                         r"num_groups=64 groups.*num_groups=32"):
        convert_to_xbn(model)
    with pytest.raises(ValueError, match=r"^XBN: 1 has 40 channels.*stem=False"):
        convert_to_xbn(model, {"type": "GN", "num_groups": 12}, stem=True, position=1)
    assert isinstance(convert_to_xbn(model, {"type": "GN", "num_groups": 4})[3][0].bn2, nn.GroupNorm)


def test_bad_options_are_refused(resnet50):
    with pytest.raises(ValueError, match="position must be 1, 2 or 3"):
        xbn_plan(resnet50, position=4)
    with pytest.raises(ValueError, match="every must be a positive int"):
        xbn_plan(resnet50, every=0)
    with pytest.raises(ValueError, match="unknown BFN type 'LN'"):
        convert_to_xbn(resnet50, {"type": "LN"})
    with pytest.raises(ValueError, match="found no residual blocks in Sequential"):
        convert_to_xbn(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)))
    converted = convert_to_xbn(resnet50, every=8)
    with pytest.raises(ValueError, match="layer3.0.bn2 is a GroupNorm, not a BatchNorm"):
        convert_to_xbn(converted, every=8)


def test_inplace_conversion_and_frozen_bns_with_a_trainable_bfn():
    frozen = torchvision.ops.FrozenBatchNorm2d
    model = torchvision.models.resnet50(norm_layer=frozen)
    assert convert_to_xbn(model, every=4, inplace=True) is model
    assert isinstance(model.layer2[0].bn2, nn.GroupNorm) and isinstance(model.layer2[0].bn1, frozen)
    model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert model.layer2[0].bn2.weight.grad is not None  # the BFN learns while the BNs stay frozen


def test_bfn_requires_grad_and_device_dtype_follow_the_cfg_and_the_bn():
    bfn = build_bfn({"type": "GN", "num_groups": 2, "requires_grad": False}, nn.BatchNorm2d(4).double().eval())
    assert not bfn.weight.requires_grad and bfn.weight.dtype == torch.float64 and not bfn.training


def _randomised(model):
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return model


@pytest.mark.parametrize("bfn_affine", ["bn", "init"])
def test_a_bn_checkpoint_fills_every_layer_that_exists_in_both(resnet50, bfn_affine):
    bn_state = _randomised(torchvision.models.resnet50(num_classes=10)).state_dict()
    xbn = convert_to_xbn(resnet50, stem=True)
    report = load_bn_state_dict(xbn, {"state_dict": {f"module.{k}": v for k, v in bn_state.items()}}, bfn_affine)
    assert len(report.bfn_layers) == 17 and report.missing == []
    own = xbn.state_dict()
    for key, value in own.items():
        layer = key.rsplit(".", 1)[0]
        if layer in report.bfn_layers:
            expected = bn_state[key] if bfn_affine == "bn" else torch.full_like(value, key.endswith("weight"))
            assert torch.equal(value, expected), key
        else:
            assert torch.equal(value, bn_state[key]), key
    dropped_stats = {f"{layer}.{b}" for layer in report.bfn_layers
                     for b in ("running_mean", "running_var", "num_batches_tracked")}
    assert set(report.dropped) - dropped_stats == (
        set() if bfn_affine == "bn" else {f"{layer}.{p}" for layer in report.bfn_layers for p in ("weight", "bias")})
    plain = convert_to_xbn(resnet50, stem=True)
    plain.load_state_dict(bn_state, strict=False)  # the BFN has the BN's name: same as bfn_affine='bn'
    if bfn_affine == "bn":
        assert all(torch.equal(v, plain.state_dict()[k]) for k, v in own.items())


def test_a_checkpoint_of_another_architecture_is_refused(resnet50):
    with pytest.raises(ValueError, match="does not fit the model"):
        load_bn_state_dict(convert_to_xbn(resnet50, every=8), torchvision.models.resnet18().state_dict())


def test_instance_norm_without_affine_drops_the_bn_affine(resnet50):
    xbn = convert_to_xbn(resnet50, {"type": "IN"}, every=8)
    report = load_bn_state_dict(xbn, resnet50.state_dict())
    assert report.bfn_layers == ["layer3.0.bn2", "layer4.2.bn2"]
    assert "layer3.0.bn2.weight" in report.dropped and report.missing == []


def test_registered_blocks():
    class Inverted(nn.Module):
        def __init__(self):
            super().__init__()
            self.expand = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16))
            self.depthwise = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16))

        def forward(self, x):
            return self.depthwise(self.expand(x))

    register_xbn_block(Inverted, lambda block: ("expand.1", "depthwise.1"))
    model = nn.Sequential(Inverted(), Inverted())
    converted = convert_to_xbn(model, {"type": "GN", "num_groups": 4}, position=3)
    assert isinstance(converted[1].depthwise[1], nn.GroupNorm) and isinstance(converted[1].expand[1], nn.BatchNorm2d)


def test_mmdet_resnets_bottleneck_and_basic_block_and_deep_stem():
    pytest.importorskip("mmdet")
    from mmdet.models.backbones import ResNet, ResNetV1d

    torch.manual_seed(0)
    r50 = ResNet(depth=50, out_indices=(3,))
    converted = convert_to_xbn(r50, stem=True)
    block = converted.layer3[5]
    assert block.norm2_name == "bn2" and isinstance(block.norm2, nn.GroupNorm)  # the property sees the BFN
    assert isinstance(block.norm1, nn.BatchNorm2d) and isinstance(converted.norm1, nn.GroupNorm)
    assert len(xbn_plan(r50, every=2)) == 8
    converted.train()  # mmdet's norm_eval puts the remaining BNs in eval; the BFN is batch-free anyway
    assert converted(torch.randn(1, 3, 64, 64))[0].shape == (1, 2048, 2, 2)

    r18 = ResNet(depth=18)
    assert xbn_plan(r18, position=3)[:2] == ["layer1.0.bn2", "layer1.1.bn2"]

    deep = ResNetV1d(depth=50)
    assert xbn_plan(deep, stem=True)[:3] == ["stem.1", "stem.4", "stem.7"]
    with pytest.raises(ValueError, match="stem.1 has 32 channels.*num_groups=64"):
        convert_to_xbn(deep, stem=True)
    assert isinstance(convert_to_xbn(deep, {"type": "GN", "num_groups": 32}, stem=True).stem[1], nn.GroupNorm)


def test_detectron2_resnet_and_a_detector_like_parent():
    pytest.importorskip("detectron2.modeling")
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone import build_resnet_backbone

    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = 50
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3))  # FrozenBN, up to res4 (13 blocks)
    neck = nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))  # a neck registered before the backbone
    detector = nn.Module()
    detector.neck, detector.bottom_up = neck, backbone
    plan = xbn_plan(detector, stem=True)
    assert plan[:2] == ["bottom_up.stem.conv1.norm", "bottom_up.res2.0.conv2.norm"] and len(plan) == 14
    converted = convert_to_xbn(detector, stem=True)
    assert isinstance(converted.bottom_up.res3[0].conv2.norm, nn.GroupNorm)
    assert isinstance(converted.neck[1], nn.BatchNorm2d)
    assert converted.bottom_up(torch.randn(1, 3, 64, 64))["res4"].shape[1] == 1024


def test_xbn_perturbation_benchmark_quick_mode(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from benchmarks.bench_xbn_perturbation import main

    record = main(["--quick", "--out", str(tmp_path)])
    assert {run["variant"] for run in record["runs"]} == {"BN", "XBN-GN", "XBN-IN"}
    for run in record["runs"]:
        assert len(run["curves"]["1"]) == 2 and all(0 <= a <= 100 for a in run["curves"]["1"])
    for name in ("xbn_perturbation.md", "xbn_perturbation.json", "xbn_perturbation.png"):
        assert (tmp_path / name).stat().st_size > 0
