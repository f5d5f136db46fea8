"""The miniature reproductions' --quick modes, and the pieces their tables are made of."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_batch_size = _load("bench_batch_size")


@pytest.mark.parametrize("norm, kind", [("BN", torch.nn.BatchNorm2d), ("GN", torch.nn.GroupNorm)])
def test_small_resnet_uses_the_requested_norm_everywhere(norm, kind):
    from sn_plugin import SwitchNorm2d

    model = bench_batch_size.SmallResNet(norm)
    norms = [m for m in model.modules() if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, SwitchNorm2d))]
    assert len(norms) == 9 and all(isinstance(m, kind) for m in norms)
    if norm == "GN":
        assert [m.num_groups for m in norms][:2] == [8, 8]  # 16 channels: 2 per group
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_unknown_norm_is_refused():
    with pytest.raises(ValueError, match="unknown norm 'LN'"):
        bench_batch_size.make_norm("LN", 16)


def test_summary_gives_mean_spread_and_sn_weights():
    runs = [{"norm": n, "batch_size": 4, "seed": s, "top1": 90.0 + s,
             "sn_mean_weights": [0.2, 0.3, 0.5], "sn_var_weights": [0.1, 0.1 * s, 0.8 - 0.1 * s]}
            for n in ("BN", "GN", "SN") for s in (0, 2)]
    table = bench_batch_size.summarise(runs, [4])
    cell = table["SN"][4]
    assert cell["mean"] == 91.0 and cell["std"] == pytest.approx(2 ** 0.5)
    assert cell["var_weights"] == pytest.approx([0.1, 0.1, 0.7])
    assert "mean_weights" not in table["BN"][4]


def test_batch_size_quick_mode_writes_table_json_and_plot(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    table = bench_batch_size.main(["--quick", "--out", str(tmp_path), "--workers", "1"])
    assert set(table) == {"BN", "GN", "SN"} and all(set(cells) == {8, 2} for cells in table.values())
    for name in ("batch_size.md", "batch_size.json", "batch_size.png"):
        assert (tmp_path / name).stat().st_size > 0
    with open(tmp_path / "batch_size.json") as f:
        record = json.load(f)
    assert record["quick"] and record["seeds"] == [0] and record["wall_seconds"] > 0
    assert record["machine"]["versions"]["torch"] == torch.__version__.split("+")[0]
    assert len(record["runs"]) == 6
    for run in record["runs"]:
        assert 0.0 <= run["top1"] <= 100.0
        if run["norm"] == "SN":
            assert sum(run["sn_mean_weights"]) == pytest.approx(1.0)
            assert sum(run["sn_var_weights"]) == pytest.approx(1.0)
    markdown = (tmp_path / "batch_size.md").read_text()
    assert "| SN−BN |" in markdown and "Paper, Table 2" in markdown and "65.3" in markdown
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]


def _bench(name, *arguments, timeout=900):
    """Run a benchmark script as its users do; its output is checked by the caller."""
    result = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", f"{name}.py"), *arguments],
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_scratch_detection_quick_mode_trains_all_three_norms_then_deploys_sn(tmp_path):
    pytest.importorskip("mmdet")
    _bench("bench_scratch_detection", "--quick", "--out", str(tmp_path / "results"), "--runs", str(tmp_path / "runs"),
           "--data", str(tmp_path / "data"), "--val-interval", "1")
    for name in ("scratch_detection.md", "scratch_detection.json", "scratch_detection.png",
                 "scratch_detection_curve.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    with open(tmp_path / "results" / "scratch_detection.json") as f:
        record = json.load(f)
    assert record["quick"] and record["schedules"] == [2] and record["seeds"] == [0]
    assert sorted(run["norm"] for run in record["runs"]) == ["BN", "GN", "SN"]
    for run in record["runs"]:
        assert run["iterations"] == 2 and run["bbox"]["AP"] is not None and run["segm"]["AP"] is not None
    assert record["summary"]["SN"]["2"]["bbox_AP"]["n"] == 1
    markdown = (tmp_path / "results" / "scratch_detection.md").read_text()
    assert "| box | SN |" in markdown and "| mask | GN |" in markdown and "29.5" in markdown
    assert sorted(os.listdir(tmp_path / "runs")) == sorted(
        f"{norm}_2it_seed0{suffix}" for norm in ("BN", "GN", "SN") for suffix in ("", ".log"))
    assert "AP during the 2-iteration trainings" in markdown

    # the SN model to deployment: evaluated as trained and sparse, exported
    _bench("bench_deployment", str(tmp_path / "runs" / "SN_2it_seed0"), "--quick", "--out", str(tmp_path / "results"))
    with open(tmp_path / "results" / "deployment.json") as f:
        deployment = json.load(f)
    trained = deployment["variants"]["SN as trained"]
    assert trained["layers"]["SN"] > 0 and trained["export"]["onnx_max_rel_diff"] < 1e-4
    assert trained["export"]["torch_export_max_rel_diff"] < 1e-4
    assert any(v["layers"]["SN"] < trained["layers"]["SN"] for v in deployment["variants"].values())


def test_nuclei_detection_quick_mode_on_fake_nuclei(tmp_path, monkeypatch):
    pytest.importorskip("mmdet")
    from fake_datasets import fake_nuclei, make_fake_stardist_wheel
    from sn_plugin.data import nuclei, prepare_nuclei_dataset

    image, labels = fake_nuclei(size=256, count=40)
    wheel, checksums = make_fake_stardist_wheel(str(tmp_path / "wheels"), image, labels)
    for member, digest in checksums.items():
        monkeypatch.setitem(nuclei.STARDIST_SHA256, member, digest)
    prepare_nuclei_dataset(str(tmp_path / "data" / "sn_nuclei"), wheel=wheel)  # the benchmark finds it made
    _bench("bench_nuclei_detection", "--quick", "--norms", "SN", "--seeds", "0", "1", "--out",
           str(tmp_path / "results"), "--runs", str(tmp_path / "runs"), "--data", str(tmp_path / "data"))
    with open(tmp_path / "results" / "nuclei_detection.json") as f:
        record = json.load(f)
    assert record["seeds"] == [0, 1] and record["iterations"] == 2 and len(record["runs"]) == 2
    summary = record["summary"]["SN"]
    assert summary["bbox_AP"]["n"] == 2 and summary["bbox_AP"]["std"] is not None
    assert record["dataset"]["classes"] == ["nucleus"] and record["dataset"]["num_val_images"] == 2
    markdown = (tmp_path / "results" / "nuclei_detection.md").read_text()
    assert "| SN | " in markdown and " ± " in markdown and "nuclei_detection.png" in markdown
    from PIL import Image

    with Image.open(tmp_path / "results" / "nuclei_detection.png") as picture:
        assert picture.width > 1.8 * picture.height  # ground truth beside the SN predictions


def test_importance_dynamics_quick_mode_records_gradients_and_movement(tmp_path):
    pytest.importorskip("mmdet")
    _bench("bench_importance_dynamics", "--quick", "--out", str(tmp_path / "results"), "--runs",
           str(tmp_path / "runs"), "--data", str(tmp_path / "data"))
    with open(tmp_path / "results" / "importance_dynamics.json") as f:
        results = {result["variant"]: result for result in json.load(f)["results"]}
    assert set(results) == {"default", "logit_lr_x10"}
    default, faster = results["default"], results["logit_lr_x10"]
    assert [w["iteration"] for w in default["windows"]] == [4, 8]
    assert len(default["per_iteration"]) == 8 and len(default["windows"][0]["layers"]) == 32  # every SN layer
    assert default["treatment"][0]["weight_decay"] == 0.0 and default["treatment"][0]["clip_max_norm"] == 10.0
    assert faster["description"]["peak_lr"] == pytest.approx(10 * default["description"]["peak_lr"])
    for layer in default["windows"][-1]["layers"].values():
        assert layer["grad_norm"] >= layer["grad_norm_after_clip"] >= 0.0 and layer["displacement"] >= 0.0
    assert (tmp_path / "results" / "importance_dynamics.png").stat().st_size > 0
    assert "| default | 8 |" in (tmp_path / "results" / "importance_dynamics.md").read_text()


def test_detector_step_quick_mode_times_every_norm(tmp_path):
    pytest.importorskip("mmdet")
    _bench("bench_detector_step", "--quick", "--data", str(tmp_path / "data"), "--out", str(tmp_path))
    with open(tmp_path / "detector_step.json") as f:
        record = json.load(f)
    cells = record["threads"]["1"]
    assert set(cells) == {"SN", "SN (reference path)", "GN", "BN"} and cells["GN"]["ratio_to_GN"] == 1.0
    assert all(cell["median_ms"] > 0 for cell in cells.values())


def test_the_xbn_benchmark_reuses_the_scratch_benchmarks_bn_and_gn_trainings(tmp_path, monkeypatch):
    """With --reuse and the same --runs, the XBN benchmark must find the scratch benchmark's finished BN
    and GN trainings, also those recorded with the options in another order (as earlier versions of
    the two benchmarks listed them)."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    common = importlib.import_module("_common")
    scratch = _load("bench_scratch_detection")
    xbn = _load("bench_xbn_detection")
    runs, data = str(tmp_path / "runs"), str(tmp_path / "data")
    made = {t.key[0]: t for t in scratch.plan(["BN", "GN"], [3200], [1], runs, data, quick=False, val_interval=400)}
    for norm in ("BN", "GN"):
        wanted = next(t for t in xbn.plan([norm], [1], 3200, runs, data, quick=False, val_interval=400))
        assert wanted.out == made[norm].out and list(wanted.arguments) == list(made[norm].arguments)
        recorded = list(made[norm].arguments)
        pairs = [recorded[i:i + 2] for i in range(0, len(recorded), 2)]  # every option here takes one value
        reordered = [token for pair in reversed(pairs) for token in pair]
        os.makedirs(wanted.out)
        with open(os.path.join(wanted.out, "command.txt"), "w") as f:
            json.dump([common.TRAIN_COMMAND, *reordered, "--out", made[norm].out], f)
        command = [sys.executable, common.TRAIN_COMMAND, *wanted.arguments, "--out", wanted.out]
        assert reordered != list(wanted.arguments)  # the same options, in another order
        assert common._made_by(wanted.out, command)
        other = [sys.executable, common.TRAIN_COMMAND, *wanted.arguments, "--seed", "2", "--out", wanted.out]
        assert not common._made_by(wanted.out, other)
