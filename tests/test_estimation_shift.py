"""Estimation shift magnitude (ESM) and perturbed running statistics."""
import csv

import pytest
import torch
from torch import nn

from sn_plugin import (
    SwitchNorm2d, consistent_branch, convert_to_cn, estimated_statistics_layers, estimation_shift,
    perturbed_running_stats, plot_estimation_shift, plot_estimation_shift_history, write_estimation_shift_csv,
)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 4), nn.BatchNorm1d(4)).double()


def _batches(sizes, features=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, features, generator=generator, dtype=torch.float64) * 3 + 1 for n in sizes]


def _set_running_stats_to_eval_inputs(model, data):
    """Layer by layer (lower layers first, since they change what upper layers receive in eval)."""
    model.eval()
    for index in (1, 4):
        inputs = torch.cat([model[:index](x) for x in data])
        with torch.no_grad():
            model[index].running_mean.copy_(inputs.mean(0))
            model[index].running_var.copy_(inputs.var(0, correction=0))


def test_esm_is_zero_when_running_statistics_equal_the_eval_mode_input_statistics():
    model, data = _mlp(), _batches([7, 3, 11])
    _set_running_stats_to_eval_inputs(model, data)
    report = estimation_shift(model, data)
    assert [r.name for r in report] == ["1", "4"] and [r.index for r in report] == [0, 1]
    for r in report:
        assert r.esm_mu == pytest.approx(0, abs=1e-12) and r.esm_sigma == pytest.approx(0, abs=1e-12)
        assert r.samples == 21 and r.kind == "BatchNorm1d"


def test_a_known_offset_gives_its_norm():
    model, data = _mlp(), _batches([8, 8])
    _set_running_stats_to_eval_inputs(model, data)
    offset = torch.tensor([0.3, -1.2, 0.0, 2.0], dtype=torch.float64)
    with torch.no_grad():
        model[4].running_mean.add_(offset)  # the last layer: nothing above it changes
        model[4].running_var.copy_((model[4].running_var.sqrt() + 0.5).square())
    last = estimation_shift(model, data)[-1]
    assert last.esm_mu == pytest.approx(float(offset.norm()), rel=1e-12)
    assert last.esm_sigma == pytest.approx(0.5 * 2, rel=1e-12)  # ||0.5 * ones(4)||


def test_convolution_inputs_use_the_n_h_w_axes_and_float64():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3)
    model = nn.Sequential(conv, nn.BatchNorm2d(3))
    data = [torch.randn(4, 2, 7, 5) * 10 + 100, torch.randn(1, 2, 7, 5) * 10 + 100]
    report = estimation_shift(model, data)
    with torch.no_grad():
        values = torch.cat([conv(x) for x in data]).double().transpose(0, 1).reshape(3, -1)
    torch.testing.assert_close(report[0].expected_mean, values.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(report[0].expected_var, values.var(1, correction=0), rtol=1e-5, atol=0)
    assert report[0].expected_mean.dtype == torch.float64
    mu = torch.linalg.vector_norm(values.mean(1))  # running mean 0, running var 1 (fresh BN)
    sigma = torch.linalg.vector_norm(1 - values.var(1, correction=0).sqrt())
    assert report[0].esm_mu == pytest.approx(float(mu), rel=1e-6)
    assert report[0].esm_sigma == pytest.approx(float(sigma), rel=1e-5)


def test_uneven_batch_sizes_give_the_statistics_of_the_whole_set():
    model = _mlp()
    uneven = _batches([5, 1, 17, 3])
    whole = [torch.cat(uneven)]
    for a, b in zip(estimation_shift(model, uneven), estimation_shift(model, whole)):
        torch.testing.assert_close(a.expected_mean, b.expected_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.expected_var, b.expected_var, rtol=1e-12, atol=1e-12)
        assert a.samples == b.samples == 26


def test_every_buffer_and_train_flag_is_restored_also_after_an_error():
    class Counting(nn.BatchNorm1d):
        def forward(self, x):  # a layer that changes a buffer even in eval
            self.num_batches_tracked += 1
            return super().forward(x)

    model = nn.Sequential(nn.Linear(5, 6), Counting(6), nn.Linear(6, 6), nn.BatchNorm1d(6))
    model.train()
    model[3].eval()
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    estimation_shift(model, _batches([4, 4], seed=1), forward=lambda m, b: m(b.float()))
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    def failing():
        yield torch.randn(4, 5)
        raise RuntimeError("data broke")

    with pytest.raises(RuntimeError, match="data broke"):
        estimation_shift(model, failing())
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not model[1]._forward_pre_hooks  # hooks removed


def test_layers_are_reported_in_forward_order_not_registration_order():
    class Reversed(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.BatchNorm1d(3)
            self.early = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.late(self.early(x))

    report = estimation_shift(Reversed(), [torch.randn(4, 3)])
    assert [(r.index, r.name) for r in report] == [(0, "early"), (1, "late")]


def test_sn_syncbn_and_cn_branches_are_measured():
    model = nn.Sequential(nn.Conv2d(2, 4, 1), SwitchNorm2d(4), nn.SyncBatchNorm(4), SwitchNorm2d(4, using_bn=False))
    names = [r.name for r in estimation_shift(model, [torch.randn(2, 2, 3, 3)])]
    assert names == ["1", "2"]  # SN without a BN branch has no estimated statistics

    cn_model = convert_to_cn(nn.Sequential(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4)), 3)
    with torch.no_grad():
        cn_model[1].branches[1].running_mean.fill_(2.0)
    with consistent_branch(cn_model, 1):
        report = estimation_shift(cn_model, [torch.randn(3, 2, 4, 4)])
    assert [r.name for r in report] == ["1.branches.1"]
    with consistent_branch(cn_model, [0, 2, 0]):
        assert [r.name for r in estimation_shift(cn_model, [torch.randn(3, 2, 4, 4)])] == ["1.branches.0",
                                                                                          "1.branches.2"]


def test_frozen_batch_norm_is_measured():
    torchvision = pytest.importorskip("torchvision")
    frozen = torchvision.ops.FrozenBatchNorm2d(3)
    assert list(estimated_statistics_layers(nn.Sequential(frozen))) == ["0"]


def test_models_without_estimated_statistics_or_data_are_refused():
    with pytest.raises(ValueError, match="has no layer with running statistics"):
        estimation_shift(nn.Sequential(nn.Linear(2, 2), nn.GroupNorm(1, 2)), [torch.randn(2, 2)])
    with pytest.raises(ValueError, match="none of the 2 layers with running statistics received data"):
        estimation_shift(_mlp(), [])


def test_perturbation_scales_statistics_within_the_magnitude_and_restores_them():
    model = _mlp()
    with torch.no_grad():
        model[1].running_mean.uniform_(1, 2)
        model[1].running_var.uniform_(1, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    with perturbed_running_stats(model, 0.5, layers=["1"], generator=generator) as names:
        assert names == ["1"]
        for buffer in ("running_mean", "running_var"):
            ratio = getattr(model[1], buffer) / before[f"1.{buffer}"]
            assert ((ratio > 0.5) & (ratio < 1.5)).all() and not torch.allclose(ratio, torch.ones(6, dtype=ratio.dtype))
        assert torch.equal(model[4].running_mean, before["4.running_mean"])  # not selected
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"):
        with perturbed_running_stats(model, 0.9):
            raise RuntimeError("inside")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("magnitude", [1.0, 1.5, -0.1])
def test_perturbation_magnitude_outside_0_1_is_rejected(magnitude):
    with pytest.raises(ValueError, match=r"magnitude must lie in \[0, 1\)"):
        with perturbed_running_stats(_mlp(), magnitude):
            pass


def test_perturbation_of_an_unknown_layer_names_the_available_ones():
    with pytest.raises(KeyError, match=r"\['3'\] are not layers with running statistics.*\['1', '4'\]"):
        with perturbed_running_stats(_mlp(), 0.1, layers=["3"]):
            pass


def test_csv_of_a_report_and_of_a_history(tmp_path):
    model, data = _mlp(), _batches([4])
    report = estimation_shift(model, data)
    write_estimation_shift_csv(report, str(tmp_path / "esm.csv"))
    with open(tmp_path / "esm.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["layer"] for row in rows] == ["1", "4"]
    assert float(rows[0]["esm_mu"]) == report[0].esm_mu and rows[0]["channels"] == "6"
    write_estimation_shift_csv({1: report, 0: report}, str(tmp_path / "history.csv"))
    with open(tmp_path / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(row["epoch"], row["layer"]) for row in rows] == [("0", "1"), ("0", "4"), ("1", "1"), ("1", "4")]


def test_plots_of_a_report_and_of_a_history(tmp_path):
    pytest.importorskip("matplotlib")
    from sn_plugin.estimation_shift import save_figure

    model, data = _mlp(), _batches([4])
    report = estimation_shift(model, data)
    figure = plot_estimation_shift(report, title="ESM")
    assert len(figure.axes) == 2
    save_figure(figure, str(tmp_path / "esm.png"))
    history = plot_estimation_shift_history({0: report, 1: report, 2: report})
    assert len(history.axes) == 3  # two panels and the depth colour bar
    assert len(history.axes[0].lines) == 2
    save_figure(history, str(tmp_path / "history.png"))
    assert (tmp_path / "esm.png").stat().st_size > 0 and (tmp_path / "history.png").stat().st_size > 0


def test_estimation_shift_benchmark_quick_mode(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from benchmarks.bench_estimation_shift import main

    record = main(["--quick", "--out", str(tmp_path)])
    assert set(record["setup_one"]) == {"BN", "GNBN"}
    for name in ("estimation_shift.md", "estimation_shift.json", "estimation_shift.png"):
        assert (tmp_path / name).stat().st_size > 0


def test_max_batches_loads_no_batch_beyond_the_limit():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6))
    loaded = []

    def loader():
        for index in range(5):
            loaded.append(index)
            yield torch.randn(4, 5)

    report = estimation_shift(model, loader(), max_batches=2)
    assert loaded == [0, 1] and report[0].samples == 8
