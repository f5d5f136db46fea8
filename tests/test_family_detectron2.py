"""CN, the XBN backbones and the ESM hook in detectron2 (sn_plugin.integrations.detectron2.family),
and configs/detectron2/COCO-Detection/faster_rcnn_R_50_FPN_1x_xbn.yaml."""
import csv
import json
import os

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

pytest.importorskip("detectron2")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import SimpleTrainer  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_backbone  # noqa: E402
from detectron2.modeling.backbone.resnet import ResNet  # noqa: E402
from detectron2.solver import build_optimizer  # noqa: E402

import sn_plugin  # noqa: E402
from sn_plugin import ConsistentNorm2d, consistent_branch, estimation_shift  # noqa: E402
from sn_plugin.integrations import detectron2 as sn_d2  # noqa: E402
from sn_plugin.integrations.detectron2 import family, train_net  # noqa: E402
from test_detectron2_end_to_end import DATASET, tiny_coco  # noqa: E402,F401  (the fixture)
from test_detectron2_integration import (  # noqa: E402
    CONFIG_DIR, FASTER_SN, TINY, load_config, synthetic_batch, train_one_iteration,
)

XBN = "COCO-Detection/faster_rcnn_R_50_FPN_1x_xbn.yaml"
# TINY's widths with GN: the bottlenecks have 4, 8, 16, 32 channels, the FPN and the box head 32.
XBN_TINY = ["MODEL.XBN.BFN_GROUPS", 4, "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32]
BLOCKS = (3, 4, 6, 3)


def _bottleneck_norms(bottom_up, position):
    return [bottom_up.get_submodule(f"res{stage}.{i}.conv{position}.norm")
            for stage, count in enumerate(BLOCKS, start=2) for i in range(count)]


# -- NORM: "CN" --------------------------------------------------------------------------------------
def test_norm_cn_builds_cn_layers_with_the_config_options_and_freeze_at_freezes_their_branches():
    cfg = load_config(FASTER_SN, "MODEL.RESNETS.NORM", "CN", "MODEL.FPN.NORM", "CN", "MODEL.ROI_BOX_HEAD.NORM", "CN",
                      "MODEL.CN.NUM_BRANCHES", 3)
    model = sn_d2.SNTrainer.build_model(cfg)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, ConsistentNorm2d)}
    assert len(layers) == 53 + 8 + 4 and all(m.num_branches == 3 for m in layers.values())
    frozen_stages = ("backbone.bottom_up.stem.", "backbone.bottom_up.res2.")
    frozen = [m for name, m in layers.items() if name.startswith(frozen_stages)]
    assert len(frozen) == 11  # FREEZE_AT 2: the stem and res2, every branch a FrozenBatchNorm2d
    assert all(type(b) is FrozenBatchNorm2d for m in frozen for b in m.branches)
    trained = [m for m in layers.values() if not any(m is f for f in frozen)]
    assert all(type(b) is nn.BatchNorm2d for m in trained for b in m.branches)

    # detectron2's own trainer: branch 0 unless the forward selects another.
    res3 = model.backbone.bottom_up.res3[0].conv1.norm
    train_one_iteration(cfg, model, synthetic_batch())
    assert [int(b.num_batches_tracked) for b in res3.branches] == [1, 0, 0]
    with consistent_branch(model, 2):
        train_one_iteration(cfg, model, synthetic_batch())
    assert [int(b.num_batches_tracked) for b in res3.branches] == [1, 0, 1]


def test_cn_with_sn_or_gn_branches_takes_their_options_from_the_config():
    cfg = load_config(FASTER_SN, "MODEL.FPN.NORM", "CN", "MODEL.CN.NORM", "SN", "MODEL.SN.USING_MOVING_AVERAGE", False)
    model = sn_d2.SNTrainer.build_model(cfg)
    fpn = model.backbone.fpn_lateral2.norm
    assert isinstance(fpn, ConsistentNorm2d) and fpn.num_branches == 2
    assert all(isinstance(b, sn_plugin.SwitchNorm2d) and not b.using_moving_average for b in fpn.branches)
    cfg = load_config(FASTER_SN, "MODEL.FPN.NORM", "CN", "MODEL.CN.NORM", "GN", "MODEL.CN.NUM_GROUPS", 4)
    fpn = sn_d2.SNTrainer.build_model(cfg).backbone.fpn_lateral2.norm
    assert all(isinstance(b, nn.GroupNorm) and b.num_groups == 4 for b in fpn.branches)


# -- the XBN backbones ---------------------------------------------------------------------------------
def test_the_xbn_config_has_gn_where_it_says_frozen_bns_trainable_gns_trains_and_infers():
    cfg = load_config(XBN, *XBN_TINY)
    model = sn_d2.SNTrainer.build_model(cfg)
    bottom_up = model.backbone.bottom_up
    gns = [bottom_up.stem.conv1.norm] + _bottleneck_norms(bottom_up, 2)
    assert all(type(m) is nn.GroupNorm and m.num_groups == 4 for m in gns)
    bns = [m for m in bottom_up.modules() if isinstance(m, (FrozenBatchNorm2d, _BatchNorm))]
    assert len(bns) == 53 - len(gns) and all(type(m) is FrozenBatchNorm2d for m in bns)
    assert all(type(m.norm) is nn.GroupNorm for m in model.roi_heads.box_head.children() if hasattr(m, "norm"))
    # FREEZE_AT 2: the stem's and res2's GNs are frozen with their stages; the others train.
    frozen_gns = [bottom_up.stem.conv1.norm] + _bottleneck_norms(bottom_up, 2)[:3]
    trained_gns = _bottleneck_norms(bottom_up, 2)[3:]
    assert all(not p.requires_grad for m in frozen_gns for p in m.parameters())
    assert all(p.requires_grad for m in trained_gns for p in m.parameters())
    before = {id(m): m.weight.detach().clone() for m in gns}
    frozen_state = [m.running_mean.clone() for m in bns]
    losses = train_one_iteration(cfg, model, synthetic_batch())
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    assert all(torch.equal(m.weight, before[id(m)]) for m in frozen_gns)
    assert all(not torch.equal(m.weight, before[id(m)]) for m in trained_gns)
    assert all(torch.equal(m.running_mean, s) for m, s in zip(bns, frozen_state))
    model.eval()
    with torch.no_grad():
        outputs = model([{k: v for k, v in x.items() if k != "instances"} for x in synthetic_batch()])
    assert len(outputs) == 2 and "instances" in outputs[0]


@pytest.mark.parametrize("position, every, stem", [(1, 1, False), (3, 2, False), (2, 4, True)])
def test_every_variant_of_the_plain_xbn_backbone_from_scratch(position, every, stem):
    cfg = load_config(FASTER_SN, "MODEL.BACKBONE.NAME", "build_xbn_resnet_backbone", "MODEL.RESNETS.NORM", "BN",
                      "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.XBN.BFN_GROUPS", 4, "MODEL.XBN.POSITION", position,
                      "MODEL.XBN.EVERY", every, "MODEL.XBN.STEM", stem)
    backbone = build_backbone(cfg)
    assert type(backbone) is ResNet
    numbered = [m for i, m in enumerate(_bottleneck_norms(backbone, position), start=1) if i % every == 0]
    expected = ([backbone.stem.conv1.norm] if stem else []) + numbered
    gns = [m for m in backbone.modules() if isinstance(m, nn.GroupNorm)]
    assert [id(m) for m in gns] == [id(m) for m in expected]
    assert len([m for m in backbone.modules() if type(m) is nn.BatchNorm2d]) == 53 - len(gns)
    bn = backbone.res2[0].shortcut.norm
    backbone.train()
    backbone(torch.randn(2, 3, 64, 64))
    assert int(bn.num_batches_tracked) == 1


def test_a_bn_detectron2_checkpoint_fills_every_layer_that_exists_in_both(tmp_path):
    bn_cfg = load_config(XBN, *XBN_TINY, "MODEL.BACKBONE.NAME", "build_resnet_fpn_backbone")
    bn_model = sn_d2.SNTrainer.build_model(bn_cfg)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for value in bn_model.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand(value.shape, generator=generator) + 0.5)
    path = str(tmp_path / "bn_model.pth")
    torch.save({"model": bn_model.state_dict()}, path)
    xbn = sn_d2.SNTrainer.build_model(load_config(XBN, *XBN_TINY))
    DetectionCheckpointer(xbn).load(path)
    bn_state, xbn_state = bn_model.state_dict(), xbn.state_dict()
    assert set(xbn_state) <= set(bn_state)
    assert all(torch.equal(xbn_state[k], bn_state[k]) for k in xbn_state)
    unused = set(bn_state) - set(xbn_state)
    assert unused == {f"{norm}.{stat}" for norm in ["backbone.bottom_up.stem.conv1.norm"] + [
        f"backbone.bottom_up.res{s}.{i}.conv2.norm" for s, c in enumerate(BLOCKS, start=2) for i in range(c)]
        for stat in ("running_mean", "running_var")}


def test_channels_that_the_groups_do_not_divide_are_a_clear_error():
    with pytest.raises(ValueError, match="stem.conv1.norm has 8 channels.*num_groups=64"):
        sn_d2.SNTrainer.build_model(load_config(XBN, "MODEL.FPN.OUT_CHANNELS", 32, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32))


# -- EstimationShiftHook --------------------------------------------------------------------------------
def test_the_hook_measures_every_period_and_after_the_last_iteration(tmp_path):
    cfg = load_config(XBN, *XBN_TINY, "OUTPUT_DIR", str(tmp_path))
    model = sn_d2.SNTrainer.build_model(cfg)
    images = [{k: v for k, v in x.items() if k != "instances"} for x in synthetic_batch()]
    hook = family.EstimationShiftHook(2, model, [images], str(tmp_path), plot=False)
    trainer = SimpleTrainer(model, iter([synthetic_batch()] * 10), build_optimizer(cfg, model))
    trainer.register_hooks([hook])
    trainer.train(0, 3)  # iterations 1, 2, 3: measured after 2 and after the last
    with open(tmp_path / "estimation_shift.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["iteration"]) for r in rows}) == [2, 3]
    assert len(rows) == 2 * 36  # the frozen BNs of backbone: 53 norms less the 17 GNs
    assert [iteration for _, iteration in trainer.storage.history("esm/sigma_max").values()] == [1, 2]
    report = estimation_shift(model, [images], forward=lambda m, b: m(b))
    assert [float(r["esm_mu"]) for r in rows[-36:]] == pytest.approx([r.esm_mu for r in report], rel=1e-6)
    with pytest.raises(ValueError, match="period"):
        family.EstimationShiftHook(-1, model, [], None)


def test_the_xbn_config_trains_with_the_command_and_the_esm_hook_writes_its_files(tiny_coco, tmp_path):
    output = str(tmp_path / "output")
    opts = TINY + XBN_TINY + [
        "MODEL.ROI_HEADS.NUM_CLASSES", 2,
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", f"('{DATASET}',)",
        "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.MAX_ITER", 3,
        "SOLVER.CHECKPOINT_PERIOD", 100,
        "TEST.ESM.ENABLED", True,
        "TEST.ESM.PERIOD", 2,
        "TEST.ESM.MAX_BATCHES", 2,
        "OUTPUT_DIR", output,
    ]
    train_net.main(["--config-file", os.path.join(CONFIG_DIR, XBN), *map(str, opts)])
    with open(os.path.join(output, "estimation_shift.csv")) as f:
        assert sorted({int(r["iteration"]) for r in csv.DictReader(f)}) == [2, 3]
    assert os.path.getsize(os.path.join(output, "estimation_shift.png")) > 0
    with open(os.path.join(output, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    # detectron2's writer keeps the latest value of each metric when it writes: the last measurement.
    assert [r["iteration"] for r in records if "esm/mu_mean" in r][-1] == 2


def test_no_esm_hook_unless_enabled_and_a_test_set():
    cfg = load_config(XBN, *XBN_TINY)
    assert family.estimation_shift_hook(cfg, nn.Identity(), lambda cfg, name: []) is None
    cfg.TEST.ESM.ENABLED, cfg.DATASETS.TEST = True, ()
    with pytest.raises(ValueError, match="DATASETS.TEST is empty"):
        family.estimation_shift_hook(cfg, nn.Identity(), lambda cfg, name: [])
