"""sn_plugin's detectron2 integration: norm names, configs, FREEZE_AT, weight decay, empty RoIs.

The configs are the real ones from configs/detectron2 (ResNet-50 depth, norms
where the paper puts them), with widths, image and RoI-batch sizes shrunk so a
training iteration takes a fraction of a second on CPU.
"""
import inspect
import os

import pytest
import torch
from torch import nn

pytest.importorskip("detectron2")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402
from detectron2.structures import BitMasks, Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import sn_plugin  # noqa: E402
from sn_plugin import SwitchNorm2d, SyncSwitchNorm  # noqa: E402
from sn_plugin.integrations import detectron2 as sn_d2  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO, "configs", "detectron2")

FASTER_SN = "COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.yaml"
FASTER_FROZENBN_SNHEAD = "COCO-Detection/faster_rcnn_R_50_FPN_1x_frozenbn_snhead.yaml"
MASK_SN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.yaml"
MASK_FROZENBN_SNHEAD = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_frozenbn_snhead.yaml"
MASK_SN_SCRATCH = "Misc/scratch_mask_rcnn_R_50_FPN_3x_sn.yaml"

# Same architecture (depth, norm placement, number of convs), tiny widths and inputs.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.WEIGHTS", "",
    "MODEL.RESNETS.STEM_OUT_CHANNELS", 8,
    "MODEL.RESNETS.RES2_OUT_CHANNELS", 16,
    "MODEL.RESNETS.WIDTH_PER_GROUP", 4,
    "MODEL.FPN.OUT_CHANNELS", 8,
    "MODEL.ROI_BOX_HEAD.CONV_DIM", 8,
    "MODEL.ROI_BOX_HEAD.FC_DIM", 16,
    "MODEL.ROI_MASK_HEAD.CONV_DIM", 8,
    "MODEL.ROI_HEADS.NUM_CLASSES", 3,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16,
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE", 32,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 64,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 32,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 64,
    "MODEL.RPN.POST_NMS_TOPK_TEST", 32,
    "INPUT.MIN_SIZE_TRAIN", (64,),
    "INPUT.MAX_SIZE_TRAIN", 96,
    "INPUT.MIN_SIZE_TEST", 64,
    "INPUT.MAX_SIZE_TEST", 96,
    "SOLVER.IMS_PER_BATCH", 2,
    "SOLVER.BASE_LR", 0.01,
    "TEST.DETECTIONS_PER_IMAGE", 10,
]

# R50: stem 1 + res2 10 + res3 13 + res4 19 + res5 10 norm layers; stem and res2 are frozen at FREEZE_AT=2.
FROZEN_AT_2, TRAINABLE_BACKBONE, FPN_NORMS, HEAD_CONVS = 11, 42, 8, 4


def load_config(name, *opts):
    cfg = sn_d2.get_sn_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
    cfg.merge_from_list(TINY + list(opts))
    return cfg


def build(cfg):
    return sn_d2.SNTrainer.build_model(cfg)


def synthetic_batch(num_images=2, with_objects=True, size=(64, 80), seed=0):
    """Detectron2 model inputs: images with 0 or 2 boxes and their masks."""
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    batch = []
    for _ in range(num_images):
        image = torch.rand(3, h, w, generator=generator) * 255
        instances = Instances((h, w))
        boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 70.0, 40.0]])[: 2 if with_objects else 0]
        masks = torch.zeros(len(boxes), h, w, dtype=torch.bool)
        for mask, (x0, y0, x1, y1) in zip(masks, boxes.int().tolist()):
            mask[y0:y1, x0:x1] = True
        instances.gt_boxes = Boxes(boxes)
        instances.gt_classes = torch.tensor([0, 2])[: len(boxes)]
        instances.gt_masks = BitMasks(masks)
        batch.append({"image": image, "instances": instances, "height": h, "width": w})
    return batch


def train_one_iteration(cfg, model, batch):
    """One iteration of detectron2's own SimpleTrainer; returns the losses it logged."""
    from detectron2.engine import SimpleTrainer

    trainer = SimpleTrainer(model, iter([batch] * 10), build_optimizer(cfg, model))
    trainer.train(0, 1)
    return {k: v.latest() for k, v in trainer.storage.histories().items() if "loss" in k}


def estimate_and_infer(model, batch):
    """The paper's inference: batch-average statistics first, then the forward in eval mode."""
    with EventStorage():
        sn_plugin.batch_stats.recompute_batch_stats(model, [batch], num_batches=1,
                                                    forward=lambda m, b: m(b), progress=False)
    model.eval()
    with torch.no_grad():
        return model([{k: v for k, v in x.items() if k != "instances"} for x in batch])


def norm_types(module):
    """Types of the ``norm`` of every detectron2 Conv2d under ``module`` (None: no norm)."""
    return [type(m.norm) if m.norm is not None else None
            for m in module.modules() if hasattr(m, "norm") and isinstance(m, nn.Conv2d)]


def count(types, cls):
    return sum(t is cls for t in types)


# ---------------------------------------------------------------------------- every config


CONFIG_CASES = {
    # config: (backbone norms, FPN norm, whether the mask head exists)
    FASTER_SN: ("SN", SwitchNorm2d, False),
    FASTER_FROZENBN_SNHEAD: ("FrozenBN", None, False),
    MASK_SN: ("SN", SwitchNorm2d, True),
    MASK_FROZENBN_SNHEAD: ("FrozenBN", None, True),
    MASK_SN_SCRATCH: ("SN-scratch", SwitchNorm2d, True),
}


@pytest.mark.parametrize("name", list(CONFIG_CASES))
def test_config_has_sn_where_it_says_trains_and_infers(name):
    backbone, fpn_norm, mask_on = CONFIG_CASES[name]
    cfg = load_config(name)
    model = build(cfg)

    bottom_up = norm_types(model.backbone.bottom_up)
    assert len(bottom_up) == FROZEN_AT_2 + TRAINABLE_BACKBONE
    if backbone == "SN":
        assert bottom_up == [sn_d2.FrozenSwitchNorm] * FROZEN_AT_2 + [SwitchNorm2d] * TRAINABLE_BACKBONE
    elif backbone == "SN-scratch":
        assert cfg.MODEL.BACKBONE.FREEZE_AT == 0 and cfg.MODEL.WEIGHTS == ""
        assert bottom_up == [SwitchNorm2d] * (FROZEN_AT_2 + TRAINABLE_BACKBONE)
    else:
        assert bottom_up == [FrozenBatchNorm2d] * (FROZEN_AT_2 + TRAINABLE_BACKBONE)
    fpn = [n for n, m in model.backbone.named_children() if n.startswith("fpn_")]
    assert len(fpn) == FPN_NORMS
    assert [type(getattr(model.backbone, n).norm) if getattr(model.backbone, n).norm is not None else None
            for n in fpn] == [fpn_norm] * FPN_NORMS
    assert norm_types(model.roi_heads.box_head) == [SwitchNorm2d] * HEAD_CONVS
    assert len([m for m in model.roi_heads.box_head.modules() if isinstance(m, nn.Linear)]) == 1  # 4conv1fc
    assert hasattr(model.roi_heads, "mask_head") == mask_on
    if mask_on:
        assert norm_types(model.roi_heads.mask_head) == [SwitchNorm2d] * HEAD_CONVS + [None]  # + predictor
    assert norm_types(model.proposal_generator) == [None]  # the RPN head has no norm, as in detectron2
    # The paper's batch average: the moving average is off in every trainable SN layer.
    assert all(not m.using_moving_average for m in model.modules()
               if isinstance(m, SwitchNorm2d) and not isinstance(m, sn_d2.FrozenSwitchNorm))

    batch = synthetic_batch()
    losses = train_one_iteration(cfg, model, batch)
    assert {"loss_cls", "loss_box_reg", "loss_rpn_cls"} <= set(losses)
    assert ("loss_mask" in losses) == mask_on
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())

    outputs = estimate_and_infer(model, batch)
    assert len(outputs) == 2 and all(isinstance(o["instances"], Instances) for o in outputs)
    if mask_on:
        assert all(o["instances"].pred_masks.shape[1:] == (64, 80) for o in outputs)


def test_sn_config_needs_sn_cfg_for_model_zoo_base():
    # The configs inherit detectron2's Base-RCNN-FPN.yaml from its model zoo, which
    # only SNCfgNode finds; the same file is not found by plain detectron2.
    cfg = load_config(FASTER_SN)
    assert cfg.MODEL.RPN.IN_FEATURES == ["p2", "p3", "p4", "p5", "p6"]  # from detectron2's Base-RCNN-FPN
    assert cfg.SOLVER.WEIGHT_DECAY_NORM == 0.0 and cfg.TEST.SN_BATCH_STATS.ENABLED
    plain = get_cfg()
    sn_d2.add_sn_config(plain)
    with pytest.raises(Exception, match="Base-RCNN-FPN.yaml"):
        plain.merge_from_file(os.path.join(CONFIG_DIR, FASTER_SN))


def test_model_zoo_base_is_found_from_relative_paths(monkeypatch):
    monkeypatch.chdir(CONFIG_DIR)
    for name in ("Base-SN-RCNN-FPN.yaml", FASTER_FROZENBN_SNHEAD):  # _BASE_ "Base-RCNN-FPN.yaml" from ".", "../.."
        cfg = sn_d2.get_sn_cfg()
        cfg.merge_from_file(name)
        assert cfg.MODEL.ROI_BOX_HEAD.NORM == "SN" and cfg.MODEL.RPN.PRE_NMS_TOPK_TRAIN == 2000


def test_pretrained_configs_name_the_converted_checkpoint():
    for name in (FASTER_SN, MASK_SN):
        cfg = sn_d2.get_sn_cfg()
        cfg.merge_from_file(os.path.join(CONFIG_DIR, name))
        assert cfg.MODEL.WEIGHTS == "checkpoints/sn_resnet50_v1_8x2_d2.pkl"
        assert cfg.INPUT.FORMAT == "RGB" and not cfg.MODEL.RESNETS.STRIDE_IN_1X1
    cfg = sn_d2.get_sn_cfg()
    cfg.merge_from_file(os.path.join(CONFIG_DIR, MASK_SN))
    assert (cfg.SOLVER.STEPS, cfg.SOLVER.MAX_ITER) == ((120000, 160000), 180000)  # 2x


# ---------------------------------------------------------------------------- norm names


def test_every_detectron2_module_sees_sn():
    import detectron2.layers
    import detectron2.layers.batch_norm
    import detectron2.modeling.backbone.fpn
    import detectron2.modeling.backbone.resnet
    import detectron2.modeling.roi_heads.box_head
    import detectron2.modeling.roi_heads.mask_head

    for module in (detectron2.layers, detectron2.layers.batch_norm, detectron2.modeling.backbone.fpn,
                   detectron2.modeling.backbone.resnet, detectron2.modeling.roi_heads.box_head,
                   detectron2.modeling.roi_heads.mask_head):
        assert module.get_norm is sn_d2.get_norm, module.__name__
    assert isinstance(detectron2.layers.get_norm("SN", 8), SwitchNorm2d)
    assert isinstance(detectron2.layers.get_norm("SyncSN", 8), SyncSwitchNorm)
    assert isinstance(detectron2.layers.get_norm("GN", 32), nn.GroupNorm)  # detectron2's names still work


def test_register_is_idempotent_and_unregister_restores_detectron2():
    import detectron2.layers
    import detectron2.layers.batch_norm as batch_norm
    import detectron2.modeling.backbone.resnet as resnet

    sn_d2.register()
    sn_d2.register()
    assert resnet.get_norm is sn_d2.get_norm
    try:
        sn_d2.unregister()
        assert not sn_d2.is_registered()
        original = batch_norm.get_norm
        assert original is not sn_d2.get_norm
        assert resnet.get_norm is original and detectron2.layers.get_norm is original
        assert type(FrozenBatchNorm2d.convert_frozen_batchnorm(SwitchNorm2d(4))) is SwitchNorm2d
        with pytest.raises(KeyError, match="SN"):
            resnet.get_norm("SN", 8)
    finally:
        sn_d2.register()
    assert resnet.get_norm is sn_d2.get_norm and sn_d2.is_registered()


def test_patching_is_limited_to_detectron2s_modules(monkeypatch):
    import sys
    import types

    import detectron2.layers.batch_norm as batch_norm

    sn_d2.unregister()
    try:
        user_module = types.ModuleType("user_models")
        user_module.get_norm = batch_norm.get_norm  # `from detectron2.layers import get_norm` before registering
        monkeypatch.setitem(sys.modules, "user_models", user_module)
        sn_d2.register()
        assert batch_norm.get_norm is sn_d2.get_norm
        assert user_module.get_norm is not sn_d2.get_norm
    finally:
        sn_d2.register()


def test_register_warns_on_a_detectron2_version_it_was_not_written_for(monkeypatch):
    from sn_plugin.integrations import common

    sn_d2.unregister()
    monkeypatch.setattr(common, "toolkit_version", lambda distribution, module: "0.7")
    try:
        with pytest.warns(RuntimeWarning, match=r"written and tested for detectron2 0\.6, but detectron2 0\.7"):
            sn_d2.register()
    finally:
        sn_d2.register()
    assert sn_d2.is_registered()


def test_add_sn_config_only_adds_keys():
    sn_d2.unregister()
    try:
        cfg = get_cfg()
        cfg.MODEL.SN = type(cfg)({"EPS": 1e-3})  # a config that has some of the keys already
        sn_d2.add_sn_config(cfg)
        assert not sn_d2.is_registered()  # registration happens at import, not here
        assert cfg.MODEL.SN.EPS == 1e-3 and cfg.MODEL.SN.MOMENTUM == 0.1
        assert cfg.TEST.SN_BATCH_STATS.NUM_ITER == 200 and cfg.TEST.SN_BATCH_STATS.INCLUDE_BN is False
    finally:
        sn_d2.register()


def test_sn_before_registration_says_how_to_register():
    sn_d2.unregister()
    try:
        with pytest.raises(KeyError, match=r"sn_plugin\.integrations\.detectron2\.register\(\)"):
            sn_d2.get_norm("SN", 8)
    finally:
        sn_d2.register()


def test_unknown_norm_names_keep_detectron2s_error():
    import detectron2.layers.batch_norm as batch_norm

    sn_d2.unregister()
    detectron2_get_norm = batch_norm.get_norm
    sn_d2.register()
    with pytest.raises(KeyError) as ours:
        sn_d2.get_norm("SwitchNorm", 8)
    with pytest.raises(KeyError) as theirs:
        detectron2_get_norm("SwitchNorm", 8)
    assert ours.value.args == theirs.value.args == ("SwitchNorm",)
    cfg = load_config(FASTER_FROZENBN_SNHEAD, "MODEL.ROI_BOX_HEAD.NORM", "SNN")
    with pytest.raises(KeyError, match="SNN"):
        build(cfg)


def _non_default(name, default):
    if isinstance(default, bool):
        return not default
    if isinstance(default, float):
        return default / 2
    raise AssertionError(f"give the new SN option {name!r} a non-default test value here")


def test_every_layer_option_goes_through_model_sn_to_the_layers():
    """MODEL.SN has a key for every option of the core layers (their own list), each reaches the
    layers "SN" builds, and the frozen stages' layers keep them."""
    defaults = {name: param.default for name, param in
                inspect.signature(sn_plugin.SwitchNormBase.__init__).parameters.items()
                if name in sn_plugin.SwitchNormBase.option_names() and name != "num_features"}
    assert set(defaults) == set(sn_d2.LAYER_OPTIONS)
    wanted = {name: _non_default(name, default) for name, default in defaults.items()}
    opts = [item for name, value in wanted.items() for item in (f"MODEL.SN.{name.upper()}", value)]
    cfg = load_config(MASK_SN, *opts)
    assert sn_d2.layer_options_from_cfg(cfg) == wanted
    model = build(cfg)
    layers = sn_plugin.switch_norm_layers(model)
    frozen = [m for m in layers.values() if isinstance(m, sn_plugin.FrozenSwitchNorm)]
    assert len(frozen) == FROZEN_AT_2 and len(layers) == FROZEN_AT_2 + TRAINABLE_BACKBONE + FPN_NORMS + 2 * HEAD_CONVS
    for name, layer in layers.items():
        options = layer.options()
        assert {k: options[k] for k in wanted} == wanted, name
    with sn_d2.sn_layer_options(**wanted):
        sync = sn_d2.get_norm("SyncSN", 8)
    assert type(sync) is SyncSwitchNorm and {k: sync.options()[k] for k in wanted} == wanted
    with pytest.raises(TypeError, match="unknown SN layer option"):
        with sn_d2.sn_layer_options(groups=2):
            pass


def test_lazyconfig_takes_names_classes_and_callables():
    from detectron2 import model_zoo
    from detectron2.config import instantiate

    cfg = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
    cfg.backbone.bottom_up.stem.norm = "SN"
    cfg.backbone.bottom_up.stages.norm = "SN"
    cfg.backbone.bottom_up.freeze_at = 2
    cfg.backbone.norm = "SyncSN"
    cfg.roi_heads.box_head.conv_dims = [16, 16]
    cfg.roi_heads.box_head.conv_norm = SwitchNorm2d
    cfg.roi_heads.mask_head.conv_norm = lambda channels: SwitchNorm2d(channels, using_bn=False)
    model = instantiate(cfg)
    assert norm_types(model.backbone.bottom_up) == [sn_d2.FrozenSwitchNorm] * FROZEN_AT_2 + \
        [SwitchNorm2d] * TRAINABLE_BACKBONE
    assert count(norm_types(model.backbone), SyncSwitchNorm) == FPN_NORMS
    assert norm_types(model.roi_heads.box_head) == [SwitchNorm2d] * 2
    assert [m.using_bn for m in model.roi_heads.mask_head.modules() if isinstance(m, SwitchNorm2d)] == [False] * 4


# ---------------------------------------------------------------------------- FREEZE_AT


def test_freeze_at_freezes_sn_parameters_and_statistics():
    cfg = load_config(MASK_SN, "MODEL.SN.USING_MOVING_AVERAGE", True)
    model = build(cfg)
    frozen = {n: m for n, m in model.named_modules() if isinstance(m, sn_d2.FrozenSwitchNorm)}
    assert len(frozen) == FROZEN_AT_2
    assert all(n.startswith(("backbone.bottom_up.stem", "backbone.bottom_up.res2")) for n in frozen)
    trainable = model.backbone.bottom_up.res3[0].conv1.norm
    assert type(trainable) is SwitchNorm2d
    # Frozen layers keep SN's state-dict keys, so one checkpoint fits frozen and trainable stages.
    assert set(frozen["backbone.bottom_up.stem.conv1.norm"].state_dict()) == set(trainable.state_dict())

    model.train()
    assert not any(m.training for m in frozen.values())
    assert not any(p.requires_grad for m in frozen.values() for p in m.parameters())
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in frozen.items()}
    trainable_before = trainable.running_mean.clone(), trainable.mean_weight.detach().clone()

    train_one_iteration(cfg, model, synthetic_batch())
    with EventStorage():
        reports = sn_plugin.batch_stats.recompute_batch_stats(model, [synthetic_batch()], forward=lambda m, b: m(b),
                                                              progress=False)
    for name, layer in frozen.items():
        for key, value in layer.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key} changed"
    assert not torch.equal(trainable.running_mean, trainable_before[0])
    assert not torch.equal(trainable.mean_weight.detach(), trainable_before[1])
    assert not any(name in reports and reports[name].updated for name in frozen)


def test_the_adapters_frozen_switch_norm_is_the_core_class():
    assert sn_d2.FrozenSwitchNorm is sn_plugin.FrozenSwitchNorm


def test_old_names_still_import_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="use SNBatchStatsHook"):
        assert sn_d2.SNBatchStats is sn_d2.SNBatchStatsHook
    with pytest.warns(DeprecationWarning, match="use SNWeightLoggerHook"):
        assert sn_d2.SNImportanceWriter is sn_d2.SNWeightLoggerHook
    with pytest.warns(DeprecationWarning, match="convert_frozen_switch_norm"):
        assert sn_d2.freeze_switch_norm == sn_plugin.FrozenSwitchNorm.convert_frozen_switch_norm
    with pytest.raises(AttributeError):
        sn_d2.no_such_name


def test_convert_frozen_batchnorm_converts_sn_without_touching_the_original():
    sn = SwitchNorm2d(4, using_moving_average=False)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([0.1, 0.2, 0.3]))
        sn.running_mean.fill_(0.5)
    frozen = FrozenBatchNorm2d.convert_frozen_batchnorm(sn)
    assert isinstance(frozen, sn_d2.FrozenSwitchNorm) and frozen is not sn
    assert sn.mean_weight.requires_grad and sn.training
    assert torch.equal(frozen.mean_weight, sn.mean_weight) and torch.equal(frozen.running_mean, sn.running_mean)
    # Frozen statistics are used as they are; no "batch average not estimated" error.
    x = torch.randn(2, 4, 3, 3)
    sn.eval()
    sn.num_batches_tracked.fill_(1)
    torch.testing.assert_close(frozen(x), sn(x))
    block = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), SyncSwitchNorm(4))
    FrozenBatchNorm2d.convert_frozen_batchnorm(block)
    assert [type(m) for m in block] == [nn.Conv2d, FrozenBatchNorm2d, sn_d2.FrozenSwitchNorm]


# ---------------------------------------------------------------------------- weight decay


def _weight_decay_of(optimizer):
    return {p: group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_weight_decay_norm_applies_to_sn_parameters_through_the_trainers_optimizer():
    cfg = load_config(FASTER_SN, "SOLVER.WEIGHT_DECAY", 1e-4, "SOLVER.WEIGHT_DECAY_NORM", 0.0,
                      "SOLVER.CLIP_GRADIENTS.ENABLED", True)
    model = build(cfg)
    optimizer = sn_d2.SNTrainer.build_optimizer(cfg, model)
    decay = _weight_decay_of(optimizer)
    sn_params = [p for m in sn_plugin.switch_norm_layers(model).values() for p in m.parameters() if p.requires_grad]
    assert len(sn_params) == 4 * (TRAINABLE_BACKBONE + FPN_NORMS + HEAD_CONVS)  # gamma, beta, 2 logits
    assert all(decay[p] == 0.0 for p in sn_params)
    assert decay[model.backbone.bottom_up.res3[0].conv1.weight] == 1e-4
    frozen_params = [p for m in model.modules() if isinstance(m, sn_d2.FrozenSwitchNorm) for p in m.parameters()]
    assert frozen_params and not any(p in decay for p in frozen_params)
    # detectron2's own builder (its SGD settings and gradient clipping) is what the trainer's extends...
    plain = build_optimizer(cfg, model)
    assert type(optimizer).__name__ == type(plain).__name__ and optimizer.defaults == plain.defaults
    # ... and it is not patched: only the trainer's optimizer knows SN.
    assert _weight_decay_of(plain)[sn_params[0]] == 1e-4


def test_sn_parameters_get_what_detectron2_gives_bn_parameters():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), SwitchNorm2d(4))
    overrides = {"mean_weight": {"weight_decay": 0.3}}
    groups = sn_d2.get_default_optimizer_params(model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.01,
                                                weight_decay_bias=0.5, overrides=overrides)
    assert overrides == {"mean_weight": {"weight_decay": 0.3}}  # the caller's dict is left alone
    decay = {p: g["weight_decay"] for g in groups for p in g["params"]}
    conv, bn, sn = model
    assert decay[sn.weight] == decay[bn.weight] == 0.01
    assert decay[sn.bias] == decay[bn.bias] == 0.5  # a per-name override wins, as for BN
    assert decay[sn.mean_weight] == 0.3 and decay[sn.var_weight] == 0.01
    assert decay[conv.weight] == 1e-4
    # detectron2's own function does not know SN: this is what the wrapper fixes.
    import detectron2.solver

    plain = {p: g["weight_decay"] for g in detectron2.solver.get_default_optimizer_params(
        model, base_lr=0.1, weight_decay=1e-4, weight_decay_norm=0.01) for p in g["params"]}
    assert plain[sn.weight] == 1e-4


# ---------------------------------------------------------------------------- empty RoI batches


def test_sn_heads_handle_empty_roi_batches():
    cfg = load_config(MASK_SN)
    model = build(cfg)
    box_head = model.roi_heads.box_head
    empty = torch.zeros(0, cfg.MODEL.FPN.OUT_CHANNELS, 7, 7, requires_grad=True)
    out = box_head(empty)
    assert out.shape == (0, cfg.MODEL.ROI_BOX_HEAD.FC_DIM)
    out.sum().backward()
    assert empty.grad.shape == empty.shape

    # Training with an image without objects: the mask head gets 0 RoIs. Its SN parameters
    # still get (zero) gradients, which DistributedDataParallel needs from every process.
    model.train()
    with EventStorage():
        losses = model(synthetic_batch(num_images=1, with_objects=False))
    sum(losses.values()).backward()
    sn_grads = [p.grad for m in sn_plugin.switch_norm_layers(model.roi_heads.mask_head).values()
                for p in m.parameters()]
    assert len(sn_grads) == 4 * HEAD_CONVS and all(g is not None and not g.any() for g in sn_grads)
    losses = train_one_iteration(cfg, model, synthetic_batch(num_images=1, with_objects=False))
    assert losses["loss_mask"] == 0.0 and all(torch.isfinite(torch.tensor(v)) for v in losses.values())

    # Inference with no detection left: the mask head runs on 0 RoIs in eval mode.
    model.roi_heads.box_predictor.test_score_thresh = 1.01
    outputs = estimate_and_infer(model, synthetic_batch(num_images=1))
    assert len(outputs[0]["instances"]) == 0
    assert outputs[0]["instances"].pred_masks.shape[0] == 0
