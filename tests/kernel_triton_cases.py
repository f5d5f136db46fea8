"""Cases for the Triton kernels, run by tests/test_kernel_triton.py in a pytest subprocess with
TRITON_INTERPRET=1 (set before triton is imported), on CPU tensors and small shapes.

Each case calls the Triton implementations of the ops (sn_plugin.kernels.triton_sn) the way
the layer does and compares them with the naive semantics (tests/kernel_helpers.py).
"""
import math
import os

import pytest
import torch

from sn_plugin.kernels import sync, triton_sn as T

from kernel_helpers import naive_switch_norm

assert os.environ.get("TRITON_INTERPRET") == "1", "run through tests/test_kernel_triton.py"


def rows_view(x):
    n, c = x.shape[:2]
    return x.reshape(n, c, math.prod(x.shape[2:])).contiguous()


def fused(x, mean_logits, var_logits, weight, bias, running_mean, running_var, training, momentum, eps, unbiased,
          dy):
    """Output and gradients (x, logits, weight, bias) through the Triton ops; updates the running statistics."""
    x3 = rows_view(x)
    batch_stats = training or running_mean is None
    has_in = x.dim() > 2
    run = (None, None) if batch_stats else (running_mean, running_var)
    y, mean_in, ln, bn = T.forward(x3, mean_logits, var_logits, weight, bias, *run, batch_stats, eps, unbiased,
                                   has_in)
    if training and running_mean is not None and mean_logits.numel() == 3:
        T.update_running_stats(running_mean, running_var, bn, None, x3.shape[0], x3.shape[2], momentum, unbiased)
    grads = T.backward(rows_view(dy), x3, mean_in, ln, bn, mean_logits, var_logits, weight, batch_stats, eps,
                       unbiased, has_in, True)
    return y.view(x.shape), grads[0].view(x.shape), *grads[1:]


def naive(x, mean_logits, var_logits, weight, bias, running_mean, running_var, training, momentum, eps, unbiased,
          dy):
    inputs = [t.detach().double().requires_grad_() for t in (x, mean_logits, var_logits, weight, bias)]
    y = naive_switch_norm(*inputs, running_mean, running_var, training, momentum, eps, unbiased)
    grads = torch.autograd.grad(y, inputs, dy.double(), allow_unused=True)
    return (y,) + tuple(torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads))


def layer_inputs(shape, k, dtype=torch.float64, seed=0, offset=1.0):
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + offset).to(dtype)
    params = [torch.randn(k, generator=g, dtype=torch.float64) for _ in range(2)]
    params += [torch.randn(c, generator=g, dtype=torch.float64) for _ in range(2)]
    running = [torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g, dtype=torch.float64) + 0.5]
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    return x, params, running, dy


@pytest.mark.parametrize("shape, k, training, unbiased", [
    ((3, 4, 7), 3, True, False), ((3, 4, 7), 3, False, True), ((3, 4, 2, 3), 2, True, True),
    ((6, 5), 3, True, True), ((6, 5), 3, False, False), ((1, 3, 4, 4), 3, True, False),
    ((4, 3, 1, 1), 3, True, False), ((2, 3, 70), 3, True, False),
])
def test_forward_backward_and_running_statistics_match_the_semantics(shape, k, training, unbiased):
    x, params, running, dy = layer_inputs(shape, k, seed=sum(shape))
    expected_running = [r.clone() for r in running]
    got = fused(x, *params, *running, training, 0.3, 1e-5, unbiased, dy)
    expected = naive(x, *params, *expected_running, training, 0.3, 1e-5, unbiased, dy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    for r, e in zip(running, expected_running):  # momentum reaches Triton as float32
        torch.testing.assert_close(r, e, rtol=1e-7, atol=1e-7)


def test_eval_without_running_statistics_uses_the_batch():
    x, params, _, dy = layer_inputs((4, 3, 5), 3, seed=3)
    got = fused(x, *params, None, None, False, 0.1, 1e-5, False, dy)
    expected = naive(x, *params, None, None, False, 0.1, 1e-5, False, dy)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)


def test_empty_batch():
    x, params, running, dy = layer_inputs((0, 4, 6), 3, seed=4)
    before = [r.clone() for r in running]
    y, dx, *param_grads = fused(x, *params, *running, True, 0.1, 1e-5, False, dy)
    assert y.shape == dx.shape == x.shape
    assert all(torch.equal(g, torch.zeros_like(g)) for g in param_grads)
    assert all(torch.equal(r, b) for r, b in zip(running, before))


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float16, 2e-2), (torch.bfloat16, 5e-2)])
def test_low_precision_inputs_run_in_float32(dtype, tol):
    x, params, running, dy = layer_inputs((3, 4, 6, 5), 3, dtype=dtype, seed=5)
    params = [p.float() for p in params]
    got = fused(x, *params, *running, True, 0.1, 1e-5, False, dy)
    expected = naive(x, *params, *[r.clone() for r in running], True, 0.1, 1e-5, False, dy)
    assert got[0].dtype == got[1].dtype == dtype
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=tol, atol=tol * max(1.0, e.abs().max().item()))


def test_large_offset_moments_stay_accurate():
    x = torch.randn(2, 3, 300, generator=torch.Generator().manual_seed(6)) + 1e4
    _, var_in = T.moments(x, False)
    torch.testing.assert_close(var_in, x.double().var(-1, unbiased=False), rtol=1e-6, atol=0)


@pytest.mark.parametrize("split", [(3, 2), (4, 0)])
@pytest.mark.parametrize("shape_tail, unbiased", [((4, 5), False), ((4,), True)])
def test_synchronized_split_ops_equal_one_process_on_the_whole_batch(split, shape_tail, unbiased):
    """Two shards through moments -> combine -> normalize and backward_reduce -> sum -> backward_dx."""
    x, params, running, dy = layer_inputs((sum(split),) + shape_tail, 3, seed=7)
    expected_running = [r.clone() for r in running]
    expected = naive(x, *params, *expected_running, True, 0.3, 1e-5, unbiased, dy)
    shards = list(zip(torch.split(x, split), torch.split(dy, split)))
    has_in = x.dim() > 2
    moments = [T.moments(rows_view(xs), unbiased) for xs, _ in shards]
    mean_bn, var_bn, count = sync.combine_moments(torch.stack([sync.local_moments(*m) for m in moments]))
    forwards = [T.normalize(rows_view(xs), *m, mean_bn, var_bn, count, *params, None, None, True, 1e-5, unbiased,
                            has_in) for (xs, _), m in zip(shards, moments)]
    T.update_running_stats(*running, forwards[0][2], count, split[0], math.prod(shape_tail[1:]), 0.3, unbiased)
    reduced = [T.backward_reduce(rows_view(d), rows_view(xs), m[0], f[1], f[2], count, params[0], params[1],
                                 params[2], True, 1e-5, unbiased, has_in)
               for (xs, d), m, f in zip(shards, moments, forwards)]
    bn_grad = sum(r[2] for r in reduced)  # what the all_reduce does
    dx = [T.backward_dx(rows_view(d), rows_view(xs), m[0], r[0].contiguous(), r[1], bn_grad, f[1], f[2], count,
                        params[0], params[1], params[2], True, 1e-5, unbiased, has_in)
          for (xs, d), m, f, r in zip(shards, moments, forwards, reduced)]
    got = [torch.cat([f[0].view(xs.shape) for f, (xs, _) in zip(forwards, shards)]),
           torch.cat([g.view(xs.shape) for g, (xs, _) in zip(dx, shards)])]
    got += [sum(r[i] for r in reduced) for i in (3, 4, 5, 6)]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-9)
    for r, e in zip(running, expected_running):
        torch.testing.assert_close(r, e, rtol=1e-7, atol=1e-7)
