"""Figs. 2-5 of the estimation-shift paper in miniature: ESM of BN layers in a deep MLP on the digits.

The paper trains a 20-layer MLP (128 neurons per layer) on MNIST with full-batch gradient
descent (lr 0.1, 80 iterations, BN running averages with update factor 0.9) and measures every
BN layer's estimation shift magnitude (ESM: distance between its running statistics and the
statistics the trained model actually feeds it on the test set):

* setup one (Fig. 2): training set = test set. Train and test error differ in the first tens of
  epochs although the data are the same, and the ESM is larger in deeper layers: the shift
  accumulates through stacked BNs;
* setup two (Fig. 3): training sets of 32 ... 1024 samples drawn from the test set. Fewer
  samples give a larger input shift, a larger ESM_sigma growing with depth, and a higher test
  error (MNIST, 32 samples: 73.02% with BN, 57.73% without);
* Figs. 4/5: the same with the odd layers' BNs replaced by GroupNorm (4 groups), "GNBN": the
  BFN blocks the accumulation.

Here the same MLP (19 hidden layers of 128 with Linear-norm-ReLU, and a classifier: 20 linear
layers) learns scikit-learn's 1797 digits (8x8 = 64 inputs), S' = all digits; ESM comes from
:func:`sn_plugin.estimation_shift` after every epoch.

    python -m benchmarks.bench_estimation_shift            # the full run (a few minutes)
    python -m benchmarks.bench_estimation_shift --quick    # a smoke test

Writes ``estimation_shift.{md,json,png}`` under ``benchmarks/results/`` (or ``--out``).
"""
import argparse
import dataclasses
import os
import statistics
import time
from typing import Dict, List, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from benchmarks._common import (machine_line, machine_record, markdown_table, save_figure_atomically, write_atomically,
                                write_json_atomically)
from benchmarks._digits import load_digits
from sn_plugin import estimation_shift, plot_estimation_shift_history

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = ("BN", "GNBN")
PAPER = {"test error, 32 samples, BN": 73.02, "test error, 32 samples, no BN": 57.73}
SIZES = (32, 128, 256, 512, 1024)


def mlp(variant: str, depth: int = 20, width: int = 128, inputs: int = 64, classes: int = 10) -> nn.Sequential:
    """``depth`` linear layers; the ``depth - 1`` hidden ones are Linear-norm-ReLU. ``variant``: 'BN' (BN
    everywhere), 'GNBN' (GroupNorm(4) in the odd hidden layers, BN in the even ones), 'none'."""
    layers: List[nn.Module] = []
    for i in range(1, depth):
        linear = nn.Linear(inputs if i == 1 else width, width)
        nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
        nn.init.zeros_(linear.bias)
        if variant == "none":
            norm = nn.Identity()
        elif variant == "GNBN" and i % 2 == 1:
            norm = nn.GroupNorm(4, width)
        else:
            norm = nn.BatchNorm1d(width, momentum=0.9)  # the paper's update factor alpha = 0.9
        layers += [linear, norm, nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def error(model: nn.Module, x: torch.Tensor, y: torch.Tensor, train_mode: bool = False) -> float:
    model.train(train_mode)
    with torch.no_grad():
        return float((model(x).argmax(1) != y).float().mean()) * 100


def train(variant: str, seed: int, x_train, y_train, x_test, y_test, epochs: int, lr: float,
          track: bool) -> Dict:
    """Full-batch gradient descent; with ``track``, errors and ESM after every epoch."""
    torch.manual_seed(seed)
    model = mlp(variant)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    curve = []
    for epoch in range(1, epochs + 1):
        model.train()
        logits = model(x_train)
        train_error = float((logits.argmax(1) != y_train).float().mean()) * 100  # the batch the step sees
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(logits, y_train).backward()
        optimizer.step()
        if track or epoch == epochs:
            entry = {"epoch": epoch, "train_error": train_error, "test_error": error(model, x_test, y_test)}
            if variant != "none":
                entry["esm"] = estimation_shift(model, [x_test])
            curve.append(entry)
    final = curve[-1]
    return {"variant": variant, "seed": seed, "curve": curve, "train_error": error(model, x_train, y_train),
            "test_error": final["test_error"], "esm": final.get("esm")}


def _mean_report(reports):
    """Layer-wise mean of ESM over seeds (reports of the same layers)."""
    return [dataclasses.replace(first, esm_mu=statistics.fmean(r[i].esm_mu for r in reports),
                                esm_sigma=statistics.fmean(r[i].esm_sigma for r in reports))
            for i, first in enumerate(reports[0])]


def _rows_of(report):
    return [{"index": r.index, "name": r.name, "esm_mu": r.esm_mu, "esm_sigma": r.esm_sigma} for r in report]


def setup_one(x, y, seeds: Sequence[int], epochs: int, lr: float) -> Dict:
    results = {}
    for variant in VARIANTS:
        runs = [train(variant, seed, x, y, x, y, epochs, lr, track=True) for seed in seeds]
        history = {e["epoch"]: _mean_report([run["curve"][i]["esm"] for run in runs])
                   for i, e in enumerate(runs[0]["curve"])}
        results[variant] = {
            "epochs": [e["epoch"] for e in runs[0]["curve"]],
            "train_error": [statistics.fmean(run["curve"][i]["train_error"] for run in runs)
                            for i in range(epochs)],
            "test_error": [statistics.fmean(run["curve"][i]["test_error"] for run in runs) for i in range(epochs)],
            "history": history,
        }
        print(f"setup one, {variant}: final train error {results[variant]['train_error'][-1]:.2f}%, "
              f"test error {results[variant]['test_error'][-1]:.2f}%", flush=True)
    return results


def input_shift(x_train, x_test) -> float:
    """ESM_sigma "of layer 0" (Fig. 3b): ||sqrt(var_train) - sqrt(var_test)|| over the input features."""
    return float(torch.linalg.vector_norm(x_train.double().var(0, correction=0).sqrt()
                                          - x_test.double().var(0, correction=0).sqrt()))


def setup_two(x, y, seeds: Sequence[int], sizes: Sequence[int], epochs: int, lr: float) -> Dict:
    results = {}
    for size in sizes:
        cell = {"input_esm_sigma": [], **{v: [] for v in (*VARIANTS, "none")}}
        for seed in seeds:
            subset = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))[:size]
            cell["input_esm_sigma"].append(input_shift(x[subset], x))
            for variant in (*VARIANTS, "none"):
                cell[variant].append(train(variant, seed, x[subset], y[subset], x, y, epochs, lr, track=False))
        results[size] = cell
        print(f"setup two, |S| = {size}: test error "
              + ", ".join(f"{v} {statistics.fmean(r['test_error'] for r in cell[v]):.2f}%"
                          for v in (*VARIANTS, "none")), flush=True)
    return results


def summarise_two(two: Dict) -> Dict:
    table = {}
    for size, cell in two.items():
        row = {"input_esm_sigma": statistics.fmean(cell["input_esm_sigma"])}
        for variant in (*VARIANTS, "none"):
            errors = [r["test_error"] for r in cell[variant]]
            row[variant] = {"test_error": statistics.fmean(errors),
                            "test_error_std": statistics.stdev(errors) if len(errors) > 1 else 0.0,
                            "train_error": statistics.fmean(r["train_error"] for r in cell[variant])}
            if variant != "none":
                row[variant]["esm"] = _rows_of(_mean_report([r["esm"] for r in cell[variant]]))
        table[size] = row
    return table


def plot(one: Dict, two_table: Dict, path: str) -> None:
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    figure = Figure(figsize=(15, 12), layout="constrained")
    axes = figure.subplots(3, 3)
    for row, variant in enumerate(VARIANTS):
        result = one[variant]
        ax = axes[row][0]
        ax.plot(result["epochs"], result["train_error"], label="train (train mode)", color="tab:blue")
        ax.plot(result["epochs"], result["test_error"], label="test (eval mode)", color="tab:red")
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%)")
        ax.set_title(f"{variant}, setup one (S = S'): errors")
        ax.legend()
        ax.grid(linewidth=0.4, alpha=0.5)
        plot_estimation_shift_history(result["history"], axes=axes[row][1:])
        for ax, what in zip(axes[row][1:], ("ESM$_\\mu$", "ESM$_\\sigma$")):
            ax.set_title(f"{variant}, setup one: {what} of each BN")
            ax.set_yscale("log")
    sizes = sorted(two_table)
    ax = axes[2][0]
    for variant, colour in zip((*VARIANTS, "none"), ("tab:blue", "tab:orange", "tab:gray")):
        ax.errorbar(sizes, [two_table[s][variant]["test_error"] for s in sizes],
                    yerr=[two_table[s][variant]["test_error_std"] for s in sizes], marker="o", capsize=3,
                    label=variant, color=colour)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("training samples |S|")
    ax.set_ylabel("test error on S' (%)")
    ax.set_title("setup two: test error")
    ax.legend()
    ax.grid(linewidth=0.4, alpha=0.5)
    colours = colormaps["plasma"]
    for ax, variant in zip(axes[2][1:], VARIANTS):
        for i, size in enumerate(sizes):
            esm = two_table[size][variant]["esm"]
            ax.plot([0] + [r["index"] + 1 for r in esm],
                    [two_table[size]["input_esm_sigma"]] + [r["esm_sigma"] for r in esm],
                    marker=".", color=colours(i / max(len(sizes) - 1, 1)), label=f"|S| = {size}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("BN layer (forward order; 0 = the input)")
        ax.set_ylabel("ESM$_\\sigma$ at the end of training")
        ax.set_title(f"{variant}, setup two: ESM$_\\sigma$ per layer")
        ax.legend(fontsize=8)
        ax.grid(linewidth=0.4, alpha=0.5)
    save_figure_atomically(figure, path, dpi=80)


def render_markdown(one: Dict, two_table: Dict, args, record, wall: float) -> str:
    shown = sorted({e for e in (1, 2, 5, 10, 20, 40, 60, 80) if e <= args.epochs} | {args.epochs})
    rows = []
    for epoch in shown:
        row = [epoch]
        for variant in VARIANTS:
            result = one[variant]
            report = result["history"][epoch]
            row += [f"{result['train_error'][epoch - 1]:.2f}", f"{result['test_error'][epoch - 1]:.2f}",
                    f"{report[0].esm_sigma:.3f}", f"{report[-1].esm_sigma:.3f}"]
        rows.append(row)
    header = ["epoch"] + [f"{v} {c}" for v in VARIANTS
                          for c in ("train err", "test err", "ESMσ first BN", "ESMσ last BN")]
    sizes = sorted(two_table)
    two_rows = []
    for size in sizes:
        row = two_table[size]
        two_rows.append([size, f"{row['input_esm_sigma']:.3f}"]
                        + [f"{row[v]['test_error']:.2f} ± {row[v]['test_error_std']:.2f}" for v in (*VARIANTS, "none")]
                        + [" / ".join(f"{row[v]['train_error']:.1f}" for v in (*VARIANTS, "none"))]
                        + [f"{row[v]['esm'][0]['esm_sigma']:.3f} / {row[v]['esm'][-1]['esm_sigma']:.3f}"
                           for v in VARIANTS])
    unfitted = [size for size in sizes if two_table[size]["none"]["train_error"] > 5.0]
    note = (f"\nThe network without normalization did not fit its training set in {args.epochs} full-batch steps "
            f"(train error above 5% at |S| = {unfitted}), so its test error is no counterpart of the paper's "
            "57.73%.\n" if unfitted else "")
    bn_layers = len(one["BN"]["history"][shown[-1]])
    gnbn_layers = len(one["GNBN"]["history"][shown[-1]])
    return (
        "# Estimation shift of BN: the paper's Figs. 2-5 in miniature\n\n"
        f"20-layer MLP (19 hidden Linear-norm-ReLU layers of 128, Kaiming init) on scikit-learn's digits "
        f"(64 inputs; S' = all {args.samples} digits), full-batch gradient descent, lr {args.lr}, {args.epochs} "
        "epochs, BN running averages with update factor 0.9 (torch momentum 0.9). BN: "
        f"{bn_layers} BN layers; GNBN: GroupNorm(4 groups) in the odd hidden layers, {gnbn_layers} BN layers. "
        f"ESM from `sn_plugin.estimation_shift` on S' after every epoch; means over seeds {args.seeds}.\n\n"
        "## Setup one: training set = test set (Figs. 2 and 4)\n\n"
        "Train error: the training-mode forward of the step; test error: eval mode (running statistics) "
        "after the step, on the same data.\n\n"
        + markdown_table(header, rows)
        + "\n## Setup two: training subsets of the test set (Figs. 3 and 5)\n\n"
        "Final test error on S' (%), final train error on S (eval mode) and final ESM_σ of the first / last BN "
        "layer; \"input ESM_σ\" is "
        "||sqrt(var_S) − sqrt(var_S')|| of the 64 input features (the paper's layer 0).\n\n"
        + markdown_table(["|S|", "input ESM_σ", *(f"{v} test err" for v in (*VARIANTS, "none")),
                          "train err BN / GNBN / none", *(f"{v} ESM_σ first / last BN" for v in VARIANTS)],
                         two_rows)
        + note
        + "\nPaper (MNIST, |S| = 32): test error 73.02% with BN, 57.73% without BN.\n\n"
        "Figure: `estimation_shift.png` (rows: BN setup one, GNBN setup one, setup two).\n\n"
        + machine_line(record, wall)
    )


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 epochs, one subset size")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for estimation_shift.{md,json,png}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--lr", type=float, default=0.1)
    args = parser.parse_args(argv)
    sizes = SIZES
    if args.quick:
        args.seeds, args.epochs, sizes = [0], 2, (32,)
    torch.set_num_threads(1)
    digits = load_digits(flat=True, test_fraction=0.0)
    x, y = digits.x_train, digits.y_train
    args.samples = len(y)
    started = time.time()
    one = setup_one(x, y, args.seeds, args.epochs, args.lr)
    two_table = summarise_two(setup_two(x, y, args.seeds, sizes, args.epochs, args.lr))
    wall = time.time() - started
    record = machine_record(("torch", "numpy", "scikit-learn", "matplotlib", "sn_plugin"))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "estimation_shift")
    payload = {
        "machine": record, "quick": args.quick, "seeds": args.seeds, "epochs": args.epochs, "lr": args.lr,
        "samples": args.samples, "wall_seconds": wall, "paper": PAPER,
        "setup_one": {v: {"epochs": r["epochs"], "train_error": r["train_error"], "test_error": r["test_error"],
                          "layers": [layer.name for layer in r["history"][r["epochs"][0]]],
                          **{field: [[round(getattr(layer, field), 6) for layer in r["history"][e]]
                                     for e in r["epochs"]] for field in ("esm_mu", "esm_sigma")}}
                      for v, r in one.items()},
        "setup_two": {str(size): row for size, row in two_table.items()},
    }
    write_json_atomically(stem + ".json", payload)
    markdown = render_markdown(one, two_table, args, record, wall)
    write_atomically(stem + ".md", markdown)
    plot(one, two_table, stem + ".png")
    print(markdown)
    return payload


if __name__ == "__main__":
    main()
