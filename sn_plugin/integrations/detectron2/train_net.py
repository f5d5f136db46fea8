"""Detectron2's standard training/evaluation command, with Switchable Normalization.

The same arguments as detectron2's ``tools/train_net.py``, plus ``--num-processes``::

    python tools/train_net_d2.py --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.yaml \\
        --num-gpus 8 [--resume] [KEY VALUE ...]
    python tools/train_net_d2.py --config-file ... --eval-only MODEL.WEIGHTS path/to/model_final.pth
    python tools/train_net_d2.py --config-file ... --num-processes 4      # 4 CPU processes (gloo)
    python tools/train_net_d2.py --config-file ... --num-gpus 8 --num-machines 2 --machine-rank 0 \\
        --dist-url tcp://<address of machine 0>:<port>                    # on machine 0; rank 1 on the other

(``tools/train_net_d2.py`` calls :func:`main`.) What it adds to detectron2's
script: ``NORM: "SN"``/``"SyncSN"`` (this module imports the
adapter, so every process ``launch`` starts, which runs :func:`run` from here,
registers them), the config keys ``MODEL.SN.*`` and ``TEST.SN_BATCH_STATS.*``,
``_BASE_`` files from detectron2's model zoo,
:class:`~sn_plugin.integrations.detectron2.SNTrainer`, and training in CPU
processes: ``--num-processes N`` starts N processes per machine that talk over
gloo (:func:`sn_plugin.integrations.detectron2.launch.launch`) and sets
``MODEL.DEVICE`` to ``cpu``. ``--num-gpus`` stays detectron2's (NCCL).
"""
import argparse
import functools
from typing import List, Optional, Type

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from .config import get_sn_cfg
from .launch import argument_parser, launch_from_args
from .trainer import SNTrainer


def setup(args: argparse.Namespace):
    cfg = get_sn_cfg()
    cfg.merge_from_file(args.config_file)
    if args.num_processes:
        cfg.MODEL.DEVICE = "cpu"
    cfg.merge_from_list(args.opts)
    if args.num_processes and cfg.MODEL.DEVICE != "cpu":
        raise ValueError(f"--num-processes trains on CPU, but the command line sets MODEL.DEVICE "
                         f"{cfg.MODEL.DEVICE}; drop it, or use --num-gpus for GPUs.")
    cfg.freeze()
    default_setup(cfg, args)
    # sn_plugin's messages (e.g. the batch-statistics hook) in the console and log.txt like detectron2's.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="sn_plugin")
    return cfg


def run(args: argparse.Namespace, trainer_class: Type[SNTrainer] = SNTrainer):
    """What every process runs: train, or with ``--eval-only`` evaluate ``MODEL.WEIGHTS``.
    Returns the evaluation results (as detectron2's train_net does)."""
    cfg = setup(args)
    if args.eval_only:
        model = trainer_class.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        trainer_class.estimate_missing_batch_stats(cfg, model)
        return trainer_class.test(cfg, model)
    trainer = trainer_class(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def main(argv: Optional[List[str]] = None, trainer_class: Type[SNTrainer] = SNTrainer) -> None:
    """Parse the arguments and :func:`run` in ``--num-gpus`` GPU processes (detectron2's ``launch``) or
    ``--num-processes`` CPU processes per machine.

    ``trainer_class``: :class:`SNTrainer` or a subclass of it (e.g. with your own
    hooks); it must be importable in the started processes, i.e. defined at the
    top level of a module or of the script that calls :func:`main`.
    """
    parser = argument_parser()
    args = parser.parse_args(argv)
    print("Command Line Args:", args)
    launch_from_args(functools.partial(run, trainer_class=trainer_class), args, parser)
