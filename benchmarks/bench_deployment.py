"""From a trained SN detector to deployment: what sparsifying and exporting cost.

Takes the output folder of one training of ``tools/train_coco_detector.py`` (the
demo, or a benchmark's SN run) and measures, on its validation set:

* box and mask AP of the model as trained (SN with its batch-average statistics);
* AP after :func:`sn_plugin.sparsify` (each layer keeps its strongest normalizer;
  layers that chose one normalizer for both statistics become BatchNorm or
  GroupNorm), as it is, and after re-estimating the statistics of the sparse
  model's layers on training batches (the layers above a sparsified one see a
  different input than the one their statistics were estimated on);
* how many layers each choice leaves as SN, BatchNorm and GroupNorm;
* the backbone and FPN exported with ``torch.export`` and to ONNX, for both
  models: the largest difference from eager PyTorch, and the time per batch in
  eager PyTorch and in onnxruntime (medians of interleaved runs, 1 thread).

    python benchmarks/bench_deployment.py work_dirs/sn_demo
    python benchmarks/bench_deployment.py work_dirs/scratch_detection_runs/SN_3200it_seed0 --out /tmp/x

Writes ``deployment.{md,json}`` (``--name``) under ``benchmarks/results/`` (or ``--out``).
"""
import argparse
import copy
import os
import statistics
import tempfile
import time
from typing import Dict

import torch
from torch import nn

from _common import RECORDED_PACKAGES, RESULTS_DIR, machine_record, markdown_table, write_atomically, \
    write_json_atomically
from _timing import interleaved_medians
from sn_plugin import SwitchNormBase, importance_weights, recompute_batch_stats, sparsify
from sn_plugin.apps.coco_detector import ap_table

STATS_BATCHES = 100  # training batches for the re-estimate after sparsifying
TIMING_REPEATS = 15


def load_runner(run: str, work_dir: str):
    """An mmengine Runner for the training in ``run``, its weights loaded, without the hooks that change them."""
    from mmengine.config import Config
    from mmengine.runner import Runner

    import sn_plugin.integrations.openmmlab  # noqa: F401  (registers SN in mmengine)

    cfg = Config.fromfile(os.path.join(run, "config.py"))
    cfg.work_dir = work_dir
    cfg.load_from = None
    cfg.resume = False
    # The statistics are estimated here, explicitly, for the variants that need it.
    cfg.custom_hooks = [h for h in cfg.get("custom_hooks", []) if h.get("type") != "SNBatchStatsHook"]
    cfg.default_hooks.pop("checkpoint", None)
    runner = Runner.from_cfg(cfg)
    summary = _read_json(os.path.join(run, "ap_table.json"))
    # A checkpoint this project's training wrote (mmengine's format pickles its message hub).
    checkpoint = torch.load(os.path.join(run, summary["checkpoint"]), map_location="cpu", weights_only=False)
    runner.model.load_state_dict(checkpoint["state_dict"])
    return runner, summary


def _read_json(path: str) -> dict:
    import json

    with open(path) as f:
        return json.load(f)


def evaluate(runner, model: nn.Module, classes) -> Dict[str, dict]:
    runner.model = model
    metrics = runner.val()
    return {kind: table["AP"] for kind, table in ap_table(metrics, classes, ("bbox", "segm")).items()
            if isinstance(table, dict) and "AP" in table}


def layer_counts(model: nn.Module) -> Dict[str, int]:
    counts = {"SN": 0, "BatchNorm": 0, "GroupNorm": 0}
    for m in model.modules():
        if isinstance(m, SwitchNormBase):
            counts["SN"] += 1
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            counts["BatchNorm"] += 1
        elif isinstance(m, nn.GroupNorm):
            counts["GroupNorm"] += 1
    return counts


class BackboneAndNeck(nn.Module):
    """The part of a detector with normalization layers that runs once per image: backbone + FPN."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.backbone, self.neck = detector.backbone, detector.neck

    def forward(self, images):
        return tuple(self.neck(self.backbone(images)))


def export_checks(model: nn.Module, images: torch.Tensor, folder: str, repeats: int) -> Dict[str, float]:
    import onnxruntime

    part = BackboneAndNeck(model).eval()
    with torch.no_grad():
        eager = part(images)
        program = torch.export.export(part, (images,))
        exported = program.module()(images)
        path = os.path.join(folder, "backbone_neck.onnx")
        torch.onnx.export(part, (images,), path, dynamo=True, verbose=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: images.numpy()}
    onnx_outputs = session.run(None, feed)

    def largest(outputs) -> float:
        return max(float((torch.as_tensor(o) - e).abs().max() / e.abs().max()) for o, e in zip(outputs, eager))

    with torch.no_grad():
        seconds = interleaved_medians({"eager": lambda: part(images), "onnxruntime": lambda: session.run(None, feed)},
                                      repeats)
    return {"torch_export_max_rel_diff": largest(exported), "onnx_max_rel_diff": largest(onnx_outputs),
            "eager_ms": 1000 * seconds["eager"], "onnxruntime_ms": 1000 * seconds["onnxruntime"]}


def training_batches(runner):
    return runner.build_dataloader(runner.cfg.train_dataloader, seed=runner.seed)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="output folder of a training of tools/train_coco_detector.py with --norm SN")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for the results files")
    parser.add_argument("--name", default="deployment", help="results file names: NAME.{md,json} (default %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 batches for the statistics, 2 timings")
    args = parser.parse_args(argv)
    stats_batches, repeats = (2, 2) if args.quick else (STATS_BATCHES, TIMING_REPEATS)
    torch.set_num_threads(1)
    from sn_plugin.integrations.openmmlab.hooks import training_forward

    with tempfile.TemporaryDirectory() as work_dir:
        runner, summary = load_runner(args.run, work_dir)
        classes = summary["dataset"]["classes"]
        trained = runner.model
        results = {"run": os.path.abspath(args.run), "iterations": summary["iterations"],
                   "dataset": summary["dataset"]["description"], "variants": {}}
        sparse = sparsify(trained).eval()
        reestimated = copy.deepcopy(sparse)
        reports = recompute_batch_stats(reestimated, training_batches(runner), num_batches=stats_batches,
                                        forward=training_forward, include_batchnorm=True, progress=False)
        variants = {"SN as trained": trained, "sparse SN": sparse,
                    f"sparse SN, statistics re-estimated ({stats_batches} batches)": reestimated}
        images = next(iter(runner.val_dataloader))
        batch = trained.data_preprocessor(images, training=False)["inputs"]
        for name, model in variants.items():
            entry = {"AP": evaluate(runner, model, classes), "layers": layer_counts(model)}
            if name != "sparse SN":
                entry["export"] = export_checks(model, batch, work_dir, repeats)
            results["variants"][name] = entry
            print(name, entry)
        results["reestimated_layers"] = sum(r.updated for r in reports.values())
        # How decisive the trained weights are: sparsifying drops everything but each layer's largest.
        weights = importance_weights(trained)
        results["largest_weight_mean"] = {
            kind: statistics.mean(float(pair[i].max()) for pair in weights.values()) for i, kind in enumerate(("mean", "var"))}
        results["batch_shape"] = list(batch.shape)
        results["timing_repeats"] = repeats
    results["machine"] = machine_record(RECORDED_PACKAGES)
    results["date"] = time.strftime("%Y-%m-%d")
    os.makedirs(args.out, exist_ok=True)
    write_json_atomically(os.path.join(args.out, f"{args.name}.json"), results)
    write_atomically(os.path.join(args.out, f"{args.name}.md"), render(results))
    return results


def render(results: dict) -> str:
    rows = []
    for name, entry in results["variants"].items():
        export = entry.get("export", {})
        ap = entry["AP"]
        rows.append([name, f"{ap.get('bbox', float('nan')):.1f}", f"{ap.get('segm', float('nan')):.1f}",
                     " / ".join(str(entry["layers"][k]) for k in ("SN", "BatchNorm", "GroupNorm")),
                     f"{export['torch_export_max_rel_diff']:.1e}" if export else "",
                     f"{export['onnx_max_rel_diff']:.1e}" if export else "",
                     f"{export['eager_ms']:.1f} / {export['onnxruntime_ms']:.1f}" if export else ""])
    machine = results["machine"]
    return "\n".join([
        "# From a trained SN detector to deployment",
        "",
        f"Model: {results['run']} ({results['iterations']} iterations; {results['dataset']}). "
        f"AP on its validation set; export of backbone + FPN on one validation batch of shape "
        f"{tuple(results['batch_shape'])}, 1 thread, medians of {results['timing_repeats']} interleaved runs.",
        "",
        markdown_table(["model", "box AP", "mask AP", "layers SN / BN / GN", "torch.export max rel. diff",
                        "ONNX (onnxruntime) max rel. diff", "eager / onnxruntime ms"], rows),
        "",
        f"The trained layers' largest importance weight, averaged over the layers: "
        f"{results['largest_weight_mean']['mean']:.2f} for the mean, {results['largest_weight_mean']['var']:.2f} "
        f"for the variance (1/3 = no preference; sparsifying keeps only that branch).",
        "",
        f"Measured {results['date']} on {machine['processor']} ({machine['cpu_count']} cores), "
        f"torch {machine['versions'].get('torch')}: `{machine['command']}`.",
        "",
    ])


if __name__ == "__main__":
    main()
