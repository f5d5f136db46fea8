"""Speed and saved-for-backward memory of SN against BatchNorm, GroupNorm and a plain autograd SN.

The plain autograd SN is the formulation of the published implementation
(statistics from Eq. 4 with ~30 small autograd ops, unbiased IN variance);
it is written here only as the baseline. Writes a Markdown table to
``benchmarks/results/layer_<device>.md`` (the README quotes it).

    python benchmarks/bench_layer.py            # CPU, ResNet-50 feature shapes
    python benchmarks/bench_layer.py --device cuda
    python benchmarks/bench_layer.py --quick    # tiny shapes, a smoke run
"""
import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sn_plugin import SwitchNorm2d  # noqa: E402
from sn_plugin.atomic import atomic_write  # noqa: E402

SHAPES = [(2, 256, 96, 96), (2, 1024, 48, 48), (8, 64, 56, 56)]
QUICK_SHAPES = [(2, 16, 12, 12)]
RESULTS = Path(__file__).resolve().parent / "results"
LOAD_AT_START = os.getloadavg()[0]


class AutogradSwitchNorm2d(nn.Module):
    """SN the way the published code computes it: every step a separate autograd op."""

    def __init__(self, num_features, eps=1e-5, momentum=0.997):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x):
        n, c, h, w = x.size()
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in ** 2
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        mean_bn = mean_in.mean(0, keepdim=True)
        var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
        with torch.no_grad():
            self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
            self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
        mean_weight = self.mean_weight.softmax(0)
        var_weight = self.var_weight.softmax(0)
        mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln + mean_weight[2] * mean_bn
        var = var_weight[0] * var_in + var_weight[1] * var_ln + var_weight[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(n, c, h, w) * self.weight + self.bias


def layers(channels):
    return {
        "SN (sn_plugin)": SwitchNorm2d(channels),
        "BatchNorm2d": nn.BatchNorm2d(channels),
        "GroupNorm(32)": nn.GroupNorm(min(32, channels), channels),
        "SN (plain autograd)": AutogradSwitchNorm2d(channels),
    }


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved_median_ms(fns, device, repeats, warmup=3):
    """Median time of each function, run round-robin so that a change in the
    machine's load (other processes) affects every function alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def saved_bytes(layer, x):
    """Bytes the autograd graph keeps for backward (distinct storages, the input included)."""
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(storages.values())


def measure(shape, device, repeats):
    x = torch.randn(shape, device=device)
    dy = torch.randn(shape, device=device)
    xg = x.clone().requires_grad_()
    modules = {name: layer.to(device) for name, layer in layers(shape[1]).items()}

    def train_step(layer):
        return lambda: layer.train()(xg).backward(dy)

    def eval_step(layer):
        def run():
            with torch.no_grad():
                layer.eval()(x)
        return run

    train = interleaved_median_ms({n: train_step(m) for n, m in modules.items()}, device, repeats)
    evaluate = interleaved_median_ms({n: eval_step(m) for n, m in modules.items()}, device, repeats)
    return {n: (train[n], evaluate[n], saved_bytes(m.train(), xg)) for n, m in modules.items()}


def render(results, device, repeats, wall):
    lines = [
        f"# SN layer benchmark ({device})",
        "",
        f"Measured by `benchmarks/bench_layer.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{describe_device(device)}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median of {repeats} round-robin runs, float32, wall time {wall:.0f} s. Machine load "
        f"(1-min average) at the start / end: {LOAD_AT_START:.1f} / {os.getloadavg()[0]:.1f}. "
        f"glibc malloc settings: {malloc_settings()}.",
        "",
        "Train = forward + backward in training mode; eval = forward under `torch.no_grad()`. "
        "Saved = bytes kept for backward, the input included; ratio = SN (sn_plugin) over "
        "the faster of BatchNorm2d / GroupNorm (time) or over BatchNorm2d (saved).",
        "",
        "| shape (N,C,H,W) | layer | train ms | eval ms | saved MiB |",
        "|---|---|---:|---:|---:|",
    ]
    for shape, rows in results.items():
        for name, (fwd_bwd, eval_fwd, saved) in rows.items():
            lines.append(f"| {shape} | {name} | {fwd_bwd:.2f} | {eval_fwd:.2f} | {saved / 2**20:.1f} |")
        ours = rows["SN (sn_plugin)"]
        best = min(rows["BatchNorm2d"][0], rows["GroupNorm(32)"][0])
        best_eval = min(rows["BatchNorm2d"][1], rows["GroupNorm(32)"][1])
        lines.append(
            f"| {shape} | **ratio** | **{ours[0] / best:.2f}x** | **{ours[1] / best_eval:.2f}x** | "
            f"**{ours[2] / rows['BatchNorm2d'][2]:.2f}x** |"
        )
        plain = rows["SN (plain autograd)"]
        lines.append(
            f"| {shape} | plain autograd SN / best | {plain[0] / best:.2f}x | {plain[1] / best_eval:.2f}x | "
            f"{plain[2] / rows['BatchNorm2d'][2]:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def malloc_settings():
    """The glibc tunables that decide whether freed tensors' memory is reused or page-faulted
    in again: on this machine they change every layer's timing by up to 3x."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    return ", ".join(settings) or "defaults"


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, repeats = (QUICK_SHAPES, 3) if args.quick else (SHAPES, args.repeats)
    start = time.time()
    results = {shape: measure(shape, device, repeats) for shape in shapes}
    table = render(results, device, repeats, time.time() - start)
    print(table)
    suffix = ("_quick" if args.quick else "") + (f"_{args.threads}thread" if args.threads else "")
    out = args.out or RESULTS / f"layer_{device.type}{suffix}.md"
    atomic_write(str(out), lambda f: f.write(table), binary=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
