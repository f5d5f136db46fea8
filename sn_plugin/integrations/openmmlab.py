"""Switchable Normalization in MMDetection, MMSegmentation, MMAction2 and MMPretrain.

Importing this module (every SN config does, through
``custom_imports = dict(imports=['sn_plugin.integrations.openmmlab'], allow_failed_imports=False)``)
makes SN behave in OpenMMLab configs the way BatchNorm does:

* norm types ``SN`` (= ``SN2d``), ``SN1d``, ``SN2d``, ``SN3d`` and ``SyncSN`` in
  mmengine's root ``MODELS`` registry, which every toolkit's registry falls back
  to, so ``norm_cfg=dict(type='SN')`` works in all of them. mmcv's
  ``build_norm_layer`` names the layers ``sn1``, ``sn2``... (the ``_abbr_`` of
  the classes below; see docs/architecture.md for why ``sn``);
* ``norm_eval=True`` puts SN layers in eval mode, as the toolkits' backbones do
  for BatchNorm (:func:`_extend_norm_eval_to_switch_norm`);
* ``SNOptimWrapperConstructor``: ``paramwise_cfg=dict(norm_decay_mult=...)``
  covers SN's gamma, beta and importance logits;
* hooks: ``SNBatchStatsHook`` (the paper's batch-average statistics whenever
  the model is evaluated or saved) and ``SNWeightLoggerHook`` (importance
  weights per stage as scalars for the visualizer, e.g. TensorBoard);
* ``mmaction.models`` imports with the broken mmaction2 1.2.0 PyPI package
  (:mod:`sn_plugin.integrations.mmaction_compat`).

What needs no code here, and is tested: ``frozen_stages`` (the backbones put
frozen stages in eval mode and stop their gradients, SN included), default
init (gamma 1, beta 0, logits 1; the toolkits' ``Constant`` init of
``_BatchNorm`` layers leaves SN alone) and ``zero_init_residual`` (a
``Constant`` init of ``norm3``/``norm2`` by name), and the Runner's ``sync_bn``
and ``revert_sync_batchnorm``, which only touch BatchNorm classes and so leave
SN as it is. To synchronise SN across GPUs, use ``type='SyncSN'`` or
:func:`sn_plugin.convert_sync_sn`.
"""
import copy
import functools
import logging
from typing import Dict, List, Optional

import torch
from mmengine.hooks import CheckpointHook, Hook
from mmengine.logging import print_log
from mmengine.model import BaseModule, is_model_wrapper
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import HOOKS, MODELS, OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from .. import switchable_norm as core
from ..batch_stats import recompute_batch_stats
from ..introspection import importance_summary, switch_norm_layers
from ..switchable_norm import SwitchNormBase
from .mmaction_compat import install_drn_placeholder

__all__ = [
    "SNBatchStatsHook", "SNOptimWrapperConstructor", "SNWeightLoggerHook",
    "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SyncSwitchNorm",
]

ABBREVIATION = "sn"


def _named_for_mmcv(cls: type) -> type:
    """``cls`` with mmcv's layer-name abbreviation ``sn``; the same layer otherwise."""
    return type(cls.__name__, (cls,), {
        "_abbr_": ABBREVIATION,
        "__module__": __name__,
        "__doc__": f"{cls.__doc__}\n\n    As built from OpenMMLab configs: mmcv names it ``{ABBREVIATION}<postfix>``.",
    })


SwitchNorm1d = _named_for_mmcv(core.SwitchNorm1d)
SwitchNorm2d = _named_for_mmcv(core.SwitchNorm2d)
SwitchNorm3d = _named_for_mmcv(core.SwitchNorm3d)
SyncSwitchNorm = _named_for_mmcv(core.SyncSwitchNorm)

NORM_TYPES: Dict[str, type] = {
    "SN": SwitchNorm2d,
    "SN1d": SwitchNorm1d,
    "SN2d": SwitchNorm2d,
    "SN3d": SwitchNorm3d,
    "SyncSN": SyncSwitchNorm,
}


def _register_norm_types() -> None:
    for name, cls in NORM_TYPES.items():
        registered = MODELS.module_dict.get(name)
        if registered is None:
            MODELS.register_module(name, module=cls)
        elif registered is not cls:
            raise KeyError(
                f"mmengine's MODELS registry already holds a different '{name}' ({registered.__module__}."
                f"{registered.__qualname__}); sn_plugin cannot register Switchable Normalization under that "
                f"name. Remove the other registration from your custom_imports.")


def _extend_norm_eval_to_switch_norm() -> None:
    """Make ``norm_eval=True`` put SN layers in eval mode too.

    The toolkits' backbones (ResNet, ResNet3d, HRNet, ...) implement
    ``norm_eval`` in their ``train()`` by calling ``eval()`` on every
    ``_BatchNorm`` after ``super().train(mode)``; SN is not a ``_BatchNorm``.
    Every such ``super().train`` reaches ``mmengine.model.BaseModule.train``,
    so wrapping that one method covers them all: after the usual
    ``train(mode)``, a module whose own ``norm_eval`` is True puts the SN
    layers below it in eval mode. Modules without ``norm_eval`` (or with it
    False) are unaffected.
    """
    original = BaseModule.train
    if getattr(original, "_covers_switch_norm", False):
        return

    @functools.wraps(original)
    def train(self, mode: bool = True):
        result = original(self, mode)
        if mode and getattr(self, "norm_eval", False) is True:
            for module in self.modules():
                if isinstance(module, SwitchNormBase):
                    module.eval()
        return result

    train._covers_switch_norm = True
    BaseModule.train = train


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class SNOptimWrapperConstructor(DefaultOptimWrapperConstructor):
    """mmengine's default constructor, counting SN layers as normalization layers.

    The default constructor applies ``paramwise_cfg``'s ``norm_decay_mult`` (and
    exempts norm biases from ``bias_lr_mult``) only for BatchNorm, InstanceNorm,
    GroupNorm and LayerNorm. Here the same rules also cover every parameter of
    an SN layer: gamma (``weight``), beta (``bias``) and the importance logits
    (``mean_weight``, ``var_weight``). The one config line::

        optim_wrapper = dict(constructor='SNOptimWrapperConstructor', paramwise_cfg=dict(norm_decay_mult=0.))

    gives SN (and every other norm layer) no weight decay, the paper's
    detection setting. ``custom_keys`` still take precedence, e.g.
    ``custom_keys={'.mean_weight': dict(decay_mult=1.), '.var_weight': dict(decay_mult=1.)}``
    keeps decay on the logits only.
    """

    def add_params(self, params: List[dict], module: nn.Module, prefix: str = "",
                   is_dcn_module=None) -> None:
        first = len(params)
        super().add_params(params, module, prefix, is_dcn_module)
        if isinstance(module, SwitchNormBase):
            self._apply_norm_rules(params[first:], module, prefix)

    def _apply_norm_rules(self, groups: List[dict], layer: nn.Module, prefix: str) -> None:
        """Redo what the default constructor does differently for a norm layer's own parameters."""
        names = {id(p): name for name, p in layer.named_parameters(recurse=False)}
        custom_keys = self.paramwise_cfg.get("custom_keys", {})
        norm_decay_mult = self.paramwise_cfg.get("norm_decay_mult", None)
        for group in groups:
            name = names[id(group["params"][0])]
            full_name = f"{prefix}.{name}" if prefix else name
            if any(key in full_name for key in custom_keys):
                continue
            if name == "bias":
                group.pop("lr", None)  # bias_lr_mult does not apply to a norm layer's bias
            if self.base_wd is not None and norm_decay_mult is not None:
                group["weight_decay"] = self.base_wd * norm_decay_mult
            print_log(f"paramwise_options -- {full_name} (SN): "
                      f"lr={group.get('lr', self.base_lr)}, weight_decay={group.get('weight_decay', self.base_wd)}",
                      logger="current", level=logging.DEBUG)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if is_model_wrapper(model) else model


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


def _missing_batch_statistics(model: nn.Module) -> List[str]:
    """SN layers that evaluate with batch-average statistics that were never estimated."""
    return [name for name, m in switch_norm_layers(model).items()
            if m.running_mean is not None and not m.using_moving_average and int(m.num_batches_tracked) == 0]


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
            that train ("precise BN"). Frozen BatchNorm (``norm_eval=True``,
            ``requires_grad=False`` backbones in eval mode) is never changed.
        before_test: estimate before testing (off: use the checkpoint's).
    """

    priority = "ABOVE_NORMAL"  # before CheckpointHook, EMAHook and the evaluation

    def __init__(self, num_batches: int = 200, include_batchnorm: bool = False, before_test: bool = True) -> None:
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
        model = _unwrap(runner.model)
        loader = self._training_batches(runner)
        if loader is None:
            self._require_statistics(runner, when)
            return
        runner.logger.info(f"SNBatchStatsHook: batch-average statistics from {self.num_batches} "
                           f"training batches {when}.")
        recompute_batch_stats(model, loader, num_batches=self.num_batches, forward=training_forward,
                              include_batchnorm=self.include_batchnorm, progress=True, logger=runner.logger)
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
        missing = _missing_batch_statistics(_unwrap(runner.model))
        if missing:
            raise RuntimeError(
                f"SNBatchStatsHook: {len(missing)} SN layers (e.g. {missing[0]}) have using_moving_average=False "
                f"and no batch-average statistics, and the runner has no training data to estimate them {when}. "
                f"Load a checkpoint saved by a run with SNBatchStatsHook, or configure train_dataloader "
                f"and train_cfg so the hook can estimate them.")


@HOOKS.register_module()
class SNWeightLoggerHook(Hook):
    """Logs the SN importance weights, averaged per stage, as scalars to the visualizer.

    Every ``interval`` training iterations and at the end of training, the
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
        if self.every_n_train_iters(runner, self.interval):
            self._log(runner, step=runner.iter + 1)

    def after_train(self, runner) -> None:
        self._log(runner, step=runner.iter)

    def _log(self, runner, step: int) -> None:
        scalars = importance_summary(_unwrap(runner.model), prefix=self.prefix)
        if not scalars:
            if not self._warned:
                runner.logger.warning("SNWeightLoggerHook: the model has no SN layers; nothing to log.")
                self._warned = True
            return
        runner.visualizer.add_scalars(scalars, step=step)


_register_norm_types()
_extend_norm_eval_to_switch_norm()
install_drn_placeholder()
