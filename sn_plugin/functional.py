"""Switchable Normalization as a function: the maths every SN module shares.

Notation follows the paper (Luo et al., ICLR 2019). For an input viewed as
(N, C, S), S the product of the spatial sizes:

* IN statistics are per (n, c) over S (population variance),
* LN statistics are derived from them per n (Eq. 4),
* BN statistics are derived from them per c, over the batch (and over every
  process of ``process_group`` when one is given: synchronized SN).

An (N, C) input has no IN branch (its "instance" is a single value): it mixes
LN over the channels and BN over the batch, as the authors' ``SwitchNorm1d``
does; the IN logit is then ignored.

The mixed statistics ``mu = sum_k w_k mu_k``, ``var = sum_k w'_k var_k`` give one
scale and one shift per (n, c), so the output is a single fused affine. The
backward pass is the analytic one of the paper's Appendix H, written so that it
needs the input plus O(N*C) statistics, as BatchNorm does, instead of the many
full-size intermediates plain autograd would keep. The importance logits'
gradients use the statistics relative to the mixed ones,
``sum(dL/dmu * (mu_k - mu))``: the softmax backward makes that equal to the
plain form, without its cancellation for inputs with a large offset.

Convention (``unbiased_instance_var``): by default the paper's population
variances, and BatchNorm's running-variance rule (the batch variance times
M*S/(M*S-1)). With ``unbiased_instance_var=True`` the authors' released code:
the IN variance divided by S-1 (for (N, C) inputs the LN and BN variances
divided by C-1 and N-1, as their 1d layer's ``var()``), the other variances
derived from it, and the running variance updated with the BN variance as it
is used, with no further correction.

:func:`switch_norm` runs on the fused kernels of :mod:`sn_plugin.kernels` (C++ on CPU,
Triton on CUDA) where they are available; the implementation in this module is the
reference path and the fallback (``SN_PLUGIN_BACKEND=reference`` forces it).

The derived LN/BN variances are computed as ``mean(var_in + (mu_in - mu)^2)``
rather than ``mean(var_in + mu_in^2) - mu^2``: the same value, without the
cancellation that the second form suffers for large means in float32.
"""
import math
from typing import List, Optional, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import kernels

IN, LN, BN = 0, 1, 2
BRANCH_NAMES = ("IN", "LN", "BN")

# Instance statistics start from ATen's group-norm kernel (one group per
# channel), which needs eps > 0 to keep zero-variance channels finite; it is
# subtracted again from the variance the kernel's 1/std implies.
_STAT_EPS = 1e-5
# Above this |mean| / std ratio (of any (n, c) row) the input counts as having a
# large offset: the IN statistics are re-measured on the centred data and the
# backward centres the input before scaling it, so that float32 rounding of the
# offset does not swamp the signal. Below it the cheaper forms are exact enough.
_LARGE_OFFSET_RATIO = 64.0
# The (N, C)-sized statistics are kept in float64: they are tiny, and it means the
# only roundings are those of the full-size passes, which run in the input's
# precision (float32 for float16/bfloat16 inputs).
_STATS = torch.float64
# A number of samples: a Python number, or a 0-d tensor when it comes from other processes.
Count = Union[float, Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _instance_moments(xs: Tensor):
    """IN statistics of a contiguous (N, C, S) float32/float64 tensor.

    Returns ``(x_hat, pivot, rstd_in, mean_in, var_in, large_offset)``:
    ``x_hat = (x - pivot) * rstd_in`` is a fresh buffer the caller may overwrite;
    ``pivot`` and ``rstd_in`` are the group-norm kernel's mean and 1/std in the
    input's precision; ``mean_in``/``var_in`` the float64 mean and population
    variance. For inputs with a large offset (``large_offset``) they are
    re-measured on ``x_hat``, whose values are centred and of order 1: that
    recovers what the kernel's float32 statistics lose (about 1e-4 of the
    variance at mean 1e4, std 1).
    """
    n, c, s = xs.shape
    if xs.numel() == 0 or s == 1:  # an empty shard of a synchronized batch; one value per (n, c)
        pivot = xs.view(n, c)
        zeros = torch.zeros_like(pivot)
        return torch.zeros_like(xs), pivot, zeros + 1, pivot.to(_STATS), zeros.to(_STATS), False
    x_hat, pivot, rstd_in = torch.native_group_norm(xs, None, None, n, c, s, c, _STAT_EPS)
    std_in = rstd_in.to(_STATS).reciprocal()
    # On CPU the test costs nothing; elsewhere it would stall the device queue, so the
    # accurate form is always taken.
    large_offset = xs.dtype != torch.float64 and (
        xs.device.type != "cpu" or bool((pivot.abs() * rstd_in > _LARGE_OFFSET_RATIO).any()))
    if not large_offset:
        return x_hat, pivot, rstd_in, pivot.to(_STATS), (std_in.square() - _STAT_EPS).clamp_min_(0.0), False
    hat_mean = x_hat.sum(-1).to(_STATS) / s
    hat_sq_mean = torch.linalg.vector_norm(x_hat, 2, -1).to(_STATS).square() / s
    mean_in = pivot.to(_STATS) + hat_mean * std_in
    var_in = (hat_sq_mean - hat_mean.square()).clamp_min_(0.0) * std_in.square()
    return x_hat, pivot, rstd_in, mean_in, var_in, True


def _row_affine(t: Tensor, scale: Tensor, shift: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """``t * scale + shift`` with one (scale, shift) per (n, c) row of an (N, C, S) tensor.

    Runs ATen's batch-norm inference kernel on the (1, N*C, S) view, every row a
    channel with mean 0 and variance 1 (so it computes exactly x * w + b): one
    vectorized pass, where a broadcasting ``addcmul`` is slower on CPU. ``out`` may be ``t`` itself.
    """
    n, c, s = t.shape
    rows = n * c
    out = torch.empty_like(t) if out is None else out
    zeros, ones, empty = t.new_zeros(rows), t.new_ones(rows), t.new_empty(0)
    torch.ops.aten.native_batch_norm.out(
        t.view(1, rows, s), scale.reshape(rows).to(t.dtype), shift.reshape(rows).to(t.dtype), zeros, ones,
        False, 0.0, 0.0, out=out.view(1, rows, s), save_mean=empty, save_invstd=empty,
    )
    return out


def _sum_over_batch(t: Tensor, group) -> Tensor:
    total = t.sum(0, keepdim=True)
    if group is not None:
        dist.all_reduce(total, group=group)
    return total


def _batch_moments(mean_in: Tensor, var_in: Tensor, group) -> Tuple[Tensor, Tensor, Count]:
    """BN mean and population variance per channel from the IN moments (Eq. 4).

    Returns (mean_bn, var_bn, number of samples) with mean/var of shape (1, C).
    Under a process group the per-rank sums are all-reduced, so every rank gets
    the statistics of the whole (possibly unevenly split) batch; the count then
    stays a tensor on the device (reading it would stall the device queue), and
    a batch that is empty on every process gives zero statistics.
    """
    n = mean_in.shape[0]
    if group is None:
        count: Count = float(n)
        mean_bn = mean_in.mean(0, keepdim=True)
    else:
        packed = torch.cat([mean_in.sum(0), mean_in.new_full((1,), n)])
        dist.all_reduce(packed, group=group)
        count = packed[-1]
        mean_bn = (packed[:-1] / count.clamp_min(1)).unsqueeze(0)
    var_bn = _sum_over_batch(var_in + (mean_in - mean_bn).square(), group) / _at_least_one(count)
    return mean_bn, var_bn, count


def _at_least_one(count: Count) -> Count:
    return count.clamp_min(1) if isinstance(count, Tensor) else max(count, 1.0)


def _sample_correction(count: Count) -> Count:
    """``count / (count - 1)``, 1 where there are fewer than two values."""
    if isinstance(count, Tensor):
        return torch.where(count > 1, count / (count - 1).clamp_min(1), torch.ones_like(count))
    return count / (count - 1) if count > 1 else 1.0


def _update_running_stats(running_mean: Tensor, running_var: Tensor, mean_bn: Tensor, var_bn: Tensor,
                          values: Count, momentum: float, unbiased_instance_var: bool) -> None:
    """Moving averages of the BN statistics over ``values`` = M * S values per channel.

    BatchNorm's rule by default (the batch variance made unbiased); in the
    authors' convention the BN variance as used, which is already derived from
    the unbiased IN variance. Nothing changes when there are fewer than two values.
    """
    if isinstance(values, Tensor):
        weight = (values > 1).to(running_mean.dtype) * momentum
    elif values > 1:
        weight = momentum
    else:
        return
    var = var_bn if unbiased_instance_var else var_bn * _sample_correction(values)
    running_mean.lerp_(mean_bn.view(-1).to(running_mean.dtype), weight)
    running_var.lerp_(var.view(-1).to(running_var.dtype), weight)


def _mixing_weights(logits: Tensor, has_instance: bool) -> Tensor:
    """Softmaxed importance weights in float64, one per branch [IN, LN(, BN)]; without the IN
    branch (an (N, C) input) its weight is 0 and the softmax runs over the other logits."""
    logits = logits.detach().to(_STATS)
    if has_instance:
        return logits.softmax(0)
    return torch.cat([logits.new_zeros(1), logits[1:].softmax(0)])


class _Stats:
    """Everything the backward pass needs besides the input, all O(N*C)."""

    __slots__ = ("means", "vars", "pivot", "mean", "var", "rstd", "mean_weight", "var_weight",
                 "count", "batch_stats", "large_offset", "in_var_divisor", "ln_var_factor", "bn_var_factor")
    _SCALARS = ("count", "batch_stats", "large_offset", "in_var_divisor", "ln_var_factor", "bn_var_factor")

    def tensors(self) -> List[Tensor]:
        return [self.pivot, self.mean, self.var, self.rstd, self.mean_weight, self.var_weight,
                *self.means, *self.vars]

    def scalars(self) -> tuple:
        return tuple(getattr(self, name) for name in self._SCALARS)

    @classmethod
    def rebuild(cls, tensors, scalars) -> "_Stats":
        stats = cls()
        stats.pivot, stats.mean, stats.var, stats.rstd, stats.mean_weight, stats.var_weight = tensors[:6]
        branches = (len(tensors) - 6) // 2
        stats.means, stats.vars = list(tensors[6:6 + branches]), list(tensors[6 + branches:])
        for name, value in zip(cls._SCALARS, scalars):
            setattr(stats, name, value)
        return stats


def _forward(
    x3: Tensor,
    mean_logits: Tensor,
    var_logits: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    batch_stats: bool,
    momentum: float,
    eps: float,
    group,
    unbiased_instance_var: bool,
    has_instance: bool,
) -> Tuple[Tensor, _Stats]:
    """SN forward on a contiguous (N, C, S) tensor; returns (output, stats).

    The output is written into the buffer of the IN-normalised input, which
    saves an allocation and a pass: out = x_hat * (scale / rstd_in) + shift'.
    """
    n, c, s = x3.shape
    compute = _compute_dtype(x3.dtype)
    xs = x3 if x3.dtype == compute else x3.to(compute)
    x_hat, pivot, rstd_in, mean_in, var_in, large_offset = _instance_moments(xs)
    in_var_divisor = float(s - 1 if unbiased_instance_var and s > 1 else s)
    if in_var_divisor != s:
        var_in = var_in * (s / in_var_divisor)
    # The authors' 1d layer takes unbiased variances over the channels and over the batch.
    sample_variances = unbiased_instance_var and not has_instance

    mean_ln = mean_in.mean(1, keepdim=True)
    ln_var_factor = _sample_correction(float(c)) if sample_variances else 1.0
    var_ln = (var_in + (mean_in - mean_ln).square()).mean(1, keepdim=True) * ln_var_factor
    means: List[Tensor] = [mean_in, mean_ln]
    variances: List[Tensor] = [var_in, var_ln]
    count: Count = float(n)
    bn_var_factor: Count = 1.0
    if mean_logits.numel() == 3:
        if batch_stats:
            mean_bn, var_bn, count = _batch_moments(mean_in, var_in, group)
            if sample_variances:
                bn_var_factor = _sample_correction(count)
                var_bn = var_bn * bn_var_factor
            if running_mean is not None:
                _update_running_stats(running_mean, running_var, mean_bn, var_bn, count * s, momentum,
                                      unbiased_instance_var)
        else:
            mean_bn = running_mean.view(1, c).to(_STATS)
            var_bn = running_var.view(1, c).to(_STATS)
        means.append(mean_bn)
        variances.append(var_bn)

    mw = _mixing_weights(mean_logits, has_instance)
    vw = _mixing_weights(var_logits, has_instance)
    mean = sum(mw[k] * means[k] for k in range(len(means)))
    var = sum(vw[k] * variances[k] for k in range(len(variances)))
    rstd = (var + eps).rsqrt()

    scale = rstd if weight is None else rstd * weight.detach().to(_STATS)
    shift = (pivot.to(_STATS) - mean) * scale
    if bias is not None:
        shift = shift + bias.detach().to(_STATS)
    # (x - mean) * scale + bias, written on x_hat = (x - pivot) * rstd_in
    out = _row_affine(x_hat, scale / rstd_in.to(_STATS), shift, out=x_hat)
    stats = _Stats()
    stats.means, stats.vars, stats.pivot, stats.mean, stats.var, stats.rstd = means, variances, pivot, mean, var, rstd
    stats.mean_weight, stats.var_weight = mw, vw
    stats.count, stats.batch_stats, stats.large_offset = count, batch_stats, large_offset
    stats.in_var_divisor, stats.ln_var_factor, stats.bn_var_factor = in_var_divisor, ln_var_factor, bn_var_factor
    return out.to(x3.dtype), stats


def _logit_gradient(weights: Tensor, grad_stat: Tensor, stats: List[Tensor], mixed: Tensor) -> Tensor:
    """dL/dlogits through the softmax, from dL/d(mixed statistic) per (n, c).

    With g_k = sum(grad * (stat_k - mixed)) the softmax backward
    w_k * (g_k - sum_j w_j g_j) reduces to w_k * g_k (sum_j w_j g_j is 0), and no
    term of the size of the statistics themselves is ever formed. An absent IN
    branch has weight 0 and so gets no gradient.
    """
    return torch.stack([(grad_stat * (stat - mixed)).sum() for stat in stats]) * weights


def _backward(grad_out: Tensor, x3: Tensor, weight: Optional[Tensor], stats: _Stats, group, needs_grad):
    """Analytic SN backward (paper, Appendix H) for a contiguous (N, C, S) input."""
    n, c, s = x3.shape
    compute = _compute_dtype(x3.dtype)
    xs = x3 if x3.dtype == compute else x3.to(compute)
    dy = grad_out.reshape(n, c, s)
    if dy.dtype != compute:
        dy = dy.to(compute)
    mean, rstd = stats.mean, stats.rstd

    # Per-(n, c) sums of dy and dy * (x - mean) * rstd in one fused pass: ATen's
    # batch-norm backward on the (1, N*C, S) view, every (n, c) as a channel. It
    # takes the statistics in the input's precision; the float64 correction
    # below removes what their rounding changed.
    if n * c * s > 0:
        mean_c, rstd_c = mean.to(compute), rstd.to(compute)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.view(1, n * c, s), xs.view(1, n * c, s), None, None, None,
            mean_c.reshape(-1), rstd_c.reshape(-1), True, 0.0, [False, True, True],
        )
        sum_dy = sum_dy.view(n, c).to(_STATS)
        sum_dy_xhat = (sum_dy_xhat.view(n, c).to(_STATS) / rstd_c.to(_STATS)
                       + (mean_c.to(_STATS) - mean) * sum_dy) * rstd
    else:
        sum_dy_xhat = sum_dy = mean.new_zeros(n, c)

    gamma = None if weight is None else weight.detach().to(_STATS)
    grad_weight = sum_dy_xhat.sum(0) if gamma is not None and needs_grad[3] else None
    grad_bias = sum_dy.sum(0) if needs_grad[4] else None
    if gamma is not None:
        sum_dy, sum_dy_xhat = sum_dy * gamma, sum_dy_xhat * gamma
    d_mean = -rstd * sum_dy                        # dL/d mu, per (n, c)
    d_var = -0.5 * rstd.square() * sum_dy_xhat     # dL/d sigma^2, per (n, c)

    mw, vw = stats.mean_weight, stats.var_weight
    branches = len(stats.means)
    grad_mean_logits = _logit_gradient(mw[:branches], d_mean, stats.means, mean)
    grad_var_logits = _logit_gradient(vw[:branches], d_var, stats.vars, stats.var)

    grad_input = None
    if needs_grad[0]:
        mean_in, mean_ln = stats.means[IN], stats.means[LN]
        ln_mean_grad = mw[LN] * d_mean.mean(1, keepdim=True)
        ln_var_grad = vw[LN] * stats.ln_var_factor * d_var.mean(1, keepdim=True)
        grad_mean_in = mw[IN] * d_mean + ln_mean_grad + 2 * ln_var_grad * (mean_in - mean_ln)
        grad_var_in = vw[IN] * d_var + ln_var_grad
        if branches == 3 and stats.batch_stats:
            count = _at_least_one(stats.count)
            bn_mean_grad = mw[BN] * _sum_over_batch(d_mean, group) / count
            bn_var_grad = vw[BN] * stats.bn_var_factor * _sum_over_batch(d_var, group) / count
            grad_mean_in = grad_mean_in + bn_mean_grad + 2 * bn_var_grad * (mean_in - stats.means[BN])
            grad_var_in = grad_var_in + bn_var_grad
        # dx = k * dy + a * (x - mean_in) + grad_mean_in / S
        k = rstd if gamma is None else rstd * gamma
        a = 2.0 * grad_var_in / stats.in_var_divisor
        offset = grad_mean_in / s
        pivot = stats.pivot
        if stats.large_offset:
            centred = xs - pivot.unsqueeze(-1)
            grad_input = _row_affine(centred, a, offset + a * (pivot.to(_STATS) - mean_in), out=centred)
        else:
            grad_input = _row_affine(xs, a, offset - a * mean_in)
        grad_input.addcmul_(dy, k.to(compute).unsqueeze(-1))
        grad_input = grad_input.to(x3.dtype)
    return grad_input, grad_mean_logits, grad_var_logits, grad_weight, grad_bias


class _SwitchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, mean_logits, var_logits, weight, bias, running_mean, running_var,
                batch_stats, momentum, eps, group, unbiased_instance_var, has_instance):
        out, stats = _forward(x3, mean_logits, var_logits, weight, bias, running_mean, running_var,
                              batch_stats, momentum, eps, group, unbiased_instance_var, has_instance)
        # Saved through save_for_backward (not as ctx attributes) so that
        # saved-tensor hooks (offloading, memory accounting) see everything.
        ctx.save_for_backward(x3, weight, *stats.tensors())
        ctx.scalars, ctx.group = stats.scalars(), group
        ctx.param_dtypes = [None if t is None else t.dtype for t in (mean_logits, var_logits, weight, bias)]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x3, weight, *tensors = ctx.saved_tensors
        stats = _Stats.rebuild(tensors, ctx.scalars)
        grad_input, *param_grads = _backward(grad_out, x3, weight, stats, ctx.group, ctx.needs_input_grad)
        param_grads = [g if g is None else g.to(dt) for g, dt in zip(param_grads, ctx.param_dtypes)]
        return (grad_input, *param_grads) + (None,) * 8


def switch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean_logits: Tensor,
    var_logits: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group=None,
    unbiased_instance_var: bool = False,
) -> Tensor:
    """Switchable Normalization of ``input`` of shape (N, C, *).

    Args:
        mean_logits, var_logits: the importance logits (before the softmax) of
            the [IN, LN, BN] statistics, or [IN, LN] for SN without BN. For an
            (N, C) input, which has no IN branch, the softmax runs over the
            others and the IN logit is ignored.
        running_mean, running_var: (C,) statistics of the BN branch. With
            ``training=True`` the BN branch uses the batch and these are updated
            in place (``running = (1 - momentum) * running + momentum * batch``;
            see the module docstring for the variance convention), if given.
            With ``training=False`` the BN branch uses them; ``None`` then means
            "use the batch", like ``F.batch_norm``.
        process_group: when given (and ``training``), BN statistics are taken
            over every process of the group.
        unbiased_instance_var: the authors' released-code convention (see the
            module docstring). Only for reproducing models trained that way; the
            paper's Eq. 2 is the default.

    Full-size passes run in the input's precision (float32 for float16 and
    bfloat16); the O(N*C) statistics are kept in float64. The output has the
    input's dtype. An empty batch returns an empty output through
    which gradients still flow, and leaves the running statistics untouched.
    """
    n, c = input.shape[0], input.shape[1]
    k = mean_logits.numel()
    if k not in (2, 3) or var_logits.numel() != k:
        raise ValueError(
            f"switch_norm: mean_logits and var_logits must both have 3 entries [IN, LN, BN] "
            f"or 2 [IN, LN]; got {mean_logits.numel()} and {var_logits.numel()}"
        )
    if torch.compiler.is_exporting() and (
            torch.onnx.is_in_onnx_export() or kernels.backend_for(input) == "reference"):
        return _traceable_switch_norm(input, running_mean, running_var, mean_logits, var_logits, weight, bias,
                                      training, momentum, eps, process_group, unbiased_instance_var)
    if kernels.backend_for(input) != "reference":
        return kernels.switch_norm(input, running_mean, running_var, mean_logits, var_logits, weight, bias,
                                   training, momentum, eps, process_group, unbiased_instance_var)
    batch_stats = training or running_mean is None
    if input.numel() == 0 and process_group is None:
        return _empty_output(input, mean_logits, var_logits, weight, bias)
    x3 = input.reshape(n, c, math.prod(input.shape[2:])).contiguous()
    # Statistics must not be computed in a lower precision chosen by autocast.
    with torch.autocast(input.device.type, enabled=False):
        args = (mean_logits, var_logits, weight, bias,
                running_mean if k == 3 else None, running_var if k == 3 else None,
                batch_stats, momentum, eps, process_group, unbiased_instance_var, input.dim() > 2)
        if torch.is_grad_enabled() and (input.requires_grad or any(
                t is not None and t.requires_grad for t in (mean_logits, var_logits, weight, bias))):
            out = _SwitchNormFunction.apply(x3, *args)
        else:
            out, _ = _forward(x3, *args)
    return kernels.restore_layout(out.view(input.shape), input)


def _traceable_switch_norm(input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                           mean_logits: Tensor, var_logits: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                           training: bool, momentum: float, eps: float, process_group,
                           unbiased_instance_var: bool) -> Tensor:
    """SN in plain tensor operations with no branch on data: what ``torch.export`` records when
    the fused operators are not used, and what ONNX export records (ONNX has no SN operator).

    The same maths as :func:`_forward`, in the input's floating precision (float32 for
    float16/bfloat16), with no custom autograd Function and no in-place output buffer.
    """
    if process_group is not None:
        raise RuntimeError(
            "switch_norm: a synchronized SN layer cannot be exported while it trains (its statistics "
            "need the other processes); export the model in eval mode, or after sn_plugin.revert_sync_sn.")
    n, c = input.shape[0], input.shape[1]
    has_instance = input.dim() > 2
    x = input if input.dtype in (torch.float32, torch.float64) else input.float()
    x3 = x.reshape(n, c, -1)
    s = x3.shape[-1]
    if has_instance:
        var_in, mean_in = torch.var_mean(x3, dim=-1, correction=1 if unbiased_instance_var and s > 1 else 0)
    else:
        mean_in, var_in = x3[..., 0], torch.zeros_like(x3[..., 0])
    sample_variances = unbiased_instance_var and not has_instance
    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = (var_in + (mean_in - mean_ln).square()).mean(1, keepdim=True)
    if sample_variances:
        var_ln = var_ln * _sample_correction(float(c))
    means, variances = [mean_in, mean_ln], [var_in, var_ln]
    if mean_logits.numel() == 3:
        if training or running_mean is None:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = (var_in + (mean_in - mean_bn).square()).mean(0, keepdim=True)
            if sample_variances:
                var_bn = var_bn * _sample_correction(float(n))
            if training and running_mean is not None:
                _update_running_stats(running_mean, running_var, mean_bn.detach(), var_bn.detach(), float(n * s),
                                      momentum, unbiased_instance_var)
        else:
            mean_bn, var_bn = running_mean.view(1, c).to(x.dtype), running_var.view(1, c).to(x.dtype)
        means.append(mean_bn)
        variances.append(var_bn)

    def mixed(logits: Tensor, statistics: List[Tensor]) -> Tensor:
        weights = logits.to(x.dtype).softmax(0) if has_instance else torch.cat(
            [logits.new_zeros(1, dtype=x.dtype), logits[1:].to(x.dtype).softmax(0)])
        return sum(weights[k] * statistics[k] for k in range(len(statistics)))

    scale = (mixed(var_logits, variances) + eps).rsqrt()
    if weight is not None:
        scale = scale * weight.to(x.dtype)
    shift = -mixed(mean_logits, means) * scale
    if bias is not None:
        shift = shift + bias.to(x.dtype)
    out = x3 * scale.unsqueeze(-1) + shift.unsqueeze(-1)
    return out.reshape(input.shape).to(input.dtype)


@torch.no_grad()
def batch_statistics(input: Tensor, unbiased_instance_var: bool = False) -> Tuple[Tensor, Tensor]:
    """Per-channel (mean, variance) of the BN branch on one batch, as SN's training forward uses them.

    Float64, shape (C,). The paper's convention gives the population variance of
    the batch; the authors' (``unbiased_instance_var``) the variance derived from
    the unbiased IN variances (for (N, C) inputs the unbiased variance over N).
    :func:`sn_plugin.recompute_batch_stats` averages these over batches.
    """
    n, c = input.shape[0], input.shape[1]
    dims = [0] + list(range(2, input.dim()))
    x = input.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if not unbiased_instance_var:
        var, mean = torch.var_mean(x, dim=dims, correction=0)
        return mean.to(_STATS), var.to(_STATS)
    s = math.prod(input.shape[2:])
    var_in, mean_in = torch.var_mean(x.reshape(n, c, s), dim=-1, correction=1 if s > 1 else 0)
    mean_in, var_in = mean_in.to(_STATS), var_in.to(_STATS)
    mean_bn = mean_in.mean(0)
    var_bn = (var_in + (mean_in - mean_bn).square()).mean(0)
    if input.dim() == 2:
        var_bn = var_bn * _sample_correction(float(n))
    return mean_bn, var_bn


def _empty_output(input, mean_logits, var_logits, weight, bias) -> Tensor:
    """An empty output that stays connected to every parameter (zero gradients)."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    out = input * 0.0 + (mean_logits.sum() + var_logits.sum()) * 0.0
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out.to(input.dtype)
