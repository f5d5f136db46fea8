"""Fig. 8 of the estimation-shift paper in miniature: accuracy under disturbed BN statistics, BN vs. XBNBlock.

The paper disturbs the running statistics of the first BN in the first six blocks of a trained
ResNet-50 (Eq. 5: mean * (1 + d), var * (1 + d), d ~ U(-Delta, Delta) per channel) and finds that
the BN network's top-1 falls fast with Delta while XBNBlock-GN and, even more, XBNBlock-IN stay
stable (averages over 5 noise seeds; Appendix Fig. A9: also with only the first block, or the
first 13, disturbed).

Here a small bottleneck ResNet (stem, three stages of two torchvision Bottlenecks of widths 16,
32, 64: six blocks) learns scikit-learn's digits (16x16) three times: with BN everywhere, and
converted by :func:`sn_plugin.convert_to_xbn` (P2, stem included as in the authors' code) with
GroupNorm (16 groups: 1 to 4 channels per group, as ResNet-50's 64 groups give 1 to 8) or with
InstanceNorm (affine=False) as the BFN. Each trained model is then evaluated with the first BN
of the first 1, 3 or 6 blocks disturbed by :func:`sn_plugin.perturbed_running_stats`.

    python -m benchmarks.bench_xbn_perturbation            # the full run (10-20 minutes on 2 cores)
    python -m benchmarks.bench_xbn_perturbation --quick    # a smoke test

Writes ``xbn_perturbation.{md,json,png}`` under ``benchmarks/results/`` (or ``--out``).
"""
import argparse
import os
import statistics
import time
from typing import Dict, List, Sequence

import torch
from torch.nn import functional as F

from benchmarks._common import (machine_line, machine_record, markdown_table, save_figure_atomically, write_atomically,
                                write_json_atomically)
from benchmarks._digits import Digits, accuracy, bottleneck_resnet, load_digits
from sn_plugin import convert_to_xbn, estimation_shift, perturbed_running_stats, residual_blocks

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = {"BN": None, "XBN-GN": {"type": "GN", "num_groups": 16}, "XBN-IN": {"type": "IN"}}
MAGNITUDES = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DISTURBED_BLOCKS = (1, 3, 6)


def build(variant: str, seed: int):
    torch.manual_seed(seed)
    model = bottleneck_resnet(blocks_per_stage=2)
    if VARIANTS[variant] is not None:
        model = convert_to_xbn(model, VARIANTS[variant], position=2, stem=True)
    return model


def train(model, digits: Digits, seed: int, epochs: int, batch_size: int = 32, lr: float = 0.05):
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": 5e-4}, {"params": no_decay}], lr=lr,
                                momentum=0.9)
    iterations = epochs * (len(digits.y_train) // batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    generator = torch.Generator().manual_seed(seed)
    order = torch.empty(0, dtype=torch.long)
    model.train()
    for _ in range(iterations):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(len(digits.y_train), generator=generator)])
        index, order = order[:batch_size], order[batch_size:]
        loss = F.cross_entropy(model(digits.x_train[index]), digits.y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return model


def first_bns(model, blocks: int) -> List[str]:
    """The first main-path norm (a BN in every variant: XBN replaces the second) of the first ``blocks`` blocks."""
    return [f"{b.name}.{b.norms[0]}" for b in residual_blocks(model)[:blocks]]


def evaluate(model, digits: Digits, magnitudes: Sequence[float], disturbed: Sequence[int], noise_seeds: int) -> Dict:
    curves = {}
    for blocks in disturbed:
        layers = first_bns(model, blocks)
        curve = []
        for magnitude in magnitudes:
            accuracies = []
            for noise in range(noise_seeds if magnitude else 1):
                generator = torch.Generator().manual_seed(noise)
                with perturbed_running_stats(model, magnitude, layers, generator):
                    accuracies.append(accuracy(model, digits.x_test, digits.y_test))
            curve.append(statistics.fmean(accuracies))
        curves[blocks] = curve
    return curves


def summarise(runs: List[Dict], disturbed: Sequence[int]) -> Dict:
    table = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        for blocks in disturbed:
            curves = [r["curves"][blocks] for r in mine]
            table.setdefault(variant, {})[blocks] = {
                "mean": [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))],
                "std": [statistics.stdev(c[i] for c in curves) if len(curves) > 1 else 0.0
                        for i in range(len(curves[0]))]}
        table[variant]["mean_esm_sigma"] = statistics.fmean(r["mean_esm_sigma"] for r in mine)
    return table


def plot(table: Dict, magnitudes: Sequence[float], disturbed: Sequence[int], path: str) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5 * len(disturbed), 4), layout="constrained")
    axes = figure.subplots(1, len(disturbed), sharey=True, squeeze=False)[0]
    for ax, blocks in zip(axes, disturbed):
        for variant, colour in zip(VARIANTS, ("tab:blue", "tab:orange", "tab:green")):
            cell = table[variant][blocks]
            ax.errorbar(magnitudes, cell["mean"], yerr=cell["std"], marker="o", capsize=3, label=variant,
                        color=colour)
        ax.set_xlabel("noise magnitude Δ")
        ax.set_title(f"first BN of the first {blocks} block{'s' if blocks > 1 else ''} disturbed")
        ax.grid(linewidth=0.4, alpha=0.5)
    axes[0].set_ylabel("top-1 (%) on held-out digits")
    axes[0].legend()
    save_figure_atomically(figure, path, dpi=110)


def render_markdown(table, args, record, wall, test_samples) -> str:
    sections = []
    for blocks in args.disturbed:
        rows = [[variant] + [f"{m:.1f}" for m in table[variant][blocks]["mean"]] for variant in VARIANTS]
        sections.append(f"First BN of the first {blocks} of 6 blocks disturbed:\n\n"
                        + markdown_table(["model", *(f"Δ={m:g}" for m in args.magnitudes)], rows))
    esm = markdown_table(["model", "mean ESM_σ of its BN layers (undisturbed)"],
                         [[v, f"{table[v]['mean_esm_sigma']:.3f}"] for v in VARIANTS])
    return (
        "# XBNBlock under disturbed BN statistics: the paper's Fig. 8 in miniature\n\n"
        "Small bottleneck ResNet (stem + 3 stages x 2 torchvision Bottlenecks, widths 16/32/64) on "
        f"scikit-learn's digits (16x16), {args.epochs} epochs (batch 32, SGD 0.05, cosine). XBN: "
        "`convert_to_xbn(position=2, stem=True)` with GroupNorm(16 groups) or InstanceNorm(affine=False). "
        f"Top-1 (%) on {test_samples} held-out digits with the running statistics of the first BN of the "
        "first k blocks multiplied by (1 + d), d ~ U(-Δ, Δ) per channel (Eq. 5), averaged over "
        f"{args.noise_seeds} noise seeds and over trainings with seeds {args.seeds}.\n\n"
        + "\n".join(sections)
        + "\nEstimation shift of the trained models on the held-out digits (`sn_plugin.estimation_shift`):\n\n"
        + esm
        + "\nPaper, Fig. 8 (ResNet-50 on ImageNet, first 6 of 16 blocks disturbed): BN's top-1 falls "
          "markedly as Δ grows, XBNBlock-GN and XBNBlock-IN stay much more stable, IN more than GN.\n\n"
        "Figure: `xbn_perturbation.png`.\n\n"
        + machine_line(record, wall)
    )


def main(argv=None) -> Dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke test: 1 seed, 2 iterations, 2 magnitudes")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for xbn_perturbation.{md,json,png}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--noise-seeds", type=int, default=5)
    args = parser.parse_args(argv)
    args.magnitudes, args.disturbed = MAGNITUDES, DISTURBED_BLOCKS
    torch.set_num_threads(1)
    digits = load_digits()
    if args.quick:
        args.seeds, args.epochs, args.noise_seeds, args.magnitudes, args.disturbed = [0], 1, 1, (0.0, 0.5), (1,)
        digits.x_train, digits.y_train = digits.x_train[:64], digits.y_train[:64]
        digits.x_test, digits.y_test = digits.x_test[:64], digits.y_test[:64]
    started = time.time()
    runs = []
    for seed in args.seeds:
        for variant in VARIANTS:
            t0 = time.time()
            model = train(build(variant, seed), digits, seed, args.epochs)
            curves = evaluate(model, digits, args.magnitudes, args.disturbed, args.noise_seeds)
            report = estimation_shift(model, digits.x_test.split(256))
            runs.append({"variant": variant, "seed": seed, "curves": curves,
                         "mean_esm_sigma": statistics.fmean(r.esm_sigma for r in report),
                         "seconds": time.time() - t0})
            print(f"{variant:<7} seed {seed}: " + "; ".join(
                f"{blocks} blocks: " + " ".join(f"{a:.1f}" for a in curve) for blocks, curve in curves.items())
                + f" ({time.time() - t0:.0f}s)", flush=True)
    wall = time.time() - started
    table = summarise(runs, args.disturbed)
    record = machine_record(("torch", "torchvision", "numpy", "scikit-learn", "matplotlib", "sn_plugin"))
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, "xbn_perturbation")
    payload = {"machine": record, "quick": args.quick, "seeds": args.seeds, "epochs": args.epochs,
               "noise_seeds": args.noise_seeds, "magnitudes": list(args.magnitudes),
               "disturbed_blocks": list(args.disturbed), "wall_seconds": wall,
               "table": {v: {str(k): c for k, c in cells.items()} for v, cells in table.items()},
               "runs": [{**r, "curves": {str(k): c for k, c in r["curves"].items()}} for r in runs]}
    write_json_atomically(stem + ".json", payload)
    write_atomically(stem + ".md", render_markdown(table, args, record, wall, len(digits.y_test)))
    plot(table, args.magnitudes, args.disturbed, stem + ".png")
    print(open(stem + ".md").read())
    return payload


if __name__ == "__main__":
    main()
