"""Switchable Normalization as a function: the maths every SN module shares.

Notation follows the paper (Luo et al., ICLR 2019). For an input viewed as
(N, C, S), S the product of the spatial sizes:

* IN statistics are per (n, c) over S (population variance),
* LN statistics are derived from them per n (Eq. 4),
* BN statistics are derived from them per c, over the batch (and over every
  process of ``process_group`` when one is given: synchronized SN).

The mixed statistics ``mu = sum_k w_k mu_k``, ``var = sum_k w'_k var_k`` give one
scale and one shift per (n, c), so the output is a single fused affine. The
backward pass is the analytic one of the paper's Appendix H, written so that it
needs the input plus O(N*C) statistics, as BatchNorm does, instead of the many
full-size intermediates plain autograd would keep.

The derived LN/BN variances are computed as ``mean(var_in + (mu_in - mu)^2)``
rather than ``mean(var_in + mu_in^2) - mu^2``: the same value, without the
cancellation that the second form suffers for large means in float32.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

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
    if xs.numel() == 0:  # an empty shard of a synchronized batch
        empty = xs.new_zeros(n, c)
        return xs.clone(), empty, empty + 1, empty.to(_STATS), empty.to(_STATS), False
    x_hat, pivot, rstd_in = torch.native_group_norm(xs, None, None, n, c, s, c, _STAT_EPS)
    std_in = rstd_in.to(_STATS).reciprocal()
    large_offset = xs.dtype != torch.float64 and bool((pivot.abs() * rstd_in > _LARGE_OFFSET_RATIO).any())
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
    channel with mean 0 and variance 1 (so it computes exactly x * w + b): on CPU
    about 3x faster than a broadcasting ``addcmul``. ``out`` may be ``t`` itself.
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


def _batch_moments(mean_in: Tensor, var_in: Tensor, group) -> Tuple[Tensor, Tensor, float]:
    """BN mean and population variance per channel from the IN moments (Eq. 4).

    Returns (mean_bn, var_bn, number of samples) with mean/var of shape (1, C).
    Under a process group the per-rank sums are all-reduced, so every rank gets
    the statistics of the whole (possibly unevenly split) batch.
    """
    n = mean_in.shape[0]
    if group is None:
        count = float(n)
        mean_bn = mean_in.mean(0, keepdim=True)
    else:
        packed = torch.cat([mean_in.sum(0), mean_in.new_tensor([n])])
        dist.all_reduce(packed, group=group)
        count = float(packed[-1].item())
        if count == 0:
            raise ValueError("SyncSwitchNorm: every process has an empty batch; the BN branch has no data")
        mean_bn = (packed[:-1] / count).unsqueeze(0)
    var_bn = _sum_over_batch(var_in + (mean_in - mean_bn).square(), group) / count
    return mean_bn, var_bn, count


class _Stats:
    """Everything the backward pass needs besides the input, all O(N*C)."""

    __slots__ = ("means", "vars", "pivot", "mean", "rstd", "mean_weight", "var_weight",
                 "count", "batch_stats", "large_offset", "in_var_divisor")
    _SCALARS = ("count", "batch_stats", "large_offset", "in_var_divisor")

    def tensors(self) -> List[Tensor]:
        return [self.pivot, self.mean, self.rstd, self.mean_weight, self.var_weight, *self.means, *self.vars]

    def scalars(self) -> tuple:
        return tuple(getattr(self, name) for name in self._SCALARS)

    @classmethod
    def rebuild(cls, tensors, scalars) -> "_Stats":
        stats = cls()
        stats.pivot, stats.mean, stats.rstd, stats.mean_weight, stats.var_weight = tensors[:5]
        branches = (len(tensors) - 5) // 2
        stats.means, stats.vars = list(tensors[5:5 + branches]), list(tensors[5 + branches:])
        for name, value in zip(cls._SCALARS, scalars):
            setattr(stats, name, value)
        return stats


def _forward(
    x3: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    batch_stats: bool,
    momentum: float,
    eps: float,
    group,
    unbiased_instance_var: bool = False,
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

    mean_ln = mean_in.mean(1, keepdim=True)
    var_ln = (var_in + (mean_in - mean_ln).square()).mean(1, keepdim=True)
    means: List[Tensor] = [mean_in, mean_ln]
    variances: List[Tensor] = [var_in, var_ln]
    count = float(n)
    if mean_weight.numel() == 3:
        if batch_stats:
            mean_bn, var_bn, count = _batch_moments(mean_in, var_in, group)
            if running_mean is not None and count * s > 1:
                unbiased = var_bn * (count * s / (count * s - 1))
                running_mean.lerp_(mean_bn.view(-1).to(running_mean.dtype), momentum)
                running_var.lerp_(unbiased.view(-1).to(running_var.dtype), momentum)
        else:
            mean_bn = running_mean.view(1, c).to(_STATS)
            var_bn = running_var.view(1, c).to(_STATS)
        means.append(mean_bn)
        variances.append(var_bn)

    mw = mean_weight.detach().to(_STATS)
    vw = var_weight.detach().to(_STATS)
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
    stats.means, stats.vars, stats.pivot, stats.mean, stats.rstd = means, variances, pivot, mean, rstd
    stats.mean_weight, stats.var_weight = mw, vw
    stats.count, stats.batch_stats, stats.large_offset = count, batch_stats, large_offset
    stats.in_var_divisor = in_var_divisor
    return out.to(x3.dtype), stats


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

    grad_mean_weight = torch.stack([(d_mean * m).sum() for m in stats.means])
    grad_var_weight = torch.stack([(d_var * v).sum() for v in stats.vars])

    grad_input = None
    if needs_grad[0]:
        mw, vw = stats.mean_weight, stats.var_weight
        mean_in, mean_ln = stats.means[IN], stats.means[LN]
        ln_mean_grad = mw[LN] * d_mean.mean(1, keepdim=True)
        ln_var_grad = vw[LN] * d_var.mean(1, keepdim=True)
        grad_mean_in = mw[IN] * d_mean + ln_mean_grad + 2 * ln_var_grad * (mean_in - mean_ln)
        grad_var_in = vw[IN] * d_var + ln_var_grad
        if len(stats.means) == 3 and stats.batch_stats:
            bn_mean_grad = mw[BN] * _sum_over_batch(d_mean, group) / stats.count
            bn_var_grad = vw[BN] * _sum_over_batch(d_var, group) / stats.count
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
    return grad_input, grad_mean_weight, grad_var_weight, grad_weight, grad_bias


class _SwitchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x3, mean_weight, var_weight, weight, bias, running_mean, running_var,
                batch_stats, momentum, eps, group, unbiased_instance_var):
        out, stats = _forward(x3, mean_weight, var_weight, weight, bias, running_mean, running_var,
                              batch_stats, momentum, eps, group, unbiased_instance_var)
        # Saved through save_for_backward (not as ctx attributes) so that
        # saved-tensor hooks (offloading, memory accounting) see everything.
        ctx.save_for_backward(x3, weight, *stats.tensors())
        ctx.scalars, ctx.group = stats.scalars(), group
        ctx.param_dtypes = [None if t is None else t.dtype for t in (mean_weight, var_weight, weight, bias)]
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x3, weight, *tensors = ctx.saved_tensors
        stats = _Stats.rebuild(tensors, ctx.scalars)
        grad_input, *param_grads = _backward(grad_out, x3, weight, stats, ctx.group, ctx.needs_input_grad)
        param_grads = [g if g is None else g.to(dt) for g, dt in zip(param_grads, ctx.param_dtypes)]
        return (grad_input, *param_grads) + (None,) * 7


def switch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    mean_weight: Tensor,
    var_weight: Tensor,
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
        mean_weight, var_weight: importance weights (already softmaxed, summing to
            1) of the [IN, LN, BN] statistics, or [IN, LN] for SN without BN.
        running_mean, running_var: (C,) statistics of the BN branch. With
            ``training=True`` the BN branch uses the batch and these are updated
            in place (``running = (1 - momentum) * running + momentum * batch``,
            unbiased batch variance), if given. With ``training=False`` the BN
            branch uses them; ``None`` then means "use the batch", like
            ``F.batch_norm``.
        process_group: when given (and ``training``), BN statistics are taken
            over every process of the group.
        unbiased_instance_var: divide the IN variance by S - 1 instead of S (the
            convention of the authors' released implementation; the LN and BN
            variances derived from it inherit it). Only for reproducing models
            trained that way; the paper's Eq. 2 is the default.

    Full-size passes run in the input's precision (float32 for float16 and
    bfloat16); the O(N*C) statistics are kept in float64. The output has the
    input's dtype. An empty batch returns an empty output through
    which gradients still flow, and leaves the running statistics untouched.
    """
    n, c = input.shape[0], input.shape[1]
    k = mean_weight.numel()
    if k not in (2, 3) or var_weight.numel() != k:
        raise ValueError(
            f"switch_norm: mean_weight and var_weight must both have 3 entries [IN, LN, BN] "
            f"or 2 [IN, LN]; got {mean_weight.numel()} and {var_weight.numel()}"
        )
    batch_stats = training or running_mean is None
    if input.numel() == 0 and process_group is None:
        return _empty_output(input, mean_weight, var_weight, weight, bias)
    x3 = input.reshape(n, c, math.prod(input.shape[2:])).contiguous()
    # Statistics must not be computed in a lower precision chosen by autocast.
    with torch.autocast(input.device.type, enabled=False):
        args = (mean_weight, var_weight, weight, bias,
                running_mean if k == 3 else None, running_var if k == 3 else None,
                batch_stats, momentum, eps, process_group, unbiased_instance_var)
        if torch.is_grad_enabled() and (input.requires_grad or any(
                t is not None and t.requires_grad for t in (mean_weight, var_weight, weight, bias))):
            out = _SwitchNormFunction.apply(x3, *args)
        else:
            out, _ = _forward(x3, *args)
    return out.view(input.shape) if input.is_contiguous() else _like(out.view(input.shape), input)


def _like(out: Tensor, input: Tensor) -> Tensor:
    """Return ``out`` in the memory format of ``input`` (e.g. channels_last)."""
    for fmt in (torch.channels_last, torch.channels_last_3d):
        try:
            if input.is_contiguous(memory_format=fmt):
                return out.contiguous(memory_format=fmt)
        except RuntimeError:  # format does not apply to this rank
            continue
    return out


def _empty_output(input, mean_weight, var_weight, weight, bias) -> Tensor:
    """An empty output that stays connected to every parameter (zero gradients)."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    out = input * 0.0 + (mean_weight.sum() + var_weight.sum()) * 0.0
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out.to(input.dtype)
