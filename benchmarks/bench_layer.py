"""Speed and saved-for-backward memory of SN against BatchNorm, GroupNorm and a plain autograd SN.

Layers, timed round-robin (every layer once per round, so a change in the machine's load
touches all alike) and reported as medians:

* SN (fused): sn_plugin's layer on its fused kernels (C++ on CPU, Triton on CUDA);
* SN (reference): the same layer on the pure-PyTorch reference path (SN_PLUGIN_BACKEND=reference);
* BatchNorm, GroupNorm(32): torch's layers (cuDNN's BatchNorm on CUDA);
* SN (plain autograd): the formulation of the published code, every step a separate
  autograd op (unbiased IN variance, Eq. 4 statistics), written here only as the baseline.

"Train" is forward + backward in training mode, "eval" a forward under ``torch.no_grad()``.
CPU runs are repeated for every ``--threads`` count. Writes a Markdown table to
``benchmarks/results/layer_<device>.md`` (the README quotes it).

    python benchmarks/bench_layer.py                  # CPU, 1 and 2 threads, the issue's shapes
    python benchmarks/bench_layer.py --device cuda    # writes layer_cuda.md
    python benchmarks/bench_layer.py --quick          # tiny shapes, a smoke run
"""
import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._timing import interleaved_medians  # noqa: E402
from sn_plugin import SwitchNorm2d, SwitchNorm3d, kernels  # noqa: E402
from sn_plugin.atomic import atomic_write  # noqa: E402

# Backbone feature maps (ResNet-50 at detection resolutions), detector-head RoI features,
# and an I3D video feature map (SwitchNorm3d).
SHAPES = [(2, 256, 96, 96), (2, 1024, 48, 48), (8, 64, 56, 56), (512, 256, 7, 7), (64, 256, 14, 14),
          (128, 32, 7, 7), (2, 64, 8, 28, 28)]
QUICK_SHAPES = [(2, 16, 12, 12), (4, 8, 2, 5, 5)]
RESULTS = Path(__file__).resolve().parent / "results"
WARMUP_ROUNDS = 3
LOAD_AT_START = os.getloadavg()[0]
FUSED, REFERENCE, BATCH_NORM, GROUP_NORM, PLAIN = (
    "SN (fused)", "SN (reference)", "BatchNorm", "GroupNorm(32)", "SN (plain autograd)")


class AutogradSwitchNorm(nn.Module):
    """SN the way the published code computes it: every step a separate autograd op."""

    def __init__(self, num_features, eps=1e-5, momentum=0.997):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x):
        shape = x.shape
        x = x.view(shape[0], shape[1], -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in ** 2
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
            with torch.no_grad():
                self.running_mean.mul_(self.momentum).add_((1 - self.momentum) * mean_bn)
                self.running_var.mul_(self.momentum).add_((1 - self.momentum) * var_bn)
        else:
            mean_bn, var_bn = self.running_mean, self.running_var
        mean_weight = self.mean_weight.softmax(0)
        var_weight = self.var_weight.softmax(0)
        mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln + mean_weight[2] * mean_bn
        var = var_weight[0] * var_in + var_weight[1] * var_ln + var_weight[2] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return (x * self.weight + self.bias).view(shape)


class OnBackend(nn.Module):
    """Runs an SN layer with the given sn_plugin backend chosen (restored afterwards)."""

    def __init__(self, layer, backend):
        super().__init__()
        self.layer, self.backend = layer, backend

    def forward(self, x):
        previous = kernels.set_backend(self.backend)
        try:
            return self.layer(x)
        finally:
            kernels.set_backend(previous)


def layers(shape):
    channels = shape[1]
    sn = SwitchNorm3d if len(shape) == 5 else SwitchNorm2d
    bn = nn.BatchNorm3d if len(shape) == 5 else nn.BatchNorm2d
    return {
        FUSED: OnBackend(sn(channels), "auto"),
        REFERENCE: OnBackend(sn(channels), "reference"),
        BATCH_NORM: bn(channels),
        GROUP_NORM: nn.GroupNorm(min(32, channels), channels),
        PLAIN: AutogradSwitchNorm(channels),
    }


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
    """{layer: (train ms, eval ms, saved bytes)} for one input shape."""
    x = torch.randn(shape, device=device)
    dy = torch.randn(shape, device=device)
    xg = x.clone().requires_grad_()
    modules = {name: layer.to(device) for name, layer in layers(shape).items()}

    def train_step(layer):
        return lambda: layer.train()(xg).backward(dy)

    def eval_step(layer):
        def run():
            with torch.no_grad():
                layer.eval()(x)
        return run

    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    train, evaluate = (interleaved_medians({n: step(m) for n, m in modules.items()}, repeats, WARMUP_ROUNDS,
                                           synchronize=synchronize) for step in (train_step, eval_step))
    return {n: (1e3 * train[n], 1e3 * evaluate[n], saved_bytes(m.train(), xg)) for n, m in modules.items()}


def render(runs, device, repeats, wall):
    """runs: {threads: {shape: {layer: (train, eval, saved)}}} -> Markdown."""
    lines = [
        f"# SN layer benchmark ({device.type})",
        "",
        f"Measured by `benchmarks/bench_layer.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: "
        f"{describe_device(device)}, torch {torch.__version__}, {kernel_note(device)}, median of {repeats} "
        f"round-robin runs, float32, wall time {wall:.0f} s. Machine load (1-min average) at the start / end: "
        f"{LOAD_AT_START:.1f} / {os.getloadavg()[0]:.1f}. glibc malloc settings: {malloc_settings()}.",
        "",
        "Train = forward + backward in training mode; eval = forward under `torch.no_grad()`. Saved = bytes "
        "kept for backward, the input included. Ratios: time over the faster of BatchNorm and GroupNorm "
        "(train) or over GroupNorm (eval), saved bytes over BatchNorm's; the issue's targets are 1.1x (time) "
        "and 1.05x (saved).",
    ]
    for threads, results in runs.items():
        lines += ["", f"## {threads_title(device, threads)}", "",
                  "| shape | layer | train ms | eval ms | saved MiB |", "|---|---|---:|---:|---:|"]
        for shape, rows in results.items():
            for name, (fwd_bwd, eval_fwd, saved) in rows.items():
                lines.append(f"| {shape} | {name} | {fwd_bwd:.3f} | {eval_fwd:.3f} | {saved / 2**20:.2f} |")
        lines += ["", "| shape | SN (fused) train | SN (fused) eval | SN (fused) saved | SN (reference) train | "
                      "SN (reference) eval | plain SN train | plain SN saved |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for shape, rows in results.items():
            best_train = min(rows[BATCH_NORM][0], rows[GROUP_NORM][0])
            gn_eval, bn_saved = rows[GROUP_NORM][1], rows[BATCH_NORM][2]
            fused, reference, plain = rows[FUSED], rows[REFERENCE], rows[PLAIN]
            lines.append(
                f"| {shape} | **{fused[0] / best_train:.2f}x** | **{fused[1] / gn_eval:.2f}x** | "
                f"**{fused[2] / bn_saved:.2f}x** | {reference[0] / best_train:.2f}x | {reference[1] / gn_eval:.2f}x | "
                f"{plain[0] / best_train:.2f}x | {plain[2] / bn_saved:.2f}x |")
    return "\n".join(lines) + "\n"


def threads_title(device, threads):
    return f"{threads} CPU thread{'s' if threads > 1 else ''}" if device.type == "cpu" else device.type


def kernel_note(device):
    if device.type == "cpu":
        if kernels.CPU_KERNELS_MISSING is not None:
            return "C++ kernels NOT built (SN (fused) ran on the reference path)"
        from sn_plugin.kernels import _C
        return f"C++ kernels ({_C.cpu_capability()})"
    import triton
    return f"Triton {triton.__version__}"


def malloc_settings():
    """The glibc tunables that decide whether freed tensors' memory is reused or page-faulted
    in again: on this machine they change every layer's timing by up to 3x."""
    settings = [f"{k}={v}" for k, v in sorted(os.environ.items()) if k.startswith("MALLOC_")]
    return ", ".join(settings) or "defaults"


def describe_device(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="CPU thread counts to run with")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (smoke test)")
    parser.add_argument("--out", type=Path, default=None, help="results file (default benchmarks/results/)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shapes, repeats = (QUICK_SHAPES, 3) if args.quick else (SHAPES, args.repeats)
    thread_counts = args.threads if device.type == "cpu" else [torch.get_num_threads()]
    start = time.time()
    runs = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        runs[threads] = {shape: measure(shape, device, repeats) for shape in shapes}
    table = render(runs, device, repeats, time.time() - start)
    print(table)
    out = args.out or RESULTS / f"layer_{device.type}{'_quick' if args.quick else ''}.md"
    atomic_write(str(out), lambda f: f.write(table), binary=False)
    print(f"wrote {out}")
    return runs


if __name__ == "__main__":
    main()
