"""The normalization family next to SN in detectron2: ``NORM: "CN"``, XBN ResNet backbones, the ESM hook.

* ``NORM: "CN"`` (wherever detectron2 takes a norm name, through the adapter's
  ``get_norm``): a :class:`~sn_plugin.ConsistentNorm2d` whose branches are
  ``MODEL.CN.NORM`` layers (BN by default), ``MODEL.CN.NUM_BRANCHES`` of them.
  Which branch runs is chosen with :func:`sn_plugin.consistent_branch` around the
  forward (branch 0 unless told otherwise); ``FREEZE_AT`` freezes every BN
  branch (detectron2's converter reaches the branches).
* ``MODEL.BACKBONE.NAME: "build_xbn_resnet_backbone"`` /
  ``"build_xbn_resnet_fpn_backbone"``: detectron2's ResNet (+FPN) with XBNBlocks
  (:func:`sn_plugin.convert_to_xbn`), set by ``MODEL.XBN.*``; the remaining norms
  are ``MODEL.RESNETS.NORM`` ("FrozenBN": frozen BNs with trainable BFNs, the
  paper's COCO fine-tuning; "BN"/"SyncBN" for training from scratch).
* :class:`EstimationShiftHook` (``TEST.ESM.*``): the estimation shift magnitude of
  every BN-like layer on the test set every ``PERIOD`` iterations.

Their config keys (:data:`FAMILY_CONFIG_KEYS`) come with SN's: ``add_sn_config`` / ``get_sn_cfg``.
"""
import contextlib
import inspect
import logging
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import nn

from ...consistent_norm import ConsistentNorm, ConsistentNorm2d
from ...estimation_shift import estimation_shift
from ...xbn import convert_to_xbn
from ..common import EstimationShiftLog, is_due, unwrap_model
from . import registration

__all__ = [
    "CN_NORM", "EstimationShiftHook", "FAMILY_CONFIG_KEYS", "build_cn", "build_xbn_resnet_backbone",
    "build_xbn_resnet_fpn_backbone", "cn_layer_options", "estimation_shift_hook", "family_layer_options",
    "xbn_options_from_cfg",
]

CN_NORM = "CN"  # the norm name this module adds to detectron2's get_norm

_state = threading.local()


# ---------------------------------------------------------------------------------------------
# NORM: "CN"
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def cn_layer_options(**options) -> Iterator[None]:
    """Constructor arguments of the CN layers that ``NORM: "CN"`` builds inside the block
    (``num_branches``, ``norm`` and the branches' options, see :class:`sn_plugin.ConsistentNorm`);
    like :func:`~sn_plugin.integrations.detectron2.sn_layer_options`. Per thread; nests."""
    previous = getattr(_state, "cn_options", {})
    _state.cn_options = {**previous, **options}
    try:
        yield
    finally:
        _state.cn_options = previous


def build_cn(out_channels: int) -> nn.Module:
    """The layer of ``NORM: "CN"``; with SN branches, the ``MODEL.SN`` options reach them too."""
    options = dict(getattr(_state, "cn_options", {}))
    if options.get("norm") == "SN":
        options = {**registration._layer_options(), **options}  # the active sn_layer_options
    return ConsistentNorm2d(out_channels, **options)


def _cn_options_from_cfg(cfg: CfgNode) -> Dict[str, Any]:
    node = cfg.MODEL.CN
    options: Dict[str, Any] = {"num_branches": node.NUM_BRANCHES, "norm": node.NORM}
    if node.NORM == "GN":
        options["num_groups"] = node.NUM_GROUPS
    return options


@contextlib.contextmanager
def family_layer_options(cfg: CfgNode) -> Iterator[None]:
    """The config's ``MODEL.CN`` options for the layers built inside the block (``SNTrainer.build_model``
    enters it); nothing for a config without those keys."""
    with cn_layer_options(**(_cn_options_from_cfg(cfg) if "CN" in cfg.MODEL else {})):
        yield


# ---------------------------------------------------------------------------------------------
# XBN ResNet backbones
# ---------------------------------------------------------------------------------------------

def xbn_options_from_cfg(cfg: CfgNode) -> Dict[str, Any]:
    """``MODEL.XBN`` as :func:`sn_plugin.convert_to_xbn` arguments."""
    node = cfg.MODEL.XBN
    bfn_cfg: Dict[str, Any] = {"type": node.BFN}
    if node.BFN == "GN":
        bfn_cfg["num_groups"] = node.BFN_GROUPS
    return {"bfn_cfg": bfn_cfg, "position": node.POSITION, "every": node.EVERY, "stem": node.STEM}


def _unfrozen(cfg: CfgNode) -> CfgNode:
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    return cfg


def _to_xbn(resnet: nn.Module, cfg: CfgNode) -> nn.Module:
    """Convert a ResNet built unfrozen, then freeze ``FREEZE_AT`` stages: frozen BNs are
    converted by freezing, so converting first keeps a frozen stage's BFN frozen as well."""
    convert_to_xbn(resnet, inplace=True, **xbn_options_from_cfg(cfg))
    return resnet.freeze(cfg.MODEL.BACKBONE.FREEZE_AT)


@BACKBONE_REGISTRY.register()
def build_xbn_resnet_backbone(cfg: CfgNode, input_shape):
    """Detectron2's ResNet (``MODEL.RESNETS.*``) with XBNBlocks (``MODEL.XBN.*``)."""
    return _to_xbn(build_resnet_backbone(_unfrozen(cfg), input_shape), cfg)


@BACKBONE_REGISTRY.register()
def build_xbn_resnet_fpn_backbone(cfg: CfgNode, input_shape):
    """Detectron2's ResNet-FPN (``MODEL.RESNETS.*``, ``MODEL.FPN.*``) with XBNBlocks in the ResNet."""
    backbone = build_resnet_fpn_backbone(_unfrozen(cfg), input_shape)
    _to_xbn(backbone.bottom_up, cfg)
    return backbone


# ---------------------------------------------------------------------------------------------
# Estimation shift
# ---------------------------------------------------------------------------------------------

_LOGGER = logging.getLogger("sn_plugin.integrations.detectron2")


class EstimationShiftHook(HookBase):
    """The estimation shift magnitude (ESM) of every layer with running statistics, during training.

    After every ``period``-th iteration (0: only after the last one) and after the last one,
    :func:`sn_plugin.estimation_shift` runs the model in eval mode, as inference does, over
    ``data_loader`` (the test set, the paper's S'). The main process logs one line, puts
    ``esm/mu_mean``, ``esm/mu_max``, ``esm/sigma_mean``, ``esm/sigma_max`` into the
    EventStorage (metrics.json, TensorBoard), and rewrites ``estimation_shift.csv`` (every layer
    at every measurement) and ``estimation_shift.png`` (each layer's ESM against the iteration,
    the paper's Figs. 2-5) in ``output_dir``. Put it before ``PeriodicWriter``, as
    ``SNTrainer`` does. The model's train flags and buffers are as before afterwards.
    """

    def __init__(self, period: int, model: nn.Module, data_loader, output_dir: Optional[str],
                 max_batches: Optional[int] = None, plot: bool = True) -> None:
        if period < 0:
            raise ValueError(f"EstimationShiftHook: period must be >= 0 (0: after the last iteration only), "
                             f"got {period}")
        if max_batches is not None and max_batches <= 0:
            raise ValueError(f"EstimationShiftHook: max_batches must be positive or None, got {max_batches}")
        self._period = period
        self._model = model
        self._data_loader = data_loader
        self._output_dir = output_dir
        self._max_batches = max_batches
        self.log = EstimationShiftLog("iteration", plot)

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if is_due(done, self._period, self.trainer.max_iter):
            self.measure(done)

    def measure(self, step: int) -> None:
        """Measure now, as the measurement at iteration ``step`` (the main process only)."""
        if not comm.is_main_process():
            return
        report = estimation_shift(unwrap_model(self._model), self._data_loader,
                                  forward=lambda model, batch: model(batch), max_batches=self._max_batches)
        scalars = self.log.record(step, report, self._output_dir)
        _LOGGER.info(self.log.summary(type(self).__name__, step, report))
        get_event_storage().put_scalars(smoothing_hint=False, **scalars)


# ---------------------------------------------------------------------------------------------
# Config keys
# ---------------------------------------------------------------------------------------------

def _cn_defaults() -> Dict[str, Any]:
    parameters = inspect.signature(ConsistentNorm.__init__).parameters
    return {"NUM_BRANCHES": parameters["num_branches"].default, "NORM": parameters["norm"].default,
            "NUM_GROUPS": 32}


# The family's config keys, (parent, node) -> key -> default; add_sn_config adds them with SN's:
# * MODEL.CN.{NUM_BRANCHES, NORM, NUM_GROUPS}: the layers of NORM "CN"; NORM is the branches'
#   normalizer ("BN", "SyncBN", "GN" with NUM_GROUPS, "LN", "SN" with the MODEL.SN options);
# * MODEL.XBN.{BFN, BFN_GROUPS, POSITION, EVERY, STEM}: the XBN backbones' batch-free normalizer
#   ("GN" with BFN_GROUPS groups, "IN", "SN"), the bottleneck norm it replaces (1, 2, 3), every
#   how many blocks (1, 2, 4, 8), and whether the stem's BN too;
# * TEST.ESM.{ENABLED, PERIOD, MAX_BATCHES}: EstimationShiftHook on the first test dataset every
#   PERIOD iterations (0: after the last one only), over at most MAX_BATCHES batches (0: all).
FAMILY_CONFIG_KEYS: Dict[Tuple[str, str], Dict[str, Any]] = {
    ("MODEL", "CN"): _cn_defaults(),
    ("MODEL", "XBN"): {"BFN": "GN", "BFN_GROUPS": 64, "POSITION": 2, "EVERY": 1, "STEM": False},
    ("TEST", "ESM"): {"ENABLED": False, "PERIOD": 0, "MAX_BATCHES": 0},
}


def estimation_shift_hook(cfg: CfgNode, model: nn.Module, build_test_loader) -> Optional[EstimationShiftHook]:
    """The hook ``TEST.ESM`` asks for (None when disabled), on ``build_test_loader(cfg, DATASETS.TEST[0])``."""
    if "ESM" not in cfg.TEST or not cfg.TEST.ESM.ENABLED:
        return None
    if not cfg.DATASETS.TEST:
        raise ValueError("TEST.ESM.ENABLED measures the estimation shift on the test set; DATASETS.TEST is empty")
    return EstimationShiftHook(cfg.TEST.ESM.PERIOD, model, build_test_loader(cfg, cfg.DATASETS.TEST[0]),
                               cfg.OUTPUT_DIR, cfg.TEST.ESM.MAX_BATCHES or None)


registration.NORM_BUILDERS[CN_NORM] = build_cn
