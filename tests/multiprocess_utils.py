"""What the multi-process tests of both toolkits share: running the commands in subprocesses, the
records each training process writes, and the 2-processes-vs-1 comparison.

Each test trains the same tiny SyncSN model twice from the same seed: in one process on a
batch of 2 images, and in 2 processes (gloo) on 1 image each. A recording hook in every
process keeps a :class:`Recorder` and writes its record to
``<work_dir>/record_from<start>_rank<r>.pt``: the weights and optimizer state it started
from, the first iteration's loss, gradients (as the optimizer receives them) and SN running
statistics (with ``using_moving_average=True`` they hold the iteration's batch statistics,
synchronised by SyncSN), the checkpoints the process wrote, and the statistics at the end of
training (after the batch-statistics hook's estimate).
"""
import glob
import os
import subprocess
import sys
from typing import Dict, List

import torch
from torch import nn

from sn_plugin import SwitchNormBase

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(REPO, "tests")
TIMEOUT_S = 300  # per command; a hung process group fails the test instead of hanging CI

# "Agree": float32 sums in another order. Differences are measured against each tensor's
# largest value: a gradient that is a small sum of large cancelling terms (SN's importance
# logits) differs by ~3e-4 of its size in detectron2's ResNet-50; unsynchronised statistics
# differ by percents.
RTOL, ATOL = 1e-3, 1e-6


def run(command: List[str], cwd: str) -> str:
    """Run ``command`` with one thread per process and tests/ importable; its output, or a failure showing it."""
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [TESTS, os.environ.get("PYTHONPATH")])))
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(command)} failed ({result.returncode}):\n{output[-6000:]}"
    return output


def torchrun(num_processes: int, *arguments: str) -> List[str]:
    """torchrun (``python -m torch.distributed.run``) on this machine, with a free rendezvous port."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={num_processes}",
            *arguments]


def optimizer_tensors(state_dict: dict) -> Dict[str, torch.Tensor]:
    """A torch optimizer's per-parameter state (e.g. SGD's momentum buffers) by ``<index>.<name>``."""
    return {f"{index}.{name}": value.detach().clone() for index, state in state_dict["state"].items()
            for name, value in state.items() if isinstance(value, torch.Tensor)}


def sn_statistics(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {f"{name}.{buffer}": getattr(layer, buffer).detach().clone()
            for name, layer in model.named_modules() if isinstance(layer, SwitchNormBase)
            for buffer in ("running_mean", "running_var")}


class Recorder:
    """Collects one process's record; the toolkits' hooks call it at the moments named."""

    def __init__(self, rank: int, world_size: int, start_iter: int, model: nn.Module, optimizer_state: dict) -> None:
        self.record = dict(rank=rank, world_size=world_size, start_iter=start_iter, checkpoints_written=0,
                           params_at_start={k: v.detach().clone() for k, v in model.state_dict().items()},
                           optimizer_at_start=optimizer_tensors(optimizer_state))

    def record_gradients(self, model: nn.Module, owner: object, step: str = "step") -> None:
        """Record the gradients when ``owner.step`` is next called (after the backward and, under
        DistributedDataParallel, the all-reduce), then restore ``owner.step``."""
        original = getattr(owner, step)

        def recording_step(*args, **kwargs):
            self.record["grads"] = {name: p.grad.detach().clone() for name, p in model.named_parameters()
                                    if p.grad is not None}
            setattr(owner, step, original)
            return original(*args, **kwargs)

        setattr(owner, step, recording_step)

    def first_iteration(self, model: nn.Module, loss: float) -> None:
        self.record.update(loss=loss, stats_after_first=sn_statistics(model))

    def checkpoint_written(self) -> None:
        self.record["checkpoints_written"] += 1

    def end(self, model: nn.Module, iterations_done: int, work_dir: str) -> None:
        self.record.update(iterations_done=iterations_done, final_stats=sn_statistics(model))
        name = f"record_from{self.record['start_iter']}_rank{self.record['rank']}.pt"
        torch.save(self.record, os.path.join(work_dir, name))


def records(work_dir: str, start_iter: int = 0) -> List[dict]:
    """The records of the run that started at ``start_iter``, by rank."""
    found = sorted(glob.glob(os.path.join(work_dir, f"record_from{start_iter}_rank*.pt")))
    loaded = [torch.load(path, weights_only=False) for path in found]
    assert [r["rank"] for r in loaded] == list(range(len(loaded))), found
    return loaded


def assert_all_close(got: Dict[str, torch.Tensor], want: Dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), f"{what}: different tensors {sorted(set(got) ^ set(want))[:5]}"

    def error(name: str) -> float:
        difference = (got[name].double() - want[name].double()).abs().max()
        return float(difference / (want[name].double().abs().max() + ATOL / RTOL))

    errors = {name: error(name) for name in want if want[name].is_floating_point()}
    worst = max(errors, key=errors.get)
    assert errors[worst] <= RTOL, f"{what} differ: {worst} by {errors[worst]:.2g} of its largest value " \
                                  f"({got[worst].flatten()[:4]} vs {want[worst].flatten()[:4]})"
    assert all(torch.equal(got[name], want[name]) for name in want if name not in errors), what


def assert_two_processes_agree_with_one(single: List[dict], pair: List[dict]) -> None:
    """The first iteration of 2 processes on 1 image each equals 1 process on both images: SN's
    (synchronised) batch statistics on every rank, the mean of the ranks' losses (each rank's
    loss is the mean over its image) and the gradients; and every rank ends with the same
    re-estimated statistics. (Those are not compared with the single process's: after a few
    steps from scratch, the float32 differences of the gradients grow to percents in a deep
    network's last stage.)"""
    (one,) = single
    assert [r["world_size"] for r in pair] == [2, 2] and one["world_size"] == 1
    assert one["stats_after_first"], "the model has no SN layers"
    for rank in pair:
        assert_all_close(rank["stats_after_first"], one["stats_after_first"],
                         f"SN statistics after the first iteration on rank {rank['rank']}")
        assert_all_close(rank["grads"], one["grads"], f"gradients on rank {rank['rank']}")
    mean_loss = sum(rank["loss"] for rank in pair) / len(pair)
    assert abs(mean_loss - one["loss"]) <= RTOL * abs(one["loss"]) + ATOL, (mean_loss, one["loss"])
    assert all(torch.equal(pair[1]["final_stats"][name], value) for name, value in pair[0]["final_stats"].items()), \
        "the ranks ended with different re-estimated statistics"


def assert_resumed(resumed: List[dict], model_state: Dict[str, torch.Tensor], optimizer_state: dict,
                   start_iter: int, iterations_done: int) -> None:
    """Every process of the resumed run started at ``start_iter`` from the checkpoint's weights,
    statistics and optimizer state, and trained until ``iterations_done``."""
    saved_optimizer = optimizer_tensors(optimizer_state)
    assert saved_optimizer, "the checkpoint has no optimizer state (momentum buffers) to resume from"
    for rank in resumed:
        assert rank["start_iter"] == start_iter and rank["iterations_done"] == iterations_done
        for name, value in model_state.items():
            assert torch.equal(rank["params_at_start"][name], value), f"{name} on rank {rank['rank']}"
        assert rank["optimizer_at_start"].keys() == saved_optimizer.keys()
        assert all(torch.equal(rank["optimizer_at_start"][k], v) for k, v in saved_optimizer.items()), \
            f"the optimizer state was not resumed on rank {rank['rank']}"
