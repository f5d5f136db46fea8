"""sn_plugin's detectron2 LazyConfig files, their train command, and the configs by name.

Each LazyConfig is built as shipped except for widths, image and RoI-batch sizes, shrunk to
those of the YAML tests (tests/test_detectron2_integration.py), so the model it builds can be
compared with its YAML counterpart's module by module; then it trains an iteration with its
own optimizer and infers. The command of tools/lazyconfig_train_net_d2.py trains, evaluates
and re-evaluates a small SN Mask R-CNN on the COCO-format dataset of the YAML end-to-end test.
"""
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("detectron2")

import detectron2.data.transforms as T  # noqa: E402
from detectron2.config import LazyCall as L  # noqa: E402
from detectron2.config import LazyConfig, instantiate  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling.backbone.resnet import BottleneckBlock, ResNet  # noqa: E402

import sn_plugin  # noqa: E402
from sn_plugin import SwitchNorm2d, SyncSwitchNorm  # noqa: E402
from sn_plugin.integrations import config_files  # noqa: E402
from sn_plugin.integrations import detectron2 as sn_d2  # noqa: E402
from sn_plugin.integrations.detectron2 import lazy_train_net  # noqa: E402
from test_detectron2_end_to_end import DATASET, tiny_coco  # noqa: E402,F401  (the fixture)
from test_detectron2_integration import (  # noqa: E402
    CONFIG_CASES, FPN_NORMS, FROZEN_AT_2, HEAD_CONVS, TINY, TRAINABLE_BACKBONE, estimate_and_infer, norm_types,
    synthetic_batch,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAZY = {yaml_name: yaml_name[:-len(".yaml")] + ".py" for yaml_name in CONFIG_CASES}
MASK_SN = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.py"


# ---------------------------------------------------------------------------- tiny versions


def tiny_stages(depth, **kwargs):
    """``ResNet.make_default_stages`` of ResNet-50 with the YAML tests' widths (stem 8, res2 16, doubling)."""
    assert depth == 50, depth
    stages, in_channels = [], 8
    for index, num_blocks in enumerate((3, 4, 6, 3)):
        out_channels = 16 * 2 ** index
        stages.append(ResNet.make_stage(
            block_class=BottleneckBlock, num_blocks=num_blocks, stride_per_block=[1 if index == 0 else 2] +
            [1] * (num_blocks - 1), in_channels=in_channels, out_channels=out_channels,
            bottleneck_channels=out_channels // 4, **kwargs))
        in_channels = out_channels
    return stages


def shrink(cfg, num_classes=3):
    """The config with TINY's sizes (in place; returns it): same depth, norms, heads and options."""
    model = cfg.model
    model.backbone.bottom_up.stem.out_channels = 8
    model.backbone.bottom_up.stages._target_ = tiny_stages
    model.backbone.out_channels = 8
    model.proposal_generator.head.in_channels = 8
    model.proposal_generator.update(batch_size_per_image=32, pre_nms_topk=[64, 64], post_nms_topk=[32, 32])
    heads = model.roi_heads
    heads.update(num_classes=num_classes, batch_size_per_image=16)
    heads.box_head.update(input_shape=ShapeSpec(channels=8, height=7, width=7),
                          conv_dims=[8] * len(heads.box_head.conv_dims), fc_dims=[16] * len(heads.box_head.fc_dims))
    heads.box_predictor.update(input_shape=ShapeSpec(channels=16), test_topk_per_image=10)
    if "mask_head" in heads:
        heads.mask_head.update(input_shape=ShapeSpec(channels=8, height=14, width=14),
                               conv_dims=[8] * len(heads.mask_head.conv_dims))
    cfg.train.device = "cpu"
    cfg.dataloader.train.mapper.augmentations = [
        L(T.ResizeShortestEdge)(short_edge_length=(64,), max_size=96, sample_style="choice"),
        L(T.RandomFlip)(horizontal=True),
    ]
    cfg.dataloader.test.mapper.augmentations = [L(T.ResizeShortestEdge)(short_edge_length=64, max_size=96)]
    return cfg


def _optimizer(cfg, model):
    return instantiate({**cfg.optimizer, "params": {**cfg.optimizer.params, "model": model}})


def _settings(optimizer):
    """(lr, weight decay) of every parameter, and the optimizer's defaults."""
    per_param = {p: (group["lr"], group["weight_decay"]) for group in optimizer.param_groups for p in group["params"]}
    return per_param, optimizer.defaults


# ---------------------------------------------------------------------------- every config


@pytest.mark.parametrize("yaml_name", list(CONFIG_CASES))
def test_lazy_config_is_its_yaml_config_trains_and_infers(yaml_name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # loaded by name, from anywhere
    cfg = shrink(sn_d2.get_sn_lazy_config(LAZY[yaml_name]))
    yaml_cfg = sn_d2.get_sn_cfg(yaml_name)  # as shipped; its model is built with TINY's sizes
    assert cfg.model.backbone.bottom_up.stages.depth == yaml_cfg.MODEL.RESNETS.DEPTH == 50
    model = instantiate(cfg.model)
    tiny_yaml_cfg = yaml_cfg.clone()
    tiny_yaml_cfg.merge_from_list(TINY)
    yaml_model = sn_d2.SNTrainer.build_model(tiny_yaml_cfg)

    # The same network, layer for layer: module types (so norms and frozen stages), their
    # printed settings (strides, channels), parameter and buffer shapes, what trains, every SN
    # layer's options, and the input format.
    assert [(n, type(m)) for n, m in model.named_modules()] == [(n, type(m)) for n, m in yaml_model.named_modules()]
    assert str(model) == str(yaml_model)
    assert {k: v.shape for k, v in model.state_dict().items()} == \
        {k: v.shape for k, v in yaml_model.state_dict().items()}
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == \
        [(n, p.requires_grad) for n, p in yaml_model.named_parameters()]
    assert {n: m.options() for n, m in sn_plugin.switch_norm_layers(model).items()} == \
        {n: m.options() for n, m in sn_plugin.switch_norm_layers(yaml_model).items()}
    assert model.input_format == yaml_cfg.INPUT.FORMAT == cfg.dataloader.train.mapper.image_format
    assert torch.equal(model.pixel_mean, yaml_model.pixel_mean) and torch.equal(model.pixel_std, yaml_model.pixel_std)

    # SN where the config says (the YAML test's expectations).
    backbone, fpn_norm, mask_on = CONFIG_CASES[yaml_name]
    bottom_up = norm_types(model.backbone.bottom_up)
    if backbone == "SN":
        assert bottom_up == [sn_d2.FrozenSwitchNorm] * FROZEN_AT_2 + [SwitchNorm2d] * TRAINABLE_BACKBONE
    elif backbone == "SN-scratch":
        assert bottom_up == [SwitchNorm2d] * (FROZEN_AT_2 + TRAINABLE_BACKBONE)
    else:
        assert bottom_up == [FrozenBatchNorm2d] * (FROZEN_AT_2 + TRAINABLE_BACKBONE)
    fpn = [getattr(model.backbone, f"fpn_{kind}{level}").norm for kind in ("lateral", "output")
           for level in (2, 3, 4, 5)]
    assert [type(norm) if norm is not None else None for norm in fpn] == [fpn_norm] * FPN_NORMS
    assert norm_types(model.roi_heads.box_head) == [SwitchNorm2d] * HEAD_CONVS
    assert hasattr(model.roi_heads, "mask_head") == mask_on == cfg.dataloader.train.mapper.use_instance_mask
    assert all(not m.using_moving_average for m in sn_plugin.switch_norm_layers(model).values()
               if not isinstance(m, sn_d2.FrozenSwitchNorm))

    # The training settings: weights, schedule, optimizer (SN's weight decay), batch statistics.
    assert cfg.train.init_checkpoint == yaml_cfg.MODEL.WEIGHTS
    assert cfg.train.max_iter == yaml_cfg.SOLVER.MAX_ITER
    milestones = cfg.lr_multiplier.scheduler.milestones
    assert [m * cfg.train.max_iter / milestones[-1] for m in milestones[:-1]] == list(yaml_cfg.SOLVER.STEPS)
    assert cfg.lr_multiplier.warmup_length * cfg.train.max_iter == pytest.approx(yaml_cfg.SOLVER.WARMUP_ITERS)
    optimizer = _optimizer(cfg, model)
    assert _settings(optimizer) == _settings(sn_d2.SNTrainer.build_optimizer(yaml_cfg, model))
    hook = instantiate({**cfg.train.sn_batch_stats, "model": model, "data_loader": []})
    assert yaml_cfg.TEST.SN_BATCH_STATS.ENABLED and hook._num_batches == yaml_cfg.TEST.SN_BATCH_STATS.NUM_ITER
    assert hook._include_batchnorm == yaml_cfg.TEST.SN_BATCH_STATS.INCLUDE_BN and hook._period == 5000

    from detectron2.engine import SimpleTrainer
    batch = synthetic_batch()
    trainer = SimpleTrainer(model, iter([batch] * 2), optimizer)
    trainer.train(0, 1)
    losses = {k: v.latest() for k, v in trainer.storage.histories().items() if "loss" in k}
    assert ("loss_mask" in losses) == mask_on and all(torch.isfinite(torch.tensor(v)) for v in losses.values())
    outputs = estimate_and_infer(model, batch)
    assert len(outputs) == 2 and all(len(o["instances"]) <= 10 for o in outputs)


def test_lazy_configs_save_as_loadable_yaml(tmp_path):
    """detectron2's command saves the config it ran (config.yaml); SN's entries must survive that."""
    cfg = sn_d2.get_sn_lazy_config("Misc/scratch_mask_rcnn_R_50_FPN_3x_sn.py")
    LazyConfig.save(cfg, str(tmp_path / "config.yaml"))
    assert not (tmp_path / "config.yaml.pkl").exists()  # detectron2's fallback when YAML cannot hold it
    saved = LazyConfig.load(str(tmp_path / "config.yaml"))
    assert saved.model.backbone.norm == {"_target_": "sn_plugin.integrations.detectron2.sn_norm",
                                         "using_moving_average": False}
    assert saved.train.sn_batch_stats.period == saved.train.eval_period
    assert saved.optimizer.params._target_ == "sn_plugin.integrations.detectron2.get_default_optimizer_params"


# ---------------------------------------------------------------------------- sn_norm


def test_sn_norm_builds_sn_layers_with_options_and_checks_them():
    layer = instantiate(L(sn_d2.sn_norm)(using_moving_average=False, eps=1e-3))(16)
    assert type(layer) is SwitchNorm2d and layer.num_features == 16
    assert (layer.using_moving_average, layer.eps) == (False, 1e-3)
    assert type(sn_d2.sn_norm("SyncSN", using_bn=False)(8)) is SyncSwitchNorm
    with pytest.raises(TypeError, match="using_moving_averages"):
        sn_d2.sn_norm(using_moving_averages=False)
    with pytest.raises(ValueError, match=r"unknown norm 'BN'.*\['SN', 'SyncSN'\]"):
        sn_d2.sn_norm("BN")


# ---------------------------------------------------------------------------- configs by name


def test_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
    yaml_name = "COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.yaml"
    direct = sn_d2.get_sn_cfg()
    direct.merge_from_file(os.path.join(REPO, "configs", "detectron2", yaml_name))
    monkeypatch.chdir(tmp_path)
    assert sn_d2.get_sn_cfg(yaml_name).dump() == direct.dump()
    assert sn_d2.get_sn_config_file(yaml_name) == config_files.config_file("detectron2/" + yaml_name)
    lazy = sn_d2.get_sn_lazy_config("COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.py")
    assert "mask_head" not in lazy.model.roi_heads and lazy.train.max_iter == 90000


def test_a_missing_or_wrong_kind_of_name_says_what_exists():
    with pytest.raises(FileNotFoundError, match=r"no detectron2 config 'COCO-Detection/faster_rcnn_R_50_FPN_1x_gn"
                                                r"\.yaml'.*COCO-Detection/faster_rcnn_R_50_FPN_1x_sn\.py.*"
                                                r"COCO-Detection/faster_rcnn_R_50_FPN_1x_sn\.yaml"):
        sn_d2.get_sn_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x_gn.yaml")
    with pytest.raises(ValueError, match="get_sn_lazy_config"):
        sn_d2.get_sn_cfg("COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.py")
    with pytest.raises(ValueError, match="get_sn_cfg"):
        sn_d2.get_sn_lazy_config("COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.yaml")


def test_configs_load_from_the_packaged_copy(tmp_path, monkeypatch):
    """A wheel's copy under sn_plugin/.mim/configs is what loads, _BASE_ and relative imports included."""
    installed = tmp_path / "sn_plugin" / ".mim" / "configs"
    shutil.copytree(os.path.join(REPO, "configs", "detectron2"), installed / "detectron2")
    # Mark the copy's shared files, to see that inheritance stays inside the copy.
    with open(installed / "detectron2" / "Base-SN-RCNN-FPN.yaml", "a") as f:
        f.write("  EVAL_PERIOD: 1234\n")  # appended under TEST
    with open(installed / "detectron2" / "common" / "train.py", "a") as f:
        f.write("train.eval_period = 1234\n")
    monkeypatch.setattr(config_files, "_INSTALLED", installed)
    monkeypatch.chdir(tmp_path)

    path = sn_d2.get_sn_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.yaml")
    assert path == str(installed / "detectron2" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_2x_sn.yaml")
    cfg = sn_d2.get_sn_cfg("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.yaml")
    assert cfg.TEST.EVAL_PERIOD == 1234 and cfg.MODEL.MASK_ON and cfg.MODEL.RPN.IN_FEATURES[-1] == "p6"
    for name in LAZY.values():
        assert sn_d2.get_sn_lazy_config(name).train.eval_period == 1234, name


# ---------------------------------------------------------------------------- the command


def _tiny_user_config(tmp_path, name=MASK_SN):
    """A user's LazyConfig that starts from one of sn_plugin's by name (shrunk for the test)."""
    path = tmp_path / "my_config.py"
    path.write_text(
        "from sn_plugin.integrations.detectron2 import get_sn_lazy_config\n"
        "from test_detectron2_lazyconfig import shrink\n\n"
        f"_cfg = shrink(get_sn_lazy_config({name!r}), num_classes=2)\n"
        "model, dataloader, optimizer, lr_multiplier, train = (\n"
        "    _cfg[key] for key in ('model', 'dataloader', 'optimizer', 'lr_multiplier', 'train'))\n")
    return str(path)


def _overrides(output):
    return [
        f"dataloader.train.dataset.names={DATASET}", f"dataloader.test.dataset.names={DATASET}",
        "dataloader.train.num_workers=0", "dataloader.test.num_workers=0", "dataloader.train.total_batch_size=2",
        "model.roi_heads.box_predictor.test_score_thresh=0.0", "optimizer.lr=0.01",
        "train.max_iter=4", "train.eval_period=0", "train.log_period=2", "train.checkpointer.period=100",
        "train.init_checkpoint=", "train.sn_batch_stats.num_batches=2", f"train.output_dir={output}",
    ]


@pytest.fixture
def recorded(monkeypatch):
    """The order in which the command re-estimates statistics and evaluates; the evaluations' results."""
    events, evaluations = [], []
    update_stats, do_test = sn_d2.SNBatchStatsHook.update_stats, lazy_train_net.do_test

    def recording_update_stats(self, when="now"):
        events.append("batch_stats")
        update_stats(self, when)

    def recording_do_test(cfg, model):
        events.append("evaluate")
        evaluations.append(do_test(cfg, model))
        return evaluations[-1]

    monkeypatch.setattr(sn_d2.SNBatchStatsHook, "update_stats", recording_update_stats)
    monkeypatch.setattr(lazy_train_net, "do_test", recording_do_test)
    return events, evaluations


def test_train_evaluate_and_eval_only(tiny_coco, tmp_path, recorded):  # noqa: F811
    events, evaluations = recorded
    output = tmp_path / "output"
    config = _tiny_user_config(tmp_path)
    lazy_train_net.main(["--config-file", config, *_overrides(output)])  # one process
    results = evaluations[-1]

    # The statistics are re-estimated after the last iteration, before the checkpoint and the evaluation.
    assert events == ["batch_stats", "evaluate"]
    assert set(results) == {"bbox", "segm"} and "AP" in results["bbox"]
    with open(output / "metrics.json") as f:
        records = [json.loads(line) for line in f]
    last = next(r for r in reversed(records) if "sn_weights/backbone.fpn_lateral2/mean_IN" in r)
    assert last["iteration"] == 3 and "sn_weights/roi_heads.mask_head.mask_fcn4/var_LN" in last
    assert LazyConfig.load(str(output / "config.yaml")).train.max_iter == 4  # what ran, with the overrides

    # The final checkpoint holds the estimated statistics, so it evaluates as it is.
    events.clear()
    final = str(output / "model_final.pth")
    lazy_train_net.main(["--eval-only", "--config-file", config, *_overrides(output),
                         f"train.init_checkpoint={final}"])
    assert events == ["evaluate"]
    assert evaluations[-1]["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], nan_ok=True)


def test_eval_only_estimates_missing_statistics_unless_the_hook_is_off(tiny_coco, tmp_path, recorded):  # noqa: F811
    events, _ = recorded
    config = _tiny_user_config(tmp_path)
    overrides = _overrides(tmp_path / "output")  # init_checkpoint "": a model without estimates
    lazy_train_net.main(["--eval-only", "--config-file", config, *overrides])
    assert events == ["batch_stats", "evaluate"]
    with pytest.raises(RuntimeError, match="recompute_batch_stats"):
        lazy_train_net.main(["--eval-only", "--config-file", config, *overrides, "train.sn_batch_stats=null"])


def test_config_file_takes_a_shipped_name_where_no_such_file_exists(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert lazy_train_net.config_file_path(MASK_SN) == config_files.config_file("detectron2/" + MASK_SN)
    own = tmp_path / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_2x_sn.py"
    own.parent.mkdir()
    own.write_text("")
    assert lazy_train_net.config_file_path(MASK_SN) == MASK_SN  # a file of that name wins
    for wrong in ("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_gn.py", "my_config.yaml"):
        with pytest.raises(SystemExit):
            lazy_train_net.main(["--config-file", wrong])
        assert wrong in capsys.readouterr().err


def test_coco_evaluator_is_fast_only_with_detectron2s_compiled_extension(tiny_coco):  # noqa: F811
    from detectron2.evaluation import COCOEvaluator
    from omegaconf import OmegaConf

    from sn_plugin.integrations.detectron2.trainer import _compiled_ops_available

    def evaluator(spec):
        return lazy_train_net._evaluator(OmegaConf.create({"dataloader": {"evaluator": spec}},
                                                          flags={"allow_objects": True}))

    assert evaluator(L(COCOEvaluator)(dataset_name=DATASET))._use_fast_impl == _compiled_ops_available()
    assert evaluator(L(COCOEvaluator)(dataset_name=DATASET, use_fast_impl=True))._use_fast_impl  # the config's word
    (listed,) = evaluator([L(COCOEvaluator)(dataset_name=DATASET, use_fast_impl=False)])
    assert isinstance(listed, COCOEvaluator)


def test_num_processes_trains_on_cpu_and_refuses_a_gpu_device(tmp_path):
    """--num-processes is shared with tools/train_net_d2.py (tested end to end there): here, that the
    lazy command takes it, trains on the CPU, and says why a GPU device on the command line cannot be."""
    name = "COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.py"
    parser = lazy_train_net.argument_parser()
    args = parser.parse_args(["--config-file", lazy_train_net.config_file_path(name), "--num-processes", "2",
                              f"train.output_dir={tmp_path}"])
    assert lazy_train_net.setup(args).train.device == "cpu"
    args = parser.parse_args(["--config-file", lazy_train_net.config_file_path(name), "--num-processes", "2",
                              "train.device=cuda", f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="--num-processes trains on CPU"):
        lazy_train_net.setup(args)
