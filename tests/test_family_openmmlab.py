"""CN, XBNResNet and the ESM hook in the OpenMMLab toolkits (sn_plugin.integrations.openmmlab.family),
and the configs of configs/{mmdet/xbn, mmpretrain/xbn, mmpretrain/cn, mmseg/cn}."""
import copy
import csv
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")
pytest.importorskip("mmpretrain")
pytest.importorskip("mmaction")

import sn_plugin.integrations.openmmlab as mm_sn  # noqa: E402
from mmcv.cnn import build_norm_layer  # noqa: E402
from mmengine.optim import build_optim_wrapper  # noqa: E402
from mmengine.registry import HOOKS, MODELS, TRANSFORMS, DefaultScope  # noqa: E402
from test_openmmlab_configs import (  # noqa: E402
    CONFIGS, _classification_batch, _detection_batch, _load, _offline_model_cfg, _segmentation_batch,
    quiet_init_report,  # noqa: F401 (an autouse fixture: quiet init logs here too)
)
from test_openmmlab_integration import _backbone  # noqa: E402

import sn_plugin  # noqa: E402
from sn_plugin import ConsistentNorm, ConsistentNorm2d, consistent_branch, estimation_shift  # noqa: E402
from sn_plugin.integrations.openmmlab import family  # noqa: E402

TOOLKITS = ("mmdet", "mmseg", "mmpretrain")
R50_BLOCKS = (3, 4, 6, 3)
R50_BOTTLENECKS = sum(R50_BLOCKS)


def _registry(toolkit):
    return __import__(f"{toolkit}.registry", fromlist=["MODELS"]).MODELS


# -- registration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("toolkit", TOOLKITS + ("mmaction",))
def test_every_toolkit_scope_finds_the_family_types(toolkit):
    registry = _registry(toolkit)
    for name, core_class in {"CN": sn_plugin.ConsistentNorm2d, "CN1d": sn_plugin.ConsistentNorm1d,
                             "CN2d": sn_plugin.ConsistentNorm2d, "CN3d": sn_plugin.ConsistentNorm3d}.items():
        assert registry.get(name) is core_class  # the core classes themselves
    assert registry.get("XBNResNet") is family.build_xbn_resnet
    assert registry.get("XBNResNeXt") is family.build_xbn_resnext
    assert registry.get("ConsistentNormModel") is family.ConsistentNormModel
    assert HOOKS.get("EstimationShiftHook") is family.EstimationShiftHook
    assert TRANSFORMS.get("CNBranchTag") is family.CNBranchTag


def test_norm_cfg_cn_builds_cn_layers_named_cn_with_their_options():
    name, layer = build_norm_layer(dict(type="CN", num_branches=3), 16, postfix=1)
    assert name == "cn1" and type(layer) is ConsistentNorm2d and layer.num_branches == 3
    assert all(type(b) is nn.BatchNorm2d and b.eps == 1e-5 for b in layer.branches)
    name, layer = build_norm_layer(dict(type="CN", num_branches=2, norm="GN", num_groups=4, requires_grad=False), 8)
    assert name == "cn" and all(type(b) is nn.GroupNorm and b.num_groups == 4 for b in layer.branches)
    assert not any(p.requires_grad for p in layer.parameters())
    name, layer = build_norm_layer(dict(type="CN3d", num_branches=2), 4)
    assert type(layer.branches[1]) is nn.BatchNorm3d


def test_registering_over_another_object_of_the_same_name_is_refused():
    MODELS.module_dict["XBNResNet"] = family.build_xbn_resnext
    try:
        with pytest.raises(KeyError, match="already holds a different 'XBNResNet'.*custom_imports"):
            mm_sn.register_family_types()
    finally:
        MODELS.module_dict["XBNResNet"] = family.build_xbn_resnet


@pytest.mark.parametrize("base_norm", ["BN", "SN"])
def test_norm_eval_freezes_every_cn_branch_and_frozen_stages_freeze_them(base_norm):
    model = _backbone("mmdet.registry", type="ResNet", depth=18, base_channels=8, frozen_stages=1, norm_eval=True,
                      norm_cfg=dict(type="CN", num_branches=2, norm=base_norm))
    model.train()
    layers = [m for m in model.modules() if isinstance(m, ConsistentNorm)]
    branches = [b for layer in layers for b in layer.branches]
    assert len(layers) == 1 + 8 * 2 + 3 and all(not b.training for b in branches)
    frozen = [model.cn1] + [m for m in model.layer1.modules() if isinstance(m, ConsistentNorm)]
    assert all(not p.requires_grad for layer in frozen for p in layer.parameters())
    before = [b.running_mean.clone() for b in branches]
    for k in (0, 1):
        with consistent_branch(model, k):
            model(torch.randn(2, 3, 32, 32))
    assert all(torch.equal(b.running_mean, m) for b, m in zip(branches, before))


# -- XBNResNet ---------------------------------------------------------------------------------------
def _expected_bfns(position, every, stem, blocks=R50_BLOCKS, stem_names=("bn1",)):
    """The paper's layout, written out: norm ``position`` of every ``every``-th bottleneck, counted over the net."""
    names, number = list(stem_names) if stem else [], 0
    for stage, count in enumerate(blocks, start=1):
        for index in range(count):
            number += 1
            if number % every == 0:
                names.append(f"layer{stage}.{index}.bn{position}")
    return names


VARIANTS = [
    ("mmdet", {}, dict(position=2, every=1, stem=False)),
    ("mmdet", dict(bfn_position=1, stem_bfn=True), dict(position=1, every=1, stem=True)),
    ("mmdet", dict(bfn_position=3, xbn_every=2), dict(position=3, every=2, stem=False)),
    ("mmseg", dict(xbn_every=8), dict(position=2, every=8, stem=False)),
    ("mmseg", dict(resnet_type="ResNetV1c", stem_bfn=True, bfn_cfg=dict(type="GN", num_groups=32)),
     dict(position=2, every=1, stem=True, stem_names=("stem.1", "stem.4", "stem.7"))),
    ("mmpretrain", dict(xbn_every=4, bfn_cfg=dict(type="IN")), dict(position=2, every=4, stem=False)),
    ("mmpretrain", dict(bfn_cfg=dict(type="SN"), stem_bfn=True), dict(position=2, every=1, stem=True)),
]


@pytest.mark.parametrize("toolkit, options, layout", VARIANTS,
                         ids=[f"{t}-{'-'.join(f'{k}={v}' for k, v in o.items()) or 'default'}" for t, o, _ in VARIANTS])
def test_xbn_resnet_builds_the_toolkits_resnet_with_the_bfn_where_the_variant_says(toolkit, options, layout):
    model = _backbone(f"{toolkit}.registry", type="XBNResNet", depth=50, **options)
    resnet_class = _registry(toolkit).get(options.get("resnet_type", "ResNet"))
    assert type(model) is resnet_class  # the toolkit's own class, nothing generated
    bfn_kind = {"GN": nn.GroupNorm, "IN": nn.InstanceNorm2d, "SN": sn_plugin.SwitchNorm2d}[
        options.get("bfn_cfg", {}).get("type", "GN")]
    bfns = [name for name, m in model.named_modules() if isinstance(m, bfn_kind)]
    assert bfns == _expected_bfns(**layout)
    stem_norms = 3 if options.get("resnet_type") == "ResNetV1c" else 1
    bns = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    assert len(bns) == stem_norms + 3 * R50_BOTTLENECKS + 4 - len(bfns)  # every other norm stays BN
    if bfn_kind is nn.GroupNorm:
        groups = options.get("bfn_cfg", {}).get("num_groups", 64)
        assert all(model.get_submodule(name).num_groups == groups for name in bfns)
    outputs = model(torch.randn(2, 3, 64, 64))
    assert outputs[-1].shape[:2] == (2, 2048)


def test_xbn_resnext_and_basic_blocks():
    resnext = _backbone("mmdet.registry", type="XBNResNeXt", depth=50, groups=32, base_width=4)
    assert type(resnext).__name__ == "ResNeXt"
    assert isinstance(resnext.layer1[0].bn2, nn.GroupNorm) and resnext.layer1[0].bn2.num_channels == 128
    resnet18 = _backbone("mmpretrain.registry", type="XBNResNet", depth=18, bfn_position=3)
    assert isinstance(resnet18.layer1[0].bn2, nn.GroupNorm) and isinstance(resnet18.layer1[0].bn1, _BatchNorm)


def test_frozen_bns_with_trainable_bfns_and_frozen_stages():
    """The paper's COCO fine-tuning: BN frozen (norm_cfg requires_grad=False, norm_eval), GN trains;
    frozen_stages freezes the BFNs of its stages too; every gamma starts at 1."""
    model = _backbone("mmdet.registry", type="XBNResNet", depth=50, frozen_stages=1, norm_eval=True,
                      norm_cfg=dict(type="BN", requires_grad=False), stem_bfn=True)
    model.init_weights()
    model.train()
    norms = {name: m for name, m in model.named_modules() if isinstance(m, (_BatchNorm, nn.GroupNorm))}
    assert all(torch.all(m.weight == 1) for m in norms.values()), "no zero-gamma initialisation"
    frozen_stage = {n for n in norms if n == "bn1" or n.startswith("layer1.")}
    trainable = {n for n, m in norms.items() if isinstance(m, nn.GroupNorm) and n not in frozen_stage}
    assert trainable and isinstance(norms["bn1"], nn.GroupNorm) and isinstance(norms["layer1.0.bn2"], nn.GroupNorm)
    for name, m in norms.items():
        assert all(p.requires_grad == (name in trainable) for p in m.parameters()), name
        assert m.training == (name in trainable), name
    state = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in norms.items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    sum(out.square().mean() for out in model(torch.randn(2, 3, 64, 64))).backward()
    optimizer.step()
    for name, m in norms.items():
        unchanged = all(torch.equal(v, state[name][k]) for k, v in m.state_dict().items())
        assert unchanged == (name not in trainable), name


@pytest.mark.parametrize("toolkit, resnet_type", [("mmdet", "ResNet"), ("mmseg", "ResNetV1c"),
                                                  ("mmpretrain", "ResNet")])
def test_a_bn_resnet50_checkpoint_fills_every_layer_that_exists_in_both(toolkit, resnet_type, tmp_path):
    bn_model = _backbone(f"{toolkit}.registry", type=resnet_type, depth=50)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in bn_model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
    path = tmp_path / "bn_resnet50.pth"
    torch.save({"state_dict": bn_model.state_dict()}, path)
    xbn = _backbone(f"{toolkit}.registry", type="XBNResNet", resnet_type=resnet_type, depth=50,
                    init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    xbn.init_weights()
    bn_state, xbn_state = bn_model.state_dict(), xbn.state_dict()
    shared = [key for key in xbn_state if key in bn_state]
    assert set(xbn_state) - set(shared) == set()  # every key of the XBN model is in the BN checkpoint
    assert all(torch.equal(xbn_state[key], bn_state[key]) for key in shared)
    dropped = sorted(set(bn_state) - set(xbn_state))
    assert dropped and all(key.split(".")[-1] in ("running_mean", "running_var", "num_batches_tracked")
                           and key.split(".")[-2] == "bn2" for key in dropped)


def test_a_resnet_the_scope_lacks_is_a_clear_error():
    with pytest.raises(KeyError, match="default scope 'mmdet' has no 'NoSuchNet'"):
        _backbone("mmdet.registry", type="XBNResNet", resnet_type="NoSuchNet", depth=50)


def test_channels_that_the_groups_do_not_divide_name_the_layer():
    with pytest.raises(ValueError, match="layer1.0.bn2 has 32 channels.*num_groups=64"):
        _backbone("mmdet.registry", type="XBNResNet", depth=50, base_channels=32)


# -- ConsistentNormModel -------------------------------------------------------------------------------
def _classifier_cfg(num_branches=3, **wrapper):
    return dict(
        type="ConsistentNormModel",
        model=dict(type="ImageClassifier",
                   backbone=dict(type="ResNet", depth=18, base_channels=8, zero_init_residual=False,
                                 norm_cfg=dict(type="CN", num_branches=num_branches)),
                   neck=dict(type="GlobalAveragePooling"),
                   head=dict(type="LinearClsHead", num_classes=10, in_channels=64)),
        data_preprocessor=dict(num_classes=10, mean=[127.5] * 3, std=[64.0] * 3),
        **wrapper)


def _build(cfg, scope="mmpretrain"):
    with DefaultScope.overwrite_default_scope(scope):
        torch.manual_seed(0)
        model = MODELS.build(cfg)
        model.init_weights()
    return model


VIEWS = [None, dict(type="Resize", size=24), dict(type="Resize", size=16)]


def test_algorithm_1_sums_every_views_loss_through_its_branch_and_steps_once():
    model = _build(_classifier_cfg(views=VIEWS))
    reference = copy.deepcopy(model.model)
    batch = _classification_batch()
    log_vars = model.train_step(copy.deepcopy(batch), build_optim_wrapper(model, dict(
        optimizer=dict(type="SGD", lr=0.1))))
    assert set(log_vars) == {"loss", "branch0.loss", "branch1.loss", "branch2.loss"}

    # The same step by hand: view k = the batch resized, through branch k; summed losses; one SGD step.
    data = model.data_preprocessor(copy.deepcopy(batch), True)
    sizes = [None, 24, 16]
    total = 0
    for k, size in enumerate(sizes):
        inputs = data["inputs"] if size is None else nn.functional.interpolate(
            data["inputs"], size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        with consistent_branch(reference, k):
            loss = reference(inputs, data["data_samples"], "loss")["loss"]
        assert float(loss.detach()) == pytest.approx(float(log_vars[f"branch{k}.loss"]), rel=1e-5)
        total = total + loss
    assert float(total) == pytest.approx(float(log_vars["loss"]), rel=1e-5)
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
    total.backward()
    optimizer.step()
    for (name, ours), theirs in zip(model.model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(ours.float(), theirs.float(), atol=1e-5), name
    # Every branch of every CN layer was trained by its own view.
    stem = model.model.backbone.cn1
    assert all(int(branch.num_batches_tracked) == 1 for branch in stem.branches)


def test_inference_uses_the_test_branch_only():
    model = _build(_classifier_cfg(views=VIEWS, test_branch=2))
    generator = torch.Generator().manual_seed(1)
    for layer in model.modules():
        if isinstance(layer, ConsistentNorm):  # branch 2 with statistics of its own
            layer.branches[2].running_mean.normal_(generator=generator)
    reference = copy.deepcopy(model.model).eval()
    model.eval()
    batch = _classification_batch()
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        predictions = model.val_step(copy.deepcopy(batch))
        data = model.data_preprocessor(copy.deepcopy(batch), False)
        with consistent_branch(reference, 2):  # predict writes into the data samples it is given: copies
            expected = reference(data["inputs"], copy.deepcopy(data["data_samples"]), "predict")
        with consistent_branch(reference, 0):
            branch0 = reference(data["inputs"], copy.deepcopy(data["data_samples"]), "predict")
    for ours, theirs in zip(predictions, expected):
        assert torch.equal(ours.pred_score, theirs.pred_score)
    assert not all(torch.equal(a.pred_score, b.pred_score) for a, b in zip(expected, branch0))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert model.model.backbone.cn1.active_branch == 0  # restored after the forward


def _tagged_batch(*tags, size=64):
    from mmpretrain.structures import DataSample
    generator = torch.Generator().manual_seed(0)
    samples = [DataSample().set_gt_label(k) for k in range(len(tags))]
    for sample, tag in zip(samples, tags):
        if tag is not None:
            sample.set_metainfo({"cn_tag": tag})
    return dict(inputs=[torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=generator)
                        for _ in tags], data_samples=samples)


def test_a_branch_per_tag_trains_only_the_branches_of_the_batchs_tags():
    model = _build(_classifier_cfg(num_branches=2, branch_of=dict(cityscapes=0, gta5=1))).train()
    stem = model.model.backbone.cn1

    def train_forward(batch):
        return model(**model.data_preprocessor(batch, True), mode="loss")

    train_forward(_tagged_batch("gta5", "gta5"))
    assert [int(b.num_batches_tracked) for b in stem.branches] == [0, 1]  # Cityscapes' branch untouched
    train_forward(_tagged_batch("gta5", "cityscapes", "cityscapes", "gta5"))
    assert [int(b.num_batches_tracked) for b in stem.branches] == [1, 2]
    with pytest.raises(KeyError, match="no 'cn_tag'.*CNBranchTag"):
        train_forward(_tagged_batch("gta5", None))
    with pytest.raises(KeyError, match="no branch for tag"):
        train_forward(_tagged_batch("gta5", "kitti"))


@pytest.mark.parametrize("wrapper, message", [
    (dict(), "either views .* or branch_of"),
    (dict(views=VIEWS, branch_of=dict(a=0)), "not both"),
    (dict(views=VIEWS + [None]), "4 branches are used but the model's CN layers have 3"),
    (dict(branch_of=dict(a=0, b=3)), "4 branches are used"),
    (dict(views=[None, dict(type="Blur")]), "view 1 is"),
    (dict(views=VIEWS, test_branch=3), "test_branch"),
])
def test_the_model_refuses_what_it_cannot_do(wrapper, message):
    with pytest.raises(ValueError, match=message):
        _build(_classifier_cfg(**wrapper))


def test_a_model_without_cn_layers_is_refused():
    cfg = _classifier_cfg(views=VIEWS)
    cfg["model"]["backbone"]["norm_cfg"] = dict(type="BN")
    with pytest.raises(ValueError, match="no CN layers"):
        _build(cfg)


def test_cn_branch_tag_reaches_the_data_sample_through_the_segmentation_configs_pipeline(tmp_path):
    """The Cityscapes + GTA5 config: each dataset's samples carry its tag into the model."""
    import numpy as np
    from mmengine.registry import DATASETS
    from PIL import Image

    cfg = _load("mmseg/cn/deeplabv3_r50-d8-cn_4xb2-80k_cityscapes-gta5-512x1024.py")
    datasets = copy.deepcopy(cfg.train_dataloader.dataset)
    for dataset in datasets.datasets:
        root = tmp_path / dataset.data_root
        for folder, suffix, mode in ((dataset.data_prefix.img_path, dataset.get("img_suffix", "_leftImg8bit.png"),
                                      "RGB"),
                                     (dataset.data_prefix.seg_map_path,
                                      dataset.get("seg_map_suffix", "_gtFine_labelTrainIds.png"), "L")):
            (root / folder).mkdir(parents=True)
            Image.fromarray(np.zeros((16, 32, 3 if mode == "RGB" else 1), np.uint8).squeeze()).save(
                root / folder / f"a{suffix}")
        dataset.data_root = str(root)
        # Keep the pipeline's loading, tagging and packing; skip the (full-size) augmentation.
        dataset.pipeline = [t for t in dataset.pipeline if t.type in ("LoadImageFromFile", "LoadAnnotations",
                                                                      "CNBranchTag", "PackSegInputs")]
        dataset.pop("indices", None)
    with DefaultScope.overwrite_default_scope("mmseg"):
        concat = DATASETS.build(copy.deepcopy(datasets))
        assert len(concat) == 2
        assert [concat[i]["data_samples"].metainfo["cn_tag"] for i in range(2)] == ["cityscapes", "gta5"]
        assert cfg.model.branch_of == dict(cityscapes=0, gta5=1)
        # The config's loader draws every batch from one dataset.
        from mmengine.runner import Runner
        loader_cfg = copy.deepcopy(cfg.train_dataloader)
        loader_cfg.update(dataset=datasets, num_workers=0, persistent_workers=False)
        batches = itertools.islice(Runner.build_dataloader(loader_cfg, seed=0), 4)
        tags = [[sample.metainfo["cn_tag"] for sample in batch["data_samples"]] for batch in batches]
    assert sorted(map(tuple, tags))[::3] == [("cityscapes", "cityscapes"), ("gta5", "gta5")]
    assert all(len(set(batch)) == 1 for batch in tags)


def test_source_batch_sampler_draws_each_batch_from_one_dataset():
    from mmengine.dataset import DefaultSampler
    from torch.utils.data import ConcatDataset

    data = ConcatDataset([list(range(5)), list(range(3)), list(range(4))])
    sampler = family.SourceBatchSampler(DefaultSampler(data, shuffle=True, seed=0), batch_size=2)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(12))  # every sample once
    assert all(len({data.cumulative_sizes.index(next(e for e in data.cumulative_sizes if i < e))
                    for i in batch}) == 1 for batch in batches)
    assert sorted(len(batch) for batch in batches) == [1, 1, 2, 2, 2, 2, 2] and len(sampler) == 6
    assert sorted(len(batch) for batch in family.SourceBatchSampler(sampler.sampler, 2, drop_last=True)) == [2] * 5
    with pytest.raises(TypeError, match="ConcatDataset"):
        family.SourceBatchSampler(DefaultSampler(list(range(4))), batch_size=2)


# -- the configs ---------------------------------------------------------------------------------------
GN64 = 1 + R50_BOTTLENECKS  # the stem and the second norm of every bottleneck
# config -> what its model must hold: the norm classes by component, counted.
FAMILY_CONFIGS = {
    "mmdet/xbn/faster-rcnn_r50-xbn_fpn_1x_coco.py": dict(gn={"backbone": GN64}, frozen_bn=True),
    "mmdet/xbn/faster-rcnn_r50-xbn_fpn-gn_4conv1fc-gn_1x_coco.py":
        dict(gn={"backbone": GN64, "neck": 8, "roi_head.bbox_head": 4}, frozen_bn=True),
    "mmdet/xbn/mask-rcnn_r50-xbn_fpn-gn_4conv1fc-gn_1x_coco.py":
        dict(gn={"backbone": GN64, "neck": 8, "roi_head.bbox_head": 4, "roi_head.mask_head": 4}, frozen_bn=True),
    "mmdet/xbn/faster-rcnn_r50-xbn-scratch_fpn-gn_4conv1fc-gn_1x_coco.py":
        dict(gn={"backbone": GN64, "neck": 8, "roi_head.bbox_head": 4}, frozen_bn=False),
    "mmpretrain/xbn/resnet50-xbn_8xb32_in1k.py": dict(gn={"backbone": GN64}, frozen_bn=False),
    "mmpretrain/cn/resnet50-cn_8xb32-multires-coslr-120e_in1k.py": dict(cn={"model.backbone": 53}, branches=3),
    "mmseg/cn/deeplabv3_r50-d8-cn_4xb2-80k_cityscapes-gta5-512x1024.py":
        dict(cn={"model.backbone": 55, "model.decode_head": 6, "model.auxiliary_head": 1}, branches=2),
}


def test_every_family_config_is_covered():
    shipped = {str(p.relative_to(CONFIGS)) for folder in ("mmdet/xbn", "mmpretrain/xbn", "mmpretrain/cn", "mmseg/cn")
               for p in (CONFIGS / folder).glob("*.py")}
    assert shipped == set(FAMILY_CONFIGS)


def _offline(cfg, tmp_path):
    """test_openmmlab_configs' offline model config, also for a model inside ConsistentNormModel."""
    if cfg.model.type != "ConsistentNormModel":
        return _offline_model_cfg(cfg, tmp_path)
    from mmengine.config import Config
    inner = Config(dict(model=cfg.model.model, data_preprocessor=cfg.data_preprocessor))
    wrapped = copy.deepcopy(cfg.model)
    wrapped.model = _offline_model_cfg(inner, tmp_path)
    return wrapped


def _count_by_component(model, kind):
    counts = {}
    for name, m in model.named_modules():
        if type(m) is kind:
            component = next(c for c in ("model.backbone", "model.decode_head", "model.auxiliary_head", "backbone",
                                         "neck", "roi_head.bbox_head", "roi_head.mask_head")
                             if name.startswith(c + "."))
            counts[component] = counts.get(component, 0) + 1
    return counts


@pytest.mark.parametrize("relative", sorted(FAMILY_CONFIGS))
def test_family_config_builds_places_its_norms_trains_and_predicts(relative, tmp_path):
    cfg = _load(relative)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):  # the toolkit's scope, for this test only
        _build_train_and_predict(cfg, FAMILY_CONFIGS[relative], tmp_path)


def _build_train_and_predict(cfg, expected, tmp_path):
    torch.manual_seed(0)
    model = MODELS.build(_offline(cfg, tmp_path))
    model.init_weights()
    if "gn" in expected:
        assert _count_by_component(model, nn.GroupNorm) == expected["gn"]
        bns = [m for m in model.backbone.modules() if isinstance(m, _BatchNorm)]
        assert len(bns) == 53 - R50_BOTTLENECKS - 1
        model.train()
        assert all(m.weight.requires_grad != expected["frozen_bn"] for m in bns)
        assert all(m.training != expected["frozen_bn"] for m in bns)
    else:
        assert _count_by_component(model, ConsistentNorm2d) == expected["cn"]
        assert {m.num_branches for m in model.modules() if isinstance(m, ConsistentNorm)} == {expected["branches"]}

    scope = cfg.default_scope
    batch = {"mmdet": _detection_batch, "mmpretrain": _classification_batch,
             "mmseg": lambda: _segmentation_batch(19)}[scope]()
    if "branch_of" in cfg.model:  # a batch from one dataset, as the config's batch sampler draws them
        for sample in batch["data_samples"]:
            sample.set_metainfo({"cn_tag": "gta5"})
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    log_vars = model.train_step(copy.deepcopy(batch), optim_wrapper)
    assert torch.isfinite(log_vars["loss"])
    if "views" in cfg.model:
        assert {f"branch{k}.loss" for k in range(3)} <= set(log_vars)
    model.eval()
    with torch.no_grad():
        predictions = model.val_step(copy.deepcopy(batch))
    assert len(predictions) == 2


def test_an_xbn_imagenet_checkpoint_loads_completely_into_every_detection_config(tmp_path):
    """configs/mmpretrain/xbn makes the checkpoints configs/mmdet/xbn fine-tune, with nothing missing."""
    cfg = _load("mmpretrain/xbn/resnet50-xbn_8xb32_in1k.py")
    with DefaultScope.overwrite_default_scope("mmpretrain"):
        classifier = MODELS.build(_offline_model_cfg(cfg, tmp_path))
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for value in classifier.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
    checkpoint = tmp_path / "xbn-resnet50_8xb32_in1k.pth"
    torch.save({"meta": {}, "state_dict": classifier.state_dict()}, checkpoint)
    expected = {k: v for k, v in classifier.backbone.state_dict().items()}
    for relative in sorted(r for r in FAMILY_CONFIGS if r.startswith("mmdet/") and "scratch" not in r):
        backbone_cfg = copy.deepcopy(_load(relative).model.backbone)
        assert backbone_cfg.init_cfg.checkpoint == "checkpoints/" + checkpoint.name
        backbone_cfg.init_cfg.checkpoint = str(checkpoint)
        with DefaultScope.overwrite_default_scope("mmdet"):
            backbone = MODELS.build(backbone_cfg)
        backbone.init_weights()
        state = backbone.state_dict()
        assert set(state) == set(expected), relative
        assert all(torch.equal(state[k], expected[k]) for k in state), relative


# -- EstimationShiftHook -------------------------------------------------------------------------------
def _toy_runner(tmp_path, hook, max_epochs=2, val=True):
    from mmengine.evaluator import BaseMetric
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class Toy(BaseModel):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8),
                                     nn.BatchNorm1d(8), nn.Linear(8, 1))

        def forward(self, inputs, data_samples=None, mode="tensor"):
            out = self.net(torch.stack(inputs))
            return {"loss": (out - 1).square().mean()} if mode == "loss" else list(out)

    class Count(BaseMetric):
        def process(self, data_batch, data_samples):
            self.results.append(len(data_samples))

        def compute_metrics(self, results):
            return {"count": sum(results)}

    generator = torch.Generator().manual_seed(0)
    data = [dict(inputs=torch.randn(4, generator=generator) * 3 + 1) for _ in range(12)]
    loader = dict(dataset=data, batch_size=4, sampler=dict(type="DefaultSampler", shuffle=False),
                  collate_fn=dict(type="pseudo_collate"))
    evaluation = dict(val_dataloader=loader, val_cfg=dict(), val_evaluator=[Count()]) if val else {}
    return Runner(model=Toy(), work_dir=str(tmp_path), train_dataloader=loader,
                  train_cfg=dict(by_epoch=True, max_epochs=max_epochs, val_interval=100),
                  optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.05)), custom_hooks=[hook],
                  default_hooks=dict(checkpoint=None), default_scope="mmengine",
                  experiment_name=f"esm_{tmp_path.name}", **evaluation)


def test_the_estimation_shift_hook_logs_writes_and_plots_every_epoch(tmp_path):
    runner = _toy_runner(tmp_path, dict(type="EstimationShiftHook"))
    runner.train()
    log_dir = Path(runner.log_dir)
    with open(log_dir / "estimation_shift.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["epoch"], r["layer"]) for r in rows] == [(e, f"net.{i}") for e in ("1", "2") for i in (1, 4)]
    assert (log_dir / "estimation_shift.png").stat().st_size > 0
    log = next(log_dir.glob("*.log")).read_text()
    assert "EstimationShiftHook: estimation shift after epoch 1 over 2 layers" in log
    assert "estimation shift after epoch 2" in log
    scalars = [json.loads(line) for line in (log_dir / "vis_data" / "scalars.json").read_text().splitlines()]
    esm = [s for s in scalars if "esm/mu_mean" in s]
    assert [s["step"] for s in esm] == [1, 2] and all(s["esm/sigma_max"] >= s["esm/sigma_mean"] for s in esm)
    # The last row is the shift of the trained model on the validation data, measured as validation runs it.
    report = estimation_shift(runner.model, runner.val_dataloader, forward=lambda m, b: m.val_step(b))
    assert [float(r["esm_mu"]) for r in rows[-2:]] == pytest.approx([r.esm_mu for r in report], rel=1e-6)
    assert report[0].samples == 12


def test_the_estimation_shift_hook_every_n_iterations(tmp_path):
    runner = _toy_runner(tmp_path, dict(type="EstimationShiftHook", by_epoch=False, interval=4, plot=False),
                         max_epochs=2)
    runner.train()  # 3 iterations per epoch: measured after iterations 4 and 6 (the last)
    with open(Path(runner.log_dir) / "estimation_shift.csv") as f:
        assert sorted({int(r["iteration"]) for r in csv.DictReader(f)}) == [4, 6]
    assert not (Path(runner.log_dir) / "estimation_shift.png").exists()


def test_the_estimation_shift_hook_needs_validation_data_and_good_arguments(tmp_path):
    runner = _toy_runner(tmp_path, dict(type="EstimationShiftHook"), val=False)
    with pytest.raises(RuntimeError, match="no val loop.*val_dataloader"):
        runner.train()
    for bad, message in ((dict(interval=0), "interval"), (dict(dataloader="train"), "'val' or 'test'"),
                         (dict(max_batches=0), "max_batches")):
        with pytest.raises(ValueError, match=message):
            family.EstimationShiftHook(**bad)


# -- benchmarks/bench_xbn_detection.py -----------------------------------------------------------------
def test_the_xbn_detection_benchmark_trains_the_demo_detector_with_an_xbn_backbone(tmp_path, monkeypatch):
    """Its XBN trainings run the training command on the demo's config with an XBN backbone and BN
    elsewhere (the command sets every norm_cfg to BN); the others are the command's own norms."""
    import importlib

    from mmengine.config import Config

    monkeypatch.syspath_prepend(str(CONFIGS.parent / "benchmarks"))
    bench = importlib.import_module("bench_xbn_detection")
    trainings = {t.key: t for t in bench.plan(["BN", "XBN"], [3], 5, str(tmp_path), "data", quick=False)}
    assert set(trainings) == {("BN", 3), ("XBN", 3)}
    arguments = list(trainings[("XBN", 3)].arguments)
    assert arguments[arguments.index("--norm") + 1] == "BN" and "--config" not in trainings[("BN", 3)].arguments
    cfg = Config.fromfile(arguments[arguments.index("--config") + 1])
    backbone_cfg = copy.deepcopy(cfg.model.backbone)
    backbone_cfg.norm_cfg = dict(type="BN")
    with DefaultScope.overwrite_default_scope("mmdet"):
        backbone = MODELS.build(backbone_cfg)
    gns = [name for name, m in backbone.named_modules() if isinstance(m, nn.GroupNorm)]
    assert gns == ["bn1"] + [f"layer{s}.{i}.bn1" for s in range(1, 5) for i in range(2)]
    assert {backbone.get_submodule(name).num_groups for name in gns} == {bench.BFN_GROUPS}

    results = {(norm, seed): {"bbox": {"AP": ap, "AP50": 2 * ap}, "segm": {"AP": ap / 2, "AP50": ap}}
               for norm, seed, ap in (("BN", 0, 10.0), ("BN", 1, 12.0), ("XBN", 0, 20.0))}
    table = bench.summarise(results, ["BN", "XBN"])
    assert table["BN"]["bbox_AP"]["mean"] == 11.0 and table["XBN"]["segm_AP50"]["mean"] == 20.0
