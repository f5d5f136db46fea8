"""Batch-average statistics: the paper's inference method (Sec. 2.1, "Inference").

Moving averages of the BN-branch statistics lag behind the weights while they
change, and with SN the BN branch's input also depends on the learned
importance weights of the layers before it. The paper therefore estimates the
BN-branch statistics after training: with the weights frozen, the network runs
in training mode over a number of batches and each layer's running mean and
variance become the average over those batches. The same procedure is known as
"precise BN" for BatchNorm layers, which this module also handles.

The result is exact: each layer's running mean and variance equal the mean and
the population variance of every value it normalized during the pass, as if all
batches had been concatenated (for batches of equal size: the mean of the batch
means and the mean of the batch E[x^2] minus the squared mean). SN layers in the
authors' convention (``unbiased_instance_var=True``) average their own batch
variance instead (derived from the unbiased IN variances), as the authors'
batch average does. Under
``torch.distributed`` the sums are all-reduced, so every process ends with the
statistics of the union of all processes' batches.
"""
import itertools
import logging
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .functional import batch_statistics
from .switchable_norm import SwitchNormBase

__all__ = ["LayerStatsReport", "recompute_batch_stats"]

_LOGGER = logging.getLogger(__name__)


@dataclass
class LayerStatsReport:
    """What :func:`recompute_batch_stats` did to one layer.

    Attributes:
        batches: batches in which the layer ran (summed over processes).
        samples: samples (dim 0 of its input) it normalized, summed over its
            calls and over processes; a layer shared by several calls per batch
            (e.g. a head shared across feature levels) counts every call.
        updated: whether its running statistics were replaced.
        note: why not, when ``updated`` is False.
    """

    batches: int
    samples: int
    updated: bool
    note: str = ""


class _Accumulator:
    """Per-channel float64 sums of one layer's inputs, collected by a forward pre-hook."""

    def __init__(self, layer: _NormBase) -> None:
        channels = layer.num_features
        factory = {"dtype": torch.float64, "device": layer.running_mean.device}
        self.sum = torch.zeros(channels, **factory)
        self.sum_sq = torch.zeros(channels, **factory)
        self.values = 0  # values per channel, i.e. the weight of the statistics
        self.samples = 0
        self.batches = 0
        self.current_batch = -1  # the batch index counted last, to count shared layers once
        self.batch_index = 0

    def __call__(self, layer: nn.Module, args, kwargs) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, Tensor) or x.numel() == 0:
            return
        values = x.numel() // x.shape[1]
        # Each layer's own convention for the batch variance (the authors' unbiased one for SN
        # layers reproducing their checkpoints); a stable reduction in the input's precision,
        # only the per-channel results widened, so memory stays at one input size.
        mean, var = batch_statistics(x, getattr(layer, "unbiased_instance_var", False))
        self.sum.add_(mean, alpha=values)
        self.sum_sq.add_(var + mean.square(), alpha=values)
        self.values += values
        self.samples += x.shape[0]
        if self.current_batch != self.batch_index:
            self.current_batch = self.batch_index
            self.batches += 1


def _estimated_layers(model: nn.Module, include_batchnorm: bool) -> Dict[str, _NormBase]:
    """The layers whose BN statistics the pass estimates, by qualified name."""
    has_norm = False
    layers = {}
    for name, m in model.named_modules():
        is_sn = isinstance(m, SwitchNormBase)
        is_bn = include_batchnorm and isinstance(m, _BatchNorm)
        has_norm = has_norm or is_sn or is_bn
        # SN without a BN branch, and layers without running statistics, have nothing to estimate.
        if (is_sn or is_bn) and m.running_mean is not None:
            layers[name] = m
    if not has_norm:
        what = ("SwitchNorm or BatchNorm" if include_batchnorm
                else "SwitchNorm (BatchNorm excluded by include_batchnorm=False)")
        raise ValueError(
            f"recompute_batch_stats: the model ({type(model).__name__}) has no {what} layers, so there are "
            f"no batch statistics to recompute. Convert its normalization layers first "
            f"(sn_plugin.convert_to_sn) or pass the model that holds them."
        )
    return layers


def _snapshot(model: nn.Module) -> Dict[nn.Module, List[Tensor]]:
    """Copies of every norm layer's running buffers, which a training-mode pass changes."""
    return {
        m: [b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
        for m in model.modules()
        if isinstance(m, _NormBase) and m.running_mean is not None
    }


def _restore(layer: _NormBase, saved: List[Tensor]) -> None:
    for buffer, value in zip((layer.running_mean, layer.running_var, layer.num_batches_tracked), saved):
        buffer.copy_(value)


def _process_group_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _all_reduce(accumulators: List[_Accumulator], batches_run: int, device: torch.device) -> int:
    """Sum every accumulator (and the number of batches run) over all processes, in place.

    One flat all-reduce, so the layers' order is the only thing processes must agree on.
    Counts travel as float64, exact up to 2**53.
    """
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    parts = [torch.tensor([float(batches_run)], dtype=torch.float64)]
    for acc in accumulators:
        counts = torch.tensor([acc.values, acc.samples, acc.batches], dtype=torch.float64)
        parts += [counts, acc.sum.cpu(), acc.sum_sq.cpu()]
    packed = torch.cat(parts).to(device)
    dist.all_reduce(packed)
    packed = packed.cpu()
    batches_run = int(packed[0])
    offset = 1
    for acc in accumulators:
        channels = acc.sum.numel()
        acc.values, acc.samples, acc.batches = (int(v) for v in packed[offset:offset + 3])
        offset += 3
        acc.sum.copy_(packed[offset:offset + channels])
        acc.sum_sq.copy_(packed[offset + channels:offset + 2 * channels])
        offset += 2 * channels
    return batches_run


class _Progress:
    """Progress and summary lines: a tqdm bar when no logger is given and tqdm is installed,
    otherwise a line through the logger (or print) every tenth of the pass. Only process 0 speaks."""

    def __init__(self, enabled: bool, total: Optional[int], logger: Optional[logging.Logger]) -> None:
        self.quiet = dist.is_available() and dist.is_initialized() and dist.get_rank() != 0
        self.enabled = enabled and not self.quiet
        self.total = total
        self.logger = logger
        self.bar = None
        if self.enabled and logger is None:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc="recompute_batch_stats", unit="batch")
        self.every = max(1, (total or 200) // 10)

    def emit(self, message: str, level: int = logging.INFO) -> None:
        if self.quiet:
            return
        if self.logger is not None:
            self.logger.log(level, message)
        elif level >= logging.WARNING:
            _LOGGER.warning(message)
        elif self.enabled:
            (self.bar.write if self.bar is not None else print)(message)

    def step(self, done: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
        elif done % self.every == 0 or done == self.total:
            self.emit(f"recompute_batch_stats: {done}/{self.total if self.total else '?'} batches")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _expected_batches(batches: Iterable, num_batches: Optional[int]) -> Optional[int]:
    """How many batches the pass will run, where known (for the progress display)."""
    try:
        available = len(batches)
    except TypeError:  # a generator, an iterable-style DataLoader
        return num_batches
    return available if num_batches is None else min(available, num_batches)


def _run_model(model: nn.Module, batch) -> object:
    return model(batch)


@torch.no_grad()
def recompute_batch_stats(
    model: nn.Module,
    batches: Iterable,
    num_batches: Optional[int] = 200,
    forward: Optional[Callable[[nn.Module, object], object]] = None,
    include_batchnorm: bool = True,
    progress: bool = True,
    logger: Optional[logging.Logger] = None,
) -> Dict[str, LayerStatsReport]:
    """Set every SN layer's BN-branch running statistics to their batch average (in place).

    Runs ``model`` in training mode, with its parameters frozen and no
    gradients, on up to ``num_batches`` batches of ``batches`` (``None``: all of
    them), and replaces each estimated layer's ``running_mean``/``running_var``
    by the mean and population variance of everything it normalized during the
    pass, weighted by the number of values each batch gave it (SN layers with
    ``unbiased_instance_var=True``: their own batch variance, averaged the same way). This is the
    paper's "batch average" (Sec. 2.1), which SN layers built with
    ``using_moving_average=False`` need before they can evaluate; their
    ``num_batches_tracked`` becomes the number of batches used, which marks the
    statistics as estimated.

    Layers estimated: every :class:`~sn_plugin.SwitchNormBase` with a BN branch
    and running statistics and, with ``include_batchnorm``, every
    ``torch.nn`` BatchNorm (``_BatchNorm`` subclasses, incl. ``SyncBatchNorm``)
    with running statistics ("precise BN"). Not estimated: SN without a BN
    branch (nothing to estimate), layers the model's own ``train()`` keeps in
    eval mode (frozen norms such as OpenMMLab's ``norm_eval=True``: reported,
    left as they were), and BatchNorm layers when ``include_batchnorm`` is
    False (they still run in training mode, as in training, and their
    statistics are restored afterwards). A layer that saw no data keeps its old
    statistics and is reported with a warning.

    Afterwards every module's training mode and every parameter's
    ``requires_grad`` are as before. If the pass raises, the running statistics
    of every norm layer are restored before the exception propagates.

    Under ``torch.distributed`` (initialised, world size > 1) every process
    must call this with its own batches; the sums are all-reduced over the
    default group, so all processes end with identical statistics of the union
    of their batches (a process may have fewer batches than the others, as long
    as the model has no synchronized layers that need every process in every
    batch). ``SyncSwitchNorm``/``SyncBatchNorm`` layers then normalize with the
    global batch statistics during the pass, as in training.

    Args:
        model: the network (also a DDP-wrapped one); modified in place.
        batches: any iterable of batches, e.g. a training DataLoader (use the
            training-time augmentation, as the statistics are those of training).
        num_batches: how many batches to use at most; ``None`` for all.
        forward: ``forward(model, batch)`` runs the model on one batch; default
            ``model(batch)``. Its return value is ignored.
        include_batchnorm: also recompute BatchNorm layers' statistics.
        progress: show progress (tqdm when installed and no ``logger`` is given,
            otherwise a line every tenth of the pass) and a summary.
        logger: a ``logging.Logger`` (e.g. mmengine's or detectron2's) for the
            progress and summary lines; default: tqdm/print.

    Returns:
        Per estimated layer name, a :class:`LayerStatsReport`.

    Raises:
        ValueError: the model has no SN/BN layers, ``num_batches`` is not
            positive, or ``batches`` yields nothing (on every process).
    """
    if num_batches is not None and num_batches <= 0:
        raise ValueError(f"recompute_batch_stats: num_batches must be positive or None, got {num_batches}")
    layers = _estimated_layers(model, include_batchnorm)
    if not layers:
        _LOGGER.info("recompute_batch_stats: no layer of %s has BN-branch running statistics "
                     "(e.g. SN with using_bn=False); nothing to estimate.", type(model).__name__)
        return {}
    run = forward if forward is not None else _run_model
    distributed = _process_group_size() > 1

    was_training = {m: m.training for m in model.modules()}
    requires_grad = {p: p.requires_grad for p in model.parameters()}
    saved = _snapshot(model)
    accumulators: Dict[str, _Accumulator] = {}
    handles = []
    try:
        model.train()
        for p in requires_grad:
            p.requires_grad_(False)
        estimated = {name: m for name, m in layers.items() if m.training}
        for name, layer in estimated.items():
            accumulators[name] = _Accumulator(layer)
            handles.append(layer.register_forward_pre_hook(accumulators[name], with_kwargs=True))

        reporter = _Progress(progress, _expected_batches(batches, num_batches), logger)
        batches_run = 0
        try:
            for index, batch in enumerate(itertools.islice(batches, num_batches)):
                for acc in accumulators.values():
                    acc.batch_index = index
                run(model, batch)
                batches_run += 1
                reporter.step(batches_run)
        finally:
            reporter.close()
        for handle in handles:
            handle.remove()
        handles.clear()

        if distributed:
            first = next(iter(layers.values()))
            batches_run = _all_reduce(list(accumulators.values()), batches_run, first.running_mean.device)
        if batches_run == 0:
            raise ValueError(
                "recompute_batch_stats: `batches` yielded no batch, so there is nothing to average. "
                "Pass a non-empty iterable (e.g. the training DataLoader)."
            )
        reports = _apply(layers, accumulators, saved)
    except BaseException:
        for layer, values in saved.items():
            _restore(layer, values)
        raise
    finally:
        for handle in handles:
            handle.remove()
        for m, mode in was_training.items():
            m.training = mode
        for p, flag in requires_grad.items():
            p.requires_grad_(flag)

    _summarise(reports, batches_run, num_batches, reporter)
    return reports


def _apply(layers: Dict[str, _NormBase], accumulators: Dict[str, _Accumulator],
           saved: Dict[nn.Module, List[Tensor]]) -> Dict[str, LayerStatsReport]:
    """Write the estimates into the layers; restore every other norm layer's buffers."""
    reports = {}
    for name, layer in layers.items():
        acc = accumulators.get(name)
        if acc is None:
            reports[name] = LayerStatsReport(0, 0, False, "kept in eval mode by the model's train()")
        elif acc.values == 0:
            reports[name] = LayerStatsReport(0, 0, False, "saw no data")
        else:
            mean = acc.sum / acc.values
            var = (acc.sum_sq / acc.values - mean.square()).clamp_min_(0.0)
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
            layer.num_batches_tracked.fill_(acc.batches)
            reports[name] = LayerStatsReport(acc.batches, acc.samples, True)
    updated = {layers[name] for name, report in reports.items() if report.updated}
    for layer, values in saved.items():
        if layer not in updated:
            _restore(layer, values)
    return reports


def _summarise(reports: Dict[str, LayerStatsReport], batches_run: int, num_batches: Optional[int],
               reporter: _Progress) -> None:
    updated = [r for r in reports.values() if r.updated]
    if num_batches is not None and batches_run < num_batches * _process_group_size():
        reporter.emit(f"recompute_batch_stats: `batches` ran out after {batches_run} of the requested "
                      f"{num_batches} batches per process; the statistics use those.")
    if updated:
        samples = sorted({r.samples for r in updated})
        samples_text = str(samples[0]) if len(samples) == 1 else f"{samples[0]}-{samples[-1]}"
        reporter.emit(f"recompute_batch_stats: recomputed the statistics of {len(updated)} layers from "
                      f"{batches_run} batches ({samples_text} samples per layer).")
    for name, report in reports.items():
        if not report.updated:
            level = logging.WARNING if report.note == "saw no data" else logging.INFO
            reporter.emit(f"recompute_batch_stats: {name} {report.note}; its statistics are unchanged.", level)
