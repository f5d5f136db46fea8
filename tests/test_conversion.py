"""convert_to_sn, convert_sync_sn / revert_sync_sn and sparsify (issue 4)."""
import copy
import math

import pytest
import torch
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

from sn_plugin import (
    BatchNormXd, SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNormBase, SwitchNormNd, SyncSwitchNorm,
    convert_sync_sn, convert_to_sn, register_sn_converter, revert_sync_sn, sn_source, sparsify,
)

NEAR_ONE = 1 - 1e-7  # original_weight making the other branches negligible, for exactness checks


def randomise_norm(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(m.named_parameters()) + list(m.named_buffers()):
            if name == "num_batches_tracked":
                t.fill_(7)
            elif name == "running_var":
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.5 + (1.0 if name == "weight" else 0.0))
    return m


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before, types):
    assert [type(m) for m in model.modules()] == types
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


class ConvNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = norm
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.head(self.norm(self.conv(x)))


X2D = torch.randn(4, 3, 6, 5) * 2 + 1


@pytest.mark.parametrize("norm, x, sn_cls", [
    (nn.BatchNorm1d(8), torch.randn(5, 8, 7), SwitchNorm1d),
    (nn.BatchNorm1d(8), torch.randn(5, 8), SwitchNorm1d),
    (nn.BatchNorm2d(8), torch.randn(5, 8, 4, 3), SwitchNorm2d),
    (nn.BatchNorm3d(8), torch.randn(3, 8, 2, 3, 4), SwitchNorm3d),
    (FrozenBatchNorm2d(8), torch.randn(5, 8, 4, 3), SwitchNorm2d),
    (nn.InstanceNorm2d(8, affine=True), torch.randn(5, 8, 4, 3), SwitchNorm2d),
    (nn.InstanceNorm1d(8), torch.randn(5, 8, 9), SwitchNorm1d),
    (nn.GroupNorm(1, 8), torch.randn(5, 8, 4, 3), SwitchNormNd),
    (nn.GroupNorm(8, 8), torch.randn(3, 8, 2, 3, 4), SwitchNormNd),
])
@pytest.mark.parametrize("training", [True, False])
def test_exact_sources_start_out_computing_the_same(norm, x, sn_cls, training):
    norm = randomise_norm(copy.deepcopy(norm)).train(training)
    sn = convert_to_sn(norm, original_weight=NEAR_ONE)
    assert type(sn) is sn_cls and sn.training == training
    if isinstance(norm, FrozenBatchNorm2d):  # no training behaviour; SN's uses batch statistics
        sn.eval()
    x = x * 2 + 1
    torch.testing.assert_close(sn(x), norm(x), rtol=1e-4, atol=1e-4)


def test_layer_norm_over_channels_only_on_request():
    ln = randomise_norm(nn.LayerNorm(8))
    model = nn.Sequential(nn.Linear(5, 8), ln)
    assert isinstance(convert_to_sn(model)[1], nn.LayerNorm)
    converted = convert_to_sn(model, original_weight=NEAR_ONE, layer_norm=True)
    assert type(converted[1]) is SwitchNorm1d
    x = torch.randn(6, 5)
    torch.testing.assert_close(converted(x), model(x), rtol=1e-4, atol=1e-4)

    class LayerNorm2d(nn.LayerNorm):  # ConvNeXt-style: per-position LN, not SN's LN
        pass

    over_positions = nn.Sequential(LayerNorm2d(8), nn.LayerNorm([8, 4]))
    assert [type(m) for m in convert_to_sn(over_positions, layer_norm=True)] == [LayerNorm2d, nn.LayerNorm]


def test_pretrained_network_starts_nearly_as_bn_and_stays_trainable():
    torch.manual_seed(0)
    model = ConvNet(randomise_norm(nn.BatchNorm2d(8))).eval()
    before, types = state(model), [type(m) for m in model.modules()]
    converted = convert_to_sn(model)
    assert_unchanged(model, before, types)
    mean_w, var_w = converted.norm.importance_weights()
    torch.testing.assert_close(mean_w, torch.tensor([0.0005, 0.0005, 0.999]))
    torch.testing.assert_close(var_w, mean_w)
    with torch.no_grad():
        y, y_sn = model(X2D), converted(X2D)
    assert (y_sn - y).norm() < 0.01 * y.norm()  # within about 0.1% per normalization
    converted.train()
    converted(X2D).square().sum().backward()
    assert converted.norm.mean_weight.grad.abs().sum() > 0 and converted.norm.var_weight.grad.abs().sum() > 0


def test_parameters_buffers_configuration_dtype_and_frozen_flags_carry_over():
    bn = randomise_norm(nn.BatchNorm2d(8, eps=1e-3, momentum=0.03)).double()
    bn.requires_grad_(False)
    sn = convert_to_sn(nn.Sequential(bn))[0]
    assert sn.eps == 1e-3 and sn.momentum == 0.03 and sn.mean_weight.dtype == torch.float64
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(sn, name), getattr(bn, name)), name
    assert not any(p.requires_grad for p in sn.parameters())  # a frozen stage stays frozen
    assert getattr(sn, "weight") is not bn.weight  # a copy, the original model is untouched

    no_affine = convert_to_sn(nn.BatchNorm2d(4, affine=False, track_running_stats=False))
    assert no_affine.weight is None and no_affine.running_mean is None

    frozen = convert_to_sn(randomise_norm(FrozenBatchNorm2d(8)))
    assert all(p.requires_grad for p in frozen.parameters())  # frozen BN becomes trainable SN


def test_sync_batch_norm_becomes_sync_switch_norm_in_its_group():
    group = object()
    sync = nn.SyncBatchNorm(8, process_group=group)
    sn = convert_to_sn(nn.Sequential(sync))[0]
    assert type(sn) is SyncSwitchNorm and sn.process_group is group


def test_other_libraries_batch_norms_are_matched_by_shape():
    class SyncBatchNorm(nn.Module):  # like mmcv.ops.SyncBatchNorm: not a torch _BatchNorm
        def __init__(self, c, group):
            super().__init__()
            self.num_features, self.eps, self.momentum, self.group = c, 1e-4, 0.05, group
            self.weight, self.bias = nn.Parameter(torch.ones(c)), nn.Parameter(torch.zeros(c))
            self.register_buffer("running_mean", torch.zeros(c))
            self.register_buffer("running_var", torch.ones(c))

    class FrozenBN(nn.Module):  # an anonymous frozen BN: only the shape tells
        def __init__(self, c):
            super().__init__()
            self.eps = 1e-5
            for name in ("weight", "bias", "running_mean", "running_var"):
                self.register_buffer(name, torch.rand(c) + 0.5)

    class NotANorm(nn.Module):  # statistics-like buffers, but neither frozen BN nor named BatchNorm
        def __init__(self):
            super().__init__()
            self.eps, self.scale = 1e-5, nn.Parameter(torch.ones(3))
            self.register_buffer("running_mean", torch.zeros(3))
            self.register_buffer("running_var", torch.ones(3))

    group = object()
    model = nn.Sequential(randomise_norm(SyncBatchNorm(8, group)), FrozenBN(8), NotANorm())
    converted = convert_to_sn(model)
    assert type(converted[0]) is SyncSwitchNorm and converted[0].process_group is group
    assert converted[0].eps == 1e-4 and converted[0].momentum == 0.05
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert torch.equal(getattr(converted[0], name), getattr(model[0], name))
        assert torch.equal(getattr(converted[1], name), getattr(model[1], name))
    assert type(converted[1]) is SwitchNormNd
    assert type(converted[2]) is NotANorm


def test_batch_average_mode_keeps_bn_statistics_as_the_estimate():
    bn = randomise_norm(nn.BatchNorm2d(8))
    sn = convert_to_sn(bn, using_moving_average=False).eval()
    assert not sn.using_moving_average
    sn(torch.randn(2, 8, 3, 3))  # statistics exist: no "run recompute_batch_stats" error
    frozen = convert_to_sn(randomise_norm(FrozenBatchNorm2d(8)), using_moving_average=False).eval()
    frozen(torch.randn(2, 8, 3, 3))


class ConvNetGN(nn.Module):
    def __init__(self, gn):
        super().__init__()
        self.norm = gn


def test_inexact_group_norm_warns_or_raises():
    gn = randomise_norm(nn.GroupNorm(4, 16))
    with pytest.warns(UserWarning, match=r"norm: GroupNorm\(4, 16\) has no SN equivalent"):
        sn = convert_to_sn(ConvNetGN(gn)).norm
    t = math.log(16 / 4) / math.log(16)
    mean_w, var_w = sn.importance_weights()
    torch.testing.assert_close(mean_w, torch.tensor([(1 - t) * 0.999, t * 0.999, 0.001]))
    with pytest.raises(ValueError, match=r"norm: GroupNorm\(4, 16\).*strict=False"):
        convert_to_sn(ConvNetGN(gn), strict=True)
    with pytest.warns(UserWarning, match="track_running_stats=True"):
        convert_to_sn(nn.InstanceNorm2d(4, track_running_stats=True))


def test_registered_converter_and_nested_modules():
    class ScaleNorm(nn.Module):  # some library's norm: an LN with a scalar gain
        def __init__(self, c):
            super().__init__()
            self.c, self.g = c, nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return self.g * nn.functional.group_norm(x, 1, eps=1e-5)

    register_sn_converter(ScaleNorm, lambda m, options: sn_source(
        m.c, 1e-5, (0.0005, 0.999, 0.0005), weight=m.g.detach().expand(m.c), bias=torch.zeros(m.c),
        cls=SwitchNorm2d))
    model = nn.Sequential(nn.Sequential(ScaleNorm(8)), nn.Sequential(nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)))
    converted = convert_to_sn(model)
    assert type(converted[0][0]) is SwitchNorm2d and type(converted[1][1]) is SwitchNorm2d
    assert torch.equal(converted[0][0].weight, torch.full((8,), 2.0))


def test_existing_switch_norm_is_left_alone_and_bad_strength_rejected():
    sn = SwitchNorm2d(4)
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
    assert torch.equal(convert_to_sn(nn.Sequential(sn))[0].mean_weight, sn.mean_weight)
    for bad in (1.0, 0.3, 1.5):
        with pytest.raises(ValueError, match=r"original_weight must lie in \(1/3, 1\)"):
            convert_to_sn(sn, original_weight=bad)


# --- synchronized SN -------------------------------------------------------------------------

def sn_model():
    return nn.Sequential(
        randomise_norm(SwitchNorm1d(4)), randomise_norm(SwitchNorm2d(4)), randomise_norm(SwitchNorm3d(4)),
        randomise_norm(SwitchNorm2d(4, using_bn=False, affine=False)),
    )


def test_convert_sync_sn_carries_everything_and_reverts():
    model = sn_model().double()
    model[1].eval()
    model[2].weight.requires_grad_(False)
    before, types = state(model), [type(m) for m in model.modules()]
    group = object()
    synced = convert_sync_sn(model, process_group=group)
    assert_unchanged(model, before, types)
    assert all(type(m) is SyncSwitchNorm and m.process_group is group for m in synced)
    assert [m.training for m in synced] == [True, False, True, True]
    assert not synced[2].weight.requires_grad and synced[2].mean_weight.requires_grad
    assert synced[3].using_bn is False and synced[3].weight is None
    assert synced[0].mean_weight.dtype == torch.float64
    for k, v in synced.state_dict().items():
        assert torch.equal(v, before[k]), k

    reverted = revert_sync_sn(synced)
    assert [type(m) for m in reverted] == [SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SwitchNorm2d]
    assert all(type(m) is SyncSwitchNorm for m in synced)  # the input is not modified
    for k, v in reverted.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(reverted[1](x), model[1](x))


def test_sync_conversion_of_a_single_layer_and_of_unknown_rank():
    sn = randomise_norm(SwitchNorm2d(4))
    synced = convert_sync_sn(sn)
    assert type(synced) is SyncSwitchNorm and type(sn) is SwitchNorm2d
    built_sync = randomise_norm(SyncSwitchNorm(4))  # e.g. built from a config as SyncSN
    local = revert_sync_sn(built_sync)
    assert type(local) is SwitchNormNd
    x = torch.randn(2, 4, 3, 3, 3)
    torch.testing.assert_close(local(x), built_sync(x))


# --- sparse SN -------------------------------------------------------------------------------

def with_logits(sn, mean_logits, var_logits):
    with torch.no_grad():
        sn.mean_weight.copy_(torch.tensor(mean_logits))
        sn.var_weight.copy_(torch.tensor(var_logits))
    return sn


def test_sparsify_keeps_the_argmax_separately_for_mean_and_variance():
    model = nn.Sequential(
        with_logits(randomise_norm(SwitchNorm2d(4)), [2.0, 1.0, 0.0], [0.0, 0.5, 1.0]),  # IN mean, BN var
        with_logits(randomise_norm(SwitchNorm2d(4)), [0.0, 1.0, 3.0], [0.0, 0.2, 3.0]),  # BN, BN
        with_logits(randomise_norm(SwitchNorm2d(4, using_bn=False)), [0.0, 1.0], [1.0, 0.0]),  # LN, IN
    ).eval()
    before, types = state(model), [type(m) for m in model.modules()]
    sparse = sparsify(model)
    assert_unchanged(model, before, types)
    assert [type(m) for m in sparse] == [SwitchNorm2d, nn.BatchNorm2d, SwitchNorm2d]
    mean_w, var_w = sparse[0].importance_weights()
    assert mean_w.tolist() == [1.0, 0.0, 0.0] and var_w.tolist() == [0.0, 0.0, 1.0]
    assert not sparse[0].mean_weight.requires_grad and not sparse[0].var_weight.requires_grad
    assert [w.tolist() for w in sparse[2].importance_weights()] == [[0.0, 1.0], [1.0, 0.0]]

    x = torch.randn(3, 4, 5, 5) * 2 + 1
    sn = sparse[0]
    expected = ((x - x.mean((2, 3), keepdim=True)) / (sn.running_var.view(1, -1, 1, 1) + sn.eps).sqrt()
                * sn.weight.view(1, -1, 1, 1) + sn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(sn(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
def test_sparse_bn_layer_is_a_batch_norm_computing_the_same(training):
    sn = with_logits(randomise_norm(SwitchNorm2d(4, momentum=0.2)), [0.0, 1.0, 3.0], [0.0, 0.2, 3.0])
    hard = copy.deepcopy(sn)
    with_logits(hard, [-60.0, -60.0, 0.0], [-60.0, -60.0, 0.0])
    bn = sparsify(sn).train(training)
    assert type(bn) is nn.BatchNorm2d and bn.momentum == 0.2
    hard.train(training)
    x = torch.randn(3, 4, 5, 5)
    torch.testing.assert_close(bn(x), hard(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_mean, hard.running_mean)
    torch.testing.assert_close(bn.running_var, hard.running_var)
    if not training:  # in eval: a per-channel affine
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        torch.testing.assert_close(bn(x), x * scale.view(1, -1, 1, 1)
                                   + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1))


@pytest.mark.parametrize("branch, groups", [(0, 4), (1, 1)])
@pytest.mark.parametrize("training", [True, False])
def test_sparse_in_and_ln_layers_are_group_norms_computing_the_same(branch, groups, training):
    logits = [0.0, 0.0, 0.0]
    logits[branch] = 3.0
    sn = with_logits(randomise_norm(SwitchNorm2d(4)), logits, logits)
    hard = sparsify(sn, freeze=False)
    plain = sparsify(sn).train(training)
    assert type(plain) is nn.GroupNorm and plain.num_groups == groups
    x = torch.randn(3, 4, 5, 5) * 2 + 1
    torch.testing.assert_close(plain(x), hard.train(training)(x), rtol=1e-5, atol=1e-5)


def test_sparse_layers_that_may_see_channel_only_inputs():
    """(N, C) inputs have no IN branch: a layer that chose IN keeps SN, and its hard choice
    for (N, C) inputs is the stronger of LN and BN, not a blend of them."""
    sn = with_logits(randomise_norm(SwitchNorm1d(4)), [3.0, 1.0, 0.0], [3.0, 0.0, 1.0])
    sparse = sparsify(sn)
    assert type(sparse) is SwitchNorm1d
    x = torch.randn(6, 4) * 2 + 1
    ln_mean = x.mean(1, keepdim=True)
    bn_var = sparse.running_var  # eval: BN variance from the running statistics
    expected = (x - ln_mean) / (bn_var + sparse.eps).sqrt() * sparse.weight + sparse.bias
    torch.testing.assert_close(sparse.eval()(x), expected, rtol=1e-5, atol=1e-5)
    ln = sparsify(with_logits(randomise_norm(SwitchNorm1d(4)), [0.0, 3.0, 1.0], [0.0, 3.0, 1.0])).eval()
    assert type(ln) is nn.GroupNorm and ln.num_groups == 1
    ln(x)


def test_layers_in_the_authors_convention_stay_switch_norm():
    sn = with_logits(randomise_norm(SwitchNorm2d(4, unbiased_instance_var=True)), [0.0, 1.0, 3.0], [0.0, 0.2, 3.0])
    assert type(sparsify(sn)) is SwitchNorm2d


def test_sparsify_sync_and_rank_free_layers_and_without_freezing():
    bn_logits = ([0.0, 1.0, 3.0], [0.0, 0.2, 3.0])
    group = object()
    model = nn.Sequential(with_logits(SyncSwitchNorm(4, process_group=group), *bn_logits),
                          with_logits(SwitchNormNd(4), *bn_logits))
    sparse = sparsify(model)
    assert type(sparse[0]) is nn.SyncBatchNorm and sparse[0].process_group is group
    assert type(sparse[1]) is BatchNormXd
    sparse[1](torch.randn(2, 4, 3))

    unfrozen = sparsify(model, freeze=False)
    assert all(isinstance(m, SwitchNormBase) and m.mean_weight.requires_grad for m in unfrozen)
    assert unfrozen[1].importance_weights()[0].tolist() == [0.0, 0.0, 1.0]


# Every option at a value other than its default (the two variants cover using_bn on and off).
NON_DEFAULT_OPTIONS = [
    dict(eps=1e-3, momentum=None, affine=False, track_running_stats=True, using_bn=True,
         using_moving_average=False, last_gamma=True, unbiased_instance_var=True),
    dict(eps=1e-3, momentum=0.3, affine=True, track_running_stats=False, using_bn=False,
         using_moving_average=False, last_gamma=True, unbiased_instance_var=True),
]


def _layer_options(model):
    layer = model if isinstance(model, SwitchNormBase) else model[0]
    return {k: v for k, v in layer.options().items() if k != "process_group"}


@pytest.mark.parametrize("options", NON_DEFAULT_OPTIONS)
def test_every_rebuild_keeps_every_option(options):
    """sync, revert, freeze and sparsify rebuild SN layers: none may drop an option."""
    from sn_plugin import FrozenSwitchNorm

    original = nn.Sequential(SwitchNorm2d(5, **options))
    expected = _layer_options(original)
    assert expected == {"num_features": 5, **options, **({"track_running_stats": False}
                                                           if not options["using_bn"] else {})}
    synced = convert_sync_sn(original)
    rebuilt = {
        "convert_sync_sn": synced,
        "revert_sync_sn": revert_sync_sn(synced),
        "revert of a layer built synchronized": revert_sync_sn(nn.Sequential(SyncSwitchNorm(5, **options))),
        "FrozenSwitchNorm.from_switch_norm": FrozenSwitchNorm.from_switch_norm(original[0]),
        "FrozenSwitchNorm of a synchronized layer": FrozenSwitchNorm.from_switch_norm(synced[0]),
        "sparsify(freeze=False)": sparsify(original, freeze=False),
    }
    with torch.no_grad():  # a choice of IN for the mean keeps the layer SN when frozen
        original[0].mean_weight[0] = 5.0
    rebuilt["sparsify(freeze=True)"] = sparsify(original)
    for how, model in rebuilt.items():
        assert _layer_options(model) == expected, how
