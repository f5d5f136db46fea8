"""Appendix D / Table 7 (lower part) of the SN paper in miniature: detection from scratch with BN, GN and SN,
over several seeds and schedules.

The paper trains Faster R-CNN (ResNet-50) on COCO from scratch and finds BN
far behind (20.0 AP), GN good (28.3) and SN best (29.5). Here the demo's Mask
R-CNN (a half-width ResNet-18 with FPN, 2 images per batch, 128px images)
trains from scratch on the built-in shapes dataset with BN, GN or SN in every
layer of backbone, FPN and heads, for each seed and each schedule (a schedule
is a complete training of that many iterations, warm-up and cosine decay
included, so each point is a finished training, not a snapshot of a longer
one). The table gives COCO box and mask AP on the val split, mean ± standard
deviation over the seeds; the figure AP against the schedule, to show where it
stops rising. BN and GN use the usual settings (BN: moving averages; GN: 16
groups); SN evaluates with batch-average statistics.

    python benchmarks/bench_scratch_detection.py                      # 3 norms x 3 seeds x 800/1600/3200 its
    python benchmarks/bench_scratch_detection.py --workers 2          # two trainings at a time (2 idle cores)
    python benchmarks/bench_scratch_detection.py --schedules 1200 --seeds 0 1 2 3 4
    python benchmarks/bench_scratch_detection.py --quick              # a smoke test (tiny dataset, 2 iterations)

Writes ``scratch_detection.{md,json,png}`` under ``benchmarks/results/`` (or
``--out``); each training's own output folder (model, logs, figures) and log
are kept under ``--runs``; ``--reuse`` keeps the finished ones after an
interruption.
"""
import argparse
import os
import time
from typing import Dict, List, Sequence, Tuple

from _common import (RECORDED_PACKAGES, Training, add_training_arguments, format_ap, machine_line, machine_record,
                     markdown_table, require_writable_folder, run_trainings, save_figure_atomically, stop_on_sigterm,
                     training_arguments, write_atomically, write_json_atomically)
from sn_plugin.apps.coco_detector import builtin_dataset
from sn_plugin.reports import format_mean_spread, mean_and_spread

NORMS = ("BN", "GN", "SN")
# Paper Table 7, lower part: Faster R-CNN, ResNet-50, COCO from scratch, box AP, AP50, AP75.
PAPER_TABLE7 = {"BN": (20.0, 33.5, 21.1), "GN": (28.3, 46.3, 30.1), "SN": (29.5, 47.8, 31.6)}
SCHEDULES = (800, 1600, 3200)
SEEDS = (0, 1, 2)
QUICK_SCHEDULES, QUICK_SEEDS = (2,), (0,)
COLOURS = {"BN": "tab:blue", "GN": "tab:orange", "SN": "tab:green"}
KINDS = (("bbox", "box"), ("segm", "mask"))

Key = Tuple[str, int, int]  # norm, schedule, seed


def plan(norms: Sequence[str], schedules: Sequence[int], seeds: Sequence[int], runs: str, data: str,
         quick: bool, val_interval: int = 0) -> List[Training]:
    """Every (norm, schedule, seed) training of the demo's detector on the shapes dataset, longest first."""
    trainings = []
    for schedule in sorted(schedules, reverse=True):
        for seed in seeds:
            for norm in norms:
                arguments = training_arguments("shapes", data, norm, seed, schedule, 3, quick, val_interval)
                trainings.append(Training((norm, schedule, seed), arguments,
                                          os.path.join(runs, f"{norm}_{schedule}it_seed{seed}")))
    return trainings


def summarise(results: Dict[Key, dict], norms: Sequence[str], schedules: Sequence[int]) -> Dict[str, dict]:
    """Per norm and schedule: mean and spread over the seeds of box and mask AP (and AP50)."""
    table: Dict[str, dict] = {}
    for norm in norms:
        table[norm] = {}
        for schedule in schedules:
            runs = [summary for (n, s, _), summary in results.items() if n == norm and s == schedule]
            table[norm][schedule] = {f"{kind}_{metric}": mean_and_spread([run[kind][metric] for run in runs])
                                     for kind, _ in KINDS for metric in ("AP", "AP50")}
    return table


def render_markdown(table: Dict[str, dict], results: Dict[Key, dict], schedules: Sequence[int],
                    seeds: Sequence[int], record: dict, wall_seconds: float) -> str:
    first = next(iter(results.values()))
    dataset = first["dataset"]
    rows = []
    for kind, label in KINDS:
        for norm in table:
            rows.append([label, norm] + [format_mean_spread(table[norm][s][f"{kind}_AP"]) for s in schedules])
    per_seed = []
    for (norm, schedule, seed), summary in sorted(results.items(), key=lambda item: (item[0][1], item[0][0],
                                                                                     item[0][2])):
        per_seed.append([norm, schedule, seed, format_ap(summary["bbox"]["AP"]), format_ap(summary["bbox"]["AP50"]),
                         format_ap(summary["segm"]["AP"]), f"{summary['train_minutes']:.1f}"])
    paper = markdown_table(["norm (backbone and head)", "AP", "AP50", "AP75"],
                           [[norm] + [f"{v:.1f}" for v in PAPER_TABLE7[norm]] for norm in NORMS])
    return (
        "# Detection from scratch at 2 images per batch: paper Table 7 (lower part) in miniature\n\n"
        f"Mask R-CNN (ResNet-{first['backbone']['depth']} at base width {first['backbone']['width']} + FPN, the "
        f"norm in every layer of backbone, FPN and heads), from scratch on the built-in shapes dataset "
        f"({dataset['num_train']} train / {dataset['num_val']} val images of {dataset['image_size']}px), "
        f"{first['images_per_batch']} images per batch. Each schedule is a complete training (linear warm-up, "
        f"cosine decay). COCO AP (%) on the val split from mmdet's CocoMetric, mean ± standard deviation over "
        f"seeds {', '.join(map(str, seeds))}.\n\n"
        + markdown_table(["", "norm", *[f"{s} iterations" for s in schedules]], rows)
        + "\nEvery training:\n\n"
        + markdown_table(["norm", "iterations", "seed", "box AP", "box AP50", "mask AP", "train min"], per_seed)
        + "\nPaper, Table 7 lower part (Faster R-CNN, ResNet-50, COCO, from scratch, box AP):\n\n" + paper
        + "\n" + machine_line(record, wall_seconds)
    )


def plot(table: Dict[str, dict], schedules: Sequence[int], path: str) -> None:
    """Box and mask AP against the schedule, mean with the seeds' standard deviation, one line per norm."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (kind, label) in zip(axes, KINDS):
        for norm, cells in table.items():
            means = [cells[s][f"{kind}_AP"]["mean"] for s in schedules]
            spreads = [cells[s][f"{kind}_AP"]["std"] or 0.0 for s in schedules]
            axis.errorbar(schedules, means, yerr=spreads, marker="o", capsize=3, color=COLOURS.get(norm),
                          label=norm)
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(schedules), [str(s) for s in schedules])
        axis.set_xlabel("training iterations (complete schedule)")
        axis.set_ylabel(f"{label} AP (%) on val")
        axis.set_title(f"{label} AP from scratch, 2 images/batch")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=110)
    plt.close(figure)


def curves(results: Dict[Key, dict], norms: Sequence[str], schedule: int) -> Dict[str, Dict[str, list]]:
    """Per norm: AP during the trainings of ``schedule`` iterations (their validations every
    ``--val-interval``), mean and spread over the seeds at each evaluated iteration."""
    table: Dict[str, Dict[str, list]] = {}
    for norm in norms:
        histories = [run.get("history", []) for (n, s, _), run in results.items() if n == norm and s == schedule]
        iterations = sorted({h["iteration"] for history in histories for h in history})
        table[norm] = {"iterations": iterations}
        for kind, _ in KINDS:
            table[norm][kind] = [mean_and_spread([h[f"{kind}_AP"] for history in histories for h in history
                                                  if h["iteration"] == i]) for i in iterations]
    return table


def plot_curves(table: Dict[str, Dict[str, list]], schedule: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for axis, (kind, label) in zip(axes, KINDS):
        for norm, cells in table.items():
            means = [c["mean"] for c in cells[kind]]
            spreads = [c["std"] or 0.0 for c in cells[kind]]
            axis.errorbar(cells["iterations"], means, yerr=spreads, marker="o", capsize=3, color=COLOURS.get(norm),
                          label=norm)
        axis.set_xlabel(f"iteration of the {schedule}-iteration training")
        axis.set_ylabel(f"{label} AP (%) on val")
        axis.set_title(f"{label} AP during training, mean ± std over seeds")
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=110)
    plt.close(figure)


def render_curves(table: Dict[str, Dict[str, list]], schedule: int) -> str:
    iterations = next(iter(table.values()))["iterations"]
    rows = [[label, norm] + [format_mean_spread(c) for c in cells[kind]]
            for kind, label in KINDS for norm, cells in table.items()]
    return (f"\nAP during the {schedule}-iteration trainings (validation every {iterations[0]} iterations; "
            f"mean ± std over the seeds), to see where it stops rising (`scratch_detection_curve.png`):\n\n"
            + markdown_table(["", "norm", *[str(i) for i in iterations]], rows))


def main(argv=None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: the command's --quick dataset, schedules {QUICK_SCHEDULES}, seeds "
                             f"{QUICK_SEEDS}")
    parser.add_argument("--schedules", type=int, nargs="+", help=f"iterations per training (default {SCHEDULES})")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default {SEEDS})")
    add_training_arguments(parser, NORMS, "scratch_detection_runs", "scratch_detection.{md,json,png}")
    parser.add_argument("--val-interval", type=int, default=0, metavar="N",
                        help="also evaluate every N iterations, for AP-against-iteration curves of the longest "
                             "schedule (default: only at the end)")
    args = parser.parse_args(argv)
    schedules = sorted(args.schedules or (QUICK_SCHEDULES if args.quick else SCHEDULES))
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else SEEDS)
    if min(schedules) < 1:
        parser.error("--schedules must be >= 1")
    require_writable_folder(parser, args.out)

    started = time.time()
    builtin_dataset("shapes", args.data, args.quick)  # made once, before the trainings that share it
    results = run_trainings(plan(args.norms, schedules, seeds, args.runs, args.data, args.quick, args.val_interval),
                            args.workers, args.reuse)
    wall = time.time() - started
    table = summarise(results, args.norms, schedules)
    record = machine_record(RECORDED_PACKAGES)
    stem = os.path.join(args.out, "scratch_detection")
    write_json_atomically(stem + ".json", {
        "machine": record, "wall_seconds": wall, "quick": args.quick, "schedules": schedules, "seeds": seeds,
        "summary": {norm: {str(s): cell for s, cell in cells.items()} for norm, cells in table.items()},
        "runs": [{"norm": n, "iterations": s, "seed": seed, "bbox": r["bbox"], "segm": r["segm"],
                  "train_minutes": r["train_minutes"]} for (n, s, seed), r in results.items()]})
    markdown = render_markdown(table, results, schedules, seeds, record, wall)
    if args.val_interval:
        longest = curves(results, args.norms, schedules[-1])
        markdown += render_curves(longest, schedules[-1])
        plot_curves(longest, schedules[-1], stem + "_curve.png")
    write_atomically(stem + ".md", markdown)
    plot(table, schedules, stem + ".png")
    print(markdown)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")
    return table


if __name__ == "__main__":
    stop_on_sigterm()
    main()
