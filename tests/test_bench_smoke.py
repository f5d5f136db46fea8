"""The miniature reproductions' --quick modes, and the pieces their tables are made of."""
import importlib.util
import json
import os

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


def test_scratch_detection_quick_mode_trains_all_three_norms(tmp_path):
    pytest.importorskip("mmdet")
    bench = _load("bench_scratch_detection")
    results = bench.main(["--quick", "--max-iters", "2", "--out", str(tmp_path / "results"),
                          "--runs", str(tmp_path / "runs")])
    assert set(results) == {"BN", "GN", "SN"}
    for norm, result in results.items():
        assert result["norm"] == norm and result["iterations"] == 2
        assert result["bbox"]["AP"] is not None and result["segm"]["AP"] is not None
    for name in ("scratch_detection.md", "scratch_detection.json", "scratch_detection.png"):
        assert (tmp_path / "results" / name).stat().st_size > 0
    markdown = (tmp_path / "results" / "scratch_detection.md").read_text()
    assert "| box | SN |" in markdown and "| mask | GN |" in markdown and "29.5" in markdown
