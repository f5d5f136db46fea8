"""``SNTrainer``: detectron2's ``DefaultTrainer`` with SN's layer options, weight decay, hooks and evaluator."""
import logging
import os
from typing import List, Optional

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, HookBase, hooks
from detectron2.evaluation import COCOEvaluator
from detectron2.utils import comm
from torch import nn

from ..common import PatchSet, describe_missing, missing_batch_statistics, unwrap_model
from .config import layer_options_from_cfg
from .family import estimation_shift_hook, family_layer_options
from .hooks import SNBatchStatsHook, SNWeightLoggerHook
from .launch import CPU_DDP
from .registration import sn_layer_options
from .solver import build_optimizer

_LOGGER = logging.getLogger("sn_plugin.integrations.detectron2")


def _compiled_ops_available() -> bool:
    """Whether ``detectron2._C`` is a compiled extension (not a placeholder)."""
    try:
        from detectron2 import _C
    except ImportError:
        return False
    return str(getattr(_C, "__file__", "")).endswith((".so", ".pyd"))


def _first_index(hook_list: List[HookBase], types) -> int:
    """Index of the first hook of one of ``types`` (the end if none)."""
    return next((i for i, h in enumerate(hook_list) if isinstance(h, types)), len(hook_list))


class SNTrainer(DefaultTrainer):
    """Detectron2's ``DefaultTrainer`` with SN's config keys and hooks.

    * builds the model with the ``MODEL.SN`` layer options;
    * builds the optimizer with ``SOLVER.WEIGHT_DECAY_NORM`` covering SN's
      parameters (:func:`~sn_plugin.integrations.detectron2.build_optimizer`);
    * adds :class:`SNBatchStatsHook` (``TEST.SN_BATCH_STATS``) where detectron2
      puts PreciseBN, i.e. before checkpointing and evaluation, and
      :class:`SNWeightLoggerHook` (``MODEL.SN.IMPORTANCE_LOG_PERIOD``) and the
      family's ``EstimationShiftHook`` (``TEST.ESM``) before the writers; builds
      ``NORM: "CN"`` layers with the ``MODEL.CN`` options;
    * evaluates COCO-format datasets with ``COCOEvaluator`` (its fast C++ mode
      only when detectron2's extension is compiled);
    * in several CPU processes (``MODEL.DEVICE: cpu``, started by
      :func:`sn_plugin.integrations.detectron2.launch.launch`), wraps the model
      in DistributedDataParallel without ``device_ids``, which detectron2 0.6
      passes and a CPU model refuses (:data:`~.launch.CPU_DDP`, installed
      only while the trainer is being built);
    * checkpoints the optimizer's state (e.g. SGD's momentum) with the
      iteration, so ``--resume`` continues it: detectron2 0.6's
      ``DefaultTrainer`` saves only the iteration and the hooks' state. The
      key, ``trainer._trainer``, is the one later detectron2 versions use.

    The config must have the SN keys (:func:`get_sn_cfg` / :func:`add_sn_config`).
    """

    def __init__(self, cfg: CfgNode) -> None:
        patches = PatchSet()
        if comm.get_world_size() > 1 and torch.device(cfg.MODEL.DEVICE).type == "cpu":
            patches.install([CPU_DDP])
        try:
            super().__init__(cfg)
        finally:
            patches.uninstall()

    def state_dict(self) -> dict:
        return {**super().state_dict(), "_trainer": self._trainer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:  # absent from checkpoints of detectron2's own DefaultTrainer
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_model(cls, cfg: CfgNode) -> nn.Module:
        with sn_layer_options(**layer_options_from_cfg(cfg)), family_layer_options(cfg):
            return super().build_model(cfg)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
        return build_optimizer(cfg, model)

    @staticmethod
    def _batch_stats_hook(cfg: CfgNode, period: int, model: nn.Module, data_loader) -> SNBatchStatsHook:
        return SNBatchStatsHook(period, model, data_loader, cfg.TEST.SN_BATCH_STATS.NUM_ITER,
                                cfg.TEST.SN_BATCH_STATS.INCLUDE_BN)

    @classmethod
    def _estimate_loader(cls, cfg: CfgNode):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.DATALOADER.NUM_WORKERS = 0  # as detectron2 does for PreciseBN
        return cls.build_train_loader(cfg)

    def build_hooks(self) -> List[HookBase]:
        ret = super().build_hooks()
        cfg = self.cfg
        if cfg.TEST.SN_BATCH_STATS.ENABLED:
            if cfg.TEST.PRECISE_BN.ENABLED and cfg.TEST.SN_BATCH_STATS.INCLUDE_BN:
                _LOGGER.warning(
                    "TEST.PRECISE_BN and TEST.SN_BATCH_STATS (with INCLUDE_BN) both re-estimate BN statistics; "
                    "disable one of them.")
            batch_stats = self._batch_stats_hook(cfg, cfg.TEST.EVAL_PERIOD, self.model, self._estimate_loader(cfg))
            ret.insert(_first_index(ret, (hooks.PeriodicCheckpointer, hooks.EvalHook)), batch_stats)
        if cfg.MODEL.SN.IMPORTANCE_LOG_PERIOD > 0:
            writer = SNWeightLoggerHook(self.model, cfg.MODEL.SN.IMPORTANCE_LOG_PERIOD)
            ret.insert(_first_index(ret, (hooks.PeriodicWriter,)), writer)
        esm = estimation_shift_hook(cfg, self.model, self.build_test_loader)
        if esm is not None:
            ret.insert(_first_index(ret, (hooks.PeriodicWriter,)), esm)
        return ret

    @classmethod
    def estimate_missing_batch_stats(cls, cfg: CfgNode, model: nn.Module) -> bool:
        """Estimate the batch-average statistics if a trainable SN layer has none yet.

        For ``--eval-only`` on a checkpoint that lacks them (one saved before the
        first estimate, or a converted classification model): with
        ``TEST.SN_BATCH_STATS.ENABLED`` they are estimated from the training
        set; otherwise nothing is done and SN's own error explains what is missing.
        Checkpoints saved when :class:`SNBatchStatsHook` ran (every EVAL_PERIOD
        and the final one) already hold them and are used as they are. Returns
        whether it estimated.
        """
        missing = missing_batch_statistics(unwrap_model(model))
        if not missing or not cfg.TEST.SN_BATCH_STATS.ENABLED:
            return False
        _LOGGER.warning(f"{describe_missing(missing)}; estimating them from {cfg.TEST.SN_BATCH_STATS.NUM_ITER} "
                        f"training batches.")
        cls._batch_stats_hook(cfg, 0, model, cls._estimate_loader(cfg)).update_stats("before evaluation")
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
