"""Fused SN kernels, and the choice between them and the pure-PyTorch reference path.

Backends:

* ``cpp``: the C++ CPU extension ``sn_plugin.kernels._C`` (built by ``pip install -e .
  --no-build-isolation`` or ``python setup.py build_ext --inplace``);
* ``triton``: Triton kernels for CUDA tensors (:mod:`sn_plugin.kernels.triton_sn`);
* ``reference``: :mod:`sn_plugin.functional`'s implementation in PyTorch operations.

``auto`` (the default) takes ``cpp`` for CPU tensors and ``triton`` for CUDA tensors and
otherwise the reference. Where the chosen kernels are unavailable (extension not built,
Triton not installed, another device or dtype) the reference path runs, with one warning
per reason that says how to get the kernels. For debugging, the environment variable
``SN_PLUGIN_BACKEND=auto|reference|cpp|triton`` (read at import) or :func:`set_backend`
forces a choice.

:func:`switch_norm` is the fused path of :func:`sn_plugin.functional.switch_norm`, which
dispatches to it; the operators themselves are in :mod:`sn_plugin.kernels.ops`.
"""
import importlib.util
import os
import warnings
from typing import Optional

import torch
from torch import Tensor

from .ops import CPU_KERNELS_MISSING, flat_sizes, ops

BACKEND_VARIABLE = "SN_PLUGIN_BACKEND"
BACKENDS = ("auto", "reference", "cpp", "triton")
# dtypes both kernels take; the full-size passes of float16/bfloat16 run in float32
KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

HOW_TO_BUILD = (
    "build the C++ kernels with `pip install -e . --no-build-isolation` (or `python setup.py "
    "build_ext --inplace`) in the sn_plugin checkout, with torch and a C++17 compiler present"
)


def _checked(name: str, source: str) -> str:
    value = name.strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{source}={name!r}: the SN backend must be one of {', '.join(BACKENDS)}")
    return value


_requested = _checked(os.environ.get(BACKEND_VARIABLE, "auto"), BACKEND_VARIABLE)
_warned = set()
_triton_found: Optional[bool] = None


def set_backend(name: str) -> str:
    """Force the backend (``auto``, ``reference``, ``cpp``, ``triton``); returns the previous one."""
    global _requested
    previous, _requested = _requested, _checked(name, "set_backend")
    return previous


def requested_backend() -> str:
    return _requested


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"sn_plugin: {reason}", RuntimeWarning, stacklevel=4)


def _triton_installed() -> bool:
    global _triton_found
    if _triton_found is None:
        _triton_found = importlib.util.find_spec("triton") is not None
    return _triton_found


def backend_for(input: Tensor) -> str:
    """The path :func:`sn_plugin.functional.switch_norm` takes for ``input``: ``cpp``, ``triton`` or ``reference``."""
    requested, device = _requested, input.device.type
    if requested == "reference":
        return "reference"
    if input.dtype not in KERNEL_DTYPES:
        _warn_once(f"no fused SN kernel for {input.dtype} inputs; using the reference path")
        return "reference"
    if device == "cpu" and requested in ("auto", "cpp"):
        if CPU_KERNELS_MISSING is None:
            return "cpp"
        _warn_once(f"the C++ SN kernels are not built ({CPU_KERNELS_MISSING}), so SN runs on the slower "
                   f"reference path; {HOW_TO_BUILD}")
        return "reference"
    if device == "cuda" and requested in ("auto", "triton"):
        if _triton_installed():
            return "triton"
        _warn_once("Triton is not installed, so SN runs on the slower reference path on CUDA; "
                   "install the triton package that matches your torch")
        return "reference"
    if requested != "auto":
        _warn_once(f"{BACKEND_VARIABLE}={requested} has no kernels for {device} tensors; using the reference path")
    elif device != "meta":
        _warn_once(f"no fused SN kernels for {device} tensors; using the reference path")
    return "reference"


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
    """:func:`sn_plugin.functional.switch_norm` on the fused kernels: same arguments, same result.

    The caller checks the arguments (the functional does, before dispatching here). No
    host synchronisation: under a process group the BN statistics are gathered and the
    gradients reduced on the device.
    """
    n, _, s = flat_sizes(input)
    x = input.contiguous()  # the ops take (N, C, *): no view, no autograd node of its own
    has_bn = mean_logits.numel() == 3
    batch_stats = training or running_mean is None
    if not has_bn:
        running_mean = running_var = None
    update = training and running_mean is not None
    args = (mean_logits, var_logits, weight, bias)
    flags = (eps, unbiased_instance_var, input.dim() > 2)
    if process_group is not None and has_bn and batch_stats:
        from .sync import sync_switch_norm

        y = sync_switch_norm(x, *args, running_mean if update else None, running_var if update else None,
                             momentum, process_group, *flags)
    else:
        from_running = not batch_stats
        y, _, _, bn_stats = ops.forward(x, *args, running_mean if from_running else None,
                                        running_var if from_running else None, batch_stats, *flags)
        if update:
            ops.update_running_stats(running_mean, running_var, bn_stats, None, n, s, momentum,
                                     unbiased_instance_var)
    return restore_layout(y, input)


def restore_layout(out: Tensor, input: Tensor) -> Tensor:
    """``out`` (contiguous, ``input``'s shape) in the memory format of ``input`` (e.g. channels_last)."""
    if input.is_contiguous():
        return out
    for fmt in (torch.channels_last, torch.channels_last_3d):
        try:
            if input.is_contiguous(memory_format=fmt):
                return out.contiguous(memory_format=fmt)
        except RuntimeError:  # format does not apply to this rank
            continue
    return out
