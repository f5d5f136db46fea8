"""Detectron2 training in several CPU processes (gloo), which detectron2 0.6 cannot do by itself.

Detectron2 0.6's ``launch()`` asserts that CUDA is available and starts its
process group with NCCL, and its ``create_ddp_model`` passes
``device_ids=[local rank]``, which DistributedDataParallel refuses for a CPU
model. This module has the CPU counterparts; GPU training stays detectron2's:

* :func:`launch`: detectron2's ``launch`` for CPU processes: it spawns
  ``num_processes_per_machine`` processes, each joins a gloo process group and
  gets detectron2's per-machine process group (``comm.get_local_rank()``,
  ``comm.get_local_size()``), then runs ``main_func(*args)``;
* :func:`create_ddp_model`: detectron2's, without ``device_ids`` for a CPU
  model. ``SNTrainer`` uses it when it trains on CPU in several processes
  (:data:`CPU_DDP`, a patch of detectron2's ``DefaultTrainer`` construction,
  installed only while an :class:`~sn_plugin.integrations.detectron2.SNTrainer`
  is being built).

* :func:`argument_parser` / :func:`launch_from_args`: detectron2's argument parser with
  ``--num-processes``, and the launch (GPU processes through detectron2, CPU processes
  through :func:`launch`) that both train commands use.

``tools/train_net_d2.py`` and ``tools/lazyconfig_train_net_d2.py`` take ``--num-processes N``.
"""
import argparse
import os
import socket
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import default_argument_parser
from detectron2.engine import defaults as d2_defaults
from detectron2.engine import launch as launch_on_gpus
from detectron2.engine.launch import DEFAULT_TIMEOUT
from detectron2.utils import comm
from torch import nn

from ..common import Patch, PatchSet, replace_attribute

__all__ = ["CPU_DDP", "argument_parser", "create_ddp_model", "launch", "launch_from_args"]

_DETECTRON2_CREATE_DDP_MODEL = d2_defaults.create_ddp_model


def _on_cpu(model: nn.Module) -> bool:
    """Whether the model's parameters (or, without any, buffers) are on the CPU."""
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor is None or tensor.device.type == "cpu"


def create_ddp_model(model: nn.Module, **kwargs) -> nn.Module:
    """Detectron2's ``create_ddp_model`` (the model itself in one process, else DistributedDataParallel),
    with ``device_ids=None`` for a model on the CPU unless ``kwargs`` set them."""
    if _on_cpu(model):
        kwargs.setdefault("device_ids", None)
    return _DETECTRON2_CREATE_DDP_MODEL(model, **kwargs)


CPU_DDP = Patch(
    target="detectron2.engine.defaults.create_ddp_model",
    reason="DefaultTrainer wraps the model with device_ids=[local rank], which DistributedDataParallel refuses for "
           "a CPU model; the wrapper leaves them out on CPU",
    distribution="detectron2", module="detectron2", written_for="0.6",
    apply=lambda: replace_attribute(d2_defaults, "create_ddp_model", create_ddp_model))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(main_func: Callable, num_processes_per_machine: int, num_machines: int = 1, machine_rank: int = 0,
           dist_url: Optional[str] = None, args: Sequence = (), timeout: timedelta = DEFAULT_TIMEOUT) -> None:
    """Run ``main_func(*args)`` in ``num_processes_per_machine`` CPU processes on each of ``num_machines``
    machines, which talk over gloo: detectron2's ``launch`` without GPUs.

    Call it on every machine with its ``machine_rank``; ``dist_url`` is where
    they meet (``tcp://<machine 0>:<port>``, or ``"auto"`` on one machine for a
    free local port). With one process in all, ``main_func`` runs in this
    process without a process group. ``main_func`` and ``args`` must pickle
    (the processes are spawned): a function at the top level of a module
    that also registers what the model needs (as ``train_net.run`` does).
    Unless ``OMP_NUM_THREADS`` is set, each process uses its share of this
    machine's cores.
    """
    if num_processes_per_machine < 1 or num_machines < 1 or not 0 <= machine_rank < num_machines:
        raise ValueError(f"launch: need num_processes_per_machine >= 1, num_machines >= 1 and 0 <= machine_rank < "
                         f"num_machines; got {num_processes_per_machine}, {num_machines}, {machine_rank}")
    world_size = num_machines * num_processes_per_machine
    if world_size == 1:
        main_func(*args)
        return
    if dist_url == "auto":
        if num_machines > 1:
            raise ValueError("launch: dist_url='auto' finds a port on this machine; with several machines give "
                             "tcp://<address of machine 0>:<port>.")
        dist_url = f"tcp://127.0.0.1:{_free_port()}"
    if not dist_url:
        raise ValueError("launch: several processes need dist_url (e.g. tcp://127.0.0.1:29500, or 'auto').")
    mp.start_processes(_worker, nprocs=num_processes_per_machine, start_method="spawn", daemon=False,
                       args=(main_func, world_size, num_processes_per_machine, machine_rank, dist_url, tuple(args),
                             timeout))


def _worker(local_rank: int, main_func: Callable, world_size: int, per_machine: int, machine_rank: int,
            dist_url: str, args: tuple, timeout: timedelta) -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // per_machine))
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size,
                            rank=machine_rank * per_machine + local_rank, timeout=timeout)
    # detectron2's comm.get_local_rank()/get_local_size() read a group of this machine's processes, which
    # its launch() makes; every process must create every machine's group, in the same order.
    groups = [dist.new_group(list(range(m * per_machine, (m + 1) * per_machine)))
              for m in range(world_size // per_machine)]
    local_group = Patch(
        target="detectron2.utils.comm._LOCAL_PROCESS_GROUP",
        reason="detectron2 0.6 keeps the per-machine process group in this module variable, which only its "
               "CUDA launch() sets",
        distribution="detectron2", module="detectron2", written_for="0.6",
        apply=lambda: replace_attribute(comm, "_LOCAL_PROCESS_GROUP", groups[machine_rank]))
    patches = PatchSet()
    patches.install([local_group])
    try:
        comm.synchronize()
        main_func(*args)
    finally:
        patches.uninstall()
        dist.destroy_process_group()


def argument_parser(epilog: Optional[str] = None) -> argparse.ArgumentParser:
    """Detectron2's ``default_argument_parser`` with ``--num-processes``."""
    parser = default_argument_parser(epilog)
    parser.add_argument("--num-processes", type=int, default=0, metavar="N",
                        help="train in N CPU processes *per machine* (gloo) instead of on --num-gpus GPUs")
    return parser


def launch_from_args(main_func: Callable, args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Run ``main_func(args)`` in ``--num-gpus`` GPU processes (detectron2's ``launch``) or in
    ``--num-processes`` CPU processes per machine (:func:`launch`); clear errors for impossible requests."""
    if args.num_processes < 0:
        parser.error(f"--num-processes must be positive, got {args.num_processes}")
    if args.num_processes and args.num_gpus > 1:
        parser.error("--num-processes (CPU processes) and --num-gpus (GPU processes) exclude each other; give one.")
    if args.num_gpus > 1 and not torch.cuda.is_available():
        parser.error(f"--num-gpus {args.num_gpus}: no GPU is visible (torch.cuda.is_available() is False). To train "
                     f"in {args.num_gpus} CPU processes, use --num-processes {args.num_gpus}.")
    run, per_machine = (launch, args.num_processes) if args.num_processes else (launch_on_gpus, args.num_gpus)
    run(main_func, per_machine, num_machines=args.num_machines, machine_rank=args.machine_rank,
        dist_url=args.dist_url, args=(args,))
