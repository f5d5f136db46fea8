"""The OpenMMLab training command (``tools/train.py``), which also trains in several CPU processes.

The arguments and behaviour of the toolkits' own ``tools/train.py`` (mmdet,
mmseg, mmpretrain, mmaction2), for any of their configs::

    python tools/train.py CONFIG [--work-dir DIR] [--resume [CHECKPOINT]] [--amp] [--auto-scale-lr]
                                 [--cfg-options KEY=VALUE ...] [--launcher {none,pytorch,slurm,mpi}]
    torchrun --nproc_per_node=8 tools/train.py CONFIG --launcher pytorch     # 8 GPUs, or 8 CPU processes
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
        tools/train.py CONFIG --launcher pytorch                             # on each of 2 machines

It imports the SN adapter before it reads the config, so ``_base_`` files
named ``sn_plugin::...`` resolve. What it adds: on a machine where mmengine
finds no GPU (nor NPU, MLU, MUSA), ``--launcher pytorch`` trains in CPU
processes that talk over gloo. mmengine 0.10 cannot do that by itself: its ``init_dist`` calls
``torch.cuda.set_device``, and the Runner wraps the model with
``device_ids=[LOCAL_RANK]``, which DistributedDataParallel refuses for a CPU
model. :func:`prepare_cpu_distributed` starts the gloo process group before
the Runner is built (the Runner then leaves the group as it is) and has the
Runner wrap the model without ``device_ids``. On GPUs the Runner does
everything itself, as with the toolkits' command.

And ``--resume`` (and ``load_from`` of a checkpoint mmengine wrote) works with
torch 2.6 and later: mmengine
0.10 reads checkpoints with ``torch.load``'s default, which torch 2.6 turned
to ``weights_only=True``; mmengine's own checkpoints hold its message hub
(numpy arrays, ``HistoryBuffer``) and then fail to load. While the command
runs, local checkpoint files are read with ``weights_only=False``, as mmengine
was written for (:data:`FULL_CHECKPOINTS`, the one patch of mmengine here,
undone when the command returns). Resume only from files you trust.
"""
import argparse
import datetime
import logging
import os
from typing import List, Optional

import torch
import torch.distributed as dist
from mmengine.config import Config, DictAction
from mmengine.device import get_device
from mmengine.logging import print_log
from mmengine.model.wrappers import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS, RUNNERS
from mmengine.runner import CheckpointLoader, Runner
from torch.nn.parallel import DistributedDataParallel

from ..common import Patch, PatchSet

__all__ = ["FULL_CHECKPOINTS", "load_config", "main", "parse_args", "prepare_cpu_distributed"]

LAUNCHERS = ("none", "pytorch", "slurm", "mpi")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train an OpenMMLab model (mmdet, mmseg, mmpretrain, mmaction2 config) with SN; "
                    "under torchrun also on CPU processes (gloo)")
    parser.add_argument("config", help="the config file")
    parser.add_argument("--work-dir", help="where logs and checkpoints go (default: ./work_dirs/<config name>)")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (mmengine's AmpOptimWrapper)")
    parser.add_argument("--auto-scale-lr", action="store_true",
                        help="scale the learning rate with the total batch size (the config's auto_scale_lr)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                        help="resume from CHECKPOINT, or without a value from the latest checkpoint in the work dir")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config keys, e.g. train_cfg.max_iters=100 (mmengine's syntax)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none",
                        help="how the processes were started: torchrun is 'pytorch' (on GPUs or CPU)")
    # torch.distributed.launch (torchrun's predecessor) passes --local-rank (--local_rank before torch 2.0).
    parser.add_argument("--local-rank", "--local_rank", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def load_config(args: argparse.Namespace) -> Config:
    """The config file with the command line applied: launcher, ``--cfg-options``, work dir, amp,
    learning-rate scaling and resuming."""
    cfg = Config.fromfile(args.config)
    cfg.launcher = args.launcher
    if args.cfg_options:
        cfg.merge_from_dict(args.cfg_options)
    if args.work_dir is not None:
        cfg.work_dir = args.work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = os.path.join("work_dirs", os.path.splitext(os.path.basename(args.config))[0])
    if args.amp:
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.loss_scale = "dynamic"
    if args.auto_scale_lr:
        scaling = cfg.get("auto_scale_lr")
        if not scaling or "base_batch_size" not in scaling:
            raise ValueError(f"--auto-scale-lr: {args.config} has no auto_scale_lr=dict(base_batch_size=...); "
                             f"add it (the total batch size the learning rate was set for) or drop the option.")
        scaling.enable = True
    if args.resume is not None:
        cfg.resume = True
        cfg.load_from = None if args.resume == "auto" else args.resume  # None: the work dir's latest
    return cfg


def _wraps_with_ddp(wrapper_type) -> bool:
    if isinstance(wrapper_type, str):
        wrapper_type = MODEL_WRAPPERS.get(wrapper_type)
    return isinstance(wrapper_type, type) and issubclass(wrapper_type, DistributedDataParallel)


def prepare_cpu_distributed(cfg: Config) -> bool:
    """Make ``Runner.from_cfg(cfg)`` train in CPU processes under torchrun; True if it did.

    Does nothing (False) when ``cfg.launcher`` is ``'none'`` or mmengine sees a
    GPU (or NPU, MLU, MUSA): the Runner then sets everything up itself.
    Otherwise, for ``launcher='pytorch'`` (torchrun's environment variables):

    * starts the default process group with the gloo backend, keeping
      ``env_cfg.dist_cfg.timeout`` (NCCL, mmengine's usual backend, needs GPUs);
    * sets ``model_wrapper_cfg`` to mmengine's ``MMDistributedDataParallel``
      without ``device_ids`` and with the Runner's own defaults
      (``broadcast_buffers=False``, the config's ``find_unused_parameters``);
      a ``model_wrapper_cfg`` of the config keeps its settings and only gets
      ``device_ids=None`` if it is a DistributedDataParallel without them.
    """
    launcher = cfg.get("launcher", "none")
    if launcher == "none" or get_device() != "cpu":
        return False
    if launcher != "pytorch":
        raise RuntimeError(
            f"--launcher {launcher}: no GPU is visible, and CPU processes are started with torchrun "
            f"(--launcher pytorch). Under Slurm or MPI, start torchrun once per machine (e.g. `srun torchrun "
            f"--nnodes=$SLURM_NNODES --node_rank=$SLURM_NODEID --master_addr=HOST --nproc_per_node=N "
            f"tools/train.py CONFIG --launcher pytorch`).")
    if not dist.is_initialized():
        timeout = cfg.get("env_cfg", {}).get("dist_cfg", {}).get("timeout")
        options = {"timeout": datetime.timedelta(seconds=timeout)} if timeout is not None else {}
        dist.init_process_group(backend="gloo", **options)  # torchrun's RANK, WORLD_SIZE, MASTER_ADDR/PORT
    wrapper = cfg.get("model_wrapper_cfg")
    if wrapper is None:
        cfg.model_wrapper_cfg = dict(type=MMDistributedDataParallel.__name__, device_ids=None,
                                     broadcast_buffers=False,
                                     find_unused_parameters=cfg.get("find_unused_parameters", False))
    elif _wraps_with_ddp(wrapper.get("type", MMDistributedDataParallel.__name__)):
        wrapper.setdefault("device_ids", None)
    print_log(f"No GPU visible: process {dist.get_rank()} of {dist.get_world_size()} trains on CPU "
              f"(gloo; the model is wrapped without device_ids).", logger="current", level=logging.INFO)
    return True


def load_from_local(filename: str, map_location=None):
    """mmengine's loader of local checkpoint files (same name, same checks), reading the whole
    pickle (``weights_only=False``) as mmengine 0.10 expects."""
    filename = os.path.expanduser(filename)
    if not os.path.isfile(filename):
        raise FileNotFoundError(f"{filename} can not be found.")
    return torch.load(filename, map_location=map_location, weights_only=False)


def _load_full_checkpoints():
    mmengine_loader = CheckpointLoader._schemes[""]
    CheckpointLoader.register_scheme("", load_from_local, force=True)
    return lambda: CheckpointLoader.register_scheme("", mmengine_loader, force=True)


FULL_CHECKPOINTS = Patch(
    target="mmengine.runner.CheckpointLoader scheme '' (local files)",
    reason="mmengine 0.10 reads checkpoints with torch.load's default, weights_only=True since torch 2.6, which "
           "refuses mmengine's own checkpoints (message hub: numpy arrays, HistoryBuffer), so --resume fails",
    distribution="mmengine", module="mmengine", written_for="0.10", apply=_load_full_checkpoints)


def main(argv: Optional[List[str]] = None) -> None:
    """Parse the arguments, build the Runner (``runner_type`` from the config if it names one) and train."""
    cfg = load_config(parse_args(argv))
    prepare_cpu_distributed(cfg)
    patches = PatchSet()
    patches.install([FULL_CHECKPOINTS])
    try:
        runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
        runner.train()
    finally:
        patches.uninstall()
