"""End to end with mmengine's Runner: tiny SN detector and segmenter, generated data, real metrics.

Each test takes one of our configs, shrinks the network and the data to CPU
size, trains a few iterations with the Runner, validates and tests with the
toolkit's metric (mmdet's CocoMetric via pycocotools, mmseg's IoUMetric), and
checks that SNBatchStatsHook estimated the statistics before each validation
and before each checkpoint, and that SNWeightLoggerHook's scalars reached the
visualizer.
"""
import json
import math
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")
pytest.importorskip("pycocotools")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from PIL import Image  # noqa: E402

from sn_plugin import SwitchNormBase  # noqa: E402
from sn_plugin.data import CLASSES, ShapesSpec, generate_shapes_dataset  # noqa: E402
from sn_plugin.data.synthetic_shapes import render_image  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NUM_STATS_BATCHES = 2


def _runtime(cfg: Config, work_dir: Path) -> None:
    """What every e2e run shares: logging each iteration, our hooks, no workers, a fixed seed."""
    cfg.work_dir = str(work_dir)
    cfg.experiment_name = f"sn_e2e_{uuid.uuid4().hex[:8]}"
    cfg.randomness = dict(seed=0)
    cfg.default_hooks.logger.interval = 1
    cfg.custom_hooks = [dict(type="SNBatchStatsHook", num_batches=NUM_STATS_BATCHES),
                        dict(type="SNWeightLoggerHook", interval=1)]
    cfg.visualizer.vis_backends = [dict(type="LocalVisBackend")]
    cfg.env_cfg.dist_cfg = dict(backend="gloo")
    for loader in ("train_dataloader", "val_dataloader", "test_dataloader"):
        cfg[loader].num_workers = 0
        cfg[loader].persistent_workers = False


def _log_text(work_dir: Path) -> str:
    return "\n".join(p.read_text() for p in work_dir.rglob("*.log"))


def _logged_scalar_keys(work_dir: Path) -> set:
    keys = set()
    for path in work_dir.rglob("scalars.json"):
        for line in path.read_text().splitlines():
            keys.update(json.loads(line))
    return keys


def _check_hooks(runner: Runner, work_dir: Path, checkpoint: Path, first_stage: str) -> None:
    log = _log_text(work_dir)
    batches = f"batch-average statistics from {NUM_STATS_BATCHES} training batches"
    assert f"{batches} before validation" in log
    assert f"{batches} before saving a checkpoint" in log
    # The checkpoint carries the statistics estimated for its weights.
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    layers = {n: m for n, m in runner.model.named_modules() if isinstance(m, SwitchNormBase)}
    assert layers
    for name, layer in layers.items():
        torch.testing.assert_close(saved[f"{name}.running_mean"], layer.running_mean)
        assert int(saved[f"{name}.num_batches_tracked"]) == NUM_STATS_BATCHES
    scalar_keys = _logged_scalar_keys(work_dir)
    for kind in ("mean", "var"):
        for branch in ("IN", "LN", "BN"):
            assert f"sn_weights/{first_stage}/{kind}_{branch}" in scalar_keys


# -- MMDetection: Faster R-CNN with SN everywhere, from scratch ---------------------------------------
def _tiny_detector_cfg(data: dict, work_dir: Path) -> Config:
    cfg = Config.fromfile(str(CONFIGS / "mmdet" / "faster-rcnn_r50-scratch_fpn_sn-all_6x_coco.py"))
    width = 16
    cfg.model.backbone.update(depth=18)
    cfg.model.neck.update(in_channels=[64, 128, 256, 512], out_channels=width)
    cfg.model.rpn_head.update(in_channels=width, feat_channels=width)
    cfg.model.roi_head.bbox_roi_extractor.out_channels = width
    cfg.model.roi_head.bbox_head.update(in_channels=width, conv_out_channels=width, fc_out_channels=32,
                                        num_classes=len(CLASSES))
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=(64, 64), keep_ratio=True),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(64, 64), keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]

    def dataset(split, pipeline, test_mode):
        return dict(type="CocoDataset", data_root=data["root"], ann_file=data[f"{split}_annotations"],
                    data_prefix=dict(img=data[f"{split}_images"] + "/"), metainfo=dict(classes=CLASSES),
                    filter_cfg=dict(filter_empty_gt=not test_mode), pipeline=pipeline, test_mode=test_mode)

    cfg.train_dataloader.update(batch_size=2, dataset=dataset("train", train_pipeline, False))
    for loader in ("val_dataloader", "test_dataloader"):
        cfg[loader].update(batch_size=1, dataset=dataset("val", test_pipeline, True))
    for evaluator in ("val_evaluator", "test_evaluator"):
        cfg[evaluator] = dict(type="CocoMetric", ann_file=data["val_annotations"], metric="bbox")
    cfg.train_cfg = dict(type="EpochBasedTrainLoop", max_epochs=2, val_interval=1)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", interval=2)  # epoch 1: validation only
    _runtime(cfg, work_dir)
    return cfg


def test_mmdet_runner_trains_evaluates_with_coco_metric_and_batch_average_statistics(tmp_path):
    data = generate_shapes_dataset(str(tmp_path / "shapes"), ShapesSpec(num_train=4, num_val=2, image_size=64))
    work_dir = tmp_path / "work"
    runner = Runner.from_cfg(_tiny_detector_cfg(data, work_dir))
    runner.train()
    metrics = runner.test()
    assert "coco/bbox_mAP" in metrics and math.isfinite(metrics["coco/bbox_mAP"])
    _check_hooks(runner, work_dir, work_dir / "epoch_2.pth", "backbone.layer1")


# -- MMSegmentation: DeepLabV3 with SN, ADE20K config on generated label maps ------------------------
SEG_CLASSES = ("background", "round", "angular")


def _write_segmentation_data(root: Path) -> None:
    spec = ShapesSpec(num_train=4, num_val=2, image_size=64)
    for split, count in (("train", spec.num_train), ("val", spec.num_val)):
        (root / "img" / split).mkdir(parents=True)
        (root / "ann" / split).mkdir(parents=True)
        for index in range(count):
            image, objects = render_image(spec, split, index)
            label = np.zeros(image.shape[:2], dtype=np.uint8)
            for class_index, mask in objects:
                label[mask] = 1 + class_index % 2
            Image.fromarray(image).save(root / "img" / split / f"{index:03d}.png")
            Image.fromarray(label).save(root / "ann" / split / f"{index:03d}.png")


def _tiny_segmenter_cfg(root: Path, work_dir: Path) -> Config:
    cfg = Config.fromfile(str(CONFIGS / "mmseg" / "deeplabv3_r50-d8-sn_8xb2-100k_ade20k-512x512.py"))
    num_classes = len(SEG_CLASSES)
    cfg.model.data_preprocessor.size = (64, 64)
    cfg.model.backbone.update(depth=18, init_cfg=None)
    cfg.model.decode_head.update(in_channels=512, channels=16, num_classes=num_classes)
    cfg.model.auxiliary_head.update(in_channels=256, channels=8, num_classes=num_classes)

    def dataset(split, pipeline):
        return dict(type="BaseSegDataset", data_root=str(root), img_suffix=".png", seg_map_suffix=".png",
                    data_prefix=dict(img_path=f"img/{split}", seg_map_path=f"ann/{split}"),
                    metainfo=dict(classes=SEG_CLASSES, palette=[[0, 0, 0], [255, 0, 0], [0, 255, 0]]),
                    pipeline=pipeline)

    cfg.train_dataloader.update(batch_size=2, dataset=dataset("train", [
        dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"),
        dict(type="RandomFlip", prob=0.5), dict(type="PackSegInputs")]))
    for loader in ("val_dataloader", "test_dataloader"):
        cfg[loader].update(batch_size=1, dataset=dataset("val", [
            dict(type="LoadImageFromFile"), dict(type="LoadAnnotations"), dict(type="PackSegInputs")]))
    cfg.val_evaluator = cfg.test_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=4, val_interval=2)
    cfg.default_hooks.checkpoint = dict(type="CheckpointHook", by_epoch=False, interval=4)
    _runtime(cfg, work_dir)
    return cfg


def test_mmseg_runner_trains_evaluates_with_iou_metric_and_batch_average_statistics(tmp_path):
    _write_segmentation_data(tmp_path / "seg")
    work_dir = tmp_path / "work"
    runner = Runner.from_cfg(_tiny_segmenter_cfg(tmp_path / "seg", work_dir))
    runner.train()
    metrics = runner.test()
    assert "mIoU" in metrics and math.isfinite(metrics["mIoU"])
    _check_hooks(runner, work_dir, work_dir / "iter_4.pth", "backbone.layer1")
