"""Detection and instance segmentation from scratch on real images: nuclei microscopy tiles, BN vs GN vs SN.

The demo's Mask R-CNN (a half-width ResNet-18 with FPN, 2 images per batch)
trains from scratch on the nuclei tiles made from the fluorescence image in
stardist's wheel (:mod:`sn_plugin.data.nuclei`: 12 train and 4 val tiles of
128x128, one class), with BN, GN or SN in every layer of backbone, FPN and
heads, the same schedule for all and several seeds. The table gives COCO box
and mask AP on the val tiles, mean ± standard deviation over the seeds, with
every training's numbers; the picture shows one val tile: ground truth and each
norm's predictions (seed of the first training). BN uses moving averages, GN
16 groups, SN batch-average statistics (as in the demo).

    python benchmarks/bench_nuclei_detection.py                 # 3 norms x 3 seeds x 1200 iterations
    python benchmarks/bench_nuclei_detection.py --workers 2     # two trainings at a time (2 idle cores)
    python benchmarks/bench_nuclei_detection.py --max-iters 2400 --seeds 0 1 2 3 4
    python benchmarks/bench_nuclei_detection.py --quick         # a smoke test (2 iterations, one seed)

The first run fetches the stardist wheel with pip (3 MB) into
~/.cache/sn_plugin/wheels. Writes ``nuclei_detection.{md,json,png}`` under
``benchmarks/results/`` (or ``--out``); each training's output folder and log
are kept under ``--runs``; ``--reuse`` keeps the finished ones after an
interruption.
"""
import argparse
import os
import time
from typing import Dict, List, Sequence, Tuple

from _common import (RECORDED_PACKAGES, Training, add_training_arguments, format_ap, machine_line, machine_record,
                     markdown_table, require_writable_folder, run_trainings, stop_on_sigterm, training_arguments,
                     write_atomically, write_json_atomically)
from sn_plugin.apps.coco_detector import PREDICTIONS, CocoPictures, CommandError, builtin_dataset
from sn_plugin.reports import format_mean_spread, mean_and_spread, save_image_grid

NORMS = ("BN", "GN", "SN")
SEEDS = (0, 1, 2)
SCHEDULE = 1200  # iterations per training: the demo's schedule
QUICK_SCHEDULE, QUICK_SEEDS = 2, (0,)
METRICS = (("bbox", "AP"), ("bbox", "AP50"), ("bbox", "AP75"), ("segm", "AP"), ("segm", "AP50"), ("segm", "AP75"))
LABELS = {"bbox": "box", "segm": "mask"}

Key = Tuple[str, int]  # norm, seed


def plan(norms: Sequence[str], seeds: Sequence[int], max_iters: int, runs: str, data: str,
         quick: bool) -> List[Training]:
    trainings = []
    for seed in seeds:
        for norm in norms:
            arguments = training_arguments("nuclei", data, norm, seed, max_iters, 4, quick)
            trainings.append(Training((norm, seed), arguments, os.path.join(runs, f"{norm}_seed{seed}")))
    return trainings


def summarise(results: Dict[Key, dict], norms: Sequence[str]) -> Dict[str, dict]:
    """Per norm: mean and spread over the seeds of each metric, as ``{'bbox_AP': {...}, ...}``."""
    return {norm: {f"{kind}_{metric}": mean_and_spread([run[kind][metric] for (n, _), run in results.items()
                                                        if n == norm])
                   for kind, metric in METRICS} for norm in norms}


def render_markdown(table: Dict[str, dict], results: Dict[Key, dict], seeds: Sequence[int], record: dict,
                    wall_seconds: float, picture: str) -> str:
    first = next(iter(results.values()))
    dataset = first["dataset"]
    header = ["norm", *[f"{LABELS[kind]} {metric}" for kind, metric in METRICS]]
    rows = [[norm, *[format_mean_spread(cells[f"{kind}_{metric}"]) for kind, metric in METRICS]]
            for norm, cells in table.items()]
    per_seed = [[norm, seed, *[format_ap(run[kind][metric]) for kind, metric in METRICS], f"{run['train_minutes']:.1f}"]
                for (norm, seed), run in sorted(results.items(), key=lambda item: (item[0][0], item[0][1]))]
    return (
        "# Mask R-CNN from scratch on real nuclei images: BN vs GN vs SN\n\n"
        f"Mask R-CNN (ResNet-{first['backbone']['depth']} at base width {first['backbone']['width']} + FPN, the "
        f"norm in every layer of backbone, FPN and heads), from scratch, {first['images_per_batch']} images per "
        f"batch, {first['iterations']} iterations each (linear warm-up, cosine decay), on the nuclei tiles of "
        f"stardist 0.9.2's `img2d.tif` (2018 Data Science Bowl; {dataset['num_train_images']} train and "
        f"{dataset['num_val_images']} val tiles of {dataset['tile_size']}px, {dataset['num_val_objects']} nuclei "
        f"in the val tiles; nuclei of the other region or mostly in another tile are ignored regions). COCO AP (%) "
        f"on the val tiles from mmdet's CocoMetric, mean ± standard deviation over seeds "
        f"{', '.join(map(str, seeds))}.\n\n"
        + markdown_table(header, rows)
        + "\nEvery training:\n\n"
        + markdown_table(["norm", "seed", *header[1:], "train min"], per_seed)
        + f"\n![predictions on a val tile]({os.path.basename(picture)})\n"
        + "\n" + machine_line(record, wall_seconds)
    )


def draw_val_tile(results: Dict[Key, dict], trainings: Sequence[Training], path: str) -> None:
    """The val tile with the most nuclei: ground truth, then each norm's predictions (the first seed's run)."""
    first = trainings[0]
    dataset = results[first.key]["dataset"]
    pictures = CocoPictures(dataset["val_annotations"], dataset["val_images"])
    tile = max(pictures.image_ids, key=pictures.num_objects)
    seed = first.key[1]
    shown = [training for training in trainings if training.key[1] == seed]
    row = [pictures.draw(tile)] + [pictures.draw(tile, os.path.join(training.out, PREDICTIONS))
                                   for training in shown]
    save_image_grid([row], ["ground truth (grey: ignored)"] + [f"{t.key[0]}, seed {seed} (score >= 0.3)"
                                                               for t in shown], path)


def main(argv=None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_SCHEDULE} iterations, seeds {QUICK_SEEDS}")
    parser.add_argument("--max-iters", type=int, help=f"iterations per training (default {SCHEDULE})")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default {SEEDS})")
    add_training_arguments(parser, NORMS, "nuclei_detection_runs", "nuclei_detection.{md,json,png}",
                           data_help="dataset folder (the nuclei tiles are made in DATA/sn_nuclei)")
    args = parser.parse_args(argv)
    max_iters = args.max_iters or (QUICK_SCHEDULE if args.quick else SCHEDULE)
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else SEEDS)
    if max_iters < 1:
        parser.error("--max-iters must be >= 1")
    require_writable_folder(parser, args.out)
    try:
        builtin_dataset("nuclei", args.data)  # fetched and made once, before the trainings that share it
    except CommandError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")

    started = time.time()
    trainings = plan(args.norms, seeds, max_iters, args.runs, args.data, args.quick)
    results = run_trainings(trainings, args.workers, args.reuse)
    wall = time.time() - started
    table = summarise(results, args.norms)
    record = machine_record(RECORDED_PACKAGES)
    stem = os.path.join(args.out, "nuclei_detection")
    draw_val_tile(results, trainings, stem + ".png")
    write_json_atomically(stem + ".json", {
        "machine": record, "wall_seconds": wall, "quick": args.quick, "iterations": max_iters, "seeds": seeds,
        "dataset": next(iter(results.values()))["dataset"], "summary": table,
        "runs": [{"norm": norm, "seed": seed, "bbox": run["bbox"], "segm": run["segm"],
                  "train_minutes": run["train_minutes"]} for (norm, seed), run in results.items()]})
    markdown = render_markdown(table, results, seeds, record, wall, stem + ".png")
    write_atomically(stem + ".md", markdown)
    print(markdown)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")
    return table


if __name__ == "__main__":
    stop_on_sigterm()
    main()
