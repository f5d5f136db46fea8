"""mmengine hooks: SN's batch-average statistics and its importance weights."""
import copy
from typing import List, Optional

import torch
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS
from torch import nn

from ...introspection import importance_summary
from ..common import (
    DEFAULT_INCLUDE_BATCHNORM, DEFAULT_NUM_BATCHES, describe_missing, estimate_batch_statistics, is_due,
    missing_batch_statistics, unwrap_model,
)


def _unwrap(model: nn.Module) -> nn.Module:
    return unwrap_model(model, is_model_wrapper)  # also wrappers registered in mmengine's MODEL_WRAPPERS


def training_forward(model: nn.Module, batch) -> None:
    """One training-mode forward of an mmengine model on a DataLoader batch, without the optimizer.

    Runs the model's own data preprocessor (with training-time batch
    augmentation) and its loss forward, so every norm layer that runs in
    training, auxiliary heads included, sees the batch.
    """
    data = model.data_preprocessor(batch, training=True)
    if isinstance(data, dict):
        model(**data, mode="loss")
    else:
        model(*data, mode="loss")


class _SharedDataset(torch.utils.data.Dataset):
    """The training dataset itself, where mmengine would deep-copy it into a second DataLoader.

    Samplers reach the dataset's own methods (``get_data_info``, ``metainfo``...) through it.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __deepcopy__(self, memo):
        return self

    def __getattr__(self, name):
        if name.startswith("__") or "dataset" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.__dict__["dataset"], name)


@HOOKS.register_module()
class SNBatchStatsHook(Hook):
    """Batch-average statistics for SN layers, whenever the model is evaluated or saved.

    The paper evaluates SN with batch-average statistics rather than moving
    averages (Sec. 2.1): with the weights frozen, the network runs in training
    mode over ``num_batches`` training batches and each SN layer's running
    mean/variance becomes their average (:func:`sn_plugin.recompute_batch_stats`).
    Build the layers with ``norm_cfg=dict(type='SN', using_moving_average=False)``
    so training does not spend time on moving averages. This hook recomputes:

    * before a checkpoint is saved (after the training iteration or epoch at
      which a ``CheckpointHook`` saves; the Runner saves before validating), so
      every checkpoint carries statistics that match its weights;
    * before validation and before testing, unless nothing changed since the
      last estimate;
    * at the end of training.

    The batches come from a separate DataLoader over the training dataset,
    built from ``train_dataloader``'s config with the same sampler and
    transforms, so the training loop's iterator is not disturbed. Layers the
    model keeps in eval mode while training (``frozen_stages``,
    ``norm_eval=True``) keep their statistics. Under distributed training every
    process uses its own batches and the sums are all-reduced, so all
    processes end with the same statistics. In a test-only run without a
    training loop the hook checks that the loaded checkpoint has the statistics.

    Args:
        num_batches: training batches per estimate (the paper notes that a
            small number suffices).
        include_batchnorm: also recompute the statistics of BatchNorm layers
            that train ("precise BN"); off by default, as in detectron2's
            ``SNBatchStatsHook`` (see ``sn_plugin.integrations.common``).
            Frozen BatchNorm (``norm_eval=True``, ``requires_grad=False``
            backbones in eval mode) is never changed.
        before_test: estimate before testing (off: use the checkpoint's).
    """

    priority = "ABOVE_NORMAL"  # before CheckpointHook, EMAHook and the evaluation

    def __init__(self, num_batches: int = DEFAULT_NUM_BATCHES, include_batchnorm: bool = DEFAULT_INCLUDE_BATCHNORM,
                 before_test: bool = True) -> None:
        if num_batches <= 0:
            raise ValueError(f"SNBatchStatsHook: num_batches must be positive, got {num_batches}")
        self.num_batches = num_batches
        self.include_batchnorm = include_batchnorm
        self.estimate_before_test = before_test
        self._stale = True

    # -- when -----------------------------------------------------------------
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        self._stale = True
        if any(not hook.by_epoch and (hook.every_n_train_iters(runner, hook.interval, hook.save_begin)
                                      or (hook.save_last and hook.is_last_train_iter(runner)))
               for hook in self._checkpoint_hooks(runner)):
            self._estimate(runner, "before saving a checkpoint")

    def after_train_epoch(self, runner) -> None:
        if self._stale and any(hook.by_epoch and (hook.every_n_epochs(runner, hook.interval, hook.save_begin)
                                                  or (hook.save_last and hook.is_last_train_epoch(runner)))
                               for hook in self._checkpoint_hooks(runner)):
            self._estimate(runner, "before saving a checkpoint")

    def before_val(self, runner) -> None:
        if self._stale:
            self._estimate(runner, "before validation")

    def before_test(self, runner) -> None:
        if self.estimate_before_test and self._stale:
            self._estimate(runner, "before testing")
        else:
            self._require_statistics(runner, "before testing")

    def after_train(self, runner) -> None:
        if self._stale:
            self._estimate(runner, "at the end of training")

    # -- how ------------------------------------------------------------------
    @staticmethod
    def _checkpoint_hooks(runner) -> List[CheckpointHook]:
        return [hook for hook in runner.hooks if isinstance(hook, CheckpointHook) and hook.interval > 0]

    def _estimate(self, runner, when: str) -> None:
        loader = self._training_batches(runner)
        if loader is None:
            self._require_statistics(runner, when)
            return
        estimate_batch_statistics(_unwrap(runner.model), loader, self.num_batches, self.include_batchnorm,
                                  runner.logger, type(self).__name__, when, forward=training_forward)
        self._stale = False

    @staticmethod
    def _training_batches(runner) -> Optional[torch.utils.data.DataLoader]:
        """A new DataLoader over the training set, independent of the training loop's iterator.

        Built anew for every estimate (only its sampler is new; the dataset is
        shared), seeded by the iteration so estimates use different batches while
        all processes agree. None when the runner has no training data.
        """
        loader_cfg = runner.cfg.get("train_dataloader")
        if loader_cfg is None or runner.train_loop is None:
            return None
        train_loader = runner.train_dataloader
        if not isinstance(loader_cfg, dict):
            return train_loader
        loader_cfg = copy.deepcopy({key: value for key, value in loader_cfg.items() if key != "dataset"})
        loader_cfg.update(dataset=_SharedDataset(train_loader.dataset), persistent_workers=False)
        return runner.build_dataloader(loader_cfg, seed=runner.seed + runner.iter)

    @staticmethod
    def _require_statistics(runner, when: str) -> None:
        missing = missing_batch_statistics(_unwrap(runner.model))
        if missing:
            raise RuntimeError(
                f"SNBatchStatsHook: {describe_missing(missing)}, and the runner has no training data to "
                f"estimate them {when}. Load a checkpoint saved by a run with SNBatchStatsHook, or configure "
                f"train_dataloader and train_cfg so the hook can estimate them.")


@HOOKS.register_module()
class SNWeightLoggerHook(Hook):
    """Logs the SN importance weights, averaged per stage, as scalars to the visualizer.

    After every ``interval``-th training iteration and after the last one, the
    scalars of :func:`sn_plugin.importance_summary` (keys
    ``{prefix}/{stage}/{mean|var}_{IN|LN|BN}``) go to
    ``runner.visualizer.add_scalars``, i.e. to every configured backend
    (``TensorboardVisBackend`` shows them as curves, ``LocalVisBackend``
    writes them to ``vis_data/scalars.json``). They bypass the text log,
    which they would flood.
    """

    priority = "BELOW_NORMAL"

    def __init__(self, interval: int = 50, prefix: str = "sn_weights") -> None:
        if interval <= 0:
            raise ValueError(f"SNWeightLoggerHook: interval must be positive, got {interval}")
        self.interval = interval
        self.prefix = prefix
        self._warned = False

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        done = runner.iter + 1
        if not is_due(done, self.interval, runner.max_iters):
            return
        scalars = importance_summary(_unwrap(runner.model), prefix=self.prefix)
        if scalars:
            runner.visualizer.add_scalars(scalars, step=done)
        elif not self._warned:
            runner.logger.warning("SNWeightLoggerHook: the model has no SN layers; nothing to log.")
            self._warned = True
