"""Detectron2 hooks: SN's batch-average statistics and its importance weights in the metrics."""
import logging

from detectron2.engine import HookBase
from detectron2.utils.events import EventStorage, get_event_storage
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ...introspection import importance_summary
from ...switchable_norm import FrozenSwitchNorm, SwitchNormBase
from ..common import DEFAULT_INCLUDE_BATCHNORM, DEFAULT_NUM_BATCHES, estimate_batch_statistics, is_due, unwrap_model

_LOGGER = logging.getLogger("sn_plugin.integrations.detectron2")

# Detectron2's writers (PeriodicWriter) write the metrics every 20 iterations.
DEFAULT_LOG_PERIOD = 20


def _has_batch_statistics(model: nn.Module, include_batchnorm: bool) -> bool:
    return any(
        (isinstance(m, SwitchNormBase) or (include_batchnorm and isinstance(m, _BatchNorm)))
        and m.running_mean is not None and not isinstance(m, FrozenSwitchNorm)
        for m in model.modules()
    )


class SNBatchStatsHook(HookBase):
    """Re-estimates batch-average statistics after every ``period``-th iteration and after the last.

    The paper evaluates SN with the batch average of its BN branch's statistics
    (Sec. 2.1): :func:`sn_plugin.recompute_batch_stats` runs ``num_batches``
    training batches per process through the model and all-reduces the sums
    over the processes. With ``include_batchnorm`` it also re-estimates the
    BatchNorm layers that train (precise BN; off by default, as in the
    OpenMMLab ``SNBatchStatsHook``); frozen layers are left as they are.
    ``period`` 0: only after the last iteration. Put it before the checkpointer
    and the evaluation hook, as :class:`~sn_plugin.integrations.detectron2.SNTrainer`
    does, so both see the new statistics.
    """

    def __init__(self, period: int, model: nn.Module, data_loader, num_batches: int = DEFAULT_NUM_BATCHES,
                 include_batchnorm: bool = DEFAULT_INCLUDE_BATCHNORM) -> None:
        self._period = period
        self._model = model
        self._data_loader = data_loader
        self._num_batches = num_batches
        self._include_batchnorm = include_batchnorm
        self._data_iter = None
        self._disabled = not _has_batch_statistics(model, include_batchnorm)
        if self._disabled:
            _LOGGER.info("SNBatchStatsHook is disabled: the model has no trainable SN (or, with include_batchnorm, "
                         "BN) layer with running statistics.")

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if is_due(done, self._period, self.trainer.max_iter):
            self.update_stats(f"after iteration {done}")

    def update_stats(self, when: str = "now") -> None:
        """Re-estimate now (every process must call it); ``when`` goes into the log line."""
        if self._disabled:
            return
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        # The training-mode forward needs an EventStorage; a fresh one discards its losses.
        with EventStorage():
            estimate_batch_statistics(self._model, self._data_iter, self._num_batches, self._include_batchnorm,
                                      _LOGGER, type(self).__name__, when)


class SNWeightLoggerHook(HookBase):
    """Writes SN's importance weights to detectron2's EventStorage after every ``period``-th
    iteration and after the last one.

    Scalars ``{prefix}/{stage}/{mean|var}_{IN|LN|BN}`` (averaged over the SN
    layers of each stage, see :func:`sn_plugin.importance_summary`), so they
    reach ``metrics.json`` and TensorBoard through detectron2's writers; put it
    before ``PeriodicWriter``.
    """

    def __init__(self, model: nn.Module, period: int = DEFAULT_LOG_PERIOD, prefix: str = "sn_weights") -> None:
        self._model = model
        self._period = period
        self._prefix = prefix

    def after_step(self) -> None:
        if is_due(self.trainer.iter + 1, self._period, self.trainer.max_iter):
            scalars = importance_summary(unwrap_model(self._model), prefix=self._prefix)
            if scalars:
                get_event_storage().put_scalars(smoothing_hint=False, **scalars)
