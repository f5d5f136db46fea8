"""Table 1 of the Consistent Normalization paper in miniature: BN vs. CN with a shrink-and-pad augmentation.

The paper trains ResNet-32/110 on CIFAR-10 and on "CIFAR-10-a", CIFAR-10 plus copies shrunk
to half size and zero-padded back, and finds that the augmentation hurts a BN network (ResNet-32:
92.9 -> 89.7) while CN, one set of BN statistics and affine parameters per transform, gains
(93.3). Here a small ResNet (9 norm layers) learns scikit-learn's digits (16x16) with the same
transform (8x8 digit in the middle of a 16x16 zero frame), trained with the library's
:func:`sn_plugin.consistent_train_step` (the paper's Algorithm 1) in five ways:

* ``BN``: clean images only;
* ``BN+aug (sequential)``: clean and shrunk view of every batch, one forward each, shared BN
  (each forward normalizes with its own view's batch statistics, both update the same running ones);
* ``BN+aug (mixed)``: both views concatenated into one BN batch;
* ``CN (sequential)`` / ``CN (mixed)``: the BN network converted to CN with 2 branches
  (:func:`sn_plugin.convert_to_cn`); the two modes compute the same thing.

Every method sees the same batches for the same number of iterations; the two-view methods get
two losses per batch (weight 1 each). Evaluation: top-1 on the held-out digits, clean and
shrunk, with branch 0 (the identity branch: the paper's inference) and, for CN, the shrunk
images with their own branch 1 ("dynamic inference" with a known transform).

    python -m benchmarks.bench_consistent_norm            # the full run (a few minutes on 2 cores)
    python -m benchmarks.bench_consistent_norm --quick    # a smoke test

Writes ``consistent_norm.{md,json}`` under ``benchmarks/results/`` (or ``--out``).
"""
import argparse
import os
import statistics
import time
from typing import Dict, List

import torch
from torch.nn import functional as F

from benchmarks._common import machine_line, machine_record, markdown_table, write_atomically, write_json_atomically
from benchmarks._digits import Digits, accuracy, basic_resnet, load_digits
from sn_plugin import consistent_branch, consistent_train_step, convert_to_cn

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# method -> (normalization, transforms used in training, mode)
METHODS = {
    "BN": ("BN", 1, "sequential"),
    "BN+aug (sequential)": ("BN", 2, "sequential"),
    "BN+aug (mixed)": ("BN", 2, "mixed"),
    "CN (sequential)": ("CN", 2, "sequential"),
    "CN (mixed)": ("CN", 2, "mixed"),
}
# Paper, Table 1 (validation top-1 %, CIFAR-10): model -> row -> accuracy.
PAPER_TABLE1 = {
    "ResNet-32": {"CIFAR-10, with BN": 92.9, "CIFAR-10, w/o BN": 92.1, "CIFAR-10-a, with BN": 89.7,
                  "CIFAR-10-a, w/o BN": 92.6, "CIFAR-10-a, with CN": 93.3},
    "ResNet-110": {"CIFAR-10, with BN": 94.0, "CIFAR-10, w/o BN": 93.6, "CIFAR-10-a, with BN": 92.3,
                   "CIFAR-10-a, w/o BN": 94.0, "CIFAR-10-a, with CN": 94.6},
}


def shrink_and_pad(digits: Digits):
    """The paper's CIFAR-10-a transform on standardised images: half size, zero frame (in pixel space)."""

    def transform(x: torch.Tensor) -> torch.Tensor:
        pixels = x * digits.std + digits.mean
        size = pixels.shape[-1]
        small = F.interpolate(pixels, size=(size // 2, size // 2), mode="area")
        margin = (size - size // 2) // 2
        framed = F.pad(small, (margin, size - size // 2 - margin) * 2, value=0.0)
        return (framed - digits.mean) / digits.std

    return transform


def run(method: str, seed: int, epochs: int, digits: Digits, batch_size: int = 64, lr: float = 0.1) -> Dict:
    """Train one model with ``method`` and evaluate it."""
    norm, views, mode = METHODS[method]
    torch.manual_seed(seed)
    model = basic_resnet()
    if norm == "CN":
        model = convert_to_cn(model, num_branches=2)
    transform = shrink_and_pad(digits)
    transforms = [None, transform][:views]
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay}], lr=lr,
                                momentum=0.9)
    iterations = epochs * (len(digits.y_train) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(iterations):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(digits.y_train), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        step = consistent_train_step(model, optimizer, digits.x_train[index], digits.y_train[index], transforms,
                                     F.cross_entropy, mode)
        scheduler.step()
    shrunk = transform(digits.x_test)
    result = {"method": method, "seed": seed, "iterations": iterations, "final_loss": float(step.loss),
              "clean": accuracy(model, digits.x_test, digits.y_test),
              "transformed": accuracy(model, shrunk, digits.y_test)}
    if norm == "CN":
        with consistent_branch(model, 1):
            result["transformed_own_branch"] = accuracy(model, shrunk, digits.y_test)
    result["seconds"] = time.time() - started
    return result


def summarise(runs: List[Dict]) -> Dict[str, Dict[str, Dict[str, float]]]:
    table = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        for column in ("clean", "transformed", "transformed_own_branch"):
            values = [r[column] for r in mine if column in r]
            if values:
                table.setdefault(method, {})[column] = {
                    "mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}
    return table


def render_markdown(table, runs, args, record, wall: float, test_samples: int) -> str:
    def cell(method, column):
        c = table[method].get(column)
        return f"{c['mean']:.2f} ± {c['std']:.2f}" if c else "–"

    rows = [[m, cell(m, "clean"), cell(m, "transformed"), cell(m, "transformed_own_branch")] for m in METHODS]
    base = table["BN"]["clean"]["mean"]
    gains = [[m, f"{table[m]['clean']['mean'] - base:+.2f}"] for m in METHODS if m != "BN"]
    paper = markdown_table(["model", *PAPER_TABLE1["ResNet-32"]],
                           [[model, *rows_.values()] for model, rows_ in PAPER_TABLE1.items()])
    return (
        "# Consistent Normalization: paper Table 1 in miniature\n\n"
        f"Small ResNet (9 norm layers) on scikit-learn's digits (16x16), {args.epochs} epochs of batches of 64 "
        "(SGD 0.1, cosine), trained with `sn_plugin.consistent_train_step`. The transform shrinks each digit "
        "to 8x8 and pads it back to 16x16 with zeros (the paper's CIFAR-10-a). Top-1 (%) on "
        f"{test_samples} held-out digits, mean ± standard deviation over seeds {args.seeds}; "
        "\"branch 0\" is the identity branch every model evaluates with, \"own branch\" evaluates the shrunk "
        "digits with CN's branch 1.\n\n"
        + markdown_table(["method", "clean", "shrunk (branch 0)", "shrunk (own branch)"], rows)
        + "\nCN (mixed) and CN (sequential) compute the same losses and gradients (in float64 they agree to "
          "rounding); in float32 the different summation order makes their runs drift apart as separate "
          "seeds would, so their difference shows the run-to-run noise.\n"
        + "\nClean top-1 relative to BN without augmentation (the paper's \"gain\" column):\n\n"
        + markdown_table(["method", "gain"], gains)
        + "\nPaper, Table 1 (CIFAR-10 validation top-1 %; the CIFAR-10-a rows are models trained on the "
          "augmented set):\n\n" + paper
        + "\n" + machine_line(record, wall)
    )


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 1 epoch of 256 digits")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for consistent_norm.{md,json}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = [0], 1
    torch.set_num_threads(1)
    digits = load_digits()
    if args.quick:  # a few iterations on a subset
        digits.x_train, digits.y_train = digits.x_train[:256], digits.y_train[:256]
    started = time.time()
    runs = []
    for seed in args.seeds:
        for method in METHODS:
            runs.append(run(method, seed, args.epochs, digits))
            r = runs[-1]
            print(f"{method:<20} seed {seed}: clean {r['clean']:.2f}  shrunk {r['transformed']:.2f}"
                  + (f"  shrunk/own branch {r['transformed_own_branch']:.2f}" if "transformed_own_branch" in r
                     else "") + f"  ({r['seconds']:.0f}s)", flush=True)
    wall = time.time() - started
    table = summarise(runs)
    record = machine_record(("torch", "numpy", "scikit-learn", "sn_plugin"))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "consistent_norm")
    payload = {"machine": record, "quick": args.quick, "seeds": args.seeds, "epochs": args.epochs,
               "test_samples": len(digits.y_test), "wall_seconds": wall, "table": table, "runs": runs,
               "paper_table1": PAPER_TABLE1}
    write_json_atomically(stem + ".json", payload)
    markdown = render_markdown(table, runs, args, record, wall, len(digits.y_test))
    write_atomically(stem + ".md", markdown)
    print(markdown)
    return payload


if __name__ == "__main__":
    main()
