"""Estimation shift of BatchNorm (Huang et al., "Delving into the Estimation Shift of Batch
Normalization in a Network", CVPR 2022): how far each layer's running statistics are from the
statistics the trained model actually feeds it.

* :func:`estimation_shift`: ESM_mu and ESM_sigma of every layer with running statistics
  (Definition 2), the expected statistics measured in one eval-mode pass over a data set
  (Definition 1), so that the shift of lower layers propagates upward as it does at test time.
* :func:`write_estimation_shift_csv`, :func:`plot_estimation_shift` (ESM per layer) and
  :func:`plot_estimation_shift_history` (ESM per layer against epoch, the paper's Figs. 2-5).
* :func:`perturbed_running_stats`: the paper's Eq. 5 noise on running statistics, for
  robustness curves like its Fig. 8.

Layers measured: torch's BatchNorms (SyncBatchNorm included), frozen BNs that keep running
statistics (torchvision's/detectron2's ``FrozenBatchNorm2d``), SN layers with a BN branch (its
running statistics) and CN layers, whose BN/SN branches are layers of their own
(``<cn>.branches.<k>``): a branch is measured when the pass runs it, so measure branch ``k``
inside :func:`sn_plugin.consistent_branch` with data made by its transform.
"""
import csv
import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .atomic import atomic_write
from .conversion import looks_like_batch_norm
from .plotting import save_importance_figure as save_figure
from .switchable_norm import SwitchNormBase

__all__ = [
    "LayerShift", "estimated_statistics_layers", "estimation_shift", "perturbed_running_stats",
    "plot_estimation_shift", "plot_estimation_shift_history", "save_figure", "write_estimation_shift_csv",
]

Report = List["LayerShift"]
History = Mapping[int, Report]  # epoch -> report


@dataclass
class LayerShift:
    """The estimation shift of one layer.

    Attributes:
        index: position in forward order (0 = the first layer the data reached).
        name: qualified module name (a CN branch: ``<cn>.branches.<k>``).
        kind: the layer's class name.
        channels: number of channels C.
        samples: samples (dim 0 of the input) seen, summed over the layer's calls.
        esm_mu: ``||mu_hat - mu_tilde||_2`` over channels.
        esm_sigma: ``||sqrt(var_hat) - sqrt(var_tilde)||_2`` over channels.
        expected_mean, expected_var: mu_tilde and var_tilde (population variance), float64 on the CPU.
    """

    index: int
    name: str
    kind: str
    channels: int
    samples: int
    esm_mu: float
    esm_sigma: float
    expected_mean: Tensor = field(repr=False)
    expected_var: Tensor = field(repr=False)


def estimated_statistics_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The layers of ``model`` that normalize with estimated (running) statistics in eval, by name."""
    layers = {}
    for name, m in model.named_modules():
        measurable = isinstance(m, (_BatchNorm, SwitchNormBase)) or looks_like_batch_norm(m)
        if measurable and isinstance(getattr(m, "running_mean", None), Tensor) \
                and isinstance(getattr(m, "running_var", None), Tensor):
            layers[name] = m
    return layers


class _Moments:
    """Per-channel mean and population variance of every value a layer received, in float64.

    Batches are merged with Chan et al.'s pairwise update, exact for batches of any size.
    """

    def __init__(self) -> None:
        self.count = 0  # values per channel
        self.samples = 0
        self.mean: Optional[Tensor] = None
        self.m2: Optional[Tensor] = None  # sum of squared deviations from the mean

    def add(self, x: Tensor) -> None:
        if x.dim() < 2 or x.numel() == 0:
            return
        x = x.detach().to(torch.float64)
        count = x.numel() // x.shape[1]
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=0)
        if self.mean is None:
            self.mean, self.m2 = mean, var * count
        else:
            total = self.count + count
            delta = mean - self.mean
            self.mean = self.mean + delta * (count / total)
            self.m2 = self.m2 + var * count + delta.square() * (self.count * count / total)
        self.count += count
        self.samples += x.shape[0]


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    if isinstance(batch, Mapping):
        return model(**batch)
    raise TypeError(f"estimation_shift: cannot feed a {type(batch).__name__} batch to the model; pass "
                    f"forward=lambda model, batch: ... to say how")


@contextmanager
def _evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; every module's train flag and every buffer as before afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, b, b.clone()) for m in model.modules() for name, b in m._buffers.items() if b is not None]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for m, name, original, saved in buffers:
                m._buffers[name] = original
                original.copy_(saved)
        for m, flag in flags:
            m.training = flag


def estimation_shift(
    model: nn.Module,
    data: Iterable,
    forward: Callable[[nn.Module, Any], Any] = _default_forward,
    max_batches: Optional[int] = None,
) -> Report:
    """ESM of every layer with running statistics, in forward order.

    The expected statistics of a layer (the paper's Definition 1) are the per-channel mean and
    population variance of its input over all of ``data``, taken over every axis but the
    channels ((N, H, W) for convolution inputs, N for (N, C) inputs), from one pass of
    ``model`` in eval mode. Eval mode matters: every layer normalizes with its running
    statistics, so a shift in lower layers changes what upper layers receive, as at test time.
    The values are accumulated in float64; batches may differ in size.

    Args:
        model: the trained model.
        data: an iterable of batches (the test set ``S'`` of the paper).
        forward: how to run a batch, ``forward(model, batch)``; by default a tensor is passed
            as is, the first element of a tuple/list, or a dict as keyword arguments.
        max_batches: stop after this many batches.

    Returns:
        a :class:`LayerShift` per layer that received data, ordered by first call. Layers the
        pass never reached (e.g. spare CN branches) are not in it.

    Every module's train flag and every buffer are as before when the function returns,
    also when it raises.
    """
    layers = estimated_statistics_layers(model)
    if not layers:
        raise ValueError(
            f"estimation_shift: {type(model).__name__} has no layer with running statistics (BatchNorm, "
            f"SyncBatchNorm, frozen BN, SN with a BN branch, or CN with such branches) to measure"
        )
    moments = {name: _Moments() for name in layers}
    first_calls: List[str] = []

    def hook_for(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                if moments[name].samples == 0 and x.numel():
                    first_calls.append(name)
                moments[name].add(x)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, m in layers.items()]
    batches = 0
    try:
        with _evaluating(model):
            for batch in itertools.islice(data, max_batches):  # no batch loaded past max_batches
                forward(model, batch)
                batches += 1
    finally:
        for handle in handles:
            handle.remove()
    if not first_calls:
        raise ValueError(f"estimation_shift: none of the {len(layers)} layers with running statistics received "
                         f"data ({batches} batches were run); check that `data` yields batches and `forward` "
                         f"runs the model on them")
    report = []
    for index, name in enumerate(first_calls):
        layer, stats = layers[name], moments[name]
        estimated_mean = layer.running_mean.detach().to("cpu", torch.float64)
        estimated_var = layer.running_var.detach().to("cpu", torch.float64)
        expected_mean, expected_var = stats.mean.cpu(), (stats.m2 / stats.count).cpu()
        report.append(LayerShift(
            index=index, name=name, kind=type(layer).__name__, channels=expected_mean.numel(),
            samples=stats.samples,
            esm_mu=float(torch.linalg.vector_norm(estimated_mean - expected_mean)),
            esm_sigma=float(torch.linalg.vector_norm(estimated_var.clamp_min(0).sqrt() - expected_var.sqrt())),
            expected_mean=expected_mean, expected_var=expected_var,
        ))
    return report


# ---------------------------------------------------------------------------------------------
# Files and figures
# ---------------------------------------------------------------------------------------------

_CSV_COLUMNS = ["index", "layer", "kind", "channels", "samples", "esm_mu", "esm_sigma"]


def _is_history(source: Union[Report, History]) -> bool:
    return isinstance(source, Mapping)


def write_estimation_shift_csv(source: Union[Report, History], path: str, step: str = "epoch") -> None:
    """Write a report, or a history ``{epoch: report}`` (with an ``epoch`` first column), as CSV
    (atomically): ``[epoch,] index, layer, kind, channels, samples, esm_mu, esm_sigma``.

    ``step`` names the history's keys (the first column): ``"epoch"``, or e.g. ``"iteration"``
    for a training measured every N iterations."""
    history = source if _is_history(source) else None

    def rows(report, prefix):
        return ([*prefix, r.index, r.name, r.kind, r.channels, r.samples, repr(r.esm_mu), repr(r.esm_sigma)]
                for r in report)

    def write(f):
        writer = csv.writer(f)
        writer.writerow(([step] if history is not None else []) + _CSV_COLUMNS)
        if history is None:
            writer.writerows(rows(source, []))
        else:
            for epoch in sorted(history):
                writer.writerows(rows(history[epoch], [epoch]))

    atomic_write(path, write, binary=False)


_PANELS = (("esm_mu", r"ESM$_\mu$"), ("esm_sigma", r"ESM$_\sigma$"))


def plot_estimation_shift(report: Report, title: Optional[str] = None):
    """A figure of ESM_mu (top) and ESM_sigma (bottom) per layer, in forward order.

    Returns a matplotlib ``Figure`` (not registered with pyplot); save it with
    ``figure.savefig`` or atomically with :func:`save_figure`.
    """
    from matplotlib.figure import Figure

    if not report:
        raise ValueError("plot_estimation_shift: the report is empty")
    n = len(report)
    figure = Figure(figsize=(min(max(6.0, 0.18 * n + 2.5), 40.0), 5.5), layout="constrained")
    axes = figure.subplots(2, 1, sharex=True)
    positions = [r.index for r in report]
    for ax, (statistic, label) in zip(axes, _PANELS):
        ax.bar(positions, [getattr(r, statistic) for r in report], color="#4477AA", width=0.8)
        ax.set_ylabel(label)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
    if n <= 60:
        axes[1].set_xticks(positions)
        axes[1].set_xticklabels([r.name for r in report], rotation=90, fontsize=7, family="monospace")
    else:
        axes[1].set_xlabel("layer (forward order)")
    if title:
        figure.suptitle(title)
    return figure


def plot_estimation_shift_history(history: History, title: Optional[str] = None, axes=None, step: str = "epoch"):
    """ESM_mu and ESM_sigma of every layer against epoch, one line per layer coloured by its depth
    (the paper's Figs. 2-5 (b, c)).

    ``history`` maps epoch -> report (layers are matched by name); ``step`` labels the x axis
    (e.g. ``"iteration"``). Draws into ``axes`` (two matplotlib axes) when given, else returns
    a new ``Figure``.
    """
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if not history:
        raise ValueError("plot_estimation_shift_history: the history is empty")
    epochs = sorted(history)
    order: Dict[str, int] = {}
    for epoch in epochs:
        for r in history[epoch]:
            order.setdefault(r.name, len(order))
    figure = None
    if axes is None:
        figure = Figure(figsize=(10.0, 4.0), layout="constrained")
        axes = figure.subplots(1, 2)
    colours = colormaps["viridis"]
    depth = Normalize(0, max(len(order) - 1, 1))
    for ax, (statistic, label) in zip(axes, _PANELS):
        for name, position in order.items():
            points = [(e, getattr(r, statistic)) for e in epochs for r in history[e] if r.name == name]
            ax.plot([p[0] for p in points], [p[1] for p in points], color=colours(depth(position)), linewidth=1.0)
        ax.set_xlabel(step)
        ax.set_ylabel(label)
        ax.grid(linewidth=0.4, alpha=0.5)
    owner = figure if figure is not None else axes[-1].figure
    colourbar = owner.colorbar(ScalarMappable(norm=depth, cmap=colours), ax=list(axes), pad=0.01)
    colourbar.set_label("layer (forward order)")
    if title and figure is not None:
        figure.suptitle(title)
    return figure


# ---------------------------------------------------------------------------------------------
# Perturbed running statistics (the paper's Eq. 5 and Fig. 8)
# ---------------------------------------------------------------------------------------------

@contextmanager
def perturbed_running_stats(
    model: nn.Module,
    magnitude: float,
    layers: Optional[Sequence[str]] = None,
    generator: Optional[torch.Generator] = None,
) -> Iterator[List[str]]:
    """Within the ``with`` block, the running statistics of ``layers`` are disturbed as in the
    paper's Eq. 5: ``mean * (1 + d_mu)`` and ``var * (1 + d_sigma)`` with ``d_mu``, ``d_sigma``
    drawn per channel from U(-magnitude, magnitude).

    Args:
        model: the model (its layers are found by :func:`estimated_statistics_layers`).
        magnitude: the noise magnitude Delta, in [0, 1): Delta >= 1 could make a variance
            negative or zero.
        layers: qualified names of the layers to disturb; default every layer with running statistics.
        generator: the random generator (CPU) for reproducible noise.

    Yields the names of the disturbed layers. The statistics are restored when the block ends,
    also when it raises.
    """
    if not 0.0 <= magnitude < 1.0:
        raise ValueError(f"perturbed_running_stats: magnitude must lie in [0, 1) so that every variance stays "
                         f"positive (var * (1 + d) with d in (-magnitude, magnitude)); got {magnitude}")
    available = estimated_statistics_layers(model)
    names = list(available) if layers is None else list(layers)
    unknown = [name for name in names if name not in available]
    if unknown:
        raise KeyError(f"perturbed_running_stats: {unknown} are not layers with running statistics of "
                       f"{type(model).__name__}; they are: {list(available)}")
    saved = [(available[name], available[name].running_mean.clone(), available[name].running_var.clone())
             for name in names]
    try:
        with torch.no_grad():
            for layer, _, _ in saved:
                for buffer in (layer.running_mean, layer.running_var):
                    noise = (torch.rand(buffer.shape, generator=generator, dtype=torch.float64) * 2 - 1) * magnitude
                    buffer.mul_((1 + noise).to(buffer.device, buffer.dtype))
        yield names
    finally:
        with torch.no_grad():
            for layer, mean, var in saved:
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
