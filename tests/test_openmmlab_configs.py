"""Every OpenMMLab config under configs/: loads, builds through its toolkit, has SN exactly
where its header says, trains one iteration and runs inference on tiny synthetic inputs.

The configs are built as shipped; only what cannot work offline or would be slow on
CPU is changed: pretrained weights come from a checkpoint this test writes (in the
layout the config expects) or are dropped when they would be downloaded, and the
data preprocessors' fixed pad sizes shrink to the synthetic image size.
"""
import copy
import logging
from pathlib import Path

import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")
pytest.importorskip("mmpretrain")
pytest.importorskip("mmaction")

from mmengine.config import Config  # noqa: E402
from mmengine.logging import MMLogger  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import MODELS, init_default_scope  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

from sn_plugin import SwitchNormBase, recompute_batch_stats  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PLUGIN = "sn_plugin.integrations.openmmlab"

R50 = 53  # norm layers of a ResNet50: the stem, 3 per bottleneck (16 of them), 4 shortcuts
FPN = 8  # 4 lateral and 4 output convs
BOX_4CONV = 4
MASK_HEAD = 4
ASPP = 6  # image pool, 4 ASPP branches, bottleneck
FCN_AUX = 1

# config -> where its SN layers are (component prefix -> count) and which other norms it has.
EXPECTED = {
    "mmdet/faster-rcnn_r50_fpn_sn-all_1x_coco.py":
        dict(sn={"backbone": R50, "neck": FPN, "roi_head.bbox_head": BOX_4CONV}, frozen_sn_stages=1),
    "mmdet/faster-rcnn_r50-frozenbn_fpn_sn-head_1x_coco.py":
        dict(sn={"neck": FPN, "roi_head.bbox_head": BOX_4CONV}, other={"backbone": ("BatchNorm2d", R50)},
             frozen_backbone=True),
    "mmdet/mask-rcnn_r50_fpn_sn-all_2x_coco.py":
        dict(sn={"backbone": R50, "neck": FPN, "roi_head.bbox_head": BOX_4CONV, "roi_head.mask_head": MASK_HEAD},
             frozen_sn_stages=1),
    "mmdet/mask-rcnn_r50-frozenbn_fpn_sn-head_2x_coco.py":
        dict(sn={"neck": FPN, "roi_head.bbox_head": BOX_4CONV, "roi_head.mask_head": MASK_HEAD},
             other={"backbone": ("BatchNorm2d", R50)}, frozen_backbone=True),
    "mmdet/mask-rcnn_r50-gn_fpn_sn-head_2x_coco.py":
        dict(sn={"neck": FPN, "roi_head.bbox_head": BOX_4CONV, "roi_head.mask_head": MASK_HEAD},
             other={"backbone": ("GroupNorm", R50)}),
    "mmdet/faster-rcnn_r50-scratch_fpn_sn-all_6x_coco.py":
        dict(sn={"backbone": R50, "neck": FPN, "roi_head.bbox_head": BOX_4CONV}),
    "mmdet/mask-rcnn_r50-scratch_fpn_sn-all_6x_coco.py":
        dict(sn={"backbone": R50, "neck": FPN, "roi_head.bbox_head": BOX_4CONV, "roi_head.mask_head": MASK_HEAD}),
    "mmseg/deeplabv3_r50-d8-sn_8xb2-100k_ade20k-512x512.py":
        dict(sn={"backbone": R50, "decode_head": ASPP, "auxiliary_head": FCN_AUX}),
    "mmseg/deeplabv3_r50-d8-sn_8xb1-80k_cityscapes-512x1024.py":
        dict(sn={"backbone": R50, "decode_head": ASPP, "auxiliary_head": FCN_AUX}),
    "mmaction2/i3d_imagenet-pretrained-r50-sn_8xb8-32x2x1-100e_kinetics400-rgb.py":
        dict(sn={"backbone": R50}, sn_class="SwitchNorm3d"),
    "mmaction2/i3d_imagenet-pretrained-r50-sn_8xb4-32x2x1-100e_kinetics400-rgb.py":
        dict(sn={"backbone": R50}, sn_class="SwitchNorm3d"),
    "mmpretrain/resnet50-sn_8xb32_in1k.py": dict(sn={"backbone": R50}),
    "mmpretrain/resnet50-sn_8xb2_in1k.py": dict(sn={"backbone": R50}),
}


@pytest.fixture(autouse=True)
def quiet_init_report():
    """mmengine logs every parameter's init at INFO; that report is slow and not what is tested here."""
    logger = MMLogger.get_instance("mmengine")
    level = logger.level
    logger.setLevel(logging.WARNING)
    yield
    logger.setLevel(level)


def test_every_config_is_covered():
    shipped = {str(p.relative_to(CONFIGS)) for toolkit in ("mmdet", "mmseg", "mmaction2", "mmpretrain")
               for p in (CONFIGS / toolkit).glob("*.py")}
    assert shipped == set(EXPECTED)


# -- synthetic batches, one per toolkit ------------------------------------------------------------
def _detection_batch():
    from mmdet.testing import demo_mm_inputs
    return demo_mm_inputs(batch_size=2, image_shapes=[(3, 64, 96)] * 2, num_items=[2, 3], num_classes=80,
                          with_mask=True)


def _segmentation_batch(num_classes: int):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample
    generator = torch.Generator().manual_seed(0)
    inputs, samples = [], []
    for _ in range(2):
        inputs.append(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8, generator=generator))
        sample = SegDataSample(metainfo=dict(img_shape=(64, 64), ori_shape=(64, 64), pad_shape=(64, 64)))
        sample.gt_sem_seg = PixelData(data=torch.randint(0, num_classes, (1, 64, 64), generator=generator))
        samples.append(sample)
    return dict(inputs=inputs, data_samples=samples)


def _video_batch():
    from mmaction.structures import ActionDataSample
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (1, 3, 8, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(2)]
    samples = [ActionDataSample().set_gt_label(label) for label in (3, 7)]
    return dict(inputs=inputs, data_samples=samples)


def _classification_batch():
    from mmpretrain.structures import DataSample
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=generator) for _ in range(2)]
    samples = [DataSample().set_gt_label(label) for label in (3, 7)]
    return dict(inputs=inputs, data_samples=samples)


# -- building a config offline -------------------------------------------------------------------
def _load(relative: str) -> Config:
    cfg = Config.fromfile(str(CONFIGS / relative))
    assert cfg.custom_imports == dict(imports=[PLUGIN], allow_failed_imports=False)
    return cfg


def _sn_checkpoint_path(cfg_backbone) -> str:
    """The user-provided SN checkpoint path a config loads, if any."""
    init_cfg = cfg_backbone.get("init_cfg") or {}
    if init_cfg.get("type") == "Pretrained":
        return init_cfg["checkpoint"]
    return cfg_backbone.get("pretrained") or ""


def _offline_model_cfg(cfg: Config, tmp_path: Path):
    """The config's model, with pretrained weights made locally and pad sizes shrunk."""
    model_cfg = copy.deepcopy(cfg.model)
    if "data_preprocessor" not in model_cfg:  # as mmengine's Runner does
        model_cfg.data_preprocessor = copy.deepcopy(cfg.data_preprocessor)
    if model_cfg.data_preprocessor.get("size") is not None:
        model_cfg.data_preprocessor.size = (64, 64)
    if "roi_head" in model_cfg:  # the box and mask heads cost per RoI: fewer proposals and samples
        model_cfg.train_cfg.rpn_proposal.update(nms_pre=100, max_per_img=32)
        model_cfg.train_cfg.rcnn.sampler.num = 16
        model_cfg.test_cfg.rpn.update(nms_pre=100, max_per_img=32)
    backbone = model_cfg.backbone
    checkpoint = _sn_checkpoint_path(backbone)
    if checkpoint.startswith("checkpoints/sn_"):
        backbone_path = tmp_path / Path(checkpoint).name
        _write_pretrained_backbone(backbone, backbone_path)
        if backbone.get("init_cfg"):
            backbone.init_cfg.checkpoint = str(backbone_path)
        else:
            backbone.pretrained = str(backbone_path)
    elif checkpoint:  # torchvision:// or open-mmlab:// weights would be downloaded
        backbone.init_cfg = None
        if "pretrained" in backbone:
            backbone.pretrained = None
    return model_cfg


def _write_pretrained_backbone(backbone_cfg, path: Path) -> None:
    """A checkpoint in the layout the config loads, with recognisable SN statistics."""
    cfg = copy.deepcopy(backbone_cfg)
    cfg.init_cfg = None
    if "pretrained" in cfg:
        cfg.pretrained = None
    backbone = MODELS.build(cfg)
    generator = torch.Generator().manual_seed(1)
    for layer in backbone.modules():
        if isinstance(layer, SwitchNormBase):
            layer.running_mean.normal_(generator=generator)
            layer.running_var.uniform_(0.5, 2.0, generator=generator)
            layer.num_batches_tracked.fill_(200)
    torch.save({"state_dict": backbone.state_dict()}, path)


def _sn_layout(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, SwitchNormBase)}


def _count_by_component(names, components):
    """SN layers per component prefix; a layer outside every component counts under its own name."""
    counts = {}
    for name in names:
        owner = next((c for c in components if name.startswith(c + ".")), name)
        counts[owner] = counts.get(owner, 0) + 1
    return counts


def _batch_for(scope: str, model):
    if scope == "mmdet":
        return _detection_batch()
    if scope == "mmseg":
        return _segmentation_batch(model.decode_head.num_classes)
    if scope == "mmaction":
        return _video_batch()
    return _classification_batch()


def _training_forward(model, batch):
    from sn_plugin.integrations.openmmlab import training_forward
    training_forward(model, batch)


@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_config_builds_places_sn_trains_and_predicts(relative, tmp_path):
    expected = EXPECTED[relative]
    cfg = _load(relative)
    init_default_scope(cfg.default_scope)
    torch.manual_seed(0)
    model = MODELS.build(_offline_model_cfg(cfg, tmp_path))
    model.init_weights()

    # SN exactly where the header says, of the right dimensionality and type name.
    sn_layers = _sn_layout(model)
    assert _count_by_component(sn_layers, list(expected["sn"])) == expected["sn"]
    sn_class = expected.get("sn_class", "SwitchNorm2d")
    assert {type(m).__name__ for m in sn_layers.values()} == {sn_class}
    assert all(name.rsplit(".", 1)[-1].startswith("sn") or name.rsplit(".", 1)[-1].isdigit()
               for name in sn_layers), "mmcv should name SN layers sn, sn1, ... (or by index in a Sequential)"
    assert all(not m.using_moving_average for m in sn_layers.values())
    for component, (class_name, count) in expected.get("other", {}).items():
        others = [m for name, m in model.named_modules()
                  if name.startswith(component + ".") and type(m).__name__ == class_name]
        assert len(others) == count

    # Pretrained SN statistics were loaded (the test checkpoint's running_var lies in [0.5, 2]).
    if _sn_checkpoint_path(cfg.model.backbone).startswith("checkpoints/sn_"):
        stem = next(m for name, m in sn_layers.items() if name.startswith("backbone."))
        assert int(stem.num_batches_tracked) == 200 and float(stem.running_var.min()) >= 0.5

    # The toolkit's freezing applies to SN as to BN.
    model.train()
    if expected.get("frozen_sn_stages"):
        frozen = [m for name, m in sn_layers.items() if name.startswith(("backbone.sn1", "backbone.layer1."))]
        assert frozen and all(not m.training and not m.weight.requires_grad for m in frozen)
        assert all(m.training for name, m in sn_layers.items() if name.startswith("backbone.layer2."))
    if expected.get("frozen_backbone"):
        bns = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
        assert all(not m.training and not m.weight.requires_grad for m in bns)

    # One training iteration through the toolkit's data preprocessor, loss, backward and optimizer step.
    scope = cfg.default_scope
    batch = _batch_for(scope, model)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    trainable_sn = [m for m in sn_layers.values() if m.training and m.weight.requires_grad]
    before = [m.mean_weight.detach().clone() for m in trainable_sn]
    log_vars = model.train_step(copy.deepcopy(batch), optim_wrapper)
    assert torch.isfinite(log_vars["loss"])
    changed = [not torch.equal(b, m.mean_weight) for b, m in zip(before, trainable_sn)]
    assert any(changed), "the optimizer step should move the SN importance logits"

    # Inference after estimating the batch-average statistics, through the toolkit's val_step.
    # Frozen layers (eval mode while training) keep the statistics they loaded.
    kept = {name: m.running_var.clone() for name, m in sn_layers.items() if not m.training}
    recompute_batch_stats(model, [copy.deepcopy(batch)], forward=_training_forward, progress=False)
    assert all(torch.equal(sn_layers[name].running_var, var) for name, var in kept.items())
    assert all(int(m.num_batches_tracked) == 1 for name, m in sn_layers.items() if name not in kept)
    model.eval()
    with torch.no_grad():
        predictions = model.val_step(copy.deepcopy(batch))
    assert len(predictions) == 2
    _check_predictions(scope, predictions)


def _check_predictions(scope, predictions):
    for sample in predictions:
        if scope == "mmdet":
            assert "bboxes" in sample.pred_instances
        elif scope == "mmseg":
            assert sample.pred_sem_seg.data.shape[-2:] == (64, 64)
        else:
            assert torch.isfinite(sample.pred_score).all()


# -- the checkpoints the finetuning configs load ------------------------------------------------------
FINETUNING_TARGETS = [
    ("mmdet/mask-rcnn_r50_fpn_sn-all_2x_coco.py", "mmdet"),
    ("mmseg/deeplabv3_r50-d8-sn_8xb2-100k_ade20k-512x512.py", "mmseg"),
    ("mmaction2/i3d_imagenet-pretrained-r50-sn_8xb8-32x2x1-100e_kinetics400-rgb.py", "mmaction2"),
]


def _sn_signature(model):
    """Order-free fingerprint of every SN layer's loaded values (the layouts name and order them differently)."""
    return sorted(
        (round(float(m.running_var.sum()), 3), round(float(m.mean_weight.sum()), 3), round(float(m.weight.sum()), 3))
        for m in model.modules() if isinstance(m, SwitchNormBase))


def test_an_mmpretrain_checkpoint_converts_into_every_finetuning_config(tmp_path):
    """The mmpretrain configs make SN-ResNet50 checkpoints; converted, they load completely where the others point."""
    from sn_plugin.checkpoints import convert_checkpoint

    cfg = _load("mmpretrain/resnet50-sn_8xb2_in1k.py")
    init_default_scope(cfg.default_scope)
    classifier = MODELS.build(_offline_model_cfg(cfg, tmp_path))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for layer in classifier.backbone.modules():
            if isinstance(layer, SwitchNormBase):
                layer.running_var.uniform_(0.5, 2.0, generator=generator)
                layer.mean_weight.normal_(generator=generator)
                layer.weight.uniform_(0.5, 2.0, generator=generator)
                layer.num_batches_tracked.fill_(200)
    trained = tmp_path / "epoch_100.pth"
    torch.save({"meta": {}, "state_dict": classifier.state_dict()}, trained)
    expected = _sn_signature(classifier.backbone)

    for relative, target in FINETUNING_TARGETS:
        cfg = _load(relative)
        init_default_scope(cfg.default_scope)
        converted = tmp_path / Path(_sn_checkpoint_path(cfg.model.backbone)).name
        convert_checkpoint(str(trained), "mmpretrain", target, str(converted))
        backbone_cfg = copy.deepcopy(cfg.model.backbone)
        if backbone_cfg.get("init_cfg"):
            backbone_cfg.init_cfg.checkpoint = str(converted)
        else:
            backbone_cfg.pretrained = str(converted)
        backbone = MODELS.build(backbone_cfg)
        backbone.init_weights()
        assert _sn_signature(backbone) == expected, target
