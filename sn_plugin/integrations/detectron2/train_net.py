"""Detectron2's standard training/evaluation command, with Switchable Normalization.

The same arguments as detectron2's ``tools/train_net.py``::

    python tools/train_net_d2.py --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.yaml \\
        --num-gpus 8 [--resume] [KEY VALUE ...]
    python tools/train_net_d2.py --config-file ... --eval-only MODEL.WEIGHTS path/to/model_final.pth

(``tools/train_net_d2.py`` calls :func:`main`.) What it adds to detectron2's
script: ``NORM: "SN"``/``"SyncSN"`` (this module imports the
adapter, so every process ``launch`` starts, which runs :func:`run` from here,
registers them), the config keys ``MODEL.SN.*`` and ``TEST.SN_BATCH_STATS.*``,
``_BASE_`` files from detectron2's model zoo, and
:class:`~sn_plugin.integrations.detectron2.SNTrainer`.
"""
import argparse
from typing import List, Optional

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_argument_parser, default_setup, launch
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .config import get_sn_cfg
from .trainer import SNTrainer


def setup(args: argparse.Namespace):
    cfg = get_sn_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # sn_plugin's messages (e.g. the batch-statistics hook) in the console and log.txt like detectron2's.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="sn_plugin")
    return cfg


def run(args: argparse.Namespace):
    """What every process runs: train, or with ``--eval-only`` evaluate ``MODEL.WEIGHTS``.
    Returns the evaluation results (as detectron2's train_net does)."""
    cfg = setup(args)
    if args.eval_only:
        model = SNTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        SNTrainer.estimate_missing_batch_stats(cfg, model)
        return SNTrainer.test(cfg, model)
    trainer = SNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(argv: Optional[List[str]] = None) -> None:
    """Parse detectron2's training arguments and :func:`run` in ``--num-gpus`` processes per machine."""
    args = default_argument_parser().parse_args(argv)
    print("Command Line Args:", args)
    launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
