"""Appendix D / Table 7 (lower part) of the SN paper in miniature: detection from scratch with BN, GN and SN.

The paper trains Faster R-CNN (ResNet-50) on COCO from scratch and finds BN
far behind (20.0 AP), GN good (28.3) and SN best (29.5). Here the demo's Mask
R-CNN (tools/demo.py: a half-width ResNet-18 with FPN, 2 images per batch,
128px images) trains from scratch on the built-in shapes dataset three times,
once per norm in every layer of backbone, FPN and heads, with the same
schedule and seed; the table reports COCO box and mask AP on its val split.
BN and GN use the usual settings (BN: moving averages; GN: 16 groups, as the
narrowest layer has 32 channels); SN evaluates with batch-average statistics.

    python benchmarks/bench_scratch_detection.py                   # 3 x 800 iterations (about 15-20 min)
    python benchmarks/bench_scratch_detection.py --max-iters 1500  # another equal schedule
    python benchmarks/bench_scratch_detection.py --quick           # a smoke test

Writes ``scratch_detection.{md,json,png}`` under ``benchmarks/results/`` (or ``--out``);
each training's own output folder (model, logs, figures) is kept under ``--runs``.
"""
import argparse
import json
import os
import signal
import subprocess
import sys
import time
from typing import Dict, List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks._common import (machine_record, markdown_table, save_figure_atomically,  # noqa: E402
                                write_atomically, write_json_atomically)

NORMS = ("BN", "GN", "SN")
RESULTS_DIR = os.path.join(REPO, "benchmarks", "results")
DEMO = os.path.join(REPO, "tools", "demo.py")
# Paper Table 7, lower part: Faster R-CNN, ResNet-50, COCO from scratch, box AP.
PAPER_TABLE7 = {"BN": (20.0, 33.5, 21.1), "GN": (28.3, 46.3, 30.1), "SN": (29.5, 47.8, 31.6)}
KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
SCHEDULE = 800  # iterations per norm: about 5 minutes each on 2 idle cores


def train(norm: str, out: str, max_iters: int, quick: bool, seed: int) -> Dict[str, object]:
    """One training by tools/demo.py in its own process; returns its ap_table.json."""
    command = [sys.executable, DEMO, "--norm", norm, "--out", out, "--seed", str(seed), "--num-images", "3",
               "--max-iters", str(max_iters)]
    if quick:
        command.append("--quick")
    print(f"\n=== {norm}: {' '.join(command)}", flush=True)
    subprocess.run(command, check=True)
    with open(os.path.join(out, "ap_table.json")) as f:
        return json.load(f)


def render_markdown(results: Dict[str, Dict], record, wall_seconds: float) -> str:
    first = results[NORMS[0]]
    rows = []
    for kind, label in (("bbox", "box"), ("segm", "mask")):
        for norm in NORMS:
            rows.append([f"{label}", norm] + [_fmt(results[norm][kind][key]) for key in KEYS])
    paper = markdown_table(["norm (backbone and head)", "AP", "AP50", "AP75"],
                           [[norm] + [f"{v:.1f}" for v in PAPER_TABLE7[norm]] for norm in NORMS])
    return (
        "# Detection from scratch at 2 images per batch: paper Table 7 (lower part) in miniature\n\n"
        f"Mask R-CNN (half-width ResNet-18 + FPN, the norm in every layer of backbone, FPN and heads), "
        f"from scratch on the built-in shapes dataset ({first['dataset']['num_train']} train / "
        f"{first['dataset']['num_val']} val images of {first['dataset']['image_size']}px), "
        f"{first['images_per_batch']} images per batch, {first['iterations']} iterations each, seed {first['seed']}. "
        "COCO AP (%) on the val split, from mmdet's CocoMetric.\n\n"
        + markdown_table(["", "norm", *KEYS], rows)
        + "\nTraining time per run (min): "
        + ", ".join(f"{norm} {results[norm]['train_minutes']:.1f}" for norm in NORMS) + ".\n"
        + "\nPaper, Table 7 lower part (Faster R-CNN, ResNet-50, COCO, from scratch, box AP):\n\n" + paper
        + f"\nMachine: {record['processor']} ({record['cpu_count']} CPUs), {record['platform']}; "
        f"versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items())}; "
        f"wall time {wall_seconds / 60:.1f} min; command: `{record['command']}`.\n"
    )


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def plot(results: Dict[str, Dict], run_dirs: Dict[str, str], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (bars, curves) = plt.subplots(1, 2, figsize=(12, 4.2))
    colours = {"BN": "tab:blue", "GN": "tab:orange", "SN": "tab:green"}
    positions = np.arange(2)
    for i, norm in enumerate(NORMS):
        values = [results[norm][kind]["AP"] or 0.0 for kind in ("bbox", "segm")]
        drawn = bars.bar(positions + (i - 1) * 0.27, values, width=0.27, color=colours[norm], label=norm)
        bars.bar_label(drawn, fmt="%.1f", fontsize=8)
    bars.set_xticks(positions, ["box AP", "mask AP"])
    bars.set_ylabel("COCO AP (%) on val")
    bars.set_title("From scratch, 2 images/batch")
    bars.legend()
    for norm in NORMS:
        steps, losses = _loss_curve(run_dirs[norm])
        curves.plot(steps, losses, color=colours[norm], label=norm)
    curves.set_xlabel("iteration")
    curves.set_ylabel("training loss (window average)")
    curves.set_title("Training loss")
    curves.legend()
    curves.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=110)
    plt.close(figure)


def _loss_curve(run_dir: str):
    steps: List[int] = []
    losses: List[float] = []
    for root, _, files in os.walk(os.path.join(run_dir, "logs")):
        if "scalars.json" in files:
            with open(os.path.join(root, "scalars.json")) as f:
                for line in f:
                    row = json.loads(line)
                    if "loss" in row:
                        steps.append(row["step"])
                        losses.append(row["loss"])
    return steps, losses


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def main(argv=None) -> Dict[str, Dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: the demo's --quick mode per norm")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for scratch_detection.{md,json,png}")
    parser.add_argument("--max-iters", type=int,
                        help=f"iterations per training, the same for all three (default {SCHEDULE}; --quick: 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs", default=os.path.join(REPO, "work_dirs", "scratch_detection_runs"),
                        help="folder for the three trainings' own outputs")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        parser.error(f"cannot write to {args.out}; pass a writable --out")

    started = time.time()
    run_dirs = {norm: os.path.join(args.runs, norm) for norm in NORMS}
    max_iters = args.max_iters or (12 if args.quick else SCHEDULE)
    results = {norm: train(norm, run_dirs[norm], max_iters, args.quick, args.seed) for norm in NORMS}
    wall = time.time() - started
    record = machine_record(("torch", "mmengine", "mmcv", "mmdet", "pycocotools", "numpy"))
    stem = os.path.join(args.out, "scratch_detection")
    write_json_atomically(stem + ".json", {"machine": record, "wall_seconds": wall, "quick": args.quick,
                                           "seed": args.seed, "results": results})
    markdown = render_markdown(results, record, wall)
    write_atomically(stem + ".md", markdown)
    plot(results, run_dirs, stem + ".png")
    print(markdown)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")
    return results


if __name__ == "__main__":
    # `kill` unwinds like Ctrl-C: subprocess.run then stops the running training, which removes its partial output
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    main()
