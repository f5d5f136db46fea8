"""The demo (`make demo` = tools/demo.py): the config it trains, its failure messages, its --quick run end to end."""
import collections
import errno
import json
import os
import subprocess
import sys

import pytest

from sn_plugin.apps import coco_detector
from sn_plugin.data import CLASSES, CocoSplit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(REPO, "tools", "demo.py")


def _split(tmp_path, name, classes=CLASSES, max_side=128):
    return CocoSplit(annotations=str(tmp_path / f"{name}.json"), images=str(tmp_path / name), classes=classes,
                     num_images=3, num_objects=6, has_masks=True, max_side=max_side, max_objects_per_image=5)


def build(tmp_path, **plan):
    return coco_detector.build_config(coco_detector.default_config(), coco_detector.Plan(**plan),
                                      _split(tmp_path, "train"), _split(tmp_path, "val"), str(tmp_path / "out"))


def _norm_types(node, found=None):
    found = [] if found is None else found
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "norm_cfg":
                found.append(value["type"])
            else:
                _norm_types(value, found)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _norm_types(value, found)
    return found


def demo_main(argv, tmp_path):
    return coco_detector.main(["--data", str(tmp_path / "data"), *argv], prog="demo",
                              defaults={"dataset": "shapes"})


@pytest.mark.parametrize("norm", ["SN", "BN", "GN"])
def test_config_puts_the_chosen_norm_everywhere_and_the_schedule_fits(norm, tmp_path):
    pytest.importorskip("mmdet")
    cfg = build(tmp_path, norm=norm, max_iters=40, seed=1, batch_stats_batches=3, log_interval=5)
    types = _norm_types(cfg.model)
    assert len(types) == 4 and set(types) == {norm}  # backbone, neck, bbox head, mask head
    assert cfg.train_cfg.max_iters == 40 and cfg.train_cfg.val_interval == 40  # validates once, at the end
    assert cfg.param_scheduler[-1]["end"] == 40
    assert cfg.default_hooks.checkpoint.interval == 40
    assert cfg.train_dataloader.batch_size == 2
    assert cfg.train_dataloader.dataset.ann_file == str(tmp_path / "train.json")
    assert cfg.val_dataloader.dataset.data_prefix.img == str(tmp_path / "val") + os.sep
    assert cfg.val_dataloader.dataset.metainfo.classes == CLASSES
    assert [e.metric for e in cfg.val_evaluator] == ["bbox", "segm"]
    assert all(e.ann_file == str(tmp_path / "val.json") for e in cfg.val_evaluator)
    assert cfg.val_evaluator[0].outfile_prefix == str(tmp_path / "out" / "val_predictions")
    assert cfg.work_dir == str(tmp_path / "out" / "logs")
    hooks = [h["type"] for h in cfg.custom_hooks]
    assert hooks == (["SNBatchStatsHook", "SNWeightLoggerHook"] if norm == "SN" else [])


def test_config_builds_a_model_with_only_sn_layers(tmp_path):
    pytest.importorskip("mmdet")
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from sn_plugin import SwitchNormBase

    register_all_modules()
    model = MODELS.build(build(tmp_path, max_iters=10).model)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm))]
    assert norms and all(isinstance(m, SwitchNormBase) for m in norms)
    assert all(not m.using_moving_average for m in norms)  # the paper's batch-average statistics


def test_ap_table_reads_coco_metric_keys():
    metrics = {"bbox/bbox_mAP": 0.4321, "bbox/bbox_mAP_50": 0.7, "bbox/bbox_mAP_75": 0.45, "bbox/bbox_mAP_s": -1.0,
               "bbox/bbox_mAP_m": 0.3, "bbox/bbox_mAP_l": 0.5, "segm/segm_mAP": 0.25, "bbox/star_precision": 0.123,
               "segm/star_precision": 0.1, "segm/cross_precision": float("nan")}
    table = coco_detector.ap_table(metrics, CLASSES, ("bbox", "segm"))
    assert table["bbox"]["AP"] == 43.2 and table["bbox"]["AP50"] == 70.0
    assert table["bbox"]["APs"] is None  # COCO's -1: no objects of that size
    assert table["segm"]["AP"] == 25.0 and table["segm"]["AP50"] is None
    assert table["per_class"]["star"] == {"bbox": 12.3, "segm": 10.0}
    assert table["per_class"]["cross"]["segm"] is None  # CocoMetric's NaN: no such objects
    assert "segm" not in coco_detector.ap_table(metrics, CLASSES, ("bbox",))


def test_output_folder_of_someone_else_is_refused(tmp_path, capsys):
    out = tmp_path / "results"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    assert demo_main(["--quick", "--out", str(out)], tmp_path) == 1
    assert "not the output of an earlier run" in capsys.readouterr().err
    assert os.listdir(out) == ["thesis.tex"]


def test_unwritable_output_location_is_reported_before_training(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert demo_main(["--quick", "--out", str(blocker / "out")], tmp_path) == 1
    message = capsys.readouterr().err
    assert message.startswith("\ndemo: error:") and "cannot write" in message and "is not a folder" in message
    assert os.listdir(tmp_path) == ["a_file"]


def test_full_disk_is_reported_before_training(tmp_path, capsys, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(coco_detector.shutil, "disk_usage", lambda path: usage(2 ** 40, 2 ** 40, 10 * 2 ** 20))
    assert demo_main(["--quick", "--out", str(tmp_path / "out")], tmp_path) == 1
    assert "MiB free" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_disk_full_during_the_run_leaves_nothing_that_looks_complete(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mmdet")

    def write_then_fail(cfg, plan, dataset, train, val, staging, args, extra_hooks):
        with open(os.path.join(staging, "ap_table.md"), "w") as f:
            f.write("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(coco_detector, "_train_and_report", write_then_fail)
    assert demo_main(["--quick", "--out", str(tmp_path / "out")], tmp_path) == 1
    assert "disk is full" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["data"]  # no out, no staging folder


def test_quick_demo_end_to_end(tmp_path):
    pytest.importorskip("mmdet")
    out = tmp_path / "demo_out"
    command = [sys.executable, DEMO, "--quick", "--out", str(out), "--data", str(tmp_path / "data")]
    result = subprocess.run(command + ["--num-images", "2"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "Iter(train)" in log and "eta:" in log  # mmengine's progress lines
    assert "Average Precision" in log  # pycocotools' summary through CocoMetric
    assert f"Results are in {out}" in log
    assert sorted(os.listdir(tmp_path)) == ["data", "demo_out"]  # no staging folder left
    files = set(os.listdir(out))
    assert {"COMPLETE", "ap_table.json", "ap_table.md", "sn_importance_weights.png", "val_predictions.png",
            "val_predictions.bbox.json", "val_predictions.segm.json", "training_curve.png",
            "sn_importance_weights.csv", "config.py", "logs"} <= files
    assert os.path.isfile(out / "logs" / "iter_12.pth")
    with open(out / "ap_table.json") as f:
        table = json.load(f)
    assert table["norm"] == "SN" and table["iterations"] == 12 and table["images_per_batch"] == 2
    assert table["dataset"]["name"] == "shapes" and table["dataset"]["classes"] == list(CLASSES)
    for kind in ("bbox", "segm"):
        assert table[kind]["AP"] is not None and 0.0 <= table[kind]["AP"] <= 100.0
    from PIL import Image

    for name in ("sn_importance_weights.png", "val_predictions.png", "training_curve.png"):
        with Image.open(out / name) as image:
            assert image.width > 300 and image.height > 200

    # a second run replaces the first one's folder
    again = subprocess.run(command + ["--max-iters", "2", "--num-images", "1"], capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    with open(out / "ap_table.json") as f:
        assert json.load(f)["iterations"] == 2
    assert sorted(os.listdir(tmp_path)) == ["data", "demo_out"]


@pytest.mark.parametrize("max_iters", [2, 12, 40, 800])
def test_learning_rate_warms_up_to_the_base_rate_and_decays(max_iters, tmp_path):
    pytest.importorskip("mmdet")
    import torch
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import PARAM_SCHEDULERS

    cfg = build(tmp_path, max_iters=max_iters)
    wrapper = build_optim_wrapper(torch.nn.Linear(2, 2), cfg.optim_wrapper)
    schedulers = [PARAM_SCHEDULERS.build(dict(s, optimizer=wrapper)) for s in cfg.param_scheduler]
    rates = []
    for _ in range(max_iters):
        rates.append(wrapper.get_lr()["lr"][0])
        for scheduler in schedulers:
            scheduler.step()
    base = cfg.optim_wrapper.optimizer.lr
    assert max(rates) == pytest.approx(base, rel=0.05)  # a too-short warm-up left it at 1% of the base
    assert rates[-1] < rates[int(max_iters * 0.5)] or max_iters == 2


def test_python_without_torch_gets_a_message_instead_of_a_traceback(tmp_path):
    blocked = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['demo.py', '--quick', '--out', "
               f"{str(tmp_path / 'out')!r}]; runpy.run_path({DEMO!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", blocked], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "demo: error:" in result.stderr and "make demo" in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "out")
