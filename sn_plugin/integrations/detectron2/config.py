"""SN's detectron2 config keys, and a ``CfgNode`` that finds ``_BASE_`` files in detectron2's model zoo."""
import inspect
import os
from typing import Any, Dict, Optional

from detectron2 import model_zoo
from detectron2.config import CfgNode, get_cfg
from detectron2.utils.file_io import PathManager

from ...switchable_norm import SwitchNormBase
from ..common import DEFAULT_INCLUDE_BATCHNORM, DEFAULT_NUM_BATCHES
from .hooks import DEFAULT_LOG_PERIOD
from .registration import LAYER_OPTIONS


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
    """
    node = type(cfg)  # new nodes of the config's own class, or merging a file into them fails
    keys = {
        ("MODEL", "SN"): {**_layer_option_keys(), "IMPORTANCE_LOG_PERIOD": DEFAULT_LOG_PERIOD},
        ("TEST", "SN_BATCH_STATS"): {"ENABLED": False, "NUM_ITER": DEFAULT_NUM_BATCHES,
                                     "INCLUDE_BN": DEFAULT_INCLUDE_BATCHNORM},
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


def get_sn_cfg() -> SNCfgNode:
    """``detectron2.config.get_cfg()`` with the SN keys, able to load ``configs/detectron2``."""
    return add_sn_config(SNCfgNode(get_cfg()))
