"""What the benchmarks share.

The file writers, the machine record and the tables come from
:mod:`sn_plugin.reports` (the training command writes its own reports with
them). The detection benchmarks train with ``tools/train_coco_detector.py``,
each training in its own process: :func:`run_trainings`.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence

from sn_plugin.apps.coco_detector import RECORDED_PACKAGES
from sn_plugin.reports import (machine_line, machine_record, markdown_table, save_figure_atomically,
                               write_atomically, write_json_atomically)

__all__ = ["RECORDED_PACKAGES", "REPO", "RESULTS_DIR", "TRAIN_COMMAND", "Training", "add_training_arguments",
           "format_ap", "machine_line", "machine_record", "markdown_table", "require_writable_folder", "run_trainings",
           "save_figure_atomically", "stop_on_sigterm", "training_arguments", "write_atomically",
           "write_json_atomically"]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
TRAIN_COMMAND = os.path.join(REPO, "tools", "train_coco_detector.py")


@dataclass(frozen=True)
class Training:
    """One run of the training command: its key in the results, its arguments and its output folder."""

    key: Hashable
    arguments: Sequence[str]
    out: str


def training_arguments(dataset: str, data: str, norm: str, seed: int, iterations: int, num_images: int,
                       quick: bool, val_interval: int = 0, config: Optional[str] = None) -> List[str]:
    """The training command's arguments for one benchmark training, written the same way by every
    benchmark, so that the trainings two benchmarks share are recognised as one (``--reuse``)."""
    arguments = ["--dataset", dataset, "--data", data, "--norm", norm, "--seed", str(seed),
                 "--max-iters", str(iterations), "--num-images", str(num_images)]
    if config is not None:
        arguments += ["--config", config]
    if quick:
        arguments.append("--quick")
    if val_interval:
        arguments += ["--val-interval", str(val_interval)]
    return arguments


def add_training_arguments(parser: argparse.ArgumentParser, norms: Sequence[str], runs_folder: str,
                           results: str, data_help: str = "dataset folder") -> None:
    """The options of every benchmark made of trainings of ``tools/train_coco_detector.py``."""
    parser.add_argument("--norms", nargs="+", choices=norms, default=list(norms))
    parser.add_argument("--workers", type=int, default=1, help="trainings run at a time (default: %(default)s)")
    parser.add_argument("--reuse", action="store_true", help="keep finished trainings found under --runs")
    parser.add_argument("--out", default=RESULTS_DIR, help=f"folder for {results}")
    parser.add_argument("--runs", default=os.path.join(REPO, "work_dirs", runs_folder),
                        help="folder for the trainings' own outputs and logs")
    parser.add_argument("--data", default=os.path.join(REPO, "work_dirs", "data"), help=data_help)


def require_writable_folder(parser: argparse.ArgumentParser, folder: str) -> None:
    """Make ``folder`` (a results ``--out``), or stop with the fix before any training starts."""
    os.makedirs(folder, exist_ok=True)
    if not os.access(folder, os.W_OK):
        parser.error(f"cannot write to {folder}; pass a writable --out")


def format_ap(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def stop_on_sigterm() -> None:
    """Make ``kill`` unwind like Ctrl-C, so that :func:`run_trainings` stops its trainings, which remove
    their partial output."""
    def raise_keyboard_interrupt(signum, frame):
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, raise_keyboard_interrupt)


def run_trainings(trainings: Sequence[Training], workers: int = 1, reuse: bool = False) -> Dict[Hashable, dict]:
    """Run each training in its own process, ``workers`` at a time; return each one's ``ap_table.json``.

    A training's log goes to ``<out>.log``; one line per finished training is
    printed. Stopping the benchmark (Ctrl-C, ``kill``) stops the running
    trainings, which remove their unfinished output. With ``reuse``, a training whose output folder is complete and
    was made with the same arguments is not run again (to continue a long
    benchmark after an interruption). A failed training stops the benchmark
    with the end of its log.
    """
    started = time.time()
    done: List[int] = []
    processes: List[subprocess.Popen] = []

    def train(training: Training) -> dict:
        command = [sys.executable, TRAIN_COMMAND, *training.arguments, "--out", training.out]
        summary_path = os.path.join(training.out, "ap_table.json")
        if reuse and os.path.exists(os.path.join(training.out, "COMPLETE")) and _made_by(training.out, command):
            print(f"reusing {training.out}", flush=True)
        else:
            os.makedirs(os.path.dirname(os.path.abspath(training.out)), exist_ok=True)
            with open(training.out + ".log", "w") as log:
                log.write(" ".join(command) + "\n")
                log.flush()
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
                processes.append(process)
                returncode = process.wait()
            if returncode != 0:
                with open(training.out + ".log") as log:
                    tail = log.read()[-3000:]
                raise RuntimeError(f"training {training.key} failed (exit {returncode}); the end of "
                                   f"{training.out}.log:\n{tail}")
            with open(os.path.join(training.out, "command.txt"), "w") as f:
                f.write(json.dumps(command[1:]) + "\n")
        with open(summary_path) as f:
            summary = json.load(f)
        done.append(1)
        print(f"[{len(done)}/{len(trainings)}, {(time.time() - started) / 60:.1f} min] {training.key}: box AP "
              f"{summary['bbox']['AP']}" + (f", mask AP {summary['segm']['AP']}" if "segm" in summary else "")
              + f" ({summary['train_minutes']:.1f} min of training)", flush=True)
        return summary

    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    try:
        summaries = list(pool.map(train, trainings))
    except BaseException:  # e.g. Ctrl-C or `kill`: stop the trainings, which then remove their partial output
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            if process.poll() is None:
                process.terminate()
        raise
    finally:
        pool.shutdown(wait=True)
    return {training.key: summary for training, summary in zip(trainings, summaries)}


def _made_by(out: str, command: List[str]) -> bool:
    """Whether ``out`` holds a training by ``command``, its options in any order (two benchmarks
    that share trainings list the same options in their own orders)."""
    try:
        with open(os.path.join(out, "command.txt")) as f:
            recorded = json.loads(f.read())
    except (OSError, ValueError):
        return False
    return recorded[:1] == command[1:2] and _option_groups(recorded[1:]) == _option_groups(command[2:])


def _option_groups(arguments: Sequence[str]) -> List[tuple]:
    """``['--b', '1', '--a', '--c', 'x', 'y']`` -> ``[('--a',), ('--b', '1'), ('--c', 'x', 'y')]``."""
    groups: List[list] = []
    for argument in arguments:
        if argument.startswith("--") or not groups:
            groups.append([argument])
        else:
            groups[-1].append(argument)
    return sorted(tuple(group) for group in groups)
