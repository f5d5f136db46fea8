"""SN's detectron2 configs: the YAML keys, LazyConfig's SN norm, and sn_plugin's configs by name.

* :func:`add_sn_config` / :func:`get_sn_cfg`: the ``MODEL.SN`` and ``TEST.SN_BATCH_STATS``
  keys, and :class:`SNCfgNode`, a ``CfgNode`` that finds ``_BASE_`` files in detectron2's
  model zoo;
* :func:`sn_norm`: what ``MODEL.SN`` is in a LazyConfig, the ``norm`` of SN layers with options;
* :func:`get_sn_config_file`, ``get_sn_cfg(name)``, :func:`get_sn_lazy_config`: the configs
  under ``configs/detectron2`` by name, like ``detectron2.model_zoo.get_config_file`` /
  ``get_config``, from a wheel install as from a checkout
  (:mod:`sn_plugin.integrations.config_files` finds them).
"""
import functools
import inspect
import os
from typing import Any, Callable, Dict, Optional

from detectron2 import model_zoo
from detectron2.config import CfgNode, LazyConfig, get_cfg
from detectron2.utils.file_io import PathManager
from omegaconf import DictConfig
from torch import nn

from ...switchable_norm import SwitchNormBase
from .. import config_files
from ..common import DEFAULT_INCLUDE_BATCHNORM, DEFAULT_NUM_BATCHES
from .family import FAMILY_CONFIG_KEYS
from .hooks import DEFAULT_LOG_PERIOD
from .registration import LAYER_OPTIONS, NORM_TYPES

# sn_plugin's detectron2 configs are configs/detectron2/<name>.
_FOLDER = "detectron2"
_YAML_SUFFIXES = (".yaml", ".yml")


def _layer_option_keys() -> Dict[str, Any]:
    """``MODEL.SN`` key -> default, for every option in ``LAYER_OPTIONS``, from the layers' signature."""
    parameters = inspect.signature(SwitchNormBase.__init__).parameters
    return {name.upper(): parameters[name].default for name in LAYER_OPTIONS}


def add_sn_config(cfg: CfgNode) -> CfgNode:
    """Add the SN keys that ``cfg`` lacks (in place; returns it). It only adds keys.

    * ``MODEL.SN.<OPTION>`` for every SN layer option (``EPS``, ``MOMENTUM``,
      ``AFFINE``, ``TRACK_RUNNING_STATS``, ``USING_BN``, ``USING_MOVING_AVERAGE``,
      ``LAST_GAMMA``, ``UNBIASED_INSTANCE_VAR``; the layers' own defaults): the
      arguments of the layers ``"SN"``/``"SyncSN"`` build.
    * ``MODEL.SN.IMPORTANCE_LOG_PERIOD``: write the importance weights to the
      EventStorage every that many iterations and after the last one (0: never).
    * ``TEST.SN_BATCH_STATS.{ENABLED, NUM_ITER, INCLUDE_BN}``: re-estimate the
      batch-average statistics before every evaluation and at the end of
      training (like ``TEST.PRECISE_BN``), from NUM_ITER training batches per
      process, also for BatchNorm layers that train when INCLUDE_BN.
    * The normalization family's ``MODEL.CN``, ``MODEL.XBN`` and ``TEST.ESM``
      (:data:`~sn_plugin.integrations.detectron2.family.FAMILY_CONFIG_KEYS`).
    """
    node = type(cfg)  # new nodes of the config's own class, or merging a file into them fails
    keys = {
        ("MODEL", "SN"): {**_layer_option_keys(), "IMPORTANCE_LOG_PERIOD": DEFAULT_LOG_PERIOD},
        ("TEST", "SN_BATCH_STATS"): {"ENABLED": False, "NUM_ITER": DEFAULT_NUM_BATCHES,
                                     "INCLUDE_BN": DEFAULT_INCLUDE_BATCHNORM},
        **FAMILY_CONFIG_KEYS,
    }
    was_frozen = cfg.is_frozen()
    cfg.defrost()
    for (parent, name), defaults in keys.items():
        if name not in cfg[parent]:
            cfg[parent][name] = node()
        for key, value in defaults.items():
            if key not in cfg[parent][name]:
                cfg[parent][name][key] = value
    if was_frozen:
        cfg.freeze()
    return cfg


def layer_options_from_cfg(cfg: CfgNode) -> Dict[str, Any]:
    """The ``MODEL.SN`` keys as :func:`~sn_plugin.integrations.detectron2.sn_layer_options` arguments."""
    return {name: cfg.MODEL.SN[name.upper()] for name in LAYER_OPTIONS}


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


def sn_norm(norm: str = "SN", **options) -> Callable[[int], nn.Module]:
    """The ``norm`` argument of detectron2's layers for SN layers with ``options``: LazyConfig's ``MODEL.SN``.

    A LazyConfig model takes ``norm="SN"`` (the layers' defaults) or, for SN layers
    with options, ``L(sn_norm)(using_moving_average=False)``: it instantiates to a
    function of the channel count, which detectron2's layers call as they call
    ``get_norm``, and it stays a plain config entry (overridable, saved to YAML).
    ``norm`` is ``"SN"`` or ``"SyncSN"``; ``options`` are the layer's constructor
    arguments (:class:`sn_plugin.SwitchNormBase`), checked here.
    """
    if norm not in NORM_TYPES:
        raise ValueError(f"sn_norm: unknown norm {norm!r}; sn_plugin's detectron2 norms are {sorted(NORM_TYPES)}")
    layer = NORM_TYPES[norm]
    inspect.signature(layer).bind(1, **options)  # a misspelt option fails now, naming it, not at model build
    return functools.partial(layer, **options)


def get_sn_config_file(name: str) -> str:
    """The path of sn_plugin's detectron2 config ``name`` (relative to ``configs/detectron2``).

    ``name`` is e.g. ``"COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.yaml"`` or its
    LazyConfig ``"COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.py"``. It works from a
    wheel install as from a checkout and whatever the current directory; a name
    sn_plugin does not ship raises ``FileNotFoundError`` listing the ones it ships.
    """
    prefix = _FOLDER + "/"
    config_files.config_root()  # not installed: its own error, which says how to install
    try:
        return config_files.config_file(prefix + name)
    except FileNotFoundError:
        shipped = [shipped[len(prefix):] for shipped in config_files.list_configs(_FOLDER)]
        raise FileNotFoundError(f"sn_plugin ships no detectron2 config {name!r}; it ships: {', '.join(shipped)} "
                                f"(in {config_files.config_root() / _FOLDER})") from None


def get_sn_cfg(name: Optional[str] = None) -> SNCfgNode:
    """``detectron2.config.get_cfg()`` with the SN keys, able to load ``configs/detectron2``.

    With ``name`` (e.g. ``"COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.yaml"``), the
    config sn_plugin ships under that name (:func:`get_sn_config_file`) merged into it.
    """
    cfg = add_sn_config(SNCfgNode(get_cfg()))
    if name is not None:
        if not name.endswith(_YAML_SUFFIXES):
            raise ValueError(f"get_sn_cfg loads YAML configs; {name!r} is not one (LazyConfig files load with "
                             f"get_sn_lazy_config)")
        cfg.merge_from_file(get_sn_config_file(name))
    return cfg


def get_sn_lazy_config(name: str) -> DictConfig:
    """The LazyConfig sn_plugin ships as ``name`` (e.g. ``"COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.py"``),
    loaded by ``detectron2.config.LazyConfig.load``: its ``model``, ``dataloader``, ``optimizer``,
    ``lr_multiplier`` and ``train`` (with the SN hooks)."""
    if not name.endswith(".py"):
        raise ValueError(f"get_sn_lazy_config loads LazyConfig .py files; {name!r} is not one (YAML configs load "
                         f"with get_sn_cfg)")
    return LazyConfig.load(get_sn_config_file(name))
