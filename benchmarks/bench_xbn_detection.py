"""Table 6 of the XBNBlock paper in miniature: detection from scratch at 2 images per batch with BN, GN and XBN.

The paper (Huang et al., CVPR 2022, Sec. 5.3.2) trains Faster R-CNN R50-FPN on COCO from
scratch with ordinary (not frozen) BN and finds, at 2 images per GPU, BN 25.35 box AP, GN 28.19
and XBNBlockGN 27.45 (at 4 and 8 images per GPU XBNBlockGN is best: 30.51 and 30.58).

Here the demo's Mask R-CNN (a half-width ResNet-18 with FPN, 2 images per batch, 128px images)
trains from scratch on the built-in shapes dataset with tools/train_coco_detector.py
(sn_plugin.apps.coco_detector), for each seed:

* BN: BN in every layer of backbone, FPN and heads (moving averages);
* GN: GN (16 groups) in every layer;
* XBN: the BN detector with an XBN backbone, ``type='XBNResNet'``: the first norm of every
  BasicBlock (P1 = P2 in a BasicBlock) and the stem's BN are GroupNorm with 32 groups (the
  paper's 64 groups at width 64, here at half width: 1 to 8 channels per group), the other
  norms stay BN. The paper does not say which norm its from-scratch FPN and head use; keeping
  them BN compares the backbones alone.

The table gives COCO box and mask AP on the val split, mean ± standard deviation over the seeds.

    python benchmarks/bench_xbn_detection.py                    # BN, GN, XBN x 3 seeds x 1600 iterations
    python benchmarks/bench_xbn_detection.py --workers 2        # two trainings at a time (2 idle cores)
    python benchmarks/bench_xbn_detection.py --quick            # a smoke test (tiny dataset, 2 iterations)

Writes ``xbn_detection.{md,json}`` under ``benchmarks/results/`` (or ``--out``); each training's
own output folder and log are kept under ``--runs``; ``--reuse`` keeps finished ones.
"""
import argparse
import os
import time
from typing import Dict, List, Sequence, Tuple

from _common import (RECORDED_PACKAGES, Training, add_training_arguments, format_ap, machine_line, machine_record,
                     markdown_table, require_writable_folder, run_trainings, stop_on_sigterm, training_arguments,
                     write_atomically, write_json_atomically)
from sn_plugin.apps.coco_detector import builtin_dataset, default_config
from sn_plugin.reports import format_mean_spread, mean_and_spread

NORMS = ("BN", "GN", "XBN")
# Paper, Table 6: Faster R-CNN R50-FPN from scratch on COCO, box AP at 2 / 4 / 8 images per GPU.
PAPER_TABLE6 = {"BN": (25.35, 29.33, 29.56), "GN": (28.19, 27.36, 28.22), "XBN": (27.45, 30.51, 30.58)}
ITERATIONS, SEEDS = 1600, (0, 1, 2)
QUICK_ITERATIONS, QUICK_SEEDS = 2, (0,)
BFN_GROUPS = 32
KINDS = (("bbox", "box"), ("segm", "mask"))

Key = Tuple[str, int]  # norm, seed


def write_xbn_config(folder: str) -> str:
    """The demo's detector config with an XBN backbone; the training command then sets every
    ``norm_cfg`` (the BNs that remain, FPN, heads) to BN, and leaves ``bfn_cfg`` alone."""
    path = os.path.join(folder, "mask_rcnn_r18_fpn_xbn_shapes.py")
    text = (f"_base_ = [{default_config()!r}]\n"
            f"model = dict(backbone=dict(type='XBNResNet', bfn_cfg=dict(type='GN', num_groups={BFN_GROUPS}), "
            f"bfn_position=2, stem_bfn=True))\n")
    os.makedirs(folder, exist_ok=True)
    write_atomically(path, text)
    return path


def plan(norms: Sequence[str], seeds: Sequence[int], iterations: int, runs: str, data: str,
         quick: bool, val_interval: int = 0) -> List[Training]:
    """One training of the command per (norm, seed)."""
    xbn_config = write_xbn_config(runs) if "XBN" in norms else None
    trainings = []
    for seed in seeds:
        for norm in norms:
            # XBN: the command's BN everywhere, on the XBN backbone of the config (its BFNs stay)
            arguments = training_arguments("shapes", data, "BN" if norm == "XBN" else norm, seed, iterations, 3, quick,
                                           val_interval, config=xbn_config if norm == "XBN" else None)
            trainings.append(Training((norm, seed), arguments, os.path.join(runs, f"{norm}_{iterations}it_seed{seed}")))
    return trainings


def summarise(results: Dict[Key, dict], norms: Sequence[str]) -> Dict[str, dict]:
    """Per norm: mean and spread over the seeds of box and mask AP and AP50."""
    return {norm: {f"{kind}_{metric}": mean_and_spread([r[kind][metric] for (n, _), r in results.items() if n == norm])
                   for kind, _ in KINDS for metric in ("AP", "AP50")}
            for norm in norms}


def render_markdown(table: Dict[str, dict], results: Dict[Key, dict], seeds: Sequence[int], record: dict,
                    wall_seconds: float) -> str:
    first = next(iter(results.values()))
    dataset = first["dataset"]
    rows = [[norm] + [format_mean_spread(cells[f"{kind}_{metric}"]) for kind, _ in KINDS for metric in ("AP", "AP50")]
            for norm, cells in table.items()]
    every = [[norm, seed, format_ap(r["bbox"]["AP"]), format_ap(r["bbox"]["AP50"]), format_ap(r["segm"]["AP"]),
              f"{r['train_minutes']:.1f}"] for (norm, seed), r in sorted(results.items(), key=lambda i: i[0][::-1])]
    paper = markdown_table(["norm", "2 images per GPU", "4", "8"],
                           [[norm] + [f"{v:.2f}" for v in PAPER_TABLE6[norm]] for norm in NORMS])
    return (
        "# Detection from scratch at 2 images per batch: XBNBlock paper, Table 6, in miniature\n\n"
        f"Mask R-CNN (ResNet-{first['backbone']['depth']} at base width {first['backbone']['width']} + FPN) "
        f"from scratch on the built-in shapes dataset ({dataset['num_train']} train / {dataset['num_val']} val "
        f"images of {dataset['image_size']}px), {first['images_per_batch']} images per batch, "
        f"{first['iterations']} iterations (linear warm-up, cosine decay). BN: BN everywhere; GN: GN everywhere; "
        f"XBN: BN everywhere except the stem's and every BasicBlock's first norm, GroupNorm with {BFN_GROUPS} "
        f"groups. COCO AP (%) on the val split, mean ± standard deviation over seeds "
        f"{', '.join(map(str, seeds))}.\n\n"
        + markdown_table(["norm", "box AP", "box AP50", "mask AP", "mask AP50"], rows)
        + "\nEvery training:\n\n"
        + markdown_table(["norm", "seed", "box AP", "box AP50", "mask AP", "train min"], every)
        + "\nPaper, Table 6 (Faster R-CNN, ResNet-50 + FPN, COCO, from scratch, box AP):\n\n" + paper
        + "\n" + machine_line(record, wall_seconds)
    )


def main(argv=None) -> Dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: the command's --quick dataset, {QUICK_ITERATIONS} iterations, seeds "
                             f"{QUICK_SEEDS}")
    parser.add_argument("--iterations", type=int, help=f"iterations per training (default {ITERATIONS})")
    parser.add_argument("--seeds", type=int, nargs="+", help=f"training seeds (default {SEEDS})")
    add_training_arguments(parser, NORMS, "xbn_detection_runs", "xbn_detection.{md,json}")
    parser.add_argument("--val-interval", type=int, default=0, metavar="N",
                        help="also evaluate every N iterations (the same trainings as bench_scratch_detection.py's "
                             "with that option: with its --runs and --reuse its BN and GN trainings are reused)")
    args = parser.parse_args(argv)
    iterations = args.iterations or (QUICK_ITERATIONS if args.quick else ITERATIONS)
    seeds = args.seeds or list(QUICK_SEEDS if args.quick else SEEDS)
    if iterations < 1:
        parser.error("--iterations must be >= 1")
    require_writable_folder(parser, args.out)

    started = time.time()
    builtin_dataset("shapes", args.data, args.quick)  # made once, before the trainings that share it
    results = run_trainings(plan(args.norms, seeds, iterations, args.runs, args.data, args.quick, args.val_interval),
                            args.workers, args.reuse)
    wall = time.time() - started
    table = summarise(results, args.norms)
    record = machine_record(RECORDED_PACKAGES)
    stem = os.path.join(args.out, "xbn_detection")
    write_json_atomically(stem + ".json", {
        "machine": record, "wall_seconds": wall, "quick": args.quick, "iterations": iterations, "seeds": seeds,
        "bfn_groups": BFN_GROUPS, "summary": table,
        "runs": [{"norm": n, "seed": seed, "bbox": r["bbox"], "segm": r["segm"], "train_minutes": r["train_minutes"]}
                 for (n, seed), r in results.items()]})
    markdown = render_markdown(table, results, seeds, record, wall)
    write_atomically(stem + ".md", markdown)
    print(markdown)
    print(f"wrote {stem}.md and {stem}.json")
    return table


if __name__ == "__main__":
    stop_on_sigterm()
    main()
