"""Converted released checkpoints in the toolkits' own ResNet-50s, loaded by the toolkits' own loaders.

Each test converts a fixture checkpoint in the released layout (random weights,
``module.`` prefix, with and without the BN branch; see
test_checkpoints_fixtures.py), loads it the way a user's config would, and
compares the backbone's features with the fixture network's in eval mode:

* SN layers built with ``unbiased_instance_var=True`` (the released layers'
  H*W - 1 IN variance) reproduce the released network;
* default SN layers (the paper's H*W) reproduce the fixture's population-variance
  twin (the same weights), and differ visibly from the released network on
  small feature maps.
"""
import pytest
import torch

from sn_plugin import SwitchNormBase
from sn_plugin.checkpoints import released_to
from test_checkpoints_fixtures import ReleasedResNetV1, max_rel_err, randomize, released_checkpoint, synthetic_released

INPUT = (1, 3, 64, 64)
TOLERANCE = 1e-4


class Fixture:
    """The released-layout network, its checkpoint, and its stage features on ``x``, computed once:
    ``released`` with the released H*W-1 IN variance, ``population`` with the paper's H*W."""

    def __init__(self, using_bn: bool):
        torch.manual_seed(0)
        self.net = randomize(ReleasedResNetV1(50, using_bn=using_bn, unbiased=True))
        self.twin = ReleasedResNetV1(50, using_bn=using_bn, unbiased=False).eval()
        self.twin.load_state_dict(self.net.state_dict())
        self.ckpt, self.using_bn = released_checkpoint(self.net), using_bn
        self.x = torch.randn(INPUT, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            self.released = self.net.features(self.x)
            self.population = self.twin.features(self.x)


@pytest.fixture(scope="module", params=[True, False], ids=["with_bn", "without_bn"])
def fixture_net(request):
    return Fixture(request.param)


def _errors(features, fix: Fixture, reference):
    with torch.no_grad():
        return [max_rel_err(got, want) for got, want in zip(features(fix.x), reference)]


def _compare(features, fix: Fixture, model=None):
    """Default layers match the population twin and visibly differ from the released network; with
    ``unbiased_instance_var`` set on every SN layer of ``model`` they match the released network."""
    errors = _errors(features, fix, fix.population)
    assert max(errors) < TOLERANCE, errors
    assert _errors(features, fix, fix.released)[-1] > 1e-3  # layer4 is 2x2 here: the convention shows
    if model is not None:
        for m in model.modules():
            if isinstance(m, SwitchNormBase):
                m.unbiased_instance_var = True
        errors = _errors(features, fix, fix.released)
        assert max(errors) < TOLERANCE, errors


def test_detectron2_resnet50_features(fixture_net, tmp_path):
    pytest.importorskip("detectron2")
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.resnet import build_resnet_backbone

    from sn_plugin.integrations.detectron2 import add_sn_config, sn_layer_options

    ckpt, using_bn = fixture_net.ckpt, fixture_net.using_bn
    for suffix in [".pkl" if using_bn else ".pth"]:  # both formats detectron2 reads, one per variant
        path = str(tmp_path / f"sn_r50{suffix}")
        released_to(ckpt, "detectron2", path)
        cfg = get_cfg()
        add_sn_config(cfg)
        cfg.MODEL.RESNETS.NORM = "SN"
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision-style v1: stride on the 3x3 conv
        cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
        cfg.MODEL.BACKBONE.FREEZE_AT = 0
        with sn_layer_options(using_bn=using_bn):
            backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
        DetectionCheckpointer(backbone).load(path)
        state = backbone.state_dict()
        assert torch.equal(state["res3.0.conv2.norm.mean_weight"],
                           ckpt["state_dict"]["module.layer2.0.sn2.mean_weight"])
        out = lambda x: [v for _, v in sorted(backbone(x).items())]  # noqa: E731  res2..res5
        _compare(out, fixture_net, backbone)


def test_mmdet_resnet50_features(fixture_net, tmp_path):
    pytest.importorskip("mmdet")
    from mmdet.models.backbones import ResNet
    from mmengine.runner import load_checkpoint

    import sn_plugin.integrations.openmmlab  # noqa: F401  (registers 'SN')

    ckpt, using_bn = fixture_net.ckpt, fixture_net.using_bn
    path = str(tmp_path / "sn_r50_mmdet.pth")
    released_to(ckpt, "mmdet", path)
    backbone = ResNet(50, norm_cfg=dict(type="SN", using_bn=using_bn), norm_eval=False)
    backbone.eval()  # (mmdet's ResNet.train returns None: no chaining)
    load_checkpoint(backbone, path, strict=True)
    _compare(lambda x: list(backbone(x)), fixture_net)
    configured = ResNet(50, norm_cfg=dict(type="SN", using_bn=using_bn, unbiased_instance_var=True))
    configured.eval()
    load_checkpoint(configured, path, strict=True)
    assert max(_errors(lambda x: list(configured(x)), fixture_net, fixture_net.released)) < TOLERANCE


def _mmaction2_resnet3d():
    pytest.importorskip("mmaction")
    from sn_plugin.integrations import mmaction_compat  # noqa: F401  (mmaction2 1.2.0 packaging fix)
    import sn_plugin.integrations.openmmlab  # noqa: F401  (registers 'SN3d')
    from mmaction.models.backbones import ResNet3d

    return ResNet3d


def test_mmaction2_i3d_loads_the_inflated_checkpoint(fixture_net, tmp_path):
    ResNet3d = _mmaction2_resnet3d()
    from mmengine.runner import load_checkpoint

    ckpt, using_bn = fixture_net.ckpt, fixture_net.using_bn
    path = str(tmp_path / "sn_i3d.pth")
    released_to(ckpt, "mmaction2", path)
    # mmaction2's I3D R50 config (configs/_base_/models/i3d_r50.py), with SN
    backbone = ResNet3d(50, None, pretrained2d=False, conv1_kernel=(5, 7, 7), conv1_stride_t=2,
                        pool1_stride_t=2, inflate=((1, 1, 1), (1, 0, 1, 0), (1, 0, 1, 0, 1, 0), (0, 1, 0)),
                        norm_cfg=dict(type="SN3d", using_bn=using_bn), conv_cfg=dict(type="Conv3d"))
    load_checkpoint(backbone, path, strict=True)
    state = backbone.state_dict()
    assert torch.equal(state["layer1.0.conv1.sn.weight"], ckpt["state_dict"]["module.layer1.0.sn1.weight"].reshape(-1))
    assert torch.allclose(state["layer1.0.conv1.conv.weight"].sum(2),
                          ckpt["state_dict"]["module.layer1.0.conv1.weight"], atol=1e-6)
    backbone.eval()
    with torch.no_grad():  # runs on a clip
        backbone(torch.randn(1, 3, 8, 32, 32))


@pytest.mark.parametrize("inflate_style", ["3x1x1", "3x3x3"])
def test_mmaction2_inflation_fits_resnet3d_of_other_depths(inflate_style):
    """Every converted tensor has the shape mmaction2 builds, for basic (R18) and bottleneck (R101) blocks."""
    ResNet3d = _mmaction2_resnet3d()
    for depth, inflate in ((18, (1, (0, 1), 1, 0)), (101, (1, 0, 1, (0, 1, 0)))):
        backbone = ResNet3d(depth, None, pretrained2d=False, conv1_kernel=(3, 7, 7), inflate=inflate,
                            inflate_style=inflate_style, norm_cfg=dict(type="SN3d"), conv_cfg=dict(type="Conv3d"))
        model_state = backbone.state_dict()
        converted, _ = released_to(synthetic_released(depth), "mmaction2", conv1_kernel_t=3, inflate=inflate,
                                   inflate_style=inflate_style)
        state = converted["state_dict"]
        assert set(state) == set(model_state)
        assert all(state[k].shape == v.shape for k, v in model_state.items())


def test_mmseg_resnet50_d8_loads_the_converted_checkpoint(fixture_net, tmp_path):
    """mmseg's ResNet (7x7 stem) with DeepLab's dilations, as configs/mmseg/ builds it."""
    pytest.importorskip("mmseg")
    from mmengine.runner import load_checkpoint
    from mmseg.models.backbones import ResNet

    import sn_plugin.integrations.openmmlab  # noqa: F401

    ckpt, using_bn = fixture_net.ckpt, fixture_net.using_bn
    path = str(tmp_path / "sn_r50_mmseg.pth")
    released_to(ckpt, "mmseg", path)
    backbone = ResNet(50, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), contract_dilation=True,
                      norm_cfg=dict(type="SN", using_bn=using_bn))
    load_checkpoint(backbone, path, strict=True)
    assert torch.equal(backbone.state_dict()["layer4.2.sn3.var_weight"],
                       ckpt["state_dict"]["module.layer4.2.sn3.var_weight"])


def test_mmpretrain_classifier_logits(fixture_net, tmp_path):
    pytest.importorskip("mmpretrain")
    from mmengine.runner import load_checkpoint
    from mmpretrain.models import ImageClassifier

    import sn_plugin.integrations.openmmlab  # noqa: F401

    ckpt, using_bn = fixture_net.ckpt, fixture_net.using_bn
    path = str(tmp_path / "sn_r50_cls.pth")
    released_to(ckpt, "mmpretrain", path)
    model = ImageClassifier(
        backbone=dict(type="ResNet", depth=50, norm_cfg=dict(type="SN", using_bn=using_bn)),
        neck=dict(type="GlobalAveragePooling"),
        head=dict(type="LinearClsHead", num_classes=10, in_channels=2048),
    )
    model.eval()
    load_checkpoint(model, path, strict=True)
    with torch.no_grad():
        assert max_rel_err(model(fixture_net.x, mode="tensor"), fixture_net.twin(fixture_net.x)) < TOLERANCE
