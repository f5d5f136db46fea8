"""Detectron2's LazyConfig training/evaluation command (its ``tools/lazyconfig_train_net.py``), with SN.

The same arguments as detectron2's script, plus ``--num-processes N`` (N CPU processes over
gloo, as in ``tools/train_net_d2.py``)::

    python tools/lazyconfig_train_net_d2.py --num-gpus 8 \\
        --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.py [key=value ...]
    python tools/lazyconfig_train_net_d2.py --config-file ... --eval-only train.init_checkpoint=output/model_final.pth

(``tools/lazyconfig_train_net_d2.py`` and ``python -m sn_plugin.integrations.detectron2.lazy_train_net``
call :func:`main`.) What it adds to detectron2's script:

* the SN hooks the config's ``train`` describes: ``train.sn_batch_stats`` (an
  :class:`~sn_plugin.integrations.detectron2.SNBatchStatsHook`, put before the checkpointer
  and the evaluation) and ``train.sn_weight_logger`` (an
  :class:`~sn_plugin.integrations.detectron2.SNWeightLoggerHook`, before the writers). They
  are LazyCalls without ``model`` and ``data_loader``, which this command fills in with the
  trained model and the config's training loader; a config without them (or with
  ``train.sn_batch_stats=null``) trains without them;
* ``--eval-only`` estimates the batch-average statistics first when trainable SN layers
  have none yet and the config has ``train.sn_batch_stats``;
* ``--config-file`` also takes the name of a LazyConfig sn_plugin ships
  (``COCO-Detection/faster_rcnn_R_50_FPN_1x_sn.py``) where no such file exists, so it works
  from a wheel install;
* COCOEvaluator's fast C++ mode only when detectron2's extension is compiled (unless the
  config sets ``use_fast_impl``);
* ``"SN"``/``"SyncSN"`` are registered in every process ``launch`` starts: they run
  :func:`run` from this module, which imports the adapter.
"""
import logging
import os
from typing import Any, Dict, List, Optional

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer, default_setup, default_writers, hooks
from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.utils.registry import locate
from omegaconf import DictConfig
from torch import nn

from ..common import describe_missing, missing_batch_statistics, unwrap_model
from .config import get_sn_config_file
from .launch import argument_parser, create_ddp_model, launch_from_args
from .trainer import _compiled_ops_available

_LOGGER = logging.getLogger("sn_plugin.integrations.detectron2")


def config_file_path(config_file: str) -> str:
    """``config_file`` if the file exists, else the path of the LazyConfig sn_plugin ships under that name."""
    if os.path.isfile(config_file):
        return config_file
    if not config_file.endswith(".py"):
        raise FileNotFoundError(f"--config-file {config_file!r}: no such file (sn_plugin's shipped LazyConfig "
                                "files, which it also takes by name, end in .py)")
    return get_sn_config_file(config_file)


def setup(args) -> DictConfig:
    """The config of ``args.config_file`` with the ``key=value`` overrides; detectron2's logging and config dump."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    if args.num_processes:
        if any(opt.startswith("train.device=") for opt in args.opts) and cfg.train.device != "cpu":
            raise ValueError(f"--num-processes trains on CPU, but the command line sets train.device="
                             f"{cfg.train.device}; drop it, or use --num-gpus for GPUs.")
        cfg.train.device = "cpu"
    default_setup(cfg, args)
    # sn_plugin's messages (e.g. the batch-statistics hook) in the console and log.txt like detectron2's.
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="sn_plugin")
    return cfg


def build_sn_hook(cfg: DictConfig, key: str, model: nn.Module, with_data: bool):
    """The hook ``cfg.train[key]`` describes, for ``model`` (and the training data); None if the config has none."""
    spec = cfg.train.get(key)
    if spec is None:
        return None
    arguments: Dict[str, Any] = {"model": model}
    if with_data:
        loader = cfg.dataloader.train
        # Workers would only add start-up time to the few batches an estimate reads (as for PreciseBN).
        arguments["data_loader"] = instantiate({**loader, "num_workers": 0} if "num_workers" in loader else loader)
    return instantiate({**spec, **arguments})


def estimate_missing_batch_stats(cfg: DictConfig, model: nn.Module) -> bool:
    """Estimate the batch-average statistics when a trainable SN layer has none yet and the config
    has ``train.sn_batch_stats``; returns whether it did (``SNTrainer.estimate_missing_batch_stats`` for YAML)."""
    missing = missing_batch_statistics(unwrap_model(model))
    if not missing or cfg.train.get("sn_batch_stats") is None:
        return False
    _LOGGER.warning(f"{describe_missing(missing)}; estimating them from training batches (train.sn_batch_stats).")
    build_sn_hook(cfg, "sn_batch_stats", model, with_data=True).update_stats("before evaluation")
    return True


def _evaluator(cfg: DictConfig):
    spec = cfg.dataloader.evaluator
    target = spec.get("_target_") if isinstance(spec, DictConfig) else None  # else e.g. a list of evaluators
    if isinstance(target, str):
        target = locate(target)
    if isinstance(target, type) and issubclass(target, COCOEvaluator) and "use_fast_impl" not in spec:
        return instantiate({**spec, "use_fast_impl": _compiled_ops_available()})
    return instantiate(spec)


def do_test(cfg: DictConfig, model: nn.Module) -> Dict[str, Any]:
    """Evaluate ``model`` on ``cfg.dataloader.test`` with ``cfg.dataloader.evaluator`` (nothing if it has none)."""
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(model, instantiate(cfg.dataloader.test), _evaluator(cfg))
    print_csv_format(results)
    return results


def do_train(args, cfg: DictConfig) -> Dict[str, Any]:
    """Train as detectron2's script does, with the config's SN hooks; returns the last evaluation's results."""
    model = instantiate(cfg.model)
    logging.getLogger("detectron2").info(f"Model:\n{model}")
    model.to(cfg.train.device)
    optimizer = instantiate({**cfg.optimizer, "params": {**cfg.optimizer.params, "model": model}})
    model = create_ddp_model(model, **cfg.train.ddp)
    trainer = (AMPTrainer if cfg.train.amp.enabled else SimpleTrainer)(
        model, instantiate(cfg.dataloader.train), optimizer)
    checkpointer = DetectionCheckpointer(model, cfg.train.output_dir, trainer=trainer)
    results: Dict[str, Any] = {}

    def evaluate() -> Dict[str, Any]:
        results.clear()
        results.update(do_test(cfg, model))
        return results

    main_process = comm.is_main_process()
    trainer.register_hooks([  # None: left out
        hooks.IterationTimer(),
        hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
        # Every process estimates (the sums are all-reduced), before the checkpoint and the evaluation.
        build_sn_hook(cfg, "sn_batch_stats", model, with_data=True),
        hooks.PeriodicCheckpointer(checkpointer, **cfg.train.checkpointer) if main_process else None,
        hooks.EvalHook(cfg.train.eval_period, evaluate),
        build_sn_hook(cfg, "sn_weight_logger", model, with_data=False),
        hooks.PeriodicWriter(default_writers(cfg.train.output_dir, cfg.train.max_iter),
                             period=cfg.train.log_period) if main_process else None,
    ])
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    trainer.train(start_iter, cfg.train.max_iter)
    return results


def run(args) -> Dict[str, Any]:
    """What every process runs: train, or with ``--eval-only`` evaluate ``train.init_checkpoint``.
    Returns the (last) evaluation's results."""
    cfg = setup(args)
    if not args.eval_only:
        return do_train(args, cfg)
    model = instantiate(cfg.model)
    model.to(cfg.train.device)
    model = create_ddp_model(model)
    DetectionCheckpointer(model).load(cfg.train.init_checkpoint)
    estimate_missing_batch_stats(cfg, model)
    return do_test(cfg, model)


def main(argv: Optional[List[str]] = None) -> None:
    """Parse detectron2's training arguments and :func:`run` in ``--num-gpus`` GPU processes or
    ``--num-processes`` CPU processes per machine."""
    parser = argument_parser()
    args = parser.parse_args(argv)
    try:
        args.config_file = config_file_path(args.config_file)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print("Command Line Args:", args)
    launch_from_args(run, args, parser)


if __name__ == "__main__":
    main()
