"""Table 2 and Fig. 4 of the SN paper in miniature: accuracy and SN's importance weights vs. batch size.

The paper trains ResNet-50 on ImageNet with BN, GN and SN at 32 down to 2
samples per GPU and finds that BN falls as the batch shrinks, GN stays flat,
SN stays at or near the best, and SN's BN weight falls with the batch size.
Here a small ResNet (9 norm layers) learns scikit-learn's handwritten digits
(1797 8x8 images, shipped inside scikit-learn; upsampled to 16x16) on one CPU
device, so the batch that the norm layers see is also the batch of the
gradient, as in the paper's (1, n) columns. Every run sees the same number of
samples; the learning rate scales linearly with the batch (0.1 at 32) and
follows a cosine schedule; weight decay applies to conv and fc weights only,
as in the paper. BN and SN evaluate with their moving averages (the layers'
defaults).

    python benchmarks/bench_batch_size.py            # the full run (about 10-15 min on 2 cores)
    python benchmarks/bench_batch_size.py --quick    # a smoke test (under a minute)

Writes ``batch_size.{md,json,png}`` under ``benchmarks/results/`` (or ``--out``).
"""
import argparse
import multiprocessing
import os
import statistics
import sys
import time
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (machine_line, machine_record, markdown_table, save_figure_atomically,  # noqa: E402
                                write_atomically, write_json_atomically)
from sn_plugin import SwitchNorm2d, importance_weights  # noqa: E402

NORMS = ("BN", "GN", "SN")
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# Paper Table 2, ResNet-50 on ImageNet, (8, n) columns: top-1 by samples per GPU.
PAPER_TABLE2 = {
    "BN": {32: 76.4, 16: 76.3, 8: 75.2, 4: 72.7, 2: 65.3},
    "GN": {32: 75.9, 16: 75.8, 8: 76.0, 4: 75.8, 2: 75.9},
    "SN": {32: 76.9, 16: 76.7, 8: 76.7, 4: 75.9, 2: 75.6},
}


def make_norm(kind: str, channels: int) -> nn.Module:
    """BN, GN or SN over ``channels``; GN takes 2 channels per group at most 32 groups."""
    if kind == "BN":
        return nn.BatchNorm2d(channels)
    if kind == "GN":
        return nn.GroupNorm(min(32, channels // 2), channels)
    if kind == "SN":
        return SwitchNorm2d(channels)
    raise ValueError(f"unknown norm {kind!r}; choose one of {NORMS}")


class BasicBlock(nn.Module):
    """ResNet's two-conv residual block with a projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.norm1 = make_norm(norm, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.norm2 = make_norm(norm, out_channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          make_norm(norm, out_channels))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Sequential):
    """Stem and three stages of one BasicBlock each (16, 32, 64 channels); 9 norm layers."""

    def __init__(self, norm: str, num_classes: int = 10) -> None:
        super().__init__(
            nn.Conv2d(1, 16, 3, 1, 1, bias=False), make_norm(norm, 16), nn.ReLU(),
            BasicBlock(16, 16, 1, norm), BasicBlock(16, 32, 2, norm), BasicBlock(32, 64, 2, norm),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes),
        )


def load_digits_split(size: int = 16, test_fraction: float = 0.3) -> Tuple[torch.Tensor, ...]:
    """scikit-learn's digits, upsampled to ``size`` px, standardised, split with a fixed permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise SystemExit("bench_batch_size needs scikit-learn (its digits dataset ships inside it): "
                         "run `make setup`, or `pip install scikit-learn`") from error
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = (images - images.mean()) / images.std()
    labels = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    num_test = int(len(labels) * test_fraction)
    test, train = order[:num_test], order[num_test:]
    return images[train], labels[train], images[test], labels[test]


def train_and_evaluate(job: Tuple[str, int, int, int, float]) -> Dict[str, object]:
    """One cell of the table for one seed: train, then top-1 on the held-out digits and SN's weights."""
    norm, batch_size, seed, samples, base_lr = job
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = load_digits_split()
    model = SmallResNet(norm)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    lr = base_lr * batch_size / 32
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=lr, momentum=0.9)
    iterations = samples // batch_size
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    generator = torch.Generator().manual_seed(seed)
    started = time.time()
    model.train()
    order = torch.empty(0, dtype=torch.long)
    for _ in range(iterations):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(y_train), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        images = _random_shift(x_train[index], generator)
        loss = F.cross_entropy(model(images), y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    with torch.no_grad():
        predictions = torch.cat([model(chunk).argmax(1) for chunk in x_test.split(256)])
    result = {"norm": norm, "batch_size": batch_size, "seed": seed, "iterations": iterations, "lr": lr,
              "test_samples": len(y_test),
              "top1": float((predictions == y_test).float().mean()) * 100, "final_loss": loss.item(),
              "seconds": time.time() - started}
    if norm == "SN":
        weights = importance_weights(model)
        result["sn_mean_weights"] = torch.stack([m for m, _ in weights.values()]).mean(0).tolist()
        result["sn_var_weights"] = torch.stack([v for _, v in weights.values()]).mean(0).tolist()
    return result


def _random_shift(images: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Shift each image by up to ``pad`` pixels (zero-padded crop), a light augmentation against overfitting."""
    size = images.shape[-1]
    padded = F.pad(images, (pad,) * 4, value=float(images.min()))
    offsets = torch.randint(0, 2 * pad + 1, (len(images), 2), generator=generator)
    return torch.stack([p[:, dy:dy + size, dx:dx + size] for p, (dy, dx) in zip(padded, offsets.tolist())])


def summarise(results: List[Dict[str, object]], batch_sizes: Sequence[int]) -> Dict[str, Dict[int, Dict]]:
    """Per norm and batch size: top-1 mean, standard deviation, seeds, and SN's mean importance weights."""
    table: Dict[str, Dict[int, Dict]] = {}
    for norm in NORMS:
        for batch_size in batch_sizes:
            runs = [r for r in results if r["norm"] == norm and r["batch_size"] == batch_size]
            accuracies = [r["top1"] for r in runs]
            cell = {"mean": statistics.fmean(accuracies),
                    "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
                    "runs": accuracies}
            if norm == "SN":
                cell["mean_weights"] = np.mean([r["sn_mean_weights"] for r in runs], axis=0).tolist()
                cell["var_weights"] = np.mean([r["sn_var_weights"] for r in runs], axis=0).tolist()
            table.setdefault(norm, {})[batch_size] = cell
    return table


def render_markdown(table, batch_sizes, seeds, samples, test_samples, record, wall_seconds) -> str:
    columns = sorted(batch_sizes, reverse=True)
    header = ["norm"] + [f"(1, {b})" for b in columns]
    rows = [[norm] + [f"{table[norm][b]['mean']:.2f} ± {table[norm][b]['std']:.2f}" for b in columns]
            for norm in NORMS]
    for first, second in (("GN", "BN"), ("SN", "BN"), ("SN", "GN")):
        rows.append([f"{first}−{second}"] + [f"{table[first][b]['mean'] - table[second][b]['mean']:+.2f}"
                                             for b in columns])
    paper_columns = [b for b in columns if b in PAPER_TABLE2["BN"]]
    paper = markdown_table(["norm"] + [f"(8, {b})" for b in paper_columns],
                           [[norm] + [f"{PAPER_TABLE2[norm][b]:.1f}" for b in paper_columns] for norm in NORMS])
    weights = markdown_table(
        ["batch", "mean: IN", "mean: LN", "mean: BN", "var: IN", "var: LN", "var: BN"],
        [[b] + [f"{w:.3f}" for w in table["SN"][b]["mean_weights"] + table["SN"][b]["var_weights"]]
         for b in columns])
    return (
        "# Batch size vs. normalizer: paper Table 2 / Fig. 4 in miniature\n\n"
        f"Small ResNet (9 norm layers) on scikit-learn's digits (16x16, {samples} training samples seen per run, "
        "lr 0.1 x batch/32, cosine), one device: the norm layers' batch is the gradient batch. "
        f"Top-1 (%) on {test_samples} held-out digits, mean ± standard deviation over seeds {list(seeds)}.\n\n"
        + markdown_table(header, rows)
        + "\nSN's importance weights, averaged over its 9 layers and the seeds (Fig. 4):\n\n" + weights
        + "\nPaper, Table 2 (ResNet-50, ImageNet, 8 GPUs, top-1 %):\n\n" + paper
        + "\n" + machine_line(record, wall_seconds)
    )


def plot(table, batch_sizes, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = sorted(batch_sizes, reverse=True)
    figure, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    for norm, colour in zip(NORMS, ("tab:blue", "tab:orange", "tab:green")):
        means = [table[norm][b]["mean"] for b in columns]
        stds = [table[norm][b]["std"] for b in columns]
        left.errorbar(range(len(columns)), means, yerr=stds, label=norm, color=colour, marker="o", capsize=3)
    left.set_xticks(range(len(columns)), [str(b) for b in columns])
    left.set_xlabel("samples per batch")
    left.set_ylabel("top-1 (%) on held-out digits")
    left.set_title("Accuracy vs. batch size (Table 2)")
    left.legend()
    left.grid(alpha=0.3)
    branch_colours = ("tab:red", "tab:purple", "tab:green")
    for axis, key, title in ((middle, "mean_weights", "SN importance weights of μ"),
                             (right, "var_weights", "SN importance weights of σ")):
        bottom = np.zeros(len(columns))
        for i, (branch, colour) in enumerate(zip(("IN", "LN", "BN"), branch_colours)):
            values = np.array([table["SN"][b][key][i] for b in columns])
            axis.bar(range(len(columns)), values, bottom=bottom, color=colour, label=branch)
            bottom += values
        axis.set_xticks(range(len(columns)), [str(b) for b in columns])
        axis.set_xlabel("samples per batch")
        axis.set_ylim(0, 1)
        axis.set_title(title + " (Fig. 4)")
        axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=9)
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=110)
    plt.close(figure)


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 batch sizes, 1 seed, few samples")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for batch_size.{md,json,png}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 16, 8, 4, 2])
    parser.add_argument("--samples", type=int, default=6400, help="training samples seen by every run")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="runs in parallel, one thread each")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.batch_sizes, args.samples = [0], [8, 2], 64
    if min(args.batch_sizes) < 2:
        parser.error("--batch-sizes must be >= 2: BN has no batch statistics from one sample")
    os.makedirs(args.out, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        parser.error(f"cannot write to {args.out}; pass a writable --out")

    jobs = [(norm, b, seed, args.samples, 0.1) for b in sorted(args.batch_sizes) for norm in NORMS
            for seed in args.seeds]
    started = time.time()
    if args.workers > 1:
        with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
            results = []
            for result in pool.imap_unordered(train_and_evaluate, jobs):
                results.append(result)
                _report(result, len(results), len(jobs), started)
    else:
        results = []
        for job in jobs:
            results.append(train_and_evaluate(job))
            _report(results[-1], len(results), len(jobs), started)
    wall = time.time() - started
    table = summarise(results, args.batch_sizes)
    record = machine_record(("torch", "numpy", "scikit-learn", "matplotlib", "sn_plugin"))
    stem = os.path.join(args.out, "batch_size")
    write_json_atomically(stem + ".json", {
        "machine": record, "seeds": args.seeds, "batch_sizes": args.batch_sizes, "samples": args.samples,
        "wall_seconds": wall, "quick": args.quick, "table": {n: {str(b): c for b, c in t.items()}
                                                              for n, t in table.items()},
        "runs": sorted(results, key=lambda r: (r["norm"], r["batch_size"], r["seed"]))})
    markdown = render_markdown(table, args.batch_sizes, args.seeds, args.samples, results[0]["test_samples"],
                               record, wall)
    write_atomically(stem + ".md", markdown)
    plot(table, args.batch_sizes, stem + ".png")
    print(markdown)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")
    return table


def _report(result, done: int, total: int, started: float) -> None:
    elapsed = time.time() - started
    print(f"[{done}/{total}] {result['norm']} batch {result['batch_size']:>2} seed {result['seed']}: "
          f"top-1 {result['top1']:.2f}% ({result['seconds']:.0f}s; elapsed {elapsed / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
