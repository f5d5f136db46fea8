"""Train a detector with Switchable Normalization from scratch on a COCO-format dataset, evaluate it, report.

The code behind ``tools/train_coco_detector.py`` (your own dataset, or a
built-in one) and ``tools/demo.py`` (``make demo``: the built-in shapes). It
takes an mmdet config as the base (by default the demo's
``configs/demo/mask_rcnn_r18_fpn_sn_shapes.py``: a Mask R-CNN, ResNet + FPN,
SN in every norm layer, 2 images per batch) and fills in the dataset, the
classes (read from the annotations), the backbone's depth and width, the norm
layer, the image size and the schedule. Every input is checked before training
starts (:func:`sn_plugin.data.check_coco_dataset`). Training runs with mmdet's
Runner (progress, loss and ETA in mmengine's log); SN's batch-average
statistics are estimated before each evaluation (``SNBatchStatsHook``); COCO
box (and mask) AP come from mmdet's ``CocoMetric`` (pycocotools). The output
folder receives:

* ``ap_table.md`` / ``ap_table.json``: AP overall, by size and by class (the
  JSON also holds the run's settings, the machine and, with
  ``--val-interval``, the AP at every evaluation);
* ``sn_importance_weights.png`` / ``.csv``: each SN layer's IN/LN/BN weights
  for the mean and the variance (the paper's Fig. 7; :mod:`sn_plugin.plotting`);
* ``val_predictions.png``: val images, ground truth beside predictions, and the
  predictions themselves in COCO's results format
  (``val_predictions.bbox.json``, ``val_predictions.segm.json``);
* ``training_curve.png``: the losses and the learning rate;
* ``logs/iter_<N>.pth``: the trained model (with SN's batch-average
  statistics); ``config.py`` and the rest of mmengine's work_dir in ``logs/``.

Everything is written into ``<out>.partial-*`` and renamed to ``<out>`` only
when complete (``<out>/COMPLETE`` is its last file), so an interrupted run
never leaves a folder that looks finished; an existing ``<out>`` is replaced
only if it is the output of an earlier run.
"""
import argparse
import copy
import dataclasses
import errno
import inspect
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from ..atomic import current_umask
from ..data import (CocoFormatError, CocoSplit, NucleiDataError, ShapesSpec, check_coco_dataset,
                    generate_shapes_dataset, prepare_nuclei_dataset)
from ..reports import (draw_objects, machine_record, markdown_table, plot_training_curve, save_image_grid,
                       write_atomically, write_json_atomically)

__all__ = ["CocoPictures", "CommandError", "DatasetFiles", "Plan", "build_config", "builtin_dataset", "default_config",
           "main", "parse_args", "run"]

MODELS = {"mask_rcnn": "Mask R-CNN", "faster_rcnn": "Faster R-CNN"}
DEPTHS = (18, 34, 50, 101, 152)  # mmdet's ResNet
NORM_CFGS = {
    "SN": dict(type="SN", using_moving_average=False),  # the paper's batch-average statistics
    "BN": dict(type="BN", requires_grad=True),
    "GN": dict(type="GN", num_groups=16, requires_grad=True),  # the demo's narrowest layers have 32 channels
}
BUILTIN_DATASETS = ("shapes", "nuclei")
DONE_MARKER = "COMPLETE"
MIN_FREE_BYTES = 200 * 2 ** 20
COCO_KEYS = (("AP", "mAP"), ("AP50", "mAP_50"), ("AP75", "mAP_75"),
             ("APs", "mAP_s"), ("APm", "mAP_m"), ("APl", "mAP_l"))
KIND_NAMES = {"bbox": "box", "segm": "mask"}
TOOLKITS = ("mmengine", "mmcv", "mmdet", "pycocotools", "matplotlib")
RECORDED_PACKAGES = ("torch", "mmengine", "mmcv", "mmdet", "pycocotools", "numpy")  # versions in ap_table.json
DEMO_CONFIG = "demo/mask_rcnn_r18_fpn_sn_shapes.py"  # among sn_plugin's configs
PREDICTIONS = "val_predictions"  # CocoMetric writes <out>/val_predictions.{bbox,segm}.json
SCORE_THRESHOLD = 0.3  # predictions drawn in val_predictions.png


@dataclasses.dataclass(frozen=True)
class Schedule:
    max_iters: int
    batch_stats_batches: int  # batches SNBatchStatsHook averages over
    log_interval: int


FULL = Schedule(max_iters=1200, batch_stats_batches=50, log_interval=20)
QUICK = Schedule(max_iters=12, batch_stats_batches=2, log_interval=4)
SHAPES_SPECS = {False: ShapesSpec(num_train=1000, num_val=150, image_size=128, seed=0),
                True: ShapesSpec(num_train=8, num_val=4, image_size=128, seed=0)}  # keyed by --quick


class CommandError(Exception):
    """A problem the user can fix (the message says how); printed without a traceback."""


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to train, resolved from the command line and the dataset."""

    model: str = "mask_rcnn"
    depth: int = 18
    width: Optional[int] = None  # the backbone's base channels; None keeps the config's
    norm: str = "SN"
    image_size: int = 128  # images are resized to fit in image_size x image_size
    max_iters: int = FULL.max_iters
    val_interval: Optional[int] = None  # None: evaluate once, at the end
    seed: int = 0
    batch_stats_batches: int = FULL.batch_stats_batches
    log_interval: int = FULL.log_interval
    quick: bool = False


# -- command line -------------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
               defaults: Optional[Dict[str, object]] = None) -> argparse.Namespace:
    """The command line; ``defaults`` (e.g. ``out``, ``data``, ``dataset``) come from the command."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Train an SN detector from scratch on a COCO-format dataset and report its AP.",
        epilog="Your own data: --train-ann TRAIN.json --train-images TRAIN_DIR --val-ann VAL.json --val-images "
               "VAL_DIR (COCO instance annotations; the classes are read from their 'categories'). "
               "Built-in data: --dataset shapes (synthetic) or --dataset nuclei (real microscopy tiles from the "
               "stardist wheel on PyPI, fetched with pip on first use).")
    data = parser.add_argument_group("data (either --dataset or all four files)")
    data.add_argument("--dataset", choices=BUILTIN_DATASETS, help="a built-in dataset, made under --data")
    data.add_argument("--train-ann", help="COCO annotation file (JSON) of the training images")
    data.add_argument("--train-images", help="folder of the training images (file names as in --train-ann)")
    data.add_argument("--val-ann", help="COCO annotation file (JSON) of the validation images")
    data.add_argument("--val-images", help="folder of the validation images")
    data.add_argument("--data", default=os.path.join("work_dirs", "data"),
                      help="where built-in datasets are made and kept (default: %(default)s)")
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=sorted(MODELS), default="mask_rcnn",
                       help="mask_rcnn (boxes and masks; needs 'segmentation' in the annotations) or faster_rcnn "
                            "(boxes only); default: %(default)s")
    model.add_argument("--depth", type=int, choices=DEPTHS, default=18, help="ResNet depth (default: %(default)s)")
    model.add_argument("--width", type=int,
                       help="ResNet base width (channels of the stem and the first stage; 64 is the standard "
                            "ResNet; default: the config's, 32 in the demo's)")
    model.add_argument("--norm", choices=sorted(NORM_CFGS), default="SN",
                       help="normalization in every layer of backbone, FPN and heads (default: %(default)s)")
    model.add_argument("--config", help=f"the mmdet config to start from (default: configs/{DEMO_CONFIG})")
    training = parser.add_argument_group("training")
    training.add_argument("--image-size", type=int,
                          help="resize images to fit in SIZE x SIZE (default: the longest side among the images; "
                               "the built-in datasets: 128)")
    training.add_argument("--max-iters", type=int,
                          help=f"training iterations (default {FULL.max_iters}; --quick: {QUICK.max_iters})")
    training.add_argument("--val-interval", type=int,
                          help="also evaluate every N iterations (the AP history goes to ap_table.json); "
                               "default: once, at the end")
    training.add_argument("--seed", type=int, default=0, help="training seed (default: %(default)s)")
    training.add_argument("--quick", action="store_true",
                          help=f"smoke test: {QUICK.max_iters} iterations (and a tiny shapes dataset); about a "
                               f"minute")
    training.add_argument("--threads", type=int, default=1,
                          help="torch intra-op threads (default 1: with more threads than idle cores, OpenMP's "
                               "spin-waiting slows training many times over)")
    output = parser.add_argument_group("output")
    output.add_argument("--out", default=os.path.join("work_dirs", "sn_detector"),
                        help="output folder, replaced if it holds an earlier run's output (default: %(default)s)")
    output.add_argument("--num-images", type=int, default=6,
                        help="val images drawn with their predictions (default: %(default)s)")
    parser.set_defaults(**(defaults or {}))
    args = parser.parse_args(argv)
    files = {"--train-ann": args.train_ann, "--train-images": args.train_images, "--val-ann": args.val_ann,
             "--val-images": args.val_images}
    given = [flag for flag, value in files.items() if value]
    if args.dataset and given:
        parser.error(f"give either --dataset or your own files, not both (got --dataset {args.dataset} and "
                     f"{', '.join(given)})")
    if not args.dataset and len(given) < len(files):
        parser.error("say what to train on: --dataset shapes|nuclei, or all of --train-ann, --train-images, "
                     f"--val-ann and --val-images (missing: {', '.join(f for f in files if f not in given)})")
    for flag in ("max_iters", "val_interval", "image_size", "width", "threads"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1 (got {value})")
    groups = NORM_CFGS["GN"]["num_groups"]
    if args.norm == "GN" and args.width is not None and args.width % groups:
        parser.error(f"--norm GN uses {groups} groups, so --width must be a multiple of {groups} (got {args.width})")
    if args.image_size is not None and args.image_size < 32:
        parser.error(f"--image-size must be >= 32 pixels (got {args.image_size})")
    if args.num_images < 0:
        parser.error(f"--num-images must be >= 0 (got {args.num_images})")
    return args


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None,
         defaults: Optional[Dict[str, object]] = None) -> int:
    """The command: parse, run, print where the results are; 1 on a problem the user can fix."""
    args = parse_args(argv, prog, defaults)
    name = prog or "train_coco_detector"
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)  # `kill` unwinds like Ctrl-C
    try:
        out = run(args)
    except CommandError as error:
        print(f"\n{name}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        print(f"\n{name}: interrupted ({interruption or 'Ctrl-C'}); the unfinished output was removed",
              file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"\nDone. Results are in {out}")
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"stopped by signal {signum}")


# -- the run ------------------------------------------------------------------------------------------------------

def run(args: argparse.Namespace, extra_hooks: Iterable = (),
        adjust_config: Optional[Callable[[object], None]] = None) -> str:
    """Check, train, evaluate and report as the module says; returns the output folder.

    ``extra_hooks`` are registered on the Runner (e.g. a benchmark's
    measurements); ``adjust_config(cfg)`` may change the finished mmengine
    Config before the Runner is built.
    """
    out = os.path.abspath(args.out)
    _check_output_folder(out)
    dataset = _dataset(args)
    train, val = _checked(dataset)  # the user's files first: their errors are the ones to fix first
    _require_toolkits()
    plan = _plan(args, dataset, train)
    if plan.model == "mask_rcnn" and not train.has_masks:
        raise CommandError(f"train annotations {train.annotations} have annotations without 'segmentation', which "
                           f"a Mask R-CNN needs; train a box detector (--model faster_rcnn) or add the masks")
    config = args.config or default_config()
    if not os.path.isfile(config):
        raise CommandError(f"--config {config} does not exist")
    staging = _make_staging_folder(out)
    try:
        cfg = build_config(config, plan, train, val, staging)
        if adjust_config is not None:
            adjust_config(cfg)
        summary = _train_and_report(cfg, plan, dataset, train, val, staging, args, list(extra_hooks))
        write_json_atomically(os.path.join(staging, DONE_MARKER), summary)
        _publish(staging, out)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise CommandError(_explain_os_error(error, out)) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def _check_output_folder(out: str) -> None:
    """Refuse early, before any training, if the results could not be written."""
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise CommandError(f"--out {out} is a file; choose a folder")
        if os.listdir(out) and not os.path.exists(os.path.join(out, DONE_MARKER)):
            raise CommandError(f"--out {out} exists and is not the output of an earlier run; choose another --out "
                               f"or remove it")
    parent = os.path.dirname(out)
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise CommandError(f"cannot write to {out}: {parent} is not a folder; choose another --out")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as error:
        raise CommandError(_explain_os_error(error, out)) from error
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write to {parent} (permission denied); choose a writable --out")
    free = shutil.disk_usage(parent).free
    if free < MIN_FREE_BYTES:
        raise CommandError(f"only {free / 2 ** 20:.0f} MiB free on the disk of {parent}; a run needs about "
                           f"{MIN_FREE_BYTES / 2 ** 20:.0f} MiB. Free some space or choose another --out")


def _require_toolkits() -> None:
    missing = []
    for name in TOOLKITS:
        try:
            __import__(name)
        except ImportError as error:
            missing.append(f"{name} ({error})")
    if missing:
        raise CommandError("missing packages: " + "; ".join(missing) + ". Run `make setup` and use .venv/bin/python")


def _make_staging_folder(out: str) -> str:
    try:
        staging = tempfile.mkdtemp(prefix=os.path.basename(out) + ".partial-", dir=os.path.dirname(out))
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp's 0700 would become the output folder's mode
        return staging
    except OSError as error:
        raise CommandError(_explain_os_error(error, out)) from error


def _explain_os_error(error: OSError, out: str) -> str:
    if error.errno == errno.ENOSPC:
        return (f"the disk is full ({error}). Nothing was left in {out}; free some space (or choose another --out) "
                f"and run again")
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write ({error}); choose a writable --out (now {out})"
    return f"{error} (output folder {out}; nothing was left there)"


@dataclasses.dataclass(frozen=True)
class DatasetFiles:
    """The files of a dataset to train on, and what the report says about it."""

    description: str  # for the report's title
    train_annotations: str
    train_images: str
    val_annotations: str
    val_images: str
    details: Dict[str, object]  # recorded in ap_table.json
    image_size: Optional[int] = None  # the built-in datasets' own image size


def _dataset(args: argparse.Namespace) -> DatasetFiles:
    """The four paths to train on: a built-in dataset (made under --data if needed) or the user's files."""
    if args.dataset:
        return builtin_dataset(args.dataset, args.data, args.quick)
    return DatasetFiles("the val set of " + os.path.abspath(args.val_ann), os.path.abspath(args.train_ann),
                    os.path.abspath(args.train_images), os.path.abspath(args.val_ann),
                    os.path.abspath(args.val_images), details={"name": "own"})


def builtin_dataset(name: str, data: str, quick: bool = False) -> DatasetFiles:
    """A built-in dataset (``shapes`` or ``nuclei``) under the folder ``data``, made there on first use.

    Benchmarks running several trainings at once call it first, so that the
    dataset is made once.
    """
    data = os.path.abspath(data)
    try:
        if name == "shapes":
            spec = SHAPES_SPECS[quick]
            root = os.path.join(data, "sn_shapes_quick" if quick else "sn_shapes")
            print(f"Dataset: {spec.num_train} train / {spec.num_val} val images of {spec.image_size}px in {root}",
                  flush=True)
            paths = generate_shapes_dataset(root, spec)
            details = {"name": "shapes", **dataclasses.asdict(spec)}
            description, image_size = f"the synthetic shapes val split ({spec.num_val} images)", spec.image_size
        elif name == "nuclei":
            root = os.path.join(data, "sn_nuclei")
            print(f"Dataset: nuclei tiles from the stardist wheel in {root}", flush=True)
            paths = prepare_nuclei_dataset(root)
            with open(os.path.join(root, "dataset_spec.json")) as f:
                details = {"name": "nuclei", **json.load(f)}
            description, image_size = "the nuclei val tiles", details["tile_size"]
        else:
            raise ValueError(f"unknown built-in dataset {name!r}; choose from {BUILTIN_DATASETS}")
    except NucleiDataError as error:
        raise CommandError(str(error)) from error
    except FileExistsError as error:
        raise CommandError(f"{error}. From the command line: remove {root} (it is made again) or choose another "
                           f"--data") from error
    return DatasetFiles(description, paths["train_annotations"], paths["train_images"], paths["val_annotations"],
                    paths["val_images"], details=details, image_size=image_size)


def _checked(dataset: DatasetFiles) -> Tuple[CocoSplit, CocoSplit]:
    try:
        return check_coco_dataset(dataset.train_annotations, dataset.train_images, dataset.val_annotations,
                                  dataset.val_images)
    except CocoFormatError as error:
        raise CommandError(str(error)) from error


def _plan(args: argparse.Namespace, dataset: DatasetFiles, train: CocoSplit) -> Plan:
    schedule = QUICK if args.quick else FULL
    return Plan(model=args.model, depth=args.depth, width=args.width, norm=args.norm,
                image_size=args.image_size or dataset.image_size or train.max_side,
                max_iters=args.max_iters or schedule.max_iters, val_interval=args.val_interval, seed=args.seed,
                batch_stats_batches=schedule.batch_stats_batches, log_interval=schedule.log_interval,
                quick=args.quick)


# -- the config ---------------------------------------------------------------------------------------------------

def default_config() -> str:
    """The demo's config, ``configs/demo/mask_rcnn_r18_fpn_sn_shapes.py``, where sn_plugin's configs are
    installed (:func:`sn_plugin.integrations.config_files.config_file`)."""
    from ..integrations.config_files import config_file

    try:
        return config_file(DEMO_CONFIG)
    except FileNotFoundError as error:
        raise CommandError(f"{error}; or pass --config") from error


def build_config(config_file: str, plan: Plan, train: CocoSplit, val: CocoSplit, output_dir: str):
    """The base config with the dataset, classes, model, norm, image size and schedule of ``plan`` filled in.

    mmengine's work_dir is ``output_dir/logs``; CocoMetric writes its
    predictions to ``output_dir/val_predictions.*.json``.
    """
    from mmdet.models.backbones import ResNet
    from mmengine.config import Config

    cfg = Config.fromfile(config_file)
    with_masks = plan.model == "mask_rcnn"
    _set_model(cfg.model, plan, len(train.classes), ResNet.arch_settings[plan.depth][0].expansion,
               default_width=inspect.signature(ResNet).parameters["base_channels"].default,
               densest=max(train.max_objects_per_image, val.max_objects_per_image), config_file=config_file)
    for loader, split in ((cfg.train_dataloader, train), (cfg.val_dataloader, val), (cfg.test_dataloader, val)):
        dataset = loader.dataset
        dataset.data_root = ""
        dataset.ann_file = split.annotations
        dataset.data_prefix = dict(img=split.images.rstrip(os.sep) + os.sep)
        dataset.metainfo = dict(classes=train.classes)
        for step in dataset.pipeline:
            if step["type"] == "Resize":
                step["scale"] = (plan.image_size, plan.image_size)
            if step["type"] == "LoadAnnotations":
                step["with_mask"] = with_masks
    kinds = ("bbox", "segm") if with_masks else ("bbox",)
    evaluators = [dict(type="CocoMetric", ann_file=val.annotations, metric=kind, classwise=True, format_only=False,
                       prefix=kind) for kind in kinds]  # one per kind: together, segm's per-class keys hide bbox's
    evaluators[0]["outfile_prefix"] = os.path.join(output_dir, PREDICTIONS)
    cfg.val_evaluator = evaluators
    cfg.test_evaluator = copy.deepcopy(evaluators)

    cfg.work_dir = os.path.join(output_dir, "logs")
    # unique names: mmengine keeps one logger, message hub and visualizer per name for the whole process
    cfg.experiment_name = os.path.basename(output_dir)
    if "visualizer" in cfg:
        cfg.visualizer.name = f"visualizer_{cfg.experiment_name}"
    cfg.randomness = dict(seed=plan.seed, deterministic=False)
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=plan.max_iters,
                         val_interval=min(plan.val_interval or plan.max_iters, plan.max_iters))
    # a linear warm-up over the first 10% (at most 200 iterations), then a cosine decay; none shorter
    # than 2 iterations, which would leave the learning rate at the warm-up's start factor
    warmup = min(200, plan.max_iters // 10)
    warmup = warmup if warmup >= 2 else 0
    cfg.param_scheduler = []
    if warmup:
        cfg.param_scheduler.append(dict(type="LinearLR", start_factor=0.01, by_epoch=False, begin=0, end=warmup))
    cfg.param_scheduler.append(dict(type="CosineAnnealingLR", by_epoch=False, begin=warmup, end=plan.max_iters,
                                    T_max=max(1, plan.max_iters - warmup), eta_min=2e-4))
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=plan.max_iters,
                                        max_keep_ckpts=1)
    log_interval = min(plan.log_interval, plan.max_iters)  # a run shorter than the interval would log no loss
    cfg.default_hooks.logger = dict(type="LoggerHook", interval=log_interval)
    cfg.log_processor = dict(type="LogProcessor", window_size=log_interval, by_epoch=False)
    if plan.norm == "SN":
        cfg.custom_hooks = [dict(type="SNBatchStatsHook", num_batches=plan.batch_stats_batches),
                            dict(type="SNWeightLoggerHook", interval=max(1, min(50, plan.max_iters // 4)))]
    else:
        cfg.custom_hooks = []
    return cfg


def _set_model(model, plan: Plan, num_classes: int, expansion: int, default_width: int, densest: int,
               config_file: str) -> None:
    """Depth, width, classes, norm and the mask head (dropped for Faster R-CNN), in place."""
    heads = model.roi_head
    if plan.model == "mask_rcnn" and "mask_head" not in heads:
        raise CommandError(f"--config {config_file} has no mask head; use --model faster_rcnn or a Mask R-CNN config")
    model.backbone.depth = plan.depth
    width = plan.width or model.backbone.get("base_channels", default_width)
    model.backbone.base_channels = width
    model.neck.in_channels = [width * expansion * 2 ** stage for stage in range(len(model.neck.in_channels))]
    heads.bbox_head.num_classes = num_classes
    if plan.model == "faster_rcnn":
        model.type = "FasterRCNN"
        for key in ("mask_roi_extractor", "mask_head"):
            heads.pop(key, None)
        model.train_cfg.rcnn.pop("mask_size", None)
        model.test_cfg.rcnn.pop("mask_thr_binary", None)
        model.data_preprocessor.pad_mask = False
    else:
        heads.mask_head.num_classes = num_classes
    # enough detections per image for the densest image (COCO evaluates up to 100)
    model.test_cfg.rcnn.max_per_img = max(model.test_cfg.rcnn.max_per_img, min(100, 2 * densest))
    if plan.quick:
        # a barely trained model scores below the usual threshold; keeping every detection makes the
        # smoke test run the COCO evaluation (which mmdet skips when there are no detections)
        model.test_cfg.rcnn.score_thr = 0.0
    _replace_norm(model, NORM_CFGS[plan.norm])


def _replace_norm(node, norm_cfg) -> None:
    """Set every ``norm_cfg`` in a config tree to a copy of ``norm_cfg``, in place."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "norm_cfg":
                node[key] = copy.deepcopy(norm_cfg)
            else:
                _replace_norm(value, norm_cfg)
    elif isinstance(node, (list, tuple)):
        for value in node:
            _replace_norm(value, norm_cfg)


# -- training and the report --------------------------------------------------------------------------------------

def _train_and_report(cfg, plan: Plan, dataset: DatasetFiles, train: CocoSplit, val: CocoSplit, staging: str,
                      args: argparse.Namespace, extra_hooks: List) -> Dict[str, object]:
    import torch
    from mmengine.runner import Runner

    from ..introspection import switch_norm_layers

    torch.set_num_threads(args.threads)
    runner = Runner.from_cfg(cfg)
    validation = _metrics_catcher()
    runner.register_hook(validation, priority="LOWEST")
    for hook in extra_hooks:
        runner.register_hook(hook)
    started = time.time()
    runner.train()
    train_seconds = time.time() - started - validation.seconds
    cfg.dump(os.path.join(staging, "config.py"))

    kinds = [evaluator["prefix"] for evaluator in cfg.val_evaluator]
    summary = {
        "model": plan.model, "backbone": {"depth": plan.depth, "width": cfg.model.backbone.base_channels},
        "norm": plan.norm, "iterations": plan.max_iters, "images_per_batch": cfg.train_dataloader.batch_size,
        "image_size": plan.image_size, "train_minutes": round(train_seconds / 60, 2), "quick": plan.quick,
        "seed": plan.seed, "checkpoint": os.path.join("logs", f"iter_{plan.max_iters}.pth"),
        "dataset": {**dataset.details, "description": dataset.description, "train_annotations": train.annotations,
                    "train_images": train.images, "val_annotations": val.annotations, "val_images": val.images,
                    "num_train_images": train.num_images, "num_val_images": val.num_images,
                    "num_val_objects": val.num_objects, "classes": list(train.classes)},
        "machine": machine_record(RECORDED_PACKAGES),
        **ap_table(validation.metrics, train.classes, kinds),
        "history": [{"iteration": iteration, **{f"{kind}_AP": ap_table(metrics, (), kinds)[kind]["AP"]
                                                for kind in kinds}}
                    for iteration, metrics in validation.history],
    }
    write_json_atomically(os.path.join(staging, "ap_table.json"), summary)
    markdown = render_ap_markdown(summary)
    write_atomically(os.path.join(staging, "ap_table.md"), markdown)
    print("\n" + markdown)

    model = runner.model.module if hasattr(runner.model, "module") else runner.model
    if switch_norm_layers(model):
        from ..plotting import plot_importance_weights, save_importance_figure, write_importance_csv

        title = f"SN importance weights after {plan.max_iters} iterations from scratch"
        save_importance_figure(plot_importance_weights(model, title=title),
                               os.path.join(staging, "sn_importance_weights.png"), dpi=110)
        write_importance_csv(model, os.path.join(staging, "sn_importance_weights.csv"))
    plot_training_curve(read_scalars(cfg.work_dir), os.path.join(staging, "training_curve.png"),
                        f"{MODELS[plan.model]} ({plan.norm}) from scratch, {summary['images_per_batch']} "
                        f"images/batch")
    if args.num_images:
        pictures = CocoPictures(val.annotations, val.images)
        rows = [[pictures.draw(image_id), pictures.draw(image_id, os.path.join(staging, PREDICTIONS))]
                for image_id in pictures.image_ids[:args.num_images]]
        save_image_grid(rows, ["ground truth", f"prediction (score >= {SCORE_THRESHOLD})"],
                        os.path.join(staging, "val_predictions.png"))
    return summary


def _metrics_catcher():
    """A runner hook keeping every validation's metrics, the last ones, and the time spent validating.

    Made on demand so that this module imports mmengine only when it trains.
    """
    from mmengine.hooks import Hook

    class MetricsOfValidations(Hook):
        def __init__(self):
            self.metrics: Dict[str, float] = {}
            self.history: List[Tuple[int, Dict[str, float]]] = []
            self.seconds = 0.0
            self._started = 0.0

        def before_val(self, runner):
            self._started = time.time()

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})
            self.history.append((runner.iter, self.metrics))
            self.seconds += time.time() - self._started

    return MetricsOfValidations()


def ap_table(metrics: Dict[str, float], classes: Sequence[str], kinds: Sequence[str]) -> Dict[str, object]:
    """CocoMetrics' results (keys ``<kind>/<kind>_mAP...``, ``<kind>/<class>_precision``) in percent:
    ``{'bbox': {'AP': ..}, 'segm': {..}, 'per_class': {class: {'bbox': AP, 'segm': AP}}}``."""
    table: Dict[str, object] = {kind: {name: _percent(metrics.get(f"{kind}/{kind}_{key}")) for name, key in COCO_KEYS}
                                for kind in kinds}
    table["per_class"] = {name: {kind: _percent(metrics.get(f"{kind}/{name}_precision")) for kind in kinds}
                          for name in classes}
    return table


def _percent(value: Optional[float]) -> Optional[float]:
    """COCO's -1 (no objects of that kind) and NaN become None."""
    if value is None or math.isnan(value) or value < 0:
        return None
    return round(100 * float(value), 1)


def _fmt(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def render_ap_markdown(summary: Dict[str, object]) -> str:
    kinds = [kind for kind in KIND_NAMES if kind in summary]
    header = ["", *[name for name, _ in COCO_KEYS]]
    rows = [[f"{KIND_NAMES[kind]} ({summary['norm']})", *[_fmt(summary[kind][name]) for name, _ in COCO_KEYS]]
            for kind in kinds]
    per_class = markdown_table(["class", *[f"{KIND_NAMES[kind]} AP" for kind in kinds]],
                               [[name, *[_fmt(ap[kind]) for kind in kinds]]
                                for name, ap in summary["per_class"].items()])
    machine = summary["machine"]
    backbone = summary["backbone"]
    return (f"# COCO AP on {summary['dataset']['description']}\n\n"
            f"{MODELS[summary['model']]} (ResNet-{backbone['depth']}, base width {backbone['width']}, + FPN), "
            f"{summary['norm']} in backbone, FPN and heads, from scratch, {summary['images_per_batch']} images per "
            f"batch of at most {summary['image_size']}px, {summary['iterations']} iterations "
            f"({summary['train_minutes']:.1f} min of training on {machine['cpu_count']} CPUs, "
            f"{machine['processor']}).\n\n"
            + markdown_table(header, rows) + "\n" + per_class)


def read_scalars(work_dir: str) -> List[Dict[str, float]]:
    """mmengine's LocalVisBackend log under ``work_dir``: one dict per logged step."""
    rows = []
    for root, _, files in os.walk(work_dir):
        if "scalars.json" in files:
            with open(os.path.join(root, "scalars.json")) as f:
                rows += [json.loads(line) for line in f if line.strip()]
    return rows


class CocoPictures:
    """Pictures of a COCO val set's images with their ground truth (crowd regions in grey) or with predictions in
    COCO's results format (the files CocoMetric writes: ``<prefix>.bbox.json`` and, for masks,
    ``<prefix>.segm.json``)."""

    def __init__(self, annotations: str, images: str):
        with open(annotations) as f:
            coco = json.load(f)
        self.images = images
        self.classes = [category["name"] for category in coco["categories"]]
        self._label = {category["id"]: index for index, category in enumerate(coco["categories"])}
        self._image = {image["id"]: image for image in coco["images"]}
        self.image_ids = [image["id"] for image in coco["images"]]
        self._truth: Dict[int, list] = {}
        for ann in coco["annotations"]:
            self._truth.setdefault(ann["image_id"], []).append(ann)
        self._results: Dict[str, Dict[int, list]] = {}

    def num_objects(self, image_id: int) -> int:
        """Annotations of the image that are not crowd regions."""
        return sum(1 for ann in self._truth.get(image_id, []) if not ann.get("iscrowd", 0))

    def draw(self, image_id: int, predictions: Optional[str] = None, score_threshold: float = SCORE_THRESHOLD,
             display_side: int = 384):
        """The image with its ground truth, or with the predictions under the prefix ``predictions``."""
        import numpy as np
        from PIL import Image

        info = self._image[image_id]
        with Image.open(os.path.join(self.images, info["file_name"])) as opened:
            pixels = np.asarray(opened.convert("RGB"))
        if predictions is None:
            objects = [self._object(ann, info, 1.0) for ann in self._truth.get(image_id, [])]
        else:
            objects = [self._object(result, info, result["score"]) for result in self._predicted(predictions, image_id)
                       if result["score"] >= score_threshold]
        return draw_objects(pixels, objects, self.classes, show_scores=predictions is not None,
                            display_side=display_side)

    def _predicted(self, prefix: str, image_id: int) -> list:
        if prefix not in self._results:
            by_image: Dict[int, list] = {}
            boxes, masks = (f"{prefix}.{kind}.json" for kind in ("bbox", "segm"))
            with open(masks if os.path.exists(masks) else boxes) as f:  # segm results carry the boxes too
                for result in json.load(f):
                    by_image.setdefault(result["image_id"], []).append(result)
            self._results[prefix] = by_image
        return self._results[prefix].get(image_id, [])

    def _object(self, ann: dict, info: dict, score: float):
        """Crowd regions (neither objects nor mistakes in COCO's evaluation) are drawn as ignored."""
        mask = _decode(ann["segmentation"], info["height"], info["width"]) if "segmentation" in ann else None
        label = None if ann.get("iscrowd", 0) else self._label[ann["category_id"]]
        return label, score, ann["bbox"], mask


def _decode(segmentation, height: int, width: int):
    """A bool (H, W) mask from polygons, uncompressed or compressed RLE."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def _publish(staging: str, out: str) -> None:
    """Replace ``out`` (an earlier run's output, checked before training) by the finished staging folder."""
    if os.path.exists(out):
        old = tempfile.mkdtemp(prefix=os.path.basename(out) + ".old-", dir=os.path.dirname(out))
        os.rename(out, os.path.join(old, "previous"))
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)
