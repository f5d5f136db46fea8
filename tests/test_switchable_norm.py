"""Exactness and robustness of the SwitchNorm layers (issue: core layers)."""
import pytest
import torch
from torch import nn

from sn_plugin import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, switch_norm

from kernel_helpers import sn_backend  # noqa: F401

pytestmark = pytest.mark.usefixtures("sn_backend")  # every test on the fused and the reference path

SN_BY_RANK = {3: SwitchNorm1d, 4: SwitchNorm2d, 5: SwitchNorm3d}
IN_BY_RANK = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}
BN_BY_RANK = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = [(4, 6, 7), (4, 6, 5, 3), (3, 4, 2, 3, 4)]


def reference_sn(x, m, training):
    """Eq. 2-3 of the paper, each scope's statistics computed directly from the data.

    With ``m.unbiased_instance_var`` the released code's convention instead: IN
    variance divided by S - 1, LN/BN variances derived from it by Eq. 4.
    """
    dims = tuple(range(2, x.dim()))
    xd = x.double()
    mean_in, var_in = xd.mean(dims, keepdim=True), xd.var(dims, unbiased=False, keepdim=True)
    ln_dims = (1,) + dims
    mean_ln, var_ln = xd.mean(ln_dims, keepdim=True), xd.var(ln_dims, unbiased=False, keepdim=True)
    if m.unbiased_instance_var:
        var_in = xd.var(dims, unbiased=True, keepdim=True)
        var_ln = (var_in + mean_in ** 2).mean(1, keepdim=True) - mean_ln ** 2
    means, variances = [mean_in, mean_ln], [var_in, var_ln]
    if m.using_bn:
        shape = (1, -1) + (1,) * len(dims)
        if training:
            bn_dims = (0,) + dims
            means.append(xd.mean(bn_dims, keepdim=True))
            if m.unbiased_instance_var:
                variances.append((var_in + mean_in ** 2).mean(0, keepdim=True) - means[-1] ** 2)
            else:
                variances.append(xd.var(bn_dims, unbiased=False, keepdim=True))
        else:
            means.append(m.running_mean.double().view(shape))
            variances.append(m.running_var.double().view(shape))
    wm, wv = (w.double() for w in m.importance_weights())
    mean = sum(w * s for w, s in zip(wm, means))
    var = sum(w * s for w, s in zip(wv, variances))
    shape = (1, -1) + (1,) * len(dims)
    y = (xd - mean) / (var + m.eps).sqrt()
    return y * m.weight.double().view(shape) + m.bias.double().view(shape)


def randomise(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (m.weight, m.bias, m.mean_weight, m.var_weight):
            p.copy_(torch.randn(p.shape, generator=g))
        if m.running_mean is not None:
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(1)
    return m


def one_hot(m, branch):
    with torch.no_grad():
        for logits in (m.mean_weight, m.var_weight):
            logits.fill_(-60.0)
            logits[branch] = 60.0
    return m


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("using_bn", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_matches_paper_equations(shape, using_bn, training):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    m = randomise(SN_BY_RANK[len(shape)](shape[1], using_bn=using_bn)).train(training)
    expected = reference_sn(x, m, training)
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("offset", [30.0, 300.0])  # below and above the large-offset path's threshold
def test_offset_inputs_match_paper_equations(offset):
    torch.manual_seed(14)
    x = torch.randn(4, 6, 9, 9) + offset * torch.rand(1, 6, 1, 1)
    m = randomise(SwitchNorm2d(6))
    torch.testing.assert_close(m(x).double(), reference_sn(x, m, True), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("training", [True, False])
def test_released_unbiased_instance_variance_convention(training):
    torch.manual_seed(15)
    x = torch.randn(3, 5, 2, 3)  # small maps, where S / (S - 1) matters
    m = randomise(SwitchNorm2d(5, unbiased_instance_var=True)).train(training)
    torch.testing.assert_close(m(x).double(), reference_sn(x, m, training), rtol=1e-5, atol=1e-5)
    assert "unbiased_instance_var=True" in repr(m)
    m = m.double()
    x = x.double().requires_grad_()

    def fn(x, weight, bias, mean_logits, var_logits):
        return switch_norm(x, m.running_mean, m.running_var, mean_logits, var_logits,
                           weight, bias, training=training, unbiased_instance_var=True)

    assert torch.autograd.gradcheck(fn, (x, m.weight, m.bias, m.mean_weight, m.var_weight))


def authors_sn1d(x, m, training):
    """The authors' released SwitchNorm1d on an (N, C) input, as their code computes it: LN
    over C and BN over N with two logits [LN, BN]; with ``m.unbiased_instance_var`` their
    ``var()`` (unbiased), otherwise population variances."""
    xd = x.double()
    unbiased = m.unbiased_instance_var
    mean_ln, var_ln = xd.mean(1, keepdim=True), xd.var(1, unbiased=unbiased, keepdim=True)
    if training:
        mean_bn, var_bn = xd.mean(0, keepdim=True), xd.var(0, unbiased=unbiased, keepdim=True)
    else:
        mean_bn, var_bn = m.running_mean.double().view(1, -1), m.running_var.double().view(1, -1)
    wm, wv = m.mean_weight.double()[1:].softmax(0), m.var_weight.double()[1:].softmax(0)
    mean = wm[0] * mean_ln + wm[1] * mean_bn
    var = wv[0] * var_ln + wv[1] * var_bn
    y = (xd - mean) / (var + m.eps).sqrt()
    return y * m.weight.double() + m.bias.double(), var_bn


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_two_dimensional_input_mixes_ln_and_bn_like_the_authors_1d_layer(unbiased, training):
    torch.manual_seed(16)
    x = torch.randn(8, 5) * 2 + 1
    m = randomise(SwitchNorm1d(5, unbiased_instance_var=unbiased)).train(training)
    expected, var_bn = authors_sn1d(x, m, training)
    running_var = m.running_var.double().clone()
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)
    if training:  # BatchNorm1d's rule by default, the authors' (the BN variance as used) in their convention
        batch_var = var_bn.view(-1) if unbiased else x.double().var(0, unbiased=True)
        torch.testing.assert_close(m.running_var.double(), 0.9 * running_var + 0.1 * batch_var, rtol=1e-5, atol=1e-6)


def test_two_dimensional_input_at_default_initialisation_is_half_ln_half_bn():
    x = torch.randn(16, 7)
    m = SwitchNorm1d(7)
    ln = nn.functional.layer_norm(x, (7,), eps=0.0)
    expected, _ = authors_sn1d(x, m, True)
    torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(m(x), ln, atol=1e-2)  # the IN branch plays no part


@pytest.mark.parametrize("unbiased", [False, True])
def test_two_dimensional_input_gradients(unbiased):
    torch.manual_seed(17)
    m = randomise(SwitchNorm1d(4, unbiased_instance_var=unbiased)).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, weight, bias, mean_logits, var_logits):
        return switch_norm(x, None, None, mean_logits, var_logits, weight, bias, training=True,
                           unbiased_instance_var=unbiased)

    assert torch.autograd.gradcheck(fn, (x, m.weight, m.bias, m.mean_weight, m.var_weight))
    (m(x) * torch.arange(24.0, dtype=torch.float64).view(6, 4)).sum().backward()
    assert m.mean_weight.grad[0] == 0 and m.var_weight.grad[0] == 0  # the unused IN logit


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_unbiased_convention_updates_running_variance_like_the_authors(shape, momentum):
    """Their update: running = (1 - m) * running + m * var_bn, var_bn derived from the unbiased
    IN variance and used as it is (no BatchNorm correction on top of it)."""
    torch.manual_seed(18)
    m = one_hot(SN_BY_RANK[len(shape)](shape[1], unbiased_instance_var=True, momentum=momentum), 2)
    x = torch.randn(shape) * 2 + 1
    m(x)
    dims = tuple(range(2, x.dim()))
    xd = x.double()
    var_in = xd.var(dims, unbiased=True)
    mean_in = xd.mean(dims)
    var_bn = (var_in + mean_in ** 2).mean(0) - mean_in.mean(0) ** 2
    factor = 0.1 if momentum else 1.0
    torch.testing.assert_close(m.running_var.double(), (1 - factor) + factor * var_bn, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_mean.double(), factor * mean_in.mean(0), rtol=1e-5, atol=1e-6)


def test_logit_gradients_stay_accurate_for_large_offsets():
    torch.manual_seed(19)
    x = torch.randn(4, 6, 8, 8) + 1e3
    dy = torch.randn_like(x)

    def logit_grads(dtype):
        m = randomise(SwitchNorm2d(6), seed=3).to(dtype)
        (m(x.to(dtype)) * dy.to(dtype)).sum().backward()
        return torch.cat([m.mean_weight.grad, m.var_weight.grad]).double()

    exact = logit_grads(torch.float64)
    assert _max_error(logit_grads(torch.float32), exact) <= 1e-5 * exact.abs().max()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_one_hot_in_equals_instance_norm(shape, training):
    torch.manual_seed(1)
    x = torch.randn(shape)
    sn = one_hot(randomise(SN_BY_RANK[len(shape)](shape[1])), 0).train(training)
    ref = IN_BY_RANK[len(shape)](shape[1], affine=True).train(training)
    ref.load_state_dict({"weight": sn.weight, "bias": sn.bias})
    torch.testing.assert_close(sn(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_one_hot_ln_equals_group_norm_with_one_group(shape, training):
    torch.manual_seed(2)
    x = torch.randn(shape)
    sn = one_hot(randomise(SN_BY_RANK[len(shape)](shape[1])), 1).train(training)
    ref = nn.GroupNorm(1, shape[1])
    ref.load_state_dict({"weight": sn.weight, "bias": sn.bias})
    torch.testing.assert_close(sn(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_one_hot_bn_equals_batch_norm_and_its_running_statistics(shape, momentum):
    torch.manual_seed(3)
    sn = one_hot(randomise(SN_BY_RANK[len(shape)](shape[1], momentum=momentum)), 2)
    sn.num_batches_tracked.zero_()
    bn = BN_BY_RANK[len(shape)](shape[1], momentum=momentum)
    bn.load_state_dict({k: v for k, v in sn.state_dict().items() if k in bn.state_dict()})
    for step in range(3):
        x = torch.randn(shape) * (step + 1) + step
        torch.testing.assert_close(sn(x), bn(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sn.running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sn.running_var, bn.running_var, rtol=1e-5, atol=1e-6)
    assert int(sn.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    sn.eval(), bn.eval()
    x = torch.randn(shape)
    torch.testing.assert_close(sn(x), bn(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(3, 4, 5), (3, 4, 3, 2), (2, 3, 2, 2, 3)])
@pytest.mark.parametrize("using_bn", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_input_affine_and_logits(shape, using_bn, training):
    torch.manual_seed(4)
    m = randomise(SN_BY_RANK[len(shape)](shape[1], using_bn=using_bn)).double().train(training)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    running = (m.running_mean, m.running_var) if using_bn and not training else (None, None)

    def fn(x, weight, bias, mean_logits, var_logits):
        return switch_norm(x, *running, mean_logits, var_logits, weight, bias,
                           training=training or not using_bn, eps=m.eps)

    params = (m.weight, m.bias, m.mean_weight, m.var_weight)
    assert torch.autograd.gradcheck(fn, (x,) + params)


def test_gradients_match_autograd_reference():
    torch.manual_seed(5)
    x = torch.randn(4, 6, 5, 5, dtype=torch.float64, requires_grad=True)
    m = randomise(SwitchNorm2d(6)).double()
    dy = torch.randn_like(x)
    grads = torch.autograd.grad((m(x) * dy).sum(), (x,) + tuple(m.parameters()))
    x_ref = x.detach().clone().requires_grad_()
    grads_ref = torch.autograd.grad((reference_sn(x_ref, m, True) * dy).sum(), (x_ref,) + tuple(m.parameters()))
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r)


def test_parameters_buffers_and_defaults():
    m = SwitchNorm2d(16)
    assert m.weight.shape == m.bias.shape == (16,)
    assert m.mean_weight.shape == m.var_weight.shape == (3,)
    assert torch.equal(m.mean_weight, torch.ones(3)) and torch.equal(m.weight, torch.ones(16))
    assert torch.equal(m.running_mean, torch.zeros(16)) and torch.equal(m.running_var, torch.ones(16))
    assert int(m.num_batches_tracked) == 0
    assert set(m.state_dict()) == set(nn.BatchNorm2d(16).state_dict()) | {"mean_weight", "var_weight"}
    no_bn = SwitchNorm2d(16, using_bn=False)
    assert no_bn.mean_weight.shape == (2,) and no_bn.running_mean is None
    assert set(no_bn.state_dict()) == {"weight", "bias", "mean_weight", "var_weight"}
    assert torch.equal(SwitchNorm2d(4, last_gamma=True).weight, torch.zeros(4))
    mean_w, var_w = m.importance_weights()
    torch.testing.assert_close(mean_w, torch.full((3,), 1 / 3))
    assert "IN 0.333" in repr(m) and "using_moving_average=True" in repr(m)


def test_batch_norm_checkpoint_loads_into_sn():
    bn = nn.BatchNorm2d(8)
    bn.running_mean.normal_()
    sn = SwitchNorm2d(8)
    missing, unexpected = sn.load_state_dict(bn.state_dict(), strict=False)
    assert set(missing) == {"mean_weight", "var_weight"} and not unexpected
    assert torch.equal(sn.running_mean, bn.running_mean)


# ---------------------------------------------------------------- awkward inputs


@pytest.mark.parametrize("shape", [(4, 6, 1, 1), (1, 6, 5, 5), (1, 6, 1, 1)])
def test_degenerate_sizes_stay_finite(shape):
    m = randomise(SwitchNorm2d(6))
    x = torch.randn(shape, requires_grad=True)
    before = m.running_var.clone()
    y = m(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())
    if shape == (1, 6, 1, 1):  # one value per channel: nothing to estimate a variance from
        assert torch.equal(m.running_var, before) and int(m.num_batches_tracked) == 1
    torch.testing.assert_close(y.double(), reference_sn(x.detach(), m, True), rtol=1e-5, atol=1e-5)


def test_single_sample_batch_statistics_equal_instance_statistics():
    torch.manual_seed(6)
    x = torch.randn(1, 6, 4, 4)
    bn_only, in_only = one_hot(SwitchNorm2d(6), 2), one_hot(SwitchNorm2d(6), 0)
    torch.testing.assert_close(bn_only(x), in_only(x), rtol=1e-5, atol=1e-5)
    expected_var = x.var((0, 2, 3), unbiased=True) * 0.1 + 0.9
    torch.testing.assert_close(bn_only.running_var, expected_var)


@pytest.mark.parametrize("training", [True, False])
def test_empty_batch(training):
    m = randomise(SwitchNorm2d(6)).train(training)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(0, 6, 7, 7, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_float32_statistics(dtype):
    torch.manual_seed(7)
    m = randomise(SwitchNorm2d(6))
    x = torch.randn(4, 6, 8, 8) * 1e3  # x^2 overflows float16
    ref = m(x.to(dtype).float())
    x_low = x.to(dtype).requires_grad_()
    y = m(x_low)
    assert y.dtype == dtype and torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    y.float().square().sum().backward()
    assert x_low.grad.dtype == dtype and torch.isfinite(x_low.grad).all()


def test_autocast_on_cpu():
    m = randomise(SwitchNorm2d(6))
    conv = nn.Conv2d(3, 6, 3)
    x = torch.randn(2, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(conv(x))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), m(conv(x)), rtol=5e-2, atol=5e-2)


def test_non_contiguous_and_channels_last_inputs():
    torch.manual_seed(8)
    m = randomise(SwitchNorm2d(6))
    x = torch.randn(4, 6, 8, 9)
    expected = m(x)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    y = m(channels_last)
    torch.testing.assert_close(y, expected)
    assert y.is_contiguous(memory_format=torch.channels_last)
    transposed = x.transpose(2, 3).contiguous().transpose(2, 3)
    torch.testing.assert_close(m(transposed), expected)
    torch.testing.assert_close(m(torch.randn(4, 6, 8, 18)[..., ::2].copy_(x)), expected)
    x5 = torch.randn(2, 6, 3, 4, 5)
    m3 = randomise(SwitchNorm3d(6))
    torch.testing.assert_close(m3(x5.contiguous(memory_format=torch.channels_last_3d)), m3(x5))


@pytest.mark.parametrize("cls, bad_shape", [
    (SwitchNorm2d, (2, 6, 5)), (SwitchNorm2d, (2, 5, 4, 4)), (SwitchNorm1d, (2, 6, 3, 3)),
    (SwitchNorm3d, (2, 6, 4, 4)),
])
def test_wrong_shape_names_module_and_expected_shape(cls, bad_shape):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\(6\) expects .*\(N, C"):
        cls(6)(torch.randn(bad_shape))


def _max_error(y, reference):
    return (y.double() - reference).abs().max().item()


def test_large_mean_inputs_are_as_accurate_as_torch_layers():
    """mean 1e4, std 1: float32 cannot hold the mean to better than ~1e-3, so torch's own
    layers err by that much; SN must not add cancellation error on top of it."""
    torch.manual_seed(9)
    x = torch.randn(4, 6, 16, 16) + 1e4
    torch_layers = [nn.InstanceNorm2d(6, affine=True), nn.GroupNorm(1, 6), nn.BatchNorm2d(6)]
    for branch, torch_layer in enumerate(torch_layers):
        m = one_hot(SwitchNorm2d(6), branch)
        reference = reference_sn(x, m, True)
        assert _max_error(m(x), reference) <= 2 * _max_error(torch_layer(x), reference) + 1e-6
        if branch == 2:
            torch.testing.assert_close(m.running_var, torch_layer.running_var, rtol=1e-5, atol=1e-5)
            expected = 0.9 + 0.1 * x.double().var((0, 2, 3))
            torch.testing.assert_close(m.running_var.double(), expected, rtol=1e-5, atol=1e-5)
    mixed = randomise(SwitchNorm2d(6))
    bound = max(_max_error(layer(x), reference_sn(x, one_hot(SwitchNorm2d(6), k), True))
                for k, layer in enumerate(torch_layers))
    assert _max_error(mixed(x), reference_sn(x, mixed, True)) <= 4 * bound


def test_large_mean_gradients_are_as_accurate_as_batch_norm():
    torch.manual_seed(10)
    x = torch.randn(4, 6, 16, 16) + 1e4
    dy = torch.randn_like(x)

    def input_grad(layer, dtype):
        xg = x.to(dtype).detach().requires_grad_()
        (layer.to(dtype)(xg) * dy.to(dtype)).sum().backward()
        return xg.grad.double()

    sn = one_hot(SwitchNorm2d(6), 2)
    sn_error = _max_error(input_grad(sn, torch.float32), input_grad(sn, torch.float64))
    bn = nn.BatchNorm2d(6)
    bn_error = _max_error(input_grad(bn, torch.float32), input_grad(bn, torch.float64))
    assert sn_error <= bn_error
    mixed = randomise(SwitchNorm2d(6))
    scale = input_grad(mixed, torch.float64).abs().max().item()
    assert _max_error(input_grad(mixed, torch.float32), input_grad(mixed, torch.float64)) <= 1e-3 * scale


def test_batch_average_mode_refuses_to_evaluate_before_statistics_exist():
    m = SwitchNorm2d(6, using_moving_average=False)
    x = torch.randn(4, 6, 5, 5)
    m(x)  # training uses the batch and leaves the running statistics alone
    assert torch.equal(m.running_mean, torch.zeros(6)) and int(m.num_batches_tracked) == 0
    m.eval()
    with pytest.raises(RuntimeError, match="recompute_batch_stats"):
        m(x)
    with torch.no_grad():  # what the batch-average estimation leaves behind
        m.running_mean.copy_(x.mean((0, 2, 3)))
        m.running_var.copy_(x.var((0, 2, 3)))
        m.num_batches_tracked.fill_(1)
    assert torch.isfinite(m(x)).all()


def test_without_running_statistics_eval_uses_the_batch():
    torch.manual_seed(11)
    m = randomise(SwitchNorm2d(6, track_running_stats=False))
    x = torch.randn(4, 6, 5, 5)
    torch.testing.assert_close(m.eval()(x), m.train()(x))


def test_eval_without_grad_is_the_same_function():
    torch.manual_seed(12)
    m = randomise(SwitchNorm2d(6)).eval()
    x = torch.randn(3, 6, 5, 5, requires_grad=True)
    with torch.no_grad():
        y0 = m(x)
    torch.testing.assert_close(y0, m(x))


def test_bad_logit_shapes_are_rejected():
    x = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="3 entries"):
        switch_norm(x, None, None, torch.ones(4) / 4, torch.ones(4) / 4, training=True)


def test_torchscript_is_refused_with_a_clear_message():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), SwitchNorm2d(4))
    with pytest.raises(RuntimeError, match="SwitchNorm2d cannot be compiled by torch.jit.script.*torch.compile"):
        torch.jit.script(model)


def test_torch_compile_matches_eager():
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomise(SwitchNorm2d(4)), nn.ReLU())
    x = torch.randn(2, 3, 10, 10)
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = model(x_eager)
    eager.square().sum().backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model)(x_compiled)
    compiled.square().sum().backward()
    torch.testing.assert_close(compiled, eager)
    # inductor reorders float32 sums, so gradients agree to rounding, not bit for bit
    torch.testing.assert_close(x_compiled.grad, x_eager.grad, rtol=1e-4, atol=1e-4)
    for p, g in zip(model.parameters(), eager_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)
