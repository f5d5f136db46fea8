"""The ``sn_plugin::`` operators: schemas, fake (meta) implementations, autograd.

Each op works on a contiguous (N, C, *) input (S the product of its spatial sizes, 1 for an
(N, C) input; the layer passes its input as it is, so that no view adds an autograd node) and
keeps every O(N*C) statistic in float64:

* ``mean_in`` (N, C): the IN means, the only statistic saved for backward besides x
  (the IN variances are recomputed in the backward's first pass, which reads x anyway).
  With one value per (n, c) (S = 1: (N, C) inputs) the means are x itself: ``forward``
  returns an (N, 0) tensor in their place and ``backward`` reads x;
* ``ln_stats`` (2, N) = [mean_ln; var_ln] and ``bn_stats`` (2, C) = [mean_bn; var_bn], the
  BN statistics the layer used (batch or running; zeros without a BN branch);
* ``batch_count``: the number of samples M of the BN branch, a 0-d float64 tensor, given
  only for synchronized SN, where it comes from the other processes; otherwise M = N.

``forward``/``backward`` are the fused ops of one process. Synchronized SN needs the BN
statistics of every process between the moments pass and the normalization, and the BN
gradient sums between the backward's reduction and its dx pass, so its path is the split
``moments`` -> (all_gather) -> ``normalize`` and ``backward_reduce`` -> (all_reduce) ->
``backward_dx`` (:mod:`sn_plugin.kernels.sync`). The running statistics are updated by a
separate in-place op, so that ``forward`` stays functional (autograd and torch.compile
need that).

Implementations: CPU in C++ (``sn_plugin/kernels/csrc``, registered when ``_C`` is
imported), CUDA in Triton (:mod:`sn_plugin.kernels.triton_sn`, imported on first use).
"""
import importlib
import math
from typing import Optional

import torch
from torch import Tensor

NAMESPACE = "sn_plugin"

# One line per op; the C++ signatures in csrc/ops.cpp follow these.
_LAYER = "Tensor mean_logits, Tensor var_logits, Tensor? weight"
_FLAGS = "bool batch_stats, float eps, bool unbiased, bool has_in"
SCHEMAS = {
    "moments": "(Tensor x, bool unbiased) -> (Tensor mean_in, Tensor var_in)",
    "normalize": (
        "(Tensor x, Tensor mean_in, Tensor var_in, Tensor? batch_mean, Tensor? batch_var, "
        f"Tensor? batch_count, {_LAYER}, Tensor? bias, Tensor? running_mean, Tensor? running_var, "
        f"{_FLAGS}) -> (Tensor y, Tensor ln_stats, Tensor bn_stats)"
    ),
    "forward": (
        f"(Tensor x, {_LAYER}, Tensor? bias, Tensor? running_mean, Tensor? running_var, {_FLAGS}) "
        "-> (Tensor y, Tensor mean_in, Tensor ln_stats, Tensor bn_stats)"
    ),
    "update_running_stats": (
        "(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor bn_stats, Tensor? batch_count, "
        "int num_samples, int spatial_size, float momentum, bool unbiased) -> ()"
    ),
    "backward_reduce": (
        "(Tensor grad_out, Tensor x, Tensor mean_in, Tensor ln_stats, Tensor bn_stats, "
        f"Tensor? batch_count, {_LAYER}, {_FLAGS}) -> (Tensor row_grads, Tensor ln_grad, "
        "Tensor bn_grad, Tensor grad_mean_logits, Tensor grad_var_logits, Tensor grad_weight, "
        "Tensor grad_bias)"
    ),
    "backward_dx": (
        "(Tensor grad_out, Tensor x, Tensor mean_in, Tensor row_grads, Tensor ln_grad, "
        "Tensor bn_grad, Tensor ln_stats, Tensor bn_stats, Tensor? batch_count, "
        f"{_LAYER}, {_FLAGS}) -> Tensor"
    ),
    "backward": (
        f"(Tensor grad_out, Tensor x, Tensor mean_in, Tensor ln_stats, Tensor bn_stats, {_LAYER}, "
        f"{_FLAGS}, bool input_grad) -> (Tensor grad_input, Tensor grad_mean_logits, "
        "Tensor grad_var_logits, Tensor grad_weight, Tensor grad_bias)"
    ),
}
STATS_DTYPE = torch.float64

_library = torch.library.Library(NAMESPACE, "DEF")
for _name, _schema in SCHEMAS.items():
    _library.define(_name + _schema)
ops = getattr(torch.ops, NAMESPACE)


# ----------------------------------------------------------------- fake implementations


def _stats(x: Tensor, *sizes: int) -> Tensor:
    return x.new_empty(sizes, dtype=STATS_DTYPE)


def flat_sizes(x: Tensor):
    """(N, C, S) of an (N, C, *) input."""
    return x.shape[0], x.shape[1], math.prod(x.shape[2:])


@torch.library.register_fake(f"{NAMESPACE}::moments")
def _moments_fake(x, unbiased):
    n, c, _ = flat_sizes(x)
    return _stats(x, n, c), _stats(x, n, c)


@torch.library.register_fake(f"{NAMESPACE}::normalize")
def _normalize_fake(x, mean_in, var_in, batch_mean, batch_var, batch_count, mean_logits, var_logits,
                    weight, bias, running_mean, running_var, batch_stats, eps, unbiased, has_in):
    n, c, _ = flat_sizes(x)
    return torch.empty_like(x), _stats(x, 2, n), _stats(x, 2, c)


@torch.library.register_fake(f"{NAMESPACE}::forward")
def _forward_fake(x, mean_logits, var_logits, weight, bias, running_mean, running_var, batch_stats, eps,
                  unbiased, has_in):
    n, c, s = flat_sizes(x)
    return torch.empty_like(x), _stats(x, n, 0 if s == 1 else c), _stats(x, 2, n), _stats(x, 2, c)


@torch.library.register_fake(f"{NAMESPACE}::update_running_stats")
def _update_running_stats_fake(running_mean, running_var, bn_stats, batch_count, num_samples, spatial_size,
                               momentum, unbiased):
    return None


def _param_grads_fake(x, mean_logits):
    c = x.shape[1]
    return (torch.empty_like(mean_logits), torch.empty_like(mean_logits),
            mean_logits.new_empty(c), mean_logits.new_empty(c))


@torch.library.register_fake(f"{NAMESPACE}::backward_reduce")
def _backward_reduce_fake(grad_out, x, mean_in, ln_stats, bn_stats, batch_count, mean_logits, var_logits,
                          weight, batch_stats, eps, unbiased, has_in):
    n, c, _ = flat_sizes(x)
    return (_stats(x, 3, n, c), _stats(x, 2, n), _stats(x, 2, c)) + _param_grads_fake(x, mean_logits)


@torch.library.register_fake(f"{NAMESPACE}::backward_dx")
def _backward_dx_fake(grad_out, x, mean_in, row_grads, ln_grad, bn_grad, ln_stats, bn_stats, batch_count,
                      mean_logits, var_logits, weight, batch_stats, eps, unbiased, has_in):
    return torch.empty_like(x)


@torch.library.register_fake(f"{NAMESPACE}::backward")
def _backward_fake(grad_out, x, mean_in, ln_stats, bn_stats, mean_logits, var_logits, weight, batch_stats,
                   eps, unbiased, has_in, input_grad):
    grad_input = torch.empty_like(x) if input_grad else x.new_empty(0)
    return (grad_input,) + _param_grads_fake(x, mean_logits)


# ----------------------------------------------------------------- implementations


def _load_cpu_kernels() -> Optional[str]:
    """Imports the C++ extension (which registers the CPU kernels); returns why not, or None."""
    try:
        importlib.import_module("sn_plugin.kernels._C")
    except ImportError as error:
        return str(error)
    return None


CPU_KERNELS_MISSING = _load_cpu_kernels()


def _triton_implementation(name):
    def run(*args):
        from . import triton_sn  # imports triton: only when a CUDA tensor reaches an op

        return getattr(triton_sn, name)(*args)

    run.__name__ = f"{name}_triton"
    return run


for _name in SCHEMAS:
    _library.impl(_name, _triton_implementation(_name), "CUDA")


# ----------------------------------------------------------------- autograd of the fused op
# The C++ extension registers it (csrc/ops.cpp); this Python one stands in without it. It
# costs more per call: torch.library's autograd wrapper spends ~100 us on argument handling.


def _setup_context(ctx, inputs, output):
    x, mean_logits, var_logits, weight, bias, _rm, _rv, batch_stats, eps, unbiased, has_in = inputs
    _y, mean_in, ln_stats, bn_stats = output
    ctx.mark_non_differentiable(mean_in, ln_stats, bn_stats)
    # x and O(N*C) statistics only: as little as BatchNorm keeps.
    ctx.save_for_backward(x, mean_in, ln_stats, bn_stats, mean_logits, var_logits, weight)
    ctx.flags = (batch_stats, eps, unbiased, has_in)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _forward_backward(ctx, grad_y, _grad_mean_in, _grad_ln, _grad_bn):
    x, mean_in, ln_stats, bn_stats, mean_logits, var_logits, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    grad_y = grad_y.contiguous() if grad_y.dtype == x.dtype else grad_y.to(x.dtype).contiguous()
    grad_x, grad_mean_logits, grad_var_logits, grad_weight, grad_bias = ops.backward(
        grad_y, x, mean_in, ln_stats, bn_stats, mean_logits, var_logits, weight, *ctx.flags, needs[0])
    return (grad_x if needs[0] else None, grad_mean_logits, grad_var_logits,
            grad_weight.to(weight.dtype) if needs[3] else None,
            grad_bias.to(ctx.bias_dtype) if needs[4] else None,
            None, None, None, None, None, None)


if CPU_KERNELS_MISSING is not None:
    torch.library.register_autograd(f"{NAMESPACE}::forward", _forward_backward, setup_context=_setup_context)
