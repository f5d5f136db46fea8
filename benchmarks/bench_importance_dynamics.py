"""Why do most SN importance weights stay near 1/3 in the demo? The logits' gradients and movement, measured.

After the demo's 1200 iterations most SN layers still weigh IN, LN and BN
about equally (benchmarks/results/demo/sn_importance_weights.png), where the
paper's Fig. 7 shows clear preferences after full training. This benchmark
trains the demo (tools/demo.py's detector and data, in this process) and
records, for every SN layer:

* the gradient norm its logits (``mean_weight``, ``var_weight``) receive, as
  backpropagated and as the optimizer sees it after gradient clipping (the
  ratio is the clipping factor, the same for every parameter);
* how far the logits move in every ``--interval`` iterations, and how far the
  softmaxed weights end from 1/3 (a weight of 1/2 on one branch needs its
  logit ln 2 = 0.69 above the two others);
* the optimizer's treatment of the logits: learning rate over the schedule,
  weight decay, momentum, and the clipping threshold.

Variants isolate the suspected causes, each a complete training with
everything else as in the demo: ``default``; ``no_clip`` (no gradient
clipping); ``logit_lr_x10`` (the logits' learning rate x10, still no weight
decay); ``long_x3`` (three times the iterations).

    python benchmarks/bench_importance_dynamics.py                          # default, no_clip, logit_lr_x10
    python benchmarks/bench_importance_dynamics.py --variants default long_x3
    python benchmarks/bench_importance_dynamics.py --quick                  # a smoke test

Writes ``importance_dynamics.{md,json,png}`` under ``benchmarks/results/``
(or ``--out``); each training's output (AP table, Fig. 7, checkpoint) under
``--runs``.
"""
import argparse
import json
import math
import os
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from _common import (REPO, RESULTS_DIR, RECORDED_PACKAGES, machine_line, machine_record, markdown_table,
                     save_figure_atomically, write_atomically, write_json_atomically)
from sn_plugin import SwitchNormBase
from sn_plugin.apps import coco_detector

LOGITS = ("mean_weight", "var_weight")
DEFAULT_VARIANTS = ("default", "no_clip", "logit_lr_x10")
QUICK_VARIANTS, QUICK_ITERS, QUICK_INTERVAL = ("default", "logit_lr_x10"), 8, 4
INTERVAL = 100
FAR_FROM_THIRD = 0.1  # a layer "has a preference" when some weight is this far from 1/3


def _no_clip(cfg) -> None:
    cfg.optim_wrapper.pop("clip_grad", None)


def _logit_lr_x10(cfg) -> None:
    paramwise = cfg.optim_wrapper.get("paramwise_cfg", {})
    paramwise["custom_keys"] = {**paramwise.get("custom_keys", {}),
                                **{key: dict(lr_mult=10.0, decay_mult=0.0) for key in (".mean_weight", ".var_weight")}}
    cfg.optim_wrapper.paramwise_cfg = paramwise


# name -> (change to the config, iterations multiplier)
VARIANTS: Dict[str, tuple] = {
    "default": (None, 1),
    "no_clip": (_no_clip, 1),
    "logit_lr_x10": (_logit_lr_x10, 1),
    "long_x3": (None, 3),
}


def make_recorder(interval: int):
    """A runner hook measuring the SN logits (see the module docstring); made here so mmengine loads lazily."""
    from mmengine.hooks import Hook

    class LogitDynamics(Hook):
        priority = "LOW"

        def __init__(self):
            self.interval = interval
            self.layers: Dict[str, SwitchNormBase] = {}
            self.raw: Dict[str, float] = {}  # this iteration's squared gradient norm of each layer's logits
            self.iterations: List[dict] = []  # per iteration: lr, clip factor, total gradient norm
            self.windows: List[dict] = []  # per interval: per layer mean gradient norms, displacement, weights
            self._window_raw: Dict[str, List[float]] = {}
            self._window_seen: Dict[str, List[float]] = {}
            self._last: Dict[str, torch.Tensor] = {}
            self._step: dict = {}
            self.treatment: List[dict] = []

        def before_train(self, runner) -> None:
            model = runner.model.module if hasattr(runner.model, "module") else runner.model
            self.layers = {name: m for name, m in model.named_modules() if isinstance(m, SwitchNormBase)}
            for name, layer in self.layers.items():
                for logit in LOGITS:
                    getattr(layer, logit).register_hook(self._raw_gradient(name))
            optimizer = runner.optim_wrapper.optimizer
            optimizer.register_step_pre_hook(self._before_step)
            logit_ids = {id(getattr(layer, logit)) for layer in self.layers.values() for logit in LOGITS}
            clip = runner.optim_wrapper.clip_grad_kwargs
            for index, group in enumerate(optimizer.param_groups):
                if any(id(p) in logit_ids for p in group["params"]):
                    self.treatment.append({"group": index, "initial_lr": group.get("initial_lr", group["lr"]),
                                           "weight_decay": group.get("weight_decay", 0.0),
                                           "momentum": group.get("momentum", 0.0),
                                           "clip_max_norm": clip.get("max_norm") if clip else None})
            self._last = self._logits()

        def _raw_gradient(self, name: str) -> Callable:
            def record(grad: torch.Tensor) -> None:
                self.raw[name] = self.raw.get(name, 0.0) + float(grad.detach().float().pow(2).sum())
            return record

        def _before_step(self, optimizer, args, kwargs) -> None:
            """After clipping, before the update: what the optimizer is given."""
            seen = {name: sum(float(getattr(layer, logit).grad.float().pow(2).sum()) for logit in LOGITS
                              if getattr(layer, logit).grad is not None) for name, layer in self.layers.items()}
            total = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for group in optimizer.param_groups
                                  for p in group["params"] if p.grad is not None))
            raw_sum, seen_sum = sum(self.raw.values()), sum(seen.values())
            factor = math.sqrt(seen_sum / raw_sum) if raw_sum > 0 else 1.0
            group = optimizer.param_groups[self.treatment[0]["group"]] if self.treatment else optimizer.param_groups[0]
            self._step = {"lr": group["lr"], "clip_factor": factor,
                          "grad_norm_before_clip": total / factor if factor > 0 else total}
            for name in self.layers:
                self._window_raw.setdefault(name, []).append(math.sqrt(self.raw.get(name, 0.0)))
                self._window_seen.setdefault(name, []).append(math.sqrt(seen[name]))
            self.raw = {}

        def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
            iteration = runner.iter + 1
            self.iterations.append({"iteration": iteration, **self._step})
            if iteration % self.interval == 0 or iteration == runner.max_iters:
                self._close_window(iteration)

        def _close_window(self, iteration: int) -> None:
            now = self._logits()
            window = {"iteration": iteration, "layers": {}}
            for name, logits in now.items():
                mean_w, var_w = (logits[i].softmax(0) for i in range(2))
                window["layers"][name] = {
                    "grad_norm": statistics.fmean(self._window_raw.get(name, [0.0])),
                    "grad_norm_after_clip": statistics.fmean(self._window_seen.get(name, [0.0])),
                    "displacement": float((logits - self._last[name]).norm()),
                    "distance_from_third": float(torch.cat([mean_w, var_w]).sub(1 / mean_w.numel()).abs().max()),
                }
            self.windows.append(window)
            self._last, self._window_raw, self._window_seen = now, {}, {}

        def _logits(self) -> Dict[str, torch.Tensor]:
            return {name: torch.stack([getattr(layer, logit).detach().float().clone() for logit in LOGITS])
                    for name, layer in self.layers.items()}

    return LogitDynamics()


def train_variant(name: str, max_iters: int, interval: int, quick: bool, runs: str, data: str) -> dict:
    change, multiplier = VARIANTS[name]
    iterations = max_iters * multiplier
    args = coco_detector.parse_args(["--dataset", "shapes", "--data", data, "--out", os.path.join(runs, name),
                                     "--max-iters", str(iterations), "--num-images", "2"]
                                    + (["--quick"] if quick else []))
    recorder = make_recorder(interval)
    print(f"\n=== {name}: {iterations} iterations", flush=True)
    out = coco_detector.run(args, extra_hooks=[recorder], adjust_config=change)
    with open(os.path.join(out, "ap_table.json")) as f:
        summary = json.load(f)
    return {"variant": name, "iterations": iterations, "treatment": recorder.treatment,
            "per_iteration": recorder.iterations, "windows": recorder.windows,
            "bbox_AP": summary["bbox"]["AP"], "segm_AP": summary["segm"]["AP"], "output": out}


def _median(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def describe(result: dict) -> dict:
    """The numbers the table shows for one variant."""
    windows = result["windows"]
    steps = result["per_iteration"]
    treatment = result["treatment"][0] if result["treatment"] else {}
    final = windows[-1]["layers"]

    def per_window(key):
        return [_median([layer[key] for layer in window["layers"].values()]) for window in windows]

    return {
        "peak_lr": max(step["lr"] for step in steps),
        "weight_decay": treatment.get("weight_decay"), "momentum": treatment.get("momentum"),
        "clip_max_norm": treatment.get("clip_max_norm"),
        "clipped_fraction": sum(1 for s in steps if s["clip_factor"] < 0.999) / len(steps),
        "median_clip_factor": _median([s["clip_factor"] for s in steps]),
        "median_grad_norm_before_clip": _median([s["grad_norm_before_clip"] for s in steps]),
        "logit_grad_norm": per_window("grad_norm"), "logit_grad_norm_after_clip": per_window("grad_norm_after_clip"),
        "displacement": per_window("displacement"),
        "total_displacement_median": _median([sum(w["layers"][n]["displacement"] for w in windows) for n in final]),
        "final_distance_median": _median([layer["distance_from_third"] for layer in final.values()]),
        "layers_with_preference": sum(1 for layer in final.values() if layer["distance_from_third"] > FAR_FROM_THIRD),
        "layers": len(final),
    }


def _f(value, digits=3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def render_markdown(results: List[dict], interval: int, record: dict, wall_seconds: float) -> str:
    rows = []
    for result in results:
        d = result["description"]
        rows.append([result["variant"], result["iterations"], _f(d["peak_lr"]), _f(d["weight_decay"]),
                     _f(d["momentum"]), _f(d["clip_max_norm"]), f"{100 * d['clipped_fraction']:.0f}%",
                     _f(d["median_clip_factor"]), _f(d["median_grad_norm_before_clip"]),
                     f"{_f(d['logit_grad_norm'][0])} / {_f(d['logit_grad_norm'][-1])}",
                     f"{_f(d['displacement'][0])} / {_f(d['displacement'][-1])}", _f(d["total_displacement_median"]),
                     _f(d["final_distance_median"]), f"{d['layers_with_preference']} of {d['layers']}",
                     _f(result["bbox_AP"]), _f(result["segm_AP"])])
    header = ["variant", "iterations", "logit peak lr", "logit weight decay", "momentum", "clip max_norm",
              "iterations clipped", "median clip factor", "median total grad norm (before clip)",
              f"logit grad norm, first / last {interval} it", f"logit move per {interval} it, first / last",
              "logit total move", "final max abs(w - 1/3)", f"layers with max abs(w - 1/3) > {FAR_FROM_THIRD}",
              "box AP", "mask AP"]
    return (
        "# SN importance logits during the demo's training: gradients, optimizer treatment, movement\n\n"
        "Each row is a complete training of the demo (Mask R-CNN, SN in backbone, FPN and heads, from scratch, "
        "shapes dataset); everything but the variant's change as in the demo. Logit values: medians over the SN "
        "layers. *Logit grad norm*: the norm of a layer's 6 logit gradients ([IN, LN, BN] for the mean and the "
        "variance) as backpropagated, averaged over the first and the last window of "
        f"{interval} iterations. *Logit move*: the norm of the change of a layer's 6 logits over a window; "
        "*total move*: summed over the windows. *Clip factor*: max_norm / total gradient norm when the gradient "
        "is clipped (1 otherwise); it scales every gradient, the logits' included. A weight of 1/2 on one branch "
        "needs its logit ln 2 = 0.69 above the others.\n\n"
        + markdown_table(header, rows)
        + "\n" + machine_line(record, wall_seconds)
    )


def plot(results: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 8))
    (grads, moves), (clips, finals) = axes
    for result in results:
        windows = result["windows"]
        ends = [w["iteration"] for w in windows]
        d = result["description"]
        grads.plot(ends, d["logit_grad_norm"], marker="o", label=result["variant"])
        moves.plot(ends, d["displacement"], marker="o", label=result["variant"])
        steps = result["per_iteration"]
        clips.plot([s["iteration"] for s in steps], [s["clip_factor"] for s in steps], linewidth=0.8,
                   label=result["variant"])
        distances = sorted(layer["distance_from_third"] for layer in windows[-1]["layers"].values())
        finals.plot(range(1, len(distances) + 1), distances, marker=".", label=result["variant"])
    grads.set(yscale="log", xlabel="iteration", ylabel="logit gradient norm (median over layers)",
              title="Gradient the logits receive (before clipping)")
    moves.set(xlabel="iteration", ylabel="logit change per window (median over layers)",
              title="How far the logits move")
    clips.set(xlabel="iteration", ylabel="clip factor", title="Gradient clipping (1 = not clipped)")
    finals.axhline(FAR_FROM_THIRD, color="grey", linestyle=":")
    finals.set(xlabel="SN layers, sorted", ylabel="final max |w - 1/3|", title="Preferences at the end")
    for axis in (grads, moves, clips, finals):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=110)
    plt.close(figure)


def main(argv=None) -> List[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: variants {QUICK_VARIANTS}, {QUICK_ITERS} iterations on the tiny dataset")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), help=f"default: {DEFAULT_VARIANTS}")
    parser.add_argument("--max-iters", type=int,
                        help=f"iterations of the default schedule (default: the demo's {coco_detector.FULL.max_iters})")
    parser.add_argument("--interval", type=int, help=f"window for the movement, in iterations (default {INTERVAL})")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for importance_dynamics.{md,json,png}")
    parser.add_argument("--runs", default=os.path.join(REPO, "work_dirs", "importance_dynamics_runs"),
                        help="folder for the trainings' own outputs")
    parser.add_argument("--data", default=os.path.join(REPO, "work_dirs", "data"), help="dataset folder")
    args = parser.parse_args(argv)
    variants = args.variants or list(QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS)
    max_iters = args.max_iters or (QUICK_ITERS if args.quick else coco_detector.FULL.max_iters)
    interval = args.interval or (QUICK_INTERVAL if args.quick else INTERVAL)
    if max_iters < 1 or interval < 1:
        parser.error("--max-iters and --interval must be >= 1")
    os.makedirs(args.out, exist_ok=True)

    started = time.time()
    results = []
    for name in variants:
        try:
            result = train_variant(name, max_iters, interval, args.quick, args.runs, args.data)
        except coco_detector.CommandError as error:
            parser.exit(1, f"{parser.prog}: error: {error}\n")
        result["description"] = describe(result)
        results.append(result)
    wall = time.time() - started
    record = machine_record(RECORDED_PACKAGES)
    stem = os.path.join(args.out, "importance_dynamics")
    write_json_atomically(stem + ".json", {"machine": record, "wall_seconds": wall, "quick": args.quick,
                                           "interval": interval, "results": results})
    markdown = render_markdown(results, interval, record, wall)
    write_atomically(stem + ".md", markdown)
    plot(results, stem + ".png")
    print(markdown)
    print(f"wrote {stem}.md, {stem}.json and {stem}.png")
    return results


if __name__ == "__main__":
    main()
