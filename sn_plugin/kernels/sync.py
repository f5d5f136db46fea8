"""Synchronized SN on the fused kernels: the BN branch over every process of a group.

Forward: ``moments`` -> one ``all_gather`` of each process's (count, mean, M2) per channel,
combined with Chan's parallel formula (exact for any split, empty shards included; no
E[x^2] - E[x]^2 cancellation) -> ``normalize``. Backward: ``backward_reduce`` -> one
``all_reduce`` of the per-channel sums of dL/dmean_bn, dL/dvar_bn -> ``backward_dx``.
Every step stays on the device: the sample count is a tensor, never read on the host.
"""
import torch
import torch.distributed as dist
from torch import Tensor

from .ops import flat_sizes, ops


def local_moments(mean_in: Tensor, var_in: Tensor) -> Tensor:
    """This process's [count, mean (C), M2 (C)] of the BN branch, from its (N, C) IN statistics (N may be 0)."""
    n = mean_in.shape[0]
    local_mean = mean_in.sum(0) / max(n, 1)
    local_m2 = (var_in + (mean_in - local_mean).square()).sum(0)
    return torch.cat([mean_in.new_full((1,), n), local_mean, local_m2])


def combine_moments(gathered: Tensor):
    """Chan's parallel formula over the rows [count, mean, M2] of every process: (mean_bn (C,),
    population var_bn (C,), sample count M (0-d)); processes with no samples count for nothing."""
    c = (gathered.shape[1] - 1) // 2
    counts, means, m2s = gathered[:, :1], gathered[:, 1:1 + c], gathered[:, 1 + c:]
    total = counts.sum(0)
    mean = (counts * means).sum(0) / total.clamp_min(1)
    m2 = m2s.sum(0) + (counts * (means - mean).square()).sum(0)
    return mean, m2 / total.clamp_min(1), total.reshape(())


def gather_batch_moments(mean_in: Tensor, var_in: Tensor, group):
    """The BN statistics of the batch of every process of ``group`` (see :func:`combine_moments`)."""
    packed = local_moments(mean_in, var_in)
    gathered = packed.new_empty(dist.get_world_size(group), packed.numel())
    dist.all_gather(list(gathered.unbind(0)), packed, group=group)
    return combine_moments(gathered)


class _SyncSwitchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mean_logits, var_logits, weight, bias, running_mean, running_var, momentum, group,
                eps, unbiased, has_in):
        mean_in, var_in = ops.moments(x, unbiased)
        batch_mean, batch_var, count = gather_batch_moments(mean_in, var_in, group)
        y, ln_stats, bn_stats = ops.normalize(x, mean_in, var_in, batch_mean, batch_var, count, mean_logits,
                                              var_logits, weight, bias, None, None, True, eps, unbiased, has_in)
        if running_mean is not None:
            n, _, s = flat_sizes(x)
            ops.update_running_stats(running_mean, running_var, bn_stats, count, n, s, momentum, unbiased)
        ctx.save_for_backward(x, mean_in, ln_stats, bn_stats, count, mean_logits, var_logits, weight)
        ctx.group, ctx.flags = group, (True, eps, unbiased, has_in)
        ctx.param_dtypes = [None if t is None else t.dtype for t in (weight, bias)]
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, mean_in, ln_stats, bn_stats, count, mean_logits, var_logits, weight = ctx.saved_tensors
        grad_y = grad_y.to(x.dtype).contiguous()
        row_grads, ln_grad, bn_grad, grad_mean_logits, grad_var_logits, grad_weight, grad_bias = (
            ops.backward_reduce(grad_y, x, mean_in, ln_stats, bn_stats, count, mean_logits, var_logits, weight,
                                *ctx.flags))
        dist.all_reduce(bn_grad, group=ctx.group)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = ops.backward_dx(grad_y, x, mean_in, row_grads, ln_grad, bn_grad, ln_stats, bn_stats, count,
                                     mean_logits, var_logits, weight, *ctx.flags)
        weight_dtype, bias_dtype = ctx.param_dtypes
        grad_weight = grad_weight.to(weight_dtype) if ctx.needs_input_grad[3] else None
        grad_bias = grad_bias.to(bias_dtype) if ctx.needs_input_grad[4] else None
        return (grad_x, grad_mean_logits, grad_var_logits, grad_weight, grad_bias) + (None,) * 7


def sync_switch_norm(x: Tensor, mean_logits: Tensor, var_logits: Tensor, weight, bias, running_mean, running_var,
                     momentum: float, group, eps: float, unbiased: bool, has_in: bool) -> Tensor:
    """SN of the contiguous (N, C, *) ``x``, BN statistics over ``group``; updates the running statistics if given."""
    with torch.autocast(x.device.type, enabled=False):  # the gathered statistics stay in float64
        return _SyncSwitchNorm.apply(x, mean_logits, var_logits, weight, bias, running_mean, running_var, momentum,
                                     group, eps, unbiased, has_in)

