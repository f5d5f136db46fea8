"""What the kernel tests share: the semantics written out naively, the backend fixture, a host-sync guard.

``naive_switch_norm`` is an independent statement of what every path must compute (the
brief of issue 10), differentiable by plain autograd in float64; it shares no code with
sn_plugin. ``sn_backend`` runs a test once per SN path (the fused kernels and the
pure-PyTorch reference).
"""
import contextlib
import math

import pytest
import torch

from sn_plugin import kernels

BACKENDS = ["cpp", "reference"]


@pytest.fixture(scope="module", params=BACKENDS)
def sn_backend(request):
    """Runs a module's tests on each SN path (the C++ kernels must be built: see test_kernels.py)."""
    if request.param == "cpp" and kernels.CPU_KERNELS_MISSING is not None:
        pytest.skip(f"the C++ kernels are not built: {kernels.CPU_KERNELS_MISSING}")
    previous = kernels.set_backend(request.param)
    yield request.param
    kernels.set_backend(previous)


def naive_switch_norm(x, mean_logits, var_logits, weight, bias, running_mean, running_var, training,
                      momentum, eps, unbiased):
    """SN of x (N, C, *) straight from the definitions, in float64; updates the running statistics in place."""
    n, c = x.shape[:2]
    has_in = x.dim() > 2
    xs = x.reshape(n, c, math.prod(x.shape[2:])).double()
    s = xs.shape[-1]
    mean_in = xs.mean(-1)
    var_in = ((xs - mean_in[..., None]) ** 2).sum(-1) / (s - 1 if unbiased and s > 1 else s)
    sample_variances = unbiased and not has_in
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = (var_in + (mean_in - mean_ln) ** 2).mean(1, keepdim=True)
    if sample_variances and c > 1:
        var_ln = var_ln * c / (c - 1)
    means, variances = [mean_in, mean_ln], [var_in, var_ln]
    if mean_logits.numel() == 3:
        if training or running_mean is None:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = (var_in + (mean_in - mean_bn) ** 2).mean(0, keepdim=True)
            if sample_variances and n > 1:
                var_bn = var_bn * n / (n - 1)
            if training and running_mean is not None and n * s > 1:
                with torch.no_grad():
                    correction = 1.0 if unbiased else n * s / (n * s - 1)
                    new_mean = (1 - momentum) * running_mean.double() + momentum * mean_bn.view(-1)
                    new_var = (1 - momentum) * running_var.double() + momentum * var_bn.view(-1) * correction
                    running_mean.copy_(new_mean)
                    running_var.copy_(new_var)
        else:
            mean_bn, var_bn = running_mean.double().view(1, c), running_var.double().view(1, c)
        means.append(mean_bn)
        variances.append(var_bn)

    def weights(logits):
        logits = logits.double()
        return logits.softmax(0) if has_in else torch.cat([logits[:1] * 0, logits[1:].softmax(0)])

    mean = sum(w * m for w, m in zip(weights(mean_logits), means))
    var = sum(w * v for w, v in zip(weights(var_logits), variances))
    y = (xs - mean[..., None]) / (var + eps).sqrt()[..., None]
    if weight is not None:
        y = y * weight.double().view(1, c, 1)
    if bias is not None:
        y = y + bias.double().view(1, c, 1)
    return y.reshape(x.shape)


class HostSync(AssertionError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Makes every Python-level read of a tensor's value (.item(), bool(), float(), .tolist()) raise."""
    names = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")
    saved = {name: getattr(torch.Tensor, name) for name in names}

    def refuse(name):
        def method(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} read a value on the host")
        return method

    for name in names:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)
