"""Switchable Normalization in detectron2: ``NORM: "SN"`` in YAML and LazyConfig.

Importing this package calls :func:`register`, which makes detectron2 treat SN
as one of its own normalizations:

* ``"SN"`` and ``"SyncSN"`` become valid wherever detectron2 takes a norm name
  (``MODEL.RESNETS.NORM``, ``MODEL.FPN.NORM``, ``MODEL.ROI_BOX_HEAD.NORM``,
  ``MODEL.ROI_MASK_HEAD.NORM``, ``norm=`` of LazyConfig models). LazyConfig
  users may also pass the class (``norm=SwitchNorm2d``) or any callable taking
  the channel count; detectron2 accepts those without registration.
* ``MODEL.BACKBONE.FREEZE_AT`` freezes SN like BN: the frozen stages' SN layers
  become :class:`sn_plugin.FrozenSwitchNorm` (fixed parameters, fixed statistics).

Both need patches of detectron2 0.6 internals, limited to detectron2's own
modules and undone by :func:`unregister` (:mod:`.registration`; the list is in
docs/architecture.md). The rest changes nothing of detectron2:

* :mod:`.config`: the config keys (:func:`add_sn_config`, :func:`get_sn_cfg`), LazyConfig's
  SN norm (:func:`sn_norm`), and sn_plugin's configs by name (``get_sn_cfg(name)``,
  :func:`get_sn_lazy_config`, :func:`get_sn_config_file`);
* :mod:`.solver`: ``SOLVER.WEIGHT_DECAY_NORM`` for SN's gamma/beta and
  importance logits (:func:`get_default_optimizer_params`, :func:`build_optimizer`);
* :mod:`.hooks`: :class:`SNBatchStatsHook` (batch-average statistics before
  evaluation, the paper's inference method) and :class:`SNWeightLoggerHook`
  (importance weights into detectron2's metrics), named as in the OpenMMLab adapter;
* :mod:`.family`: the normalization family: ``NORM: "CN"`` (Consistent
  Normalization, ``MODEL.CN``), the backbones ``build_xbn_resnet_backbone`` /
  ``build_xbn_resnet_fpn_backbone`` (XBNBlock, ``MODEL.XBN``) and
  :class:`EstimationShiftHook` (``TEST.ESM``);
* :mod:`.trainer`: :class:`SNTrainer`, a ``DefaultTrainer`` with all of it;
* :mod:`.train_net`: the training command (``tools/train_net_d2.py``);
  :mod:`.lazy_train_net`, the LazyConfig one (``tools/lazyconfig_train_net_d2.py``).
"""
import warnings

from ...switchable_norm import FrozenSwitchNorm
from .config import (
    SNCfgNode, add_sn_config, get_sn_cfg, get_sn_config_file, get_sn_lazy_config, layer_options_from_cfg, sn_norm,
)
from .family import (
    EstimationShiftHook, build_xbn_resnet_backbone, build_xbn_resnet_fpn_backbone, cn_layer_options,
)
from .hooks import SNBatchStatsHook, SNWeightLoggerHook
from .registration import (
    LAYER_OPTIONS, NORM_TYPES, PATCHES, get_norm, is_registered, register, sn_layer_options, unregister,
)
from .solver import build_optimizer, get_default_optimizer_params
from .trainer import SNTrainer

__all__ = [
    "EstimationShiftHook", "build_xbn_resnet_backbone", "build_xbn_resnet_fpn_backbone", "cn_layer_options",
    "LAYER_OPTIONS", "NORM_TYPES", "PATCHES", "FrozenSwitchNorm", "SNBatchStatsHook", "SNCfgNode", "SNTrainer",
    "SNWeightLoggerHook", "add_sn_config", "build_optimizer", "get_default_optimizer_params", "get_norm",
    "get_sn_cfg", "get_sn_config_file", "get_sn_lazy_config", "is_registered", "layer_options_from_cfg", "register",
    "sn_layer_options", "sn_norm", "unregister",
]

register()

# Names of earlier versions, still importable with a DeprecationWarning.
_DEPRECATED = {
    "SNBatchStats": ("SNBatchStatsHook", lambda: SNBatchStatsHook),
    "SNImportanceWriter": ("SNWeightLoggerHook", lambda: SNWeightLoggerHook),
    "freeze_switch_norm": ("sn_plugin.FrozenSwitchNorm.convert_frozen_switch_norm",
                           lambda: FrozenSwitchNorm.convert_frozen_switch_norm),
}


def __getattr__(name: str):
    if name in _DEPRECATED:
        new_name, value = _DEPRECATED[name]
        warnings.warn(f"sn_plugin.integrations.detectron2.{name} is deprecated; use {new_name}.",
                      DeprecationWarning, stacklevel=2)
        return value()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
