"""recompute_batch_stats: the paper's batch-average statistics (issue 4).

The 2-process version (statistics all-reduced over ranks) runs in
tests/test_sync_switch_norm.py, inside its single spawn.
"""
import copy
import logging

import pytest
import torch
from torch import nn

from sn_plugin import LayerStatsReport, SwitchNorm1d, SwitchNorm2d, recompute_batch_stats


class Net(nn.Module):
    """conv -> SN -> conv -> BN -> pool -> linear -> SN1d, plus a branch only some batches reach."""

    def __init__(self, using_moving_average=True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.sn = SwitchNorm2d(4, using_moving_average=using_moving_average)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 6)
        self.sn_fc = SwitchNorm1d(6, using_moving_average=using_moving_average)
        self.no_bn = SwitchNorm1d(6, using_bn=False)
        self.unused = nn.BatchNorm1d(6)
        with torch.no_grad():  # importance weights other than uniform, so the mixing matters
            for m in (self.sn, self.sn_fc):
                m.mean_weight.copy_(torch.tensor([0.3, -0.2, 0.5]))
                m.var_weight.copy_(torch.tensor([-0.4, 0.1, 0.6]))

    def forward(self, x):
        x = self.sn(self.conv1(x)).relu()
        x = self.bn(self.conv2(x)).relu()
        return self.no_bn(self.sn_fc(self.fc(x.mean((2, 3)))))


def make_batches(sizes=((3, 6), (5, 6), (2, 8)), seed=0):
    """Batches of different sample counts and spatial sizes, offset so the means matter."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, hw, hw, generator=g) * 2 + 1 for n, hw in sizes]


def reference_statistics(model, batches, names):
    """Each layer's inputs over all batches, gathered from a training-mode run, reduced directly."""
    model = copy.deepcopy(model).train()
    inputs = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(
        lambda m, args, name=name: inputs[name].append(args[0].detach().double())) for name in names]
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for h in handles:
        h.remove()
    stats = {}
    for name, xs in inputs.items():
        values = torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], dim=1)
        stats[name] = (values.mean(1), values.var(1, unbiased=False))
    return stats


def test_statistics_equal_those_of_the_concatenated_data():
    torch.manual_seed(0)
    model = Net()
    batches = make_batches()
    expected = reference_statistics(model, batches, ["sn", "bn", "sn_fc"])
    reports = recompute_batch_stats(model, batches, progress=False)
    for name, (mean, var) in expected.items():
        layer = dict(model.named_modules())[name]
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-6, atol=1e-6)
        assert int(layer.num_batches_tracked) == 3
    assert reports["sn"] == LayerStatsReport(batches=3, samples=10, updated=True)
    assert reports["sn_fc"] == LayerStatsReport(batches=3, samples=10, updated=True)
    assert "no_bn" not in reports  # SN without a BN branch has nothing to estimate


def test_batch_average_mode_can_evaluate_afterwards():
    model = Net(using_moving_average=False).eval()
    x = make_batches(((2, 6),))[0]
    with pytest.raises(RuntimeError, match="recompute_batch_stats"):
        model(x)
    batches = make_batches()
    expected = reference_statistics(model, batches, ["sn"])
    recompute_batch_stats(model, batches, progress=False)
    assert not model.training
    out = model(x)
    assert torch.isfinite(out).all()
    assert int(model.sn.num_batches_tracked) == 3
    torch.testing.assert_close(model.sn.running_mean.double(), expected["sn"][0], rtol=1e-6, atol=1e-6)


def test_restores_modes_requires_grad_momentum_and_parameters():
    model = Net().eval()
    model.bn.train()
    model.conv1.weight.requires_grad_(False)
    model.sn.momentum = None
    params = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    modes = {name: m.training for name, m in model.named_modules()}
    recompute_batch_stats(model, make_batches(), progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    assert model.sn.momentum is None and model.bn.momentum == 0.1
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        if k in params:
            assert torch.equal(v, params[k]), k


def test_exclude_batchnorm_keeps_its_statistics_but_runs_it_in_training_mode():
    model = Net()
    batches = make_batches()
    expected = reference_statistics(model, batches, ["sn_fc"])  # BN used batch statistics there
    before = [b.clone() for b in (model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked)]
    reports = recompute_batch_stats(model, batches, include_batchnorm=False, progress=False)
    assert set(reports) == {"sn", "sn_fc"}
    for b, old in zip((model.bn.running_mean, model.bn.running_var, model.bn.num_batches_tracked), before):
        assert torch.equal(b, old)
    torch.testing.assert_close(model.sn_fc.running_var.double(), expected["sn_fc"][1], rtol=1e-6, atol=1e-6)


def test_layer_without_data_keeps_statistics_and_is_reported(caplog):
    model = Net()
    with torch.no_grad():
        model.unused.running_mean.fill_(3.0)
    with caplog.at_level(logging.WARNING):
        reports = recompute_batch_stats(model, make_batches(), progress=False)
    assert reports["unused"] == LayerStatsReport(0, 0, False, "saw no data")
    assert torch.all(model.unused.running_mean == 3.0) and int(model.unused.num_batches_tracked) == 0
    assert "unused saw no data" in caplog.text


def test_norm_kept_in_eval_by_the_models_train_is_left_alone():
    class FrozenBN(Net):
        def train(self, mode=True):
            super().train(mode)
            self.bn.eval()  # like OpenMMLab's norm_eval=True
            return self

    model = FrozenBN()
    before = model.bn.running_var.clone()
    reports = recompute_batch_stats(model, make_batches(), progress=False)
    assert not reports["bn"].updated and "eval" in reports["bn"].note
    assert torch.equal(model.bn.running_var, before)
    assert reports["sn"].updated


def test_custom_forward_num_batches_and_generators():
    model = Net()
    consumed = []

    def stream():
        for i, x in enumerate(make_batches(((2, 6),) * 6)):
            consumed.append(i)
            yield {"img": x}

    reports = recompute_batch_stats(model, stream(), num_batches=4, forward=lambda m, b: m(b["img"]),
                                    progress=False)
    assert consumed == [0, 1, 2, 3]
    assert reports["sn"].batches == 4 and reports["sn"].samples == 8


def test_shared_layer_counts_each_batch_once_and_uses_every_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.sn = SwitchNorm2d(3)

        def forward(self, x):
            return self.sn(x).mean() + self.sn(x[:, :, ::2] * 3).mean()

    model = Shared()
    batches = make_batches(((2, 4), (2, 4)))
    recompute_batch_stats(model, batches, progress=False)
    values = torch.cat([t.double().transpose(0, 1).reshape(3, -1)
                        for x in batches for t in (x, x[:, :, ::2] * 3)], dim=1)
    assert int(model.sn.num_batches_tracked) == 2
    torch.testing.assert_close(model.sn.running_mean.double(), values.mean(1))
    torch.testing.assert_close(model.sn.running_var.double(), values.var(1, unbiased=False))


def test_layer_called_with_a_keyword_input():
    class Keyword(nn.Module):
        def __init__(self):
            super().__init__()
            self.sn = SwitchNorm2d(3)

        def forward(self, x):
            return self.sn(input=x)

    model = Keyword()
    batches = make_batches(((2, 4),))
    recompute_batch_stats(model, batches, progress=False)
    torch.testing.assert_close(model.sn.running_mean.double(), batches[0].double().mean((0, 2, 3)))


def test_progress_through_a_logger(caplog):
    logger = logging.getLogger("test_batch_stats")
    with caplog.at_level(logging.INFO, logger="test_batch_stats"):
        recompute_batch_stats(Net(), make_batches(), num_batches=5, logger=logger)
    assert "3/3 batches" in caplog.text
    assert "ran out after 3 of the requested 5" in caplog.text
    assert "recomputed the statistics of 3 layers from 3 batches" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="test_batch_stats"):
        recompute_batch_stats(Net(), make_batches(), num_batches=None, logger=logger)
    assert "3/3 batches" in caplog.text and "ran out" not in caplog.text


def test_progress_without_logger_prints(capsys):
    recompute_batch_stats(Net(), make_batches(), progress=True)
    captured = capsys.readouterr()
    assert "recomputed the statistics" in captured.out + captured.err


def test_failing_forward_restores_everything():
    model = Net().eval()
    state = copy.deepcopy(model.state_dict())

    def forward(m, batch):
        if batch.shape[0] == 2:
            raise RuntimeError("bad batch")
        return m(batch)

    with pytest.raises(RuntimeError, match="bad batch"):
        recompute_batch_stats(model, make_batches(), forward=forward, progress=False)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.sn._forward_pre_hooks


def test_model_without_norm_layers_is_rejected():
    with pytest.raises(ValueError, match="no SwitchNorm or BatchNorm layers.*convert_to_sn"):
        recompute_batch_stats(nn.Sequential(nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3)), make_batches())
    with pytest.raises(ValueError, match="include_batchnorm=False"):
        recompute_batch_stats(nn.Sequential(nn.BatchNorm2d(3)), make_batches(), include_batchnorm=False)


def test_model_with_only_bn_free_switch_norm_has_nothing_to_do():
    model = nn.Sequential(SwitchNorm2d(3, using_bn=False))
    assert recompute_batch_stats(model, make_batches(), progress=False) == {}


def test_empty_iterable_is_rejected_and_changes_nothing():
    model = Net(using_moving_average=False)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="yielded no batch"):
        recompute_batch_stats(model, [], progress=False)
    with pytest.raises(ValueError, match="yielded no batch"):
        recompute_batch_stats(model, iter(()), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_bad_num_batches_is_rejected():
    with pytest.raises(ValueError, match="num_batches must be positive"):
        recompute_batch_stats(Net(), make_batches(), num_batches=0)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (6, 3)])
def test_layers_in_the_authors_convention_average_their_own_batch_variance(shape):
    """The authors' batch average: the mean over batches of the BN variance as their layer uses
    it (derived from unbiased IN variances; unbiased over N for (N, C) inputs) plus the spread
    of the batch means; the paper's convention gives the population variance of every value."""
    torch.manual_seed(3)
    batches = [torch.randn(shape) * 2 + 1 for _ in range(3)]
    authors = SwitchNorm2d(3, unbiased_instance_var=True) if len(shape) == 4 else \
        SwitchNorm1d(3, unbiased_instance_var=True)
    recompute_batch_stats(authors, batches, progress=False)
    means, second_moments = [], []
    for x in batches:
        xd = x.double()
        if xd.dim() == 2:
            mean_bn, var_bn = xd.mean(0), xd.var(0, unbiased=True)
        else:
            var_in, mean_in = xd.var((2, 3), unbiased=True), xd.mean((2, 3))
            mean_bn = mean_in.mean(0)
            var_bn = (var_in + mean_in ** 2).mean(0) - mean_bn ** 2
        means.append(mean_bn)
        second_moments.append(var_bn + mean_bn ** 2)
    mean = torch.stack(means).mean(0)
    torch.testing.assert_close(authors.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(authors.running_var.double(), torch.stack(second_moments).mean(0) - mean ** 2,
                               rtol=1e-5, atol=1e-6)
    paper = type(authors)(3)
    recompute_batch_stats(paper, batches, progress=False)
    values = torch.cat([x.double().transpose(0, 1).reshape(3, -1) for x in batches], dim=1)
    torch.testing.assert_close(paper.running_var.double(), values.var(1, unbiased=False), rtol=1e-5, atol=1e-6)
