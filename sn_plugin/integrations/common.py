"""What the toolkit adapters share. Imports no toolkit.

* the defaults of the batch-statistics hooks, so both toolkits behave alike;
* model unwrapping, the "statistics not estimated yet" check, "every N
  iterations and after the last one", and the estimate with its progress lines;
* :class:`Patch` / :class:`PatchSet`: every change an adapter makes to a
  toolkit's internals, installed by one call, checked against the toolkit
  version it was written for, and undone by one call;
* :class:`EstimationShiftLog`: what both ``EstimationShiftHook`` s record, write and log.
"""
import importlib.metadata
import logging
import os
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from torch import nn

from ..batch_stats import LayerStatsReport, recompute_batch_stats
from ..estimation_shift import LayerShift, plot_estimation_shift_history, save_figure, write_estimation_shift_csv
from ..introspection import switch_norm_layers
from ..switchable_norm import FrozenSwitchNorm

__all__ = [
    "DEFAULT_INCLUDE_BATCHNORM", "DEFAULT_NUM_BATCHES", "EstimationShiftLog", "Patch", "PatchSet", "describe_missing",
    "estimate_batch_statistics", "is_due", "missing_batch_statistics", "replace_attribute", "toolkit_version",
    "unwrap_model",
]

# Training batches (per process) for one estimate of the batch-average statistics; the paper
# notes that a small number suffices.
DEFAULT_NUM_BATCHES = 200
# The hooks re-estimate SN's statistics only. BatchNorm layers that train keep the moving
# averages their configuration gives them: re-estimating them too ("precise BN") changes how
# BN evaluates, which a user asks for (include_batchnorm / INCLUDE_BN, or the toolkit's own
# precise-BN hook) rather than gets from adding SN.
DEFAULT_INCLUDE_BATCHNORM = False


# ---------------------------------------------------------------------------- models

def _is_torch_wrapper(model: nn.Module) -> bool:
    """DataParallel, DistributedDataParallel (mmengine's wrappers subclass it) or FSDP."""
    wrappers: Tuple[type, ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)
    fsdp = sys.modules.get("torch.distributed.fsdp")  # no FSDP model exists unless it was imported
    if fsdp is not None:
        wrappers += (fsdp.FullyShardedDataParallel,)
    return isinstance(model, wrappers)


def unwrap_model(model: nn.Module, is_wrapper: Callable[[nn.Module], bool] = _is_torch_wrapper) -> nn.Module:
    """The model inside however many wrappers (``is_wrapper``: torch's data-parallel classes by default)."""
    while is_wrapper(model):
        model = model.module
    return model


def missing_batch_statistics(model: nn.Module) -> List[str]:
    """Names of the SN layers that evaluate with batch-average statistics never estimated.

    Those are layers with ``using_moving_average=False``, running statistics
    and ``num_batches_tracked == 0``; frozen layers use whatever they hold.
    """
    return [name for name, layer in switch_norm_layers(model).items()
            if not isinstance(layer, FrozenSwitchNorm) and not layer.using_moving_average
            and layer.running_mean is not None and int(layer.num_batches_tracked) == 0]


def describe_missing(missing: List[str]) -> str:
    return (f"{len(missing)} SN layers (e.g. {missing[0]}) have using_moving_average=False and no "
            f"batch-average statistics")


def is_due(iterations_done: int, period: int, max_iterations: int) -> bool:
    """Whether a periodic action runs once ``iterations_done`` iterations are done:
    after every ``period``-th one (``period`` 0: never) and after the last one."""
    return iterations_done == max_iterations or (period > 0 and iterations_done % period == 0)


def estimate_batch_statistics(model: nn.Module, batches: Iterable, num_batches: int,
                              include_batchnorm: bool, logger: logging.Logger, source: str, when: str,
                              forward: Optional[Callable] = None) -> Dict[str, LayerStatsReport]:
    """:func:`sn_plugin.recompute_batch_stats` as the hooks run it: announced by ``source``
    (the hook's name) and ``when``, with its progress and summary lines in ``logger``."""
    logger.info(f"{source}: batch-average statistics from {num_batches} training batches {when}.")
    return recompute_batch_stats(model, batches, num_batches=num_batches, forward=forward,
                                 include_batchnorm=include_batchnorm, progress=True, logger=logger)


# ---------------------------------------------------------------------------- patches

_MISSING = object()


def replace_attribute(owner: object, name: str, value: object) -> Callable[[], None]:
    """Set ``owner.name = value``; returns the function that undoes exactly that.

    The undo puts back what ``owner`` itself held under ``name``, or deletes the
    attribute if ``owner`` only inherited it (a class) or had none.
    """
    previous = vars(owner).get(name, _MISSING)
    setattr(owner, name, value)

    def undo() -> None:
        if previous is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, previous)

    return undo


def toolkit_version(distribution: str, module: str) -> Optional[str]:
    """The installed version of ``distribution``; else ``module.__version__`` if it is imported."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return getattr(sys.modules.get(module), "__version__", None)


def _release(version: str) -> Tuple[int, ...]:
    """'0.6+nocsrc' -> (0, 6); '0.10.7' -> (0, 10, 7)."""
    match = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


@dataclass(frozen=True)
class Patch:
    """One change an adapter makes to a toolkit's internals.

    Attributes:
        target: what it changes, e.g. ``mmengine.model.BaseModule.train``.
        reason: why SN needs it (shown when the version differs).
        distribution: the toolkit's distribution name, for the version check.
        module: the toolkit's import name (its ``__version__`` when the distribution has no metadata).
        written_for: the version it was written and tested for; a prefix, e.g. ``0.10``
            covers 0.10.x.
        apply: makes the change and returns the function that undoes it.
    """

    target: str
    reason: str
    distribution: str
    module: str
    written_for: str
    apply: Callable[[], Callable[[], None]]

    def check_version(self) -> None:
        """Warn when the installed toolkit is not the version this patch was written for."""
        found = toolkit_version(self.distribution, self.module)
        wanted = _release(self.written_for)
        if found is not None and _release(found)[:len(wanted)] == wanted:
            return
        warnings.warn(
            f"sn_plugin patches {self.target} ({self.reason}). The patch was written and tested for "
            f"{self.distribution} {self.written_for}, but {self.distribution} {found or '(version unknown)'} is "
            f"installed. It is installed anyway; if SN misbehaves with this toolkit, install "
            f"{self.distribution} {self.written_for} or report the version.", RuntimeWarning, stacklevel=3)


class PatchSet:
    """The patches one adapter installed: each goes in once, and :meth:`uninstall` undoes them
    all, the last first."""

    def __init__(self) -> None:
        self._undo: List[Tuple[Patch, Callable[[], None]]] = []
        self._lock = threading.Lock()

    def install(self, patches: Iterable[Patch]) -> None:
        with self._lock:
            for patch in patches:
                if patch.target in self.installed:
                    continue
                patch.check_version()
                self._undo.append((patch, patch.apply()))

    def uninstall(self) -> None:
        with self._lock:
            while self._undo:
                _, undo = self._undo.pop()
                undo()

    @property
    def installed(self) -> Tuple[str, ...]:
        """The targets of the installed patches, in installation order."""
        return tuple(patch.target for patch, _ in self._undo)


# ---------------------------------------------------------------------------- estimation shift

class EstimationShiftLog:
    """The estimation shift of a model over its training, as both ``EstimationShiftHook`` s keep it.

    :meth:`record` adds one measurement (a :func:`sn_plugin.estimation_shift` report) at a
    step (an epoch, or an iteration), rewrites ``<folder>/estimation_shift.csv`` (every
    layer at every step so far) and ``estimation_shift.png`` (each layer's ESM against the
    step, the paper's Figs. 2-5), and returns the four scalars the hooks send to the
    toolkit's metrics; :meth:`summary` is the hooks' log line.

    Args:
        step: what the steps are, ``"epoch"`` or ``"iteration"`` (the CSV's first column and
            the figure's x axis).
        plot: draw the figure (matplotlib) after every measurement.
    """

    FILE_STEM = "estimation_shift"

    def __init__(self, step: str = "epoch", plot: bool = True) -> None:
        self.step = step
        self.plot = plot
        self.history: Dict[int, List[LayerShift]] = {}

    def record(self, step: int, report: List[LayerShift], folder: Optional[str]) -> Dict[str, float]:
        """Keep ``report`` as the measurement at ``step``; write the files into ``folder``
        (None: no files, e.g. on processes other than the main one). Returns the scalars."""
        self.history[step] = report
        if folder is not None:
            stem = os.path.join(folder, self.FILE_STEM)
            write_estimation_shift_csv(self.history, stem + ".csv", step=self.step)
            if self.plot:
                save_figure(plot_estimation_shift_history(self.history, step=self.step), stem + ".png", dpi=110)
        return self.scalars(report)

    @staticmethod
    def scalars(report: List[LayerShift], prefix: str = "esm") -> Dict[str, float]:
        """Mean and maximum over the layers of ESM_mu and ESM_sigma: ``{prefix}/mu_mean`` ..."""
        values = {"mu": [r.esm_mu for r in report], "sigma": [r.esm_sigma for r in report]}
        return {f"{prefix}/{name}_{kind}": (sum(v) / len(v) if kind == "mean" else max(v))
                for name, v in values.items() for kind in ("mean", "max")}

    def summary(self, source: str, step: int, report: List[LayerShift]) -> str:
        """One line: where the largest shifts are and the means over the layers."""
        worst_mu = max(report, key=lambda r: r.esm_mu)
        worst_sigma = max(report, key=lambda r: r.esm_sigma)
        scalars = self.scalars(report)
        return (f"{source}: estimation shift after {self.step} {step} over {len(report)} layers: "
                f"ESM_mu mean {scalars['esm/mu_mean']:.4g}, max {worst_mu.esm_mu:.4g} ({worst_mu.name}); "
                f"ESM_sigma mean {scalars['esm/sigma_mean']:.4g}, max {worst_sigma.esm_sigma:.4g} "
                f"({worst_sigma.name})")
