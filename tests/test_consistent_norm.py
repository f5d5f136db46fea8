"""Consistent Normalization: the layer, branch selection, Algorithm 1, conversion and export."""
import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sn_plugin import (
    ConsistentNorm, ConsistentNorm1d, ConsistentNorm2d, ConsistentNorm3d, SwitchNorm2d, SwitchNormNd,
    branch_assignment, consistent_branch, consistent_norm_layers, consistent_train_step, convert_to_cn,
    export_branch,
)


def _distinct_branches(layer: ConsistentNorm, seed: int = 0) -> ConsistentNorm:
    """Give every branch its own affine parameters and running statistics."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for branch in layer.branches:
            for tensor in (branch.weight, branch.bias, branch.running_mean):
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            branch.running_var.copy_(torch.rand(branch.running_var.shape, generator=generator) + 0.5)
    return layer


def _state(module: nn.Module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class SmallNet(nn.Sequential):
    """Conv-BN twice, a shortcut-free stand-in for a ResNet stage, and a classifier."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes))


# ---------------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [0, 1, 2])
def test_branch_k_is_an_independent_bn_and_the_other_branches_stay_untouched(k):
    layer = _distinct_branches(ConsistentNorm2d(4, num_branches=3))
    reference = copy.deepcopy(layer.branches[k])
    others = {j: _state(layer.branches[j]) for j in range(3) if j != k}
    x = torch.randn(5, 4, 3, 3, requires_grad=True)
    layer.active_branch = k
    out = layer(x)
    expected = reference(x)
    torch.testing.assert_close(out, expected)
    assert _same_state(_state(layer.branches[k]), _state(reference))  # same running statistics update
    out.square().sum().backward()
    assert all(_same_state(_state(layer.branches[j]), state) for j, state in others.items())
    assert all(layer.branches[j].weight.grad is None for j in others)
    assert layer.branches[k].weight.grad is not None


def test_per_sample_branches_normalize_each_branch_over_its_own_samples_in_input_order():
    layer = _distinct_branches(ConsistentNorm2d(4, num_branches=3))
    references = [copy.deepcopy(branch) for branch in layer.branches]
    assignment = torch.tensor([1, 0, 1, 0, 0, 1, 1])  # branch 2 absent: a spare branch
    spare = _state(layer.branches[2])
    x = torch.randn(7, 4, 3, 3, requires_grad=True)
    layer.sample_branches = assignment
    out = layer(x)
    for k in (0, 1):
        rows = (assignment == k).nonzero().flatten()
        torch.testing.assert_close(out[rows], references[k](x[rows]))
        assert _same_state(_state(layer.branches[k]), _state(references[k]))
    assert _same_state(_state(layer.branches[2]), spare)
    out[:, :, 0, 0].sum().backward()  # gradients reach the input rows through the reordering
    assert x.grad[:, :, 0, 0].abs().sum() > 0


def test_per_sample_branches_in_runs_equal_separate_batches():
    layer = _distinct_branches(ConsistentNorm2d(4, num_branches=2))
    twin = copy.deepcopy(layer)
    a, b = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    with consistent_branch(layer, [0, 0, 0, 1, 1, 1]):
        mixed = layer(torch.cat([a, b]))
    with consistent_branch(twin, 0):
        first = twin(a)
    with consistent_branch(twin, 1):
        second = twin(b)
    torch.testing.assert_close(mixed, torch.cat([first, second]))
    assert _same_state(_state(layer), _state(twin))


def test_per_sample_branches_must_cover_the_batch_and_name_existing_branches():
    layer = ConsistentNorm2d(4, num_branches=2)
    layer.sample_branches = [0, 1, 1]
    with pytest.raises(ValueError, match="assigns 3 samples but the input has 2"):
        layer(torch.randn(2, 4, 2, 2))
    with pytest.raises(ValueError, match=r"has 2 branches \(0..1\), got sample_branches \[0, 2\]"):
        layer.sample_branches = [0, 2]
    with pytest.raises(ValueError, match="1-D sequence of branch indices"):
        layer.sample_branches = torch.tensor([0.0, 1.0])
    layer.sample_branches = []
    assert layer.eval()(torch.randn(0, 4, 2, 2)).shape == (0, 4, 2, 2)
    with pytest.raises(ValueError, match=r"has 2 branches \(0..1\), got branch 2"):
        layer.active_branch = 2


def test_eval_uses_the_active_branch_running_statistics():
    layer = _distinct_branches(ConsistentNorm1d(3, num_branches=2)).eval()
    x = torch.randn(4, 3)
    layer.active_branch = 1
    torch.testing.assert_close(layer(x), layer.branches[1](x))
    assert not torch.allclose(layer(x), layer.branches[0](x))


@pytest.mark.parametrize("cls, norm, options, branch_type", [
    (ConsistentNorm2d, "BN", {}, nn.BatchNorm2d),
    (ConsistentNorm3d, "BN", {"momentum": 0.3}, nn.BatchNorm3d),
    (ConsistentNorm1d, "BN", {"eps": 1e-3}, nn.BatchNorm1d),
    (ConsistentNorm, "GN", {"num_groups": 2}, nn.GroupNorm),
    (ConsistentNorm, "LN", {}, nn.GroupNorm),
    (ConsistentNorm2d, "SN", {"using_moving_average": False}, SwitchNorm2d),
    (ConsistentNorm, "SN", {}, SwitchNormNd),
    (ConsistentNorm, "SyncBN", {}, nn.SyncBatchNorm),
    (ConsistentNorm, nn.InstanceNorm2d, {"affine": True}, nn.InstanceNorm2d),
])
def test_every_base_normalizer_builds_its_branches_and_options_rebuild_the_layer(cls, norm, options, branch_type):
    layer = cls(4, 3, norm, **options)
    assert [type(b) for b in layer.branches] == [branch_type] * 3
    assert layer.options() == {"num_features": 4, "num_branches": 3, "norm": norm, **options}
    rebuilt = type(layer)(**layer.options())
    assert rebuilt.state_dict().keys() == layer.state_dict().keys()
    if norm == "LN":
        assert layer.branches[0].num_groups == 1
    if isinstance(layer.branches[0], SwitchNorm2d):
        assert layer.branches[0].using_moving_average is False
    shape = {1: (2, 4, 3), 3: (2, 4, 2, 3, 3)}.get(cls._rank, (2, 4, 3, 3))
    assert layer(torch.randn(shape)).shape == shape
    assert ConsistentNorm._abbr_ == "cn" and cls._abbr_ == "cn"


def test_bad_constructions_name_the_problem():
    with pytest.raises(ValueError, match="needs the input's rank.*ConsistentNorm2d"):
        ConsistentNorm(4, 2, "BN")
    with pytest.raises(ValueError, match="needs num_groups"):
        ConsistentNorm2d(4, 2, "GN")
    with pytest.raises(ValueError, match="unknown norm 'XN'"):
        ConsistentNorm2d(4, 2, "XN")
    with pytest.raises(ValueError, match="num_branches must be a positive int"):
        ConsistentNorm2d(4, 0)
    with pytest.raises(RuntimeError, match="running_mean should contain 3 elements not 4"):
        ConsistentNorm2d(4)(torch.randn(2, 3, 2, 2))  # the branch checks the input


def test_a_channels_last_layer_norm_branch_for_token_inputs():
    layer = ConsistentNorm(4, 2, nn.LayerNorm)
    tokens = torch.randn(3, 5, 4)
    with torch.no_grad():
        layer.branches[1].weight.fill_(2.0)
    layer.sample_branches = [0, 1, 0]
    torch.testing.assert_close(layer(tokens)[1], 2 * nn.functional.layer_norm(tokens[1], (4,)))


def test_a_plain_normalizer_checkpoint_loads_into_every_branch():
    bn_model = SmallNet()
    with torch.no_grad():
        for m in bn_model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 2.0)
                m.running_mean.normal_()
                m.num_batches_tracked.fill_(7)
    cn_model = convert_to_cn(SmallNet(), 3)
    cn_model.load_state_dict(bn_model.state_dict())  # strict: nothing missing or unexpected
    for name, layer in consistent_norm_layers(cn_model).items():
        bn = bn_model.get_submodule(name)
        assert all(_same_state(_state(branch), _state(bn)) for branch in layer.branches)
    round_trip = convert_to_cn(SmallNet(), 3)
    round_trip.load_state_dict(cn_model.state_dict())  # a CN checkpoint loads branch by branch
    assert _same_state(_state(round_trip), _state(cn_model))


def test_norm_eval_freezes_every_branch():
    """OpenMMLab's norm_eval puts every _BatchNorm in eval mode: with CN that is every branch."""
    model = convert_to_cn(SmallNet(), 2).train()
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
    before = _state(model)
    for k in (0, 1):
        with consistent_branch(model, k):
            model(torch.randn(3, 2, 5, 5))
    assert _same_state(_state(model), before)


# ---------------------------------------------------------------------------------------------
# Whole-model tools
# ---------------------------------------------------------------------------------------------

def test_conversion_replaces_every_bn_with_copies_and_leaves_the_model_alone():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=4)
    model.layer1[0].bn1.requires_grad_(False)
    model.eval()
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    converted = convert_to_cn(model, 3)
    layers = consistent_norm_layers(converted)
    assert set(layers) == set(bns)  # stem and shortcuts too
    assert "bn1" in layers and "layer2.0.downsample.1" in layers
    for name, layer in layers.items():
        assert type(layer) is ConsistentNorm2d and not layer.training
        assert all(_same_state(_state(b), _state(bns[name])) for b in layer.branches)
    assert not any(p.requires_grad for p in layers["layer1.0.bn1"].parameters())
    assert all(isinstance(m, nn.BatchNorm2d) for m in bns.values())  # the original is unchanged
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_conversion_keeps_other_normalizers_kinds_and_leaves_frozen_layers():
    from sn_plugin import FrozenSwitchNorm

    model = nn.Sequential(nn.GroupNorm(2, 4), SwitchNorm2d(4), nn.SyncBatchNorm(4),
                          FrozenSwitchNorm(4), nn.LayerNorm(4))
    converted = convert_to_cn(model, 2)
    assert converted[0].norm == "GN" and converted[0].norm_options["num_groups"] == 2
    assert converted[1].norm == "SN" and type(converted[1]) is ConsistentNorm2d
    assert converted[2].norm == "SyncBN"
    assert isinstance(converted[3], FrozenSwitchNorm) and isinstance(converted[4], nn.LayerNorm)
    with pytest.raises(TypeError, match="cannot make CN branches of LayerNorm"):
        ConsistentNorm.from_norm(nn.LayerNorm(4), 2)


def _trained_cn_model(steps: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = convert_to_cn(SmallNet(), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        consistent_train_step(model, optimizer, torch.randn(6, 2, 6, 6), torch.randint(0, 3, (6,)),
                              [None, lambda x: 2 * x + 1], nn.functional.cross_entropy)
    return model


def test_in_eval_branch_0_equals_the_exported_plain_model():
    model = _trained_cn_model().eval()
    layer = consistent_norm_layers(model)["1"]
    assert not torch.equal(layer.branches[0].running_mean, layer.branches[1].running_mean)
    x = torch.randn(4, 2, 6, 6)
    for branch in (0, 1):
        plain = export_branch(model, branch)
        assert not consistent_norm_layers(plain) and isinstance(plain[1], nn.BatchNorm2d)
        with consistent_branch(model, branch):
            torch.testing.assert_close(model(x), plain(x))
    torch.testing.assert_close(model(x), export_branch(model)(x))  # default: branch 0
    with pytest.raises(ValueError, match="has 2 branches .* asked for branch 2"):
        export_branch(model, 2)


def test_the_active_branch_is_restored_after_an_exception():
    model = convert_to_cn(SmallNet(), 3)
    for layer in consistent_norm_layers(model).values():
        layer.active_branch = 1
    with pytest.raises(RuntimeError, match="boom"):
        with consistent_branch(model, 2):
            assert all(layer.active_branch == 2 for layer in consistent_norm_layers(model).values())
            raise RuntimeError("boom")
    assert all(layer.active_branch == 1 and layer.sample_branches is None
               for layer in consistent_norm_layers(model).values())
    with pytest.raises(RuntimeError, match="boom"):
        with consistent_branch(model, torch.tensor([0, 2, 1])):
            raise RuntimeError("boom")
    assert all(layer.sample_branches is None for layer in consistent_norm_layers(model).values())
    with pytest.raises(ValueError, match="got branch 5"):  # a bad branch also restores
        with consistent_branch(model, 5):
            pass
    assert all(layer.active_branch == 1 for layer in consistent_norm_layers(model).values())
    with pytest.raises(ValueError, match="no ConsistentNorm layers"):
        with consistent_branch(SmallNet(), 0):
            pass


def test_branch_assignment_maps_tags_and_names_unknown_ones():
    assert branch_assignment(["city", "gta", "city"], {"city": 0, "gta": 1}).tolist() == [0, 1, 0]
    with pytest.raises(KeyError, match=r"no branch for tag\(s\) \['synthia'\]; known tags: \['city', 'gta'\]"):
        branch_assignment(["city", "synthia"], {"city": 0, "gta": 1})


def _step_twins(mode):
    torch.manual_seed(1)
    model = convert_to_cn(SmallNet(), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = torch.randn(5, 2, 6, 6), torch.randint(0, 3, (5,))
    flip = lambda v: v.flip(-1)  # noqa: E731
    step = consistent_train_step(model, optimizer, x, y, [None, flip], nn.functional.cross_entropy, mode)
    return model, step


def test_mixed_mode_equals_sequential_mode():
    sequential, seq_step = _step_twins("sequential")
    mixed, mixed_step = _step_twins("mixed")
    torch.testing.assert_close(seq_step.loss, mixed_step.loss)
    torch.testing.assert_close(torch.stack(seq_step.branch_losses), torch.stack(mixed_step.branch_losses))
    torch.testing.assert_close(seq_step.loss, sum(seq_step.branch_losses))
    for (name, a), b in zip(sequential.state_dict().items(), mixed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_one_step_sums_the_views_losses_with_weight_one():
    """The summed loss's gradient is the sum of each view's gradient (computed by hand here)."""
    torch.manual_seed(2)
    model = convert_to_cn(SmallNet(), 2)
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    views = [x, x + 3]
    total = 0
    for k, view in enumerate(views):
        with consistent_branch(reference, k):
            total = total + nn.functional.cross_entropy(reference(view), y)
    total.backward()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    consistent_train_step(model, optimizer, x, y, [None, lambda v: v + 3], nn.functional.cross_entropy)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q.detach() - q.grad, msg=name)


def test_train_step_refuses_what_it_cannot_do():
    model = convert_to_cn(SmallNet(), 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(2, 2, 6, 6), torch.tensor([0, 1])
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="3 transforms but the model has CN layers with only \\[2\\] branches"):
        consistent_train_step(model, optimizer, x, y, [None, None, None], loss)
    with pytest.raises(ValueError, match="must have one shape"):
        consistent_train_step(model, optimizer, x, y, [None, lambda v: v[..., :4, :4]], loss, mode="mixed")
    with pytest.raises(ValueError, match="mode must be 'sequential' or 'mixed'"):
        consistent_train_step(model, optimizer, x, y, [None], loss, mode="joint")


def test_without_cn_layers_the_views_share_the_normalizers():
    """The paper's BN-with-augmentation baseline: mixed mode normalizes all views together."""
    torch.manual_seed(3)
    model = SmallNet()
    x, y = torch.randn(3, 2, 6, 6), torch.randint(0, 3, (3,))
    reference = copy.deepcopy(model)
    consistent_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, [None, lambda v: v * 2],
                          nn.functional.cross_entropy, mode="mixed")
    reference(torch.cat([x, x * 2]))  # one BN batch over both views
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)


def test_target_transforms_and_structured_outputs_in_mixed_mode():
    class TwoHeads(SmallNet):
        def forward(self, x):
            logits = super().forward(x)
            return {"logits": logits, "aux": (logits * 2,)}

    model = convert_to_cn(TwoHeads(), 2)
    seen = []

    def loss_fn(output, target):
        seen.append((output["logits"].shape[0], output["aux"][0].shape[0], target.tolist()))
        return nn.functional.cross_entropy(output["logits"], target)

    consistent_train_step(model, torch.optim.SGD(model.parameters(), lr=0.1), torch.randn(2, 2, 6, 6),
                          torch.tensor([0, 1]), [None, lambda v: v.flip(-1)], loss_fn, mode="mixed",
                          target_transforms=[None, lambda t: 1 - t])
    assert seen == [(2, 2, [0, 1]), (2, 2, [1, 0])]


def test_consistent_norm_benchmark_quick_mode(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    from benchmarks.bench_consistent_norm import main

    record = main(["--quick", "--out", str(tmp_path)])
    assert {run["method"] for run in record["runs"]} == {"BN", "BN+aug (sequential)", "BN+aug (mixed)",
                                                         "CN (sequential)", "CN (mixed)"}
    for run in record["runs"]:
        assert 0 <= run["clean"] <= 100 and 0 <= run["transformed"] <= 100
    for name in ("consistent_norm.md", "consistent_norm.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert "Table 1" in (tmp_path / "consistent_norm.md").read_text()
