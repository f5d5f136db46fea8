#!/usr/bin/env python
"""Detectron2's standard training/evaluation entry point, with Switchable Normalization.

The same arguments as detectron2's ``tools/train_net.py``::

    python tools/train_net_d2.py --config-file configs/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_2x_sn.yaml \
        --num-gpus 8 [--resume] [KEY VALUE ...]
    python tools/train_net_d2.py --config-file ... --eval-only MODEL.WEIGHTS path/to/model_final.pth

What it adds to detectron2's script: ``NORM: "SN"``/``"SyncSN"`` (importing
``sn_plugin.integrations.detectron2`` registers them, at the top level so that
every process ``launch`` starts has them), the config keys ``MODEL.SN.*`` and
``TEST.SN_BATCH_STATS.*``, ``_BASE_`` files from detectron2's model zoo, and
:class:`~sn_plugin.integrations.detectron2.SNTrainer`'s hooks.
"""
import os
import sys

# Run from a source checkout without installing sn_plugin.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.engine import default_argument_parser, default_setup, launch  # noqa: E402
from detectron2.utils import comm  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

from sn_plugin.integrations.detectron2 import SNTrainer, get_sn_cfg  # noqa: E402


def setup(args):
    cfg = get_sn_cfg()
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    # sn_plugin's messages (e.g. the batch-statistics hook) in the console and log.txt like detectron2's.
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="sn_plugin")
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = SNTrainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        SNTrainer.estimate_missing_batch_stats(cfg, model)
        return SNTrainer.test(cfg, model)
    trainer = SNTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
