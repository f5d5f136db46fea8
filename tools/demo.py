"""The main job: Mask R-CNN with Switchable Normalization, from scratch, 2 images per batch, on CPU.

Generates the built-in synthetic shapes dataset (:mod:`sn_plugin.data`),
trains ``configs/demo/mask_rcnn_r18_fpn_sn_shapes.py`` with mmdet's Runner
(progress, loss and ETA in mmengine's log), estimates SN's batch-average
statistics, evaluates COCO box and mask AP with mmdet's ``CocoMetric``
(pycocotools) and writes to the output folder:

* ``ap_table.md`` / ``ap_table.json``: box and mask AP (overall, by size, by class);
* ``sn_importance_weights.png`` / ``.csv``: each SN layer's IN/LN/BN weights for
  the mean and the variance (as in the paper's Fig. 7; sn_plugin.plotting);
* ``val_predictions.png``: validation images, ground truth beside prediction;
* ``training_curve.png``: the losses and the learning rate over the iterations;
* ``logs/iter_<N>.pth``: the trained model (with SN's batch-average
  statistics), ``config.py`` and the rest of mmengine's work_dir in ``logs/``.

Everything is written into ``<out>.partial-*`` and renamed to ``<out>`` only
when complete (``<out>/COMPLETE`` is the last file written), so an interrupted
run never leaves a folder that looks finished.

    make demo                              # = .venv/bin/python tools/demo.py
    .venv/bin/python tools/demo.py --quick # a 1-minute smoke test (CI)
    .venv/bin/python tools/demo.py --norm GN --out work_dirs/gn_demo

``--norm BN|GN`` swaps every SN layer for BatchNorm or GroupNorm (16 groups),
the rest unchanged; benchmarks/bench_scratch_detection.py uses it.
"""
import argparse
import copy
import dataclasses
import errno
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

try:
    from benchmarks._common import (machine_record, markdown_table,
                                    save_figure_atomically, write_atomically, write_json_atomically)
    from sn_plugin.atomic import current_umask
    from sn_plugin.data import CLASSES, ShapesSpec, generate_shapes_dataset, rle_to_mask
except ImportError as missing:  # e.g. a Python without torch, outside the project's environment
    sys.exit(f"demo: error: {missing}. Run `make demo` (it sets up .venv first) or use .venv/bin/python.")

CONFIG = os.path.join(REPO, "configs", "demo", "mask_rcnn_r18_fpn_sn_shapes.py")
DONE_MARKER = "COMPLETE"
NORM_CFGS = {
    "SN": dict(type="SN", using_moving_average=False),
    "BN": dict(type="BN", requires_grad=True),
    "GN": dict(type="GN", num_groups=16, requires_grad=True),
}
FULL = dict(max_iters=1200, spec=ShapesSpec(num_train=1000, num_val=150, image_size=128, seed=0),
            batch_stats_batches=50, log_interval=20)
QUICK = dict(max_iters=12, spec=ShapesSpec(num_train=8, num_val=4, image_size=128, seed=0),
             batch_stats_batches=2, log_interval=4)
COCO_KEYS = (("AP", "mAP"), ("AP50", "mAP_50"), ("AP75", "mAP_75"),
             ("APs", "mAP_s"), ("APm", "mAP_m"), ("APl", "mAP_l"))
MIN_FREE_BYTES = 200 * 2 ** 20
PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48))


class DemoError(Exception):
    """A problem the user can fix (the message says how); printed without a traceback."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "work_dirs", "sn_demo"),
                        help="output folder (replaced if it holds an earlier demo's output)")
    parser.add_argument("--data", default=os.path.join(REPO, "work_dirs", "data"),
                        help="where the generated dataset is kept (reused by later runs)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 12 iterations on 8 images, evaluation on 4 (about a minute)")
    parser.add_argument("--norm", choices=sorted(NORM_CFGS), default="SN",
                        help="normalization in every layer of backbone, FPN and heads (default: SN)")
    parser.add_argument("--max-iters", type=int, help="training iterations (default: 1200; --quick: 12)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the dataset's is fixed)")
    parser.add_argument("--num-images", type=int, default=6, help="validation images drawn with predictions")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: with 2 threads, OpenMP's spin-waiting made "
                             "training 25x slower whenever other processes competed for a 2-core machine)")
    args = parser.parse_args(argv)
    if args.max_iters is not None and args.max_iters < 1:
        parser.error("--max-iters must be >= 1")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
    except DemoError as error:
        print(f"\ndemo: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        print(f"\ndemo: interrupted ({interruption or 'Ctrl-C'}); the unfinished output was removed",
              file=sys.stderr)
        return 130
    print(f"\nDone. Results are in {out}")
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def run(args: argparse.Namespace) -> str:
    preset = QUICK if args.quick else FULL
    max_iters = args.max_iters or preset["max_iters"]
    out = os.path.abspath(args.out)
    _check_output_folder(out)
    _require_toolkits()
    staging = _make_staging_folder(out)
    try:
        data_root = _dataset(args.data, preset["spec"], args.quick)
        summary = _train_and_report(args, preset, max_iters, data_root, staging)
        write_json_atomically(os.path.join(staging, DONE_MARKER), summary)
        _publish(staging, out)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise DemoError(_explain_os_error(error, out)) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# -- preflight ----------------------------------------------------------------------------------------------------

def _check_output_folder(out: str) -> None:
    """Refuse early, before any training, if the results could not be written."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise DemoError(f"--out {out} is a file; choose a folder")
        if os.listdir(out) and not os.path.exists(os.path.join(out, DONE_MARKER)):
            raise DemoError(f"--out {out} exists and is not the output of an earlier demo run; "
                            f"choose another --out or remove it")
    parent = os.path.dirname(out)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise DemoError(f"cannot write to {out}: {parent} is not a folder; choose another --out")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise DemoError(_explain_os_error(error, out)) from error
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DemoError(f"cannot write to {parent} (permission denied); choose a writable --out")
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise DemoError(f"only {free / 2 ** 20:.0f} MiB free on the disk of {parent}; the demo needs about "
                        f"{MIN_FREE_BYTES / 2 ** 20:.0f} MiB. Free some space or choose another --out")


def _require_toolkits() -> None:
    missing = []
    for name in ("mmengine", "mmcv", "mmdet", "pycocotools", "matplotlib"):
        try:
            __import__(name)
        except ImportError as error:
            missing.append(f"{name} ({error})")
    if missing:
        raise DemoError("missing packages: " + "; ".join(missing) + ". Run `make setup` and use .venv/bin/python")


def _make_staging_folder(out: str) -> str:
    try:
        staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would become the output folder's mode
        return staging
    except OSError as error:
        raise DemoError(_explain_os_error(error, out)) from error



def _explain_os_error(error: OSError, out: str) -> str:
    if error.errno == errno.ENOSPC:
        return (f"the disk is full ({error}). Nothing was left in {out}; free some space (or choose another --out) "
                f"and run again")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write ({error}); choose a writable --out (now {out})"
    return f"{error} (output folder {out}; nothing was left there)"


def _dataset(data_dir: str, spec: ShapesSpec, quick: bool) -> str:
    root = os.path.join(os.path.abspath(data_dir), "sn_shapes_quick" if quick else "sn_shapes")
    print(f"Dataset: {spec.num_train} train / {spec.num_val} val images of {spec.image_size}px in {root}", flush=True)
    return generate_shapes_dataset(root, spec)["root"]


# -- training and evaluation --------------------------------------------------------------------------------------

def build_config(norm: str, max_iters: int, data_root: str, work_dir: str, seed: int,
                 batch_stats_batches: int, log_interval: int):
    """The demo config with the dataset, the work_dir, the schedule and the norm layer filled in."""
    from mmengine.config import Config

    cfg = Config.fromfile(CONFIG)
    data_root = data_root.rstrip("/") + "/"
    for loader in (cfg.train_dataloader, cfg.val_dataloader, cfg.test_dataloader):
        loader.dataset.data_root = data_root
    for evaluator in (*cfg.val_evaluator, *cfg.test_evaluator):
        evaluator.ann_file = data_root + "annotations/instances_val.json"
    cfg.work_dir = work_dir
    cfg.randomness = dict(seed=seed, deterministic=False)
    # validation runs once, at the end of training
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters)
    # a linear warm-up over the first 10% (at most 200 iterations), then a cosine decay; none shorter
    # than 2 iterations, which would leave the learning rate at the warm-up's start factor
    warmup = min(200, max_iters // 10)
    warmup = warmup if warmup >= 2 else 0
    cfg.param_scheduler = []
    if warmup:
        cfg.param_scheduler.append(dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=warmup))
    cfg.param_scheduler.append(dict(type="CosineAnnealingLR", by_epoch=False, begin=warmup, end=max_iters,
                                    T_max=max(1, max_iters - warmup), eta_min=2e-4))
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=max_iters,
                                        max_keep_ckpts=1)
    log_interval = min(log_interval, max_iters)  # a run shorter than the interval would log no loss
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=log_interval)
    cfg.log_processor = dict(type="LogProcessor", window_size=log_interval, by_epoch=False)
    cfg.model = _replace_norm(cfg.model, NORM_CFGS[norm])
    if norm == "SN":
        cfg.custom_hooks = [dict(type="SNBatchStatsHook", num_batches=batch_stats_batches),
                            dict(type="SNWeightLoggerHook", interval=max(1, min(50, max_iters // 4)))]
    else:
        cfg.custom_hooks = []
    return cfg


def _replace_norm(node, norm_cfg):
    """A copy of a config tree with every ``norm_cfg`` replaced by ``norm_cfg``."""
    if isinstance(node, dict):
        return type(node)({key: copy.deepcopy(norm_cfg) if key == "norm_cfg" else _replace_norm(value, norm_cfg)
                           for key, value in node.items()})
    if isinstance(node, (list, tuple)):
        return type(node)(_replace_norm(value, norm_cfg) for value in node)
    return node


def _train_and_report(args, preset, max_iters: int, data_root: str, staging: str) -> Dict[str, object]:
    import torch
    from mmengine.runner import Runner

    torch.set_num_threads(args.threads)
    work_dir = os.path.join(staging, "logs")
    cfg = build_config(args.norm, max_iters, data_root, work_dir, args.seed, preset["batch_stats_batches"],
                       preset["log_interval"])
    if args.quick:
        # a barely trained model scores below the usual threshold; keeping every detection makes the
        # smoke test run the COCO evaluation (which mmdet skips when there are no detections)
        cfg.model.test_cfg.rcnn.score_thr = 0.0
    runner = Runner.from_cfg(cfg)
    validation = _metrics_catcher()
    runner.register_hook(validation, priority="LOWEST")
    started = time.time()
    runner.train()
    train_seconds = time.time() - started - validation.seconds
    metrics = validation.metrics
    cfg.dump(os.path.join(staging, "config.py"))

    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    table = ap_table(metrics)
    summary = {
        "norm": args.norm, "iterations": max_iters, "images_per_batch": cfg.train_dataloader.batch_size,
        "train_minutes": round(train_seconds / 60, 2), "quick": args.quick, "seed": args.seed,
        "checkpoint": os.path.join("logs", f"iter_{max_iters}.pth"),
        "dataset": {"root": data_root, **dataclasses.asdict(preset["spec"])}, "machine": machine_record(
            ("torch", "mmengine", "mmcv", "mmdet", "pycocotools", "numpy")),
        **table,
    }
    write_json_atomically(os.path.join(staging, "ap_table.json"), summary)
    markdown = render_ap_markdown(summary)
    write_atomically(os.path.join(staging, "ap_table.md"), markdown)
    print("\n" + markdown)

    from sn_plugin import switch_norm_layers

    if switch_norm_layers(model):
        plot_importance_weights(model, staging,
                                title=f"SN importance weights after {max_iters} iterations from scratch")
    plot_training_curve(work_dir, os.path.join(staging, "training_curve.png"), args.norm)
    draw_predictions(runner, data_root, os.path.join(staging, "val_predictions.png"), args.num_images)
    return summary


def _metrics_catcher():
    """A runner hook keeping the metrics of the last validation and the time spent validating.

    Made on demand so that this script imports mmengine only after checking it is installed.
    """
    from mmengine.hooks import Hook

    class MetricsOfLastValidation(Hook):
        def __init__(self):
            self.metrics: Dict[str, float] = {}
            self.seconds = 0.0
            self._started = 0.0

        def before_val(self, runner):
            self._started = time.time()

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})
            self.seconds += time.time() - self._started

    return MetricsOfLastValidation()


def ap_table(metrics: Dict[str, float]) -> Dict[str, object]:
    """The config's two CocoMetrics' results (prefixes ``bbox/``, ``segm/``) as
    {'bbox': {'AP': ..}, 'segm': {..}, 'per_class': {class: {'bbox': AP, 'segm': AP}}}, in percent."""
    table: Dict[str, object] = {}
    for kind in ("bbox", "segm"):
        table[kind] = {name: _percent(metrics.get(f"{kind}/{kind}_{key}")) for name, key in COCO_KEYS}
    table["per_class"] = {name: {kind: _percent(metrics.get(f"{kind}/{name}_precision"))
                                 for kind in ("bbox", "segm")} for name in CLASSES}
    return table


def _percent(value: Optional[float]) -> Optional[float]:
    """COCO's -1 (no objects of that kind) and NaN become None."""
    if value is None or math.isnan(value) or value < 0:
        return None
    return round(100 * float(value), 1)


def render_ap_markdown(summary: Dict[str, object]) -> str:
    def fmt(value):
        return "n/a" if value is None else f"{value:.1f}"

    header = ["", *[name for name, _ in COCO_KEYS]]
    rows = [[f"box ({summary['norm']})", *[fmt(summary["bbox"][name]) for name, _ in COCO_KEYS]],
            [f"mask ({summary['norm']})", *[fmt(summary["segm"][name]) for name, _ in COCO_KEYS]]]
    per_class = markdown_table(["class", "box AP", "mask AP"],
                               [[name, fmt(ap["bbox"]), fmt(ap["segm"])] for name, ap in summary["per_class"].items()])
    machine = summary["machine"]
    return (f"# COCO AP on the synthetic shapes val split ({summary['dataset']['num_val']} images)\n\n"
            f"Mask R-CNN, {summary['norm']} in backbone, FPN and heads, from scratch, "
            f"{summary['images_per_batch']} images per batch, {summary['iterations']} iterations "
            f"({summary['train_minutes']:.1f} min of training on {machine['cpu_count']} CPUs, "
            f"{machine['processor']}).\n\n"
            + markdown_table(header, rows) + "\n" + per_class)


# -- figures ------------------------------------------------------------------------------------------------------

def plot_importance_weights(model, staging: str, title: str) -> None:
    """Each SN layer's IN/LN/BN weights for the mean and the variance (the paper's Fig. 7), as PNG and CSV."""
    from sn_plugin.plotting import plot_importance_weights as plot
    from sn_plugin.plotting import save_importance_figure, write_importance_csv

    save_importance_figure(plot(model, title=title), os.path.join(staging, "sn_importance_weights.png"), dpi=110)
    write_importance_csv(model, os.path.join(staging, "sn_importance_weights.csv"))


def _read_scalars(work_dir: str) -> List[Dict[str, float]]:
    """mmengine's LocalVisBackend log: one JSON object per logged step."""
    rows = []
    for root, _, files in os.walk(work_dir):
        if "scalars.json" in files:
            with open(os.path.join(root, "scalars.json")) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    return rows


def plot_training_curve(work_dir: str, path: str, norm: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in _read_scalars(work_dir) if "loss" in row]
    if not rows:
        raise RuntimeError(f"no training losses were logged under {work_dir}; cannot draw the training curve")
    steps = [row["step"] for row in rows]
    figure, (losses, rate) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw=dict(width_ratios=[3, 1]))
    keys = ["loss"] + sorted(k for k in rows[0] if k.startswith("loss_"))
    for key in keys:
        losses.plot(steps, [row.get(key) for row in rows], label=key, linewidth=2.2 if key == "loss" else 1.2)
    losses.set_xlabel("iteration")
    losses.set_ylabel("training loss (window average)")
    losses.set_title(f"Mask R-CNN ({norm}) from scratch, 2 images/batch")
    losses.legend(fontsize=8, ncol=2)
    losses.grid(alpha=0.3)
    rate.plot(steps, [row.get("lr") for row in rows], color="black")
    rate.set_xlabel("iteration")
    rate.set_title("learning rate")
    rate.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=110)
    plt.close(figure)


def draw_predictions(runner, data_root: str, path: str, num_images: int, score_threshold: float = 0.3) -> None:
    """Validation images, ground truth (left) beside predictions above ``score_threshold`` (right)."""
    import numpy as np
    from PIL import Image

    with open(os.path.join(data_root, "annotations", "instances_val.json")) as f:
        coco = json.load(f)
    by_image: Dict[int, list] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)

    import torch

    model = runner.model
    model.eval()
    panels = []
    for batch in runner.val_dataloader:
        with torch.no_grad():
            samples = model.val_step(batch)
        for sample in samples:
            if len(panels) == num_images:
                break
            image = np.asarray(Image.open(sample.img_path).convert("RGB"))
            truth = [(a["category_id"] - 1, 1.0, a["bbox"], rle_to_mask(a["segmentation"]))
                     for a in by_image.get(sample.img_id, [])]
            pred = sample.pred_instances
            keep = pred.scores >= score_threshold
            predicted = [(int(label), float(score), _xyxy_to_xywh(box.tolist()), mask.numpy())
                         for label, score, box, mask in zip(pred.labels[keep], pred.scores[keep],
                                                            pred.bboxes[keep], pred.masks[keep])]
            panels.append((_draw(image, truth, scores=False), _draw(image, predicted, scores=True)))
        if len(panels) == num_images:
            break
    _save_grid(panels, path, score_threshold)


def _xyxy_to_xywh(box):
    return [box[0], box[1], box[2] - box[0], box[3] - box[1]]


def _draw(image, objects, scores: bool, scale: int = 3):
    """The image scaled up, each object's mask tinted and outlined by its box, with its class (and score)."""
    import numpy as np
    from PIL import Image, ImageDraw

    canvas = image.astype(np.float32)
    for label, _, _, mask in objects:
        canvas[mask] = 0.45 * canvas[mask] + 0.55 * np.array(PALETTE[label])
    picture = Image.fromarray(canvas.astype(np.uint8)).resize(
        (image.shape[1] * scale, image.shape[0] * scale), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for label, score, (x, y, w, h), _ in objects:
        box = [x * scale, y * scale, (x + w) * scale, (y + h) * scale]
        draw.rectangle(box, outline=PALETTE[label], width=2)
        text = f"{CLASSES[label]} {score:.2f}" if scores else CLASSES[label]
        left, top, right, bottom = draw.textbbox((box[0] + 2, box[1] + 1), text)
        draw.rectangle([left - 2, top - 1, right + 2, bottom + 1], fill=(0, 0, 0))
        draw.text((box[0] + 2, box[1] + 1), text, fill=PALETTE[label])
    return picture


def _save_grid(panels, path: str, score_threshold: float) -> None:
    import io

    from PIL import Image, ImageDraw

    if not panels:
        raise RuntimeError("the validation set produced no images to draw")
    width, height = panels[0][0].size
    header = 18
    grid = Image.new("RGB", (2 * width + 6, len(panels) * (height + 4) + header), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), "ground truth", fill=(0, 0, 0))
    draw.text((width + 10, 3), f"prediction (score >= {score_threshold})", fill=(0, 0, 0))
    for row, (truth, predicted) in enumerate(panels):
        top = header + row * (height + 4)
        grid.paste(truth, (0, top))
        grid.paste(predicted, (width + 6, top))
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    write_atomically(path, buffer.getvalue(), binary=True)


# -- publishing ---------------------------------------------------------------------------------------------------

def _publish(staging: str, out: str) -> None:
    """Replace ``out`` (an earlier demo's output, checked before training) by the finished staging folder."""
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "previous"))
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


if __name__ == "__main__":
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the unfinished output folder is removed
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    sys.exit(main())
