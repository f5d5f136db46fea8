"""Switchable Normalization in detectron2: ``NORM: "SN"`` in YAML and LazyConfig.

Importing this module calls :func:`register`, which makes detectron2 treat SN as
one of its own normalizations:

* ``"SN"`` and ``"SyncSN"`` become valid wherever detectron2 takes a norm name
  (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ``MODEL.ROI_BOX_HEAD.NORM``,
  ``MODEL.ROI_MASK_HEAD.NORM``, ``norm=`` of LazyConfig models). LazyConfig
  users may also pass the class (``norm=SwitchNorm2d``) or any callable taking
  the channel count; detectron2 accepts those without registration.
* ``MODEL.BACKBONE.FREEZE_AT`` freezes SN like BN: the frozen stages' SN layers
  become :class:`FrozenSwitchNorm` (fixed parameters, fixed statistics).
* ``SOLVER.WEIGHT_DECAY_NORM`` applies to SN's gamma/beta and importance logits.

Detectron2 v0.6 looks norm names up in a dict local to ``get_norm`` and
``get_default_optimizer_params`` lists its norm classes inline, so neither can
be extended in place. :func:`register` therefore replaces these two functions by
SN-aware wrappers (which hand everything else to detectron2's originals) in
every loaded module that holds them by name (``from detectron2.layers import
get_norm`` in resnet, fpn, box and mask heads, also in user code imported
earlier); modules imported later find the wrappers in ``detectron2.layers`` and
``detectron2.solver``. ``FrozenBatchNorm2d.convert_frozen_batchnorm``, which
``CNNBlockBase.freeze`` calls, is extended to convert SN too.
:func:`unregister` puts detectron2's originals back.

The rest is what a training run needs: the config keys (:func:`add_sn_config`,
:func:`get_sn_cfg`), the hooks :class:`SNBatchStats` (batch-average statistics
before evaluation, the paper's inference method) and :class:`SNImportanceWriter`
(importance weights into detectron2's metrics), and :class:`SNTrainer`, a
``DefaultTrainer`` with all of it, used by ``tools/train_net_d2.py``.
"""
import contextlib
import copy
import inspect
import logging
import os
import sys
import threading
import types
from typing import Any, Dict, Iterator, List, Optional

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import detectron2.layers.batch_norm as _d2_batch_norm
import detectron2.modeling  # noqa: F401  (loads the modules that hold get_norm, so register() sees them)
import detectron2.solver.build as _d2_solver_build
from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import FrozenBatchNorm2d
from detectron2.utils.events import EventStorage, get_event_storage
from detectron2.utils.file_io import PathManager

from ..batch_stats import recompute_batch_stats
from ..introspection import importance_summary, switch_norm_layers
from ..switchable_norm import SwitchNorm2d, SwitchNormBase, SyncSwitchNorm

__all__ = [
    "SN_NORM_NAMES", "FrozenSwitchNorm", "SNBatchStats", "SNCfgNode", "SNImportanceWriter", "SNTrainer",
    "add_sn_config", "freeze_switch_norm", "get_default_optimizer_params", "get_norm", "get_sn_cfg",
    "is_registered", "layer_options_from_cfg", "register", "sn_layer_options", "unregister",
]

_LOGGER = logging.getLogger(__name__)

# The norm names this module adds to detectron2's get_norm, and the layer each builds.
_NORM_LAYERS = {"SN": SwitchNorm2d, "SyncSN": SyncSwitchNorm}
SN_NORM_NAMES = tuple(_NORM_LAYERS)

# SwitchNorm constructor arguments a config may set for the layers "SN"/"SyncSN" build.
_LAYER_OPTION_NAMES = ("eps", "momentum", "using_bn", "using_moving_average", "last_gamma", "unbiased_instance_var")


def _detectron2_original(current):
    """Detectron2's own function, also when a previous import of this module replaced it (a reload)."""
    function = getattr(current, "__func__", current)  # a classmethod's function
    return getattr(function, "__detectron2_original__", current)


_ORIGINAL_GET_NORM = _detectron2_original(_d2_batch_norm.get_norm)
_ORIGINAL_OPTIMIZER_PARAMS = _detectron2_original(_d2_solver_build.get_default_optimizer_params)
_ORIGINAL_CONVERT_FROZEN = _detectron2_original(FrozenBatchNorm2d.__dict__["convert_frozen_batchnorm"])

_state = threading.local()
_registry_lock = threading.Lock()
_registered = False


# ---------------------------------------------------------------------------- norm names

def _layer_options() -> Dict[str, Any]:
    return getattr(_state, "layer_options", {})


@contextlib.contextmanager
def sn_layer_options(**options) -> Iterator[None]:
    """Constructor arguments for the SN layers that ``"SN"``/``"SyncSN"`` build inside the block.

    Detectron2's ``get_norm(name, channels)`` has no room for layer options, so
    the config's ``MODEL.SN.*`` reach the layers this way
    (``SNTrainer.build_model`` does it)::

        with sn_layer_options(using_moving_average=False):
            model = build_model(cfg)

    Accepted: ``eps``, ``momentum``, ``using_bn``, ``using_moving_average``,
    ``last_gamma`` (see :class:`sn_plugin.SwitchNormBase`). Per thread; nests.
    """
    unknown = sorted(set(options) - set(_LAYER_OPTION_NAMES))
    if unknown:
        raise TypeError(f"sn_layer_options: unknown SN layer option(s) {unknown}; accepted: {list(_LAYER_OPTION_NAMES)}")
    previous = _layer_options()
    _state.layer_options = {**previous, **options}
    try:
        yield
    finally:
        _state.layer_options = previous


def get_norm(norm, out_channels: int) -> Optional[nn.Module]:
    """Detectron2's ``get_norm`` that also knows ``"SN"`` and ``"SyncSN"``.

    Every other name or callable goes to detectron2's own ``get_norm``, so
    unknown names fail with detectron2's own error.
    """
    if isinstance(norm, str) and norm in _NORM_LAYERS:
        if not _registered:
            raise KeyError(
                f"Norm {norm!r} is sn_plugin's Switchable Normalization, which is not registered with "
                f"detectron2 in this process. Call sn_plugin.integrations.detectron2.register() (importing "
                f"sn_plugin.integrations.detectron2 does it) before building the model, or pass the class "
                f"itself (norm=sn_plugin.SwitchNorm2d)."
            )
        return _NORM_LAYERS[norm](out_channels, **_layer_options())
    return _ORIGINAL_GET_NORM(norm, out_channels)


# ---------------------------------------------------------------------------- FREEZE_AT

class FrozenSwitchNorm(SwitchNormBase):
    """SN whose parameters and statistics are fixed: what ``FrozenBatchNorm2d`` is to BN.

    Stays in eval mode whatever ``train()`` is called with, so its BN branch
    always uses the running statistics and never updates them (also during
    :func:`sn_plugin.recompute_batch_stats`, which leaves it as it is); its
    parameters have ``requires_grad=False``. Its state-dict keys are those of
    SN, so checkpoints load the same into frozen and trainable stages.

    Like ``FrozenBatchNorm2d`` it uses whatever statistics it holds or a
    checkpoint gives it; the "batch average not estimated yet" check of SN
    built with ``using_moving_average=False`` does not apply, because frozen
    statistics are never estimated.
    """

    _expected_dims = (2, 3, 4, 5)
    _expected_shape = "(N, C, *)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, using_bn: bool = True,
                 last_gamma: bool = False, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, using_bn,
                         using_moving_average=True, last_gamma=last_gamma, device=device, dtype=dtype)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "FrozenSwitchNorm":
        return super().train(False)

    @classmethod
    def from_switch_norm(cls, module: SwitchNormBase) -> "FrozenSwitchNorm":
        """A frozen copy of an SN layer (the layer itself is not modified)."""
        frozen = cls(module.num_features, module.eps, module.momentum, module.affine,
                     module.track_running_stats, module.using_bn, module.last_gamma,
                     device=module.mean_weight.device, dtype=module.mean_weight.dtype)
        frozen.load_state_dict(module.state_dict())
        return frozen


def freeze_switch_norm(module: nn.Module) -> nn.Module:
    """Replace every SN layer in ``module`` by a :class:`FrozenSwitchNorm`.

    Like ``FrozenBatchNorm2d.convert_frozen_batchnorm``: returns a new module if
    ``module`` itself is an SN layer, otherwise converts its children in place
    and returns it.
    """
    if isinstance(module, SwitchNormBase) and not isinstance(module, FrozenSwitchNorm):
        return FrozenSwitchNorm.from_switch_norm(module)
    for name, child in module.named_children():
        frozen = freeze_switch_norm(child)
        if frozen is not child:
            module.add_module(name, frozen)
    return module


def _convert_frozen_batchnorm(cls, module: nn.Module) -> nn.Module:
    """``FrozenBatchNorm2d.convert_frozen_batchnorm``, also freezing SN layers."""
    return _ORIGINAL_CONVERT_FROZEN.__get__(None, cls)(freeze_switch_norm(module))


# ---------------------------------------------------------------------------- weight decay

def get_default_optimizer_params(model: nn.Module, *args, **kwargs) -> List[Dict[str, Any]]:
    """Detectron2's ``get_default_optimizer_params``, counting SN layers as norm layers.

    Takes the same arguments. ``weight_decay_norm`` then also applies to SN's
    ``weight``, ``bias``, ``mean_weight`` and ``var_weight``; as for detectron2's
    norm layers, a per-name override with a weight decay (e.g.
    ``weight_decay_bias`` for ``bias``) takes precedence.
    """
    arguments = inspect.signature(_ORIGINAL_OPTIMIZER_PARAMS).bind(model, *args, **kwargs).arguments
    # Detectron2 adds its bias override to the ``overrides`` dict it is given; pass it a copy.
    overrides = copy.deepcopy(arguments.get("overrides")) or {}
    arguments["overrides"] = copy.deepcopy(overrides)
    groups = _ORIGINAL_OPTIMIZER_PARAMS(**arguments)
    weight_decay_norm = arguments.get("weight_decay_norm")
    if weight_decay_norm is None:
        return groups
    if arguments.get("weight_decay_bias") is not None:
        overrides.setdefault("bias", {})["weight_decay"] = arguments["weight_decay_bias"]
    norm_params = {
        param
        for layer in model.modules() if isinstance(layer, SwitchNormBase)
        for name, param in layer.named_parameters(recurse=False)
        if "weight_decay" not in overrides.get(name, {})
    }
    per_param = []
    for group in groups:
        for param in group["params"]:
            item = {**group, "params": [param]}
            if param in norm_params:
                item["weight_decay"] = weight_decay_norm
            per_param.append(item)
    return _d2_solver_build.reduce_param_groups(per_param)


# ---------------------------------------------------------------------------- registration

def _patches():
    """(detectron2's function, its SN-aware replacement) for every function :func:`register` rebinds."""
    return [
        (_ORIGINAL_GET_NORM, get_norm),
        (_ORIGINAL_OPTIMIZER_PARAMS, get_default_optimizer_params),
    ]


def _rebind(old, new) -> None:
    """Replace ``old`` by ``new`` wherever a loaded module holds it as a global name.

    Also replaces wrappers of ``old`` left by an earlier import of this module (a reload).
    """
    for module in list(sys.modules.values()):
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict) or module is sys.modules[__name__]:
            continue
        for name, value in list(namespace.items()):
            if value is new:
                continue
            if value is old or (isinstance(value, types.FunctionType)
                                and getattr(value, "__detectron2_original__", None) is old):
                setattr(module, name, new)


get_norm.__detectron2_original__ = _ORIGINAL_GET_NORM
get_default_optimizer_params.__detectron2_original__ = _ORIGINAL_OPTIMIZER_PARAMS
_convert_frozen_batchnorm.__detectron2_original__ = _ORIGINAL_CONVERT_FROZEN
_FROZEN_CONVERSION = classmethod(_convert_frozen_batchnorm)


def register() -> None:
    """Make detectron2 build and train SN (see the module docstring). Idempotent.

    Call it (or import this module) in every process before building a model:
    at the top level of a training script, so that the worker processes
    ``detectron2.engine.launch`` starts run it too. Calling it again also
    covers modules imported since that hold detectron2's originals.
    """
    global _registered
    with _registry_lock:
        for original, replacement in _patches():
            _rebind(original, replacement)
        FrozenBatchNorm2d.convert_frozen_batchnorm = _FROZEN_CONVERSION
        _registered = True


def unregister() -> None:
    """Undo :func:`register`: detectron2's own functions everywhere again.

    Models already built keep their SN layers.
    """
    global _registered
    with _registry_lock:
        for original, replacement in _patches():
            _rebind(replacement, original)
        FrozenBatchNorm2d.convert_frozen_batchnorm = _ORIGINAL_CONVERT_FROZEN
        _registered = False


def is_registered() -> bool:
    return _registered


# ---------------------------------------------------------------------------- config

def add_sn_config(cfg: CfgNode) -> CfgNode:
    """Add the SN keys to a detectron2 config (in place; returns it) and :func:`register`.

    * ``MODEL.SN.{EPS, MOMENTUM, USING_BN, USING_MOVING_AVERAGE, LAST_GAMMA, UNBIASED_INSTANCE_VAR}``:
      arguments of the layers ``"SN"``/``"SyncSN"`` build.
    * ``MODEL.SN.IMPORTANCE_LOG_PERIOD``: write the importance weights to the
      EventStorage every that many iterations (0: never).
    * ``TEST.SN_BATCH_STATS.{ENABLED, NUM_ITER, INCLUDE_BN}``: re-estimate the
      batch-average statistics before every evaluation and at the end of
      training (like ``TEST.PRECISE_BN``), from NUM_ITER training batches per
      process, also for BN layers when INCLUDE_BN.
    """
    register()
    node = type(cfg)  # new nodes of the config's own class, or merging a file into them fails
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    if "SN" not in cfg.MODEL:
        cfg.MODEL.SN = node()
        cfg.MODEL.SN.EPS = 1e-5
        cfg.MODEL.SN.MOMENTUM = 0.1
        cfg.MODEL.SN.USING_BN = True
        cfg.MODEL.SN.USING_MOVING_AVERAGE = True
        cfg.MODEL.SN.LAST_GAMMA = False
        cfg.MODEL.SN.UNBIASED_INSTANCE_VAR = False
        cfg.MODEL.SN.IMPORTANCE_LOG_PERIOD = 20
    if "SN_BATCH_STATS" not in cfg.TEST:
        cfg.TEST.SN_BATCH_STATS = node()
        cfg.TEST.SN_BATCH_STATS.ENABLED = False
        cfg.TEST.SN_BATCH_STATS.NUM_ITER = 200
        cfg.TEST.SN_BATCH_STATS.INCLUDE_BN = True
    if was_frozen:
        cfg.freeze()
    return cfg


def layer_options_from_cfg(cfg: CfgNode) -> Dict[str, Any]:
    """The ``MODEL.SN`` keys as :func:`sn_layer_options` arguments."""
    return {name: cfg.MODEL.SN[name.upper()] for name in _LAYER_OPTION_NAMES}


def _model_zoo_config(path: str) -> Optional[str]:
    """The model-zoo config at the longest trailing part of ``path``, if any."""
    parts = os.path.normpath(path).replace("\\", "/").split("/")
    for start in range(len(parts)):
        tail = parts[start:]
        if any(part in ("", ".", "..") for part in tail):  # the root of an absolute path, or outside the zoo
            continue
        try:
            return model_zoo.get_config_file("/".join(tail))
        except RuntimeError:
            continue
    return None


class SNCfgNode(CfgNode):
    """A detectron2 ``CfgNode`` whose ``_BASE_`` files may come from detectron2's model zoo.

    A ``_BASE_`` file that does not exist is looked up in the configs that
    detectron2 installs (``detectron2/model_zoo/configs``) at the longest
    trailing part of its path. So ``configs/detectron2/COCO-Detection/x.yaml``
    can say ``_BASE_: "../Base-RCNN-FPN.yaml"``, exactly as detectron2's own
    configs do, wherever detectron2 is installed; files that exist always win.
    """

    @classmethod
    def _open_cfg(cls, filename):
        if isinstance(filename, str) and not PathManager.exists(filename):
            fallback = _model_zoo_config(filename)
            if fallback is not None:
                return PathManager.open(fallback, "r")
        return super()._open_cfg(filename)


def get_sn_cfg() -> SNCfgNode:
    """``detectron2.config.get_cfg()`` with the SN keys, able to load ``configs/detectron2``."""
    return add_sn_config(SNCfgNode(get_cfg()))


# ---------------------------------------------------------------------------- hooks

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _has_batch_statistics(model: nn.Module, include_batchnorm: bool) -> bool:
    return any(
        (isinstance(m, SwitchNormBase) or (include_batchnorm and isinstance(m, _BatchNorm)))
        and m.running_mean is not None and not isinstance(m, FrozenSwitchNorm)
        for m in model.modules()
    )


def _training_forward(model: nn.Module, batch) -> None:
    """One training-mode forward of a detectron2 model; its losses are discarded."""
    model(batch)


class SNBatchStats(HookBase):
    """Re-estimates batch-average statistics before evaluation and at the end of training.

    The paper evaluates SN with the batch average of its BN branch's statistics
    (Sec. 2.1): :func:`sn_plugin.recompute_batch_stats` runs ``num_iter``
    training batches per process through the model and all-reduces the sums
    over the processes. It also re-estimates BatchNorm layers (precise BN)
    unless ``include_batchnorm`` is False; frozen layers are left as they are.
    Runs after every ``period``-th iteration (0: only at the end) and after the
    last one; put it before the checkpointer and the evaluation hook, as
    :class:`SNTrainer` does, so both see the new statistics.
    """

    def __init__(self, period: int, model: nn.Module, data_loader, num_iter: int,
                 include_batchnorm: bool = True) -> None:
        self._logger = _LOGGER
        self._period = period
        self._model = model
        self._data_loader = data_loader
        self._num_iter = num_iter
        self._include_batchnorm = include_batchnorm
        self._data_iter = None
        self._disabled = not _has_batch_statistics(model, include_batchnorm)
        if self._disabled:
            self._logger.info("SNBatchStats is disabled: the model has no trainable SN/BN layer with running statistics.")

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self._period > 0 and next_iter % self._period == 0):
            self.update_stats()

    def update_stats(self) -> None:
        """Re-estimate now (every process must call it)."""
        if self._disabled:
            return
        if self._data_iter is None:
            self._data_iter = iter(self._data_loader)
        # The training-mode forward needs an EventStorage; a fresh one discards its losses.
        with EventStorage():
            self._logger.info(f"Re-estimating SN/BN batch-average statistics from {self._num_iter} batches ...")
            recompute_batch_stats(self._model, self._data_iter, num_batches=self._num_iter,
                                  forward=_training_forward, include_batchnorm=self._include_batchnorm,
                                  logger=self._logger)


class SNImportanceWriter(HookBase):
    """Writes SN's importance weights to detectron2's EventStorage every ``period`` iterations.

    Scalars ``sn_weights/{stage}/{mean|var}_{IN|LN|BN}`` (averaged over the SN
    layers of each stage, see :func:`sn_plugin.importance_summary`), so they
    reach ``metrics.json`` and TensorBoard through detectron2's writers; put it
    before ``PeriodicWriter``. Also written after the last iteration.
    """

    def __init__(self, model: nn.Module, period: int = 20) -> None:
        self._model = model
        self._period = period

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if next_iter == self.trainer.max_iter or (self._period > 0 and next_iter % self._period == 0):
            scalars = importance_summary(_unwrap(self._model))
            if scalars:
                get_event_storage().put_scalars(smoothing_hint=False, **scalars)


# ---------------------------------------------------------------------------- trainer

def _compiled_ops_available() -> bool:
    """Whether ``detectron2._C`` is a compiled extension (not a placeholder)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return str(getattr(_C, "__file__", "")).endswith((".so", ".pyd"))


class SNTrainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with SN's config keys and hooks.

    * builds the model with the ``MODEL.SN`` layer options;
    * adds :class:`SNBatchStats` (``TEST.SN_BATCH_STATS``) where detectron2 puts
      PreciseBN, i.e. before checkpointing and evaluation, and
      :class:`SNImportanceWriter` (``MODEL.SN.IMPORTANCE_LOG_PERIOD``) before
      the writers;
    * evaluates COCO-format datasets with ``COCOEvaluator`` (its fast C++ mode
      only when detectron2's extension is compiled).

    The config must have the SN keys (:func:`get_sn_cfg` / :func:`add_sn_config`).
    """

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        with sn_layer_options(**layer_options_from_cfg(cfg)):
            return super().build_model(cfg)

    def build_hooks(self) -> List[HookBase]:
        ret = super().build_hooks()
        cfg = self.cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as detectron2 does for PreciseBN
        if cfg.TEST.SN_BATCH_STATS.ENABLED:
            if cfg.TEST.PRECISE_BN.ENABLED and cfg.TEST.SN_BATCH_STATS.INCLUDE_BN:
                _LOGGER.warning(
                    "TEST.PRECISE_BN and TEST.SN_BATCH_STATS (with INCLUDE_BN) both re-estimate BN statistics; "
                    "disable one of them.")
            batch_stats = SNBatchStats(cfg.TEST.EVAL_PERIOD, self.model, self.build_train_loader(cfg),
                                       cfg.TEST.SN_BATCH_STATS.NUM_ITER, cfg.TEST.SN_BATCH_STATS.INCLUDE_BN)
            ret.insert(_first_index(ret, (hooks.PeriodicCheckpointer, hooks.EvalHook)), batch_stats)
        if cfg.MODEL.SN.IMPORTANCE_LOG_PERIOD > 0:
            writer = SNImportanceWriter(self.model, cfg.MODEL.SN.IMPORTANCE_LOG_PERIOD)
            ret.insert(_first_index(ret, (hooks.PeriodicWriter,)), writer)
        return ret

    @classmethod
    def estimate_missing_batch_stats(cls, cfg: CfgNode, model: nn.Module) -> bool:
        """Estimate the batch-average statistics if a trainable SN layer has none yet.

        For ``--eval-only`` on a checkpoint that lacks them (one saved before the
        first estimate, or a converted classification model): with
        ``TEST.SN_BATCH_STATS.ENABLED`` they are estimated from the training
        set; otherwise nothing is done and SN's own error explains what is missing.
        Checkpoints saved when :class:`SNBatchStats` ran (every EVAL_PERIOD and
        the final one) already hold them and are used as they are. Returns
        whether it estimated.
        """
        missing = [
            name for name, layer in switch_norm_layers(_unwrap(model)).items()
            if not isinstance(layer, FrozenSwitchNorm) and not layer.using_moving_average
            and layer.running_mean is not None and int(layer.num_batches_tracked) == 0
        ]
        if not missing or not cfg.TEST.SN_BATCH_STATS.ENABLED:
            return False
        _LOGGER.warning(f"{len(missing)} SN layers (e.g. {missing[0]}) have no batch-average statistics; "
                        f"estimating them from {cfg.TEST.SN_BATCH_STATS.NUM_ITER} training batches.")
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0
        SNBatchStats(0, model, cls.build_train_loader(cfg), cfg.TEST.SN_BATCH_STATS.NUM_ITER,
                     cfg.TEST.SN_BATCH_STATS.INCLUDE_BN).update_stats()
        return True

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str, output_folder: Optional[str] = None):
        metadata = MetadataCatalog.get(dataset_name)
        if metadata.get("evaluator_type") != "coco" and not metadata.get("json_file"):
            raise NotImplementedError(
                f"SNTrainer evaluates COCO-format datasets (MetadataCatalog evaluator_type 'coco' or a json_file); "
                f"{dataset_name!r} has neither. Override build_evaluator for other datasets."
            )
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder, use_fast_impl=_compiled_ops_available())


def _first_index(hook_list: List[HookBase], types) -> int:
    """Index of the first hook of one of ``types`` (the end if none)."""
    return next((i for i, h in enumerate(hook_list) if isinstance(h, types)), len(hook_list))


register()
