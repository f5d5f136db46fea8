"""End to end: the command of tools/train_net_d2.py trains a small SN Mask R-CNN with detectron2's trainer
on a COCO-format dataset the test writes, re-estimates the batch-average statistics,
evaluates with COCOEvaluator, writes SN's importance weights to metrics.json, and
evaluates the saved checkpoint again with --eval-only."""
import json
import os

import numpy as np
import pytest

pytest.importorskip("detectron2")

from detectron2.data import DatasetCatalog, MetadataCatalog  # noqa: E402
from detectron2.data.datasets import register_coco_instances  # noqa: E402
from detectron2.engine import DefaultTrainer  # noqa: E402
from PIL import Image  # noqa: E402

import sn_plugin  # noqa: E402
from sn_plugin.integrations import detectron2 as sn_d2  # noqa: E402
from sn_plugin.integrations.detectron2 import train_net  # noqa: E402
from test_detectron2_integration import CONFIG_DIR, MASK_SN, TINY  # noqa: E402

DATASET = "sn_plugin_tiny_coco"


def write_tiny_coco(root, num_images=4, size=64):
    """A few images with one or two filled rectangles each, annotated in COCO format (polygons)."""
    rng = np.random.default_rng(0)
    images, annotations = [], []
    os.makedirs(os.path.join(root, "images"))
    for image_id in range(1, num_images + 1):
        pixels = (rng.random((size, size, 3)) * 60).astype(np.uint8)
        for k in range(1 + image_id % 2):
            x0, y0 = (int(v) for v in rng.integers(2, size // 2, 2))
            w, h = (int(v) for v in rng.integers(12, size // 2 - 2, 2))
            category = 1 + k
            pixels[y0:y0 + h, x0:x0 + w] = (200, 80, 40) if category == 1 else (40, 200, 120)
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": category, "iscrowd": 0,
                "bbox": [x0, y0, w, h], "area": w * h,
                "segmentation": [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]],
            })
        file_name = f"{image_id:04d}.png"
        Image.fromarray(pixels).save(os.path.join(root, "images", file_name))
        images.append({"id": image_id, "file_name": file_name, "height": size, "width": size})
    json_file = os.path.join(root, "instances.json")
    with open(json_file, "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "red"}, {"id": 2, "name": "green"}]}, f)
    return json_file, os.path.join(root, "images")


@pytest.fixture
def tiny_coco(tmp_path):
    json_file, image_root = write_tiny_coco(str(tmp_path / "data"))
    register_coco_instances(DATASET, {}, json_file, image_root)
    assert MetadataCatalog.get(DATASET).json_file == json_file  # what COCOEvaluator reads
    yield
    DatasetCatalog.remove(DATASET)
    MetadataCatalog.remove(DATASET)


def test_train_evaluate_and_eval_only(tiny_coco, tmp_path, monkeypatch):
    events, evaluations = [], []
    update_stats = sn_d2.SNBatchStatsHook.update_stats

    def recording_update_stats(self, when="now"):
        events.append("batch_stats")
        update_stats(self, when)

    def recording_test(cls, cfg, model, evaluators=None):
        events.append("evaluate")
        evaluations.append(DefaultTrainer.test.__func__(cls, cfg, model, evaluators))
        return evaluations[-1]

    monkeypatch.setattr(sn_d2.SNBatchStatsHook, "update_stats", recording_update_stats)
    monkeypatch.setattr(sn_d2.SNTrainer, "test", classmethod(recording_test))

    output = str(tmp_path / "output")
    opts = TINY + [
        "MODEL.ROI_HEADS.NUM_CLASSES", 2,
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "DATASETS.TRAIN", f"('{DATASET}',)",
        "DATASETS.TEST", f"('{DATASET}',)",
        "DATALOADER.NUM_WORKERS", 0,
        "SOLVER.MAX_ITER", 4,
        "SOLVER.CHECKPOINT_PERIOD", 100,
        "TEST.SN_BATCH_STATS.NUM_ITER", 2,
        "MODEL.SN.IMPORTANCE_LOG_PERIOD", 2,
        "OUTPUT_DIR", output,
    ]
    train_net.main(["--config-file", os.path.join(CONFIG_DIR, MASK_SN), *map(str, opts)])  # one process
    results = evaluations[-1]

    # The statistics are re-estimated after the last iteration, before the evaluation.
    assert events == ["batch_stats", "evaluate"]
    assert set(results) == {"bbox", "segm"} and "AP" in results["bbox"] and "AP" in results["segm"]

    with open(os.path.join(output, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    sn_keys = {k for r in records for k in r if k.startswith("sn_weights/")}
    assert "sn_weights/backbone.bottom_up.res3/mean_BN" in sn_keys
    assert "sn_weights/roi_heads.mask_head.mask_fcn4/var_LN" in sn_keys
    last = next(r for r in reversed(records) if "sn_weights/backbone.fpn_lateral2/mean_IN" in r)
    assert last["iteration"] == 3
    weights = [last[f"sn_weights/backbone.fpn_lateral2/mean_{b}"] for b in ("IN", "LN", "BN")]
    assert sum(weights) == pytest.approx(1.0, abs=1e-5)

    # The final checkpoint holds the estimated statistics, so it evaluates as it is.
    events.clear()
    train_net.main(["--eval-only", "--config-file", os.path.join(CONFIG_DIR, MASK_SN),
                    *map(str, opts + ["MODEL.WEIGHTS", os.path.join(output, "model_final.pth")])])
    assert events == ["evaluate"]
    assert evaluations[-1]["bbox"]["AP"] == pytest.approx(results["bbox"]["AP"], nan_ok=True)


def test_eval_only_estimates_missing_batch_stats(tiny_coco):
    import torch
    from detectron2.utils.events import EventStorage

    from test_detectron2_integration import load_config, synthetic_batch

    cfg = load_config(MASK_SN, "DATASETS.TRAIN", f"('{DATASET}',)", "DATALOADER.NUM_WORKERS", 0,
                      "TEST.SN_BATCH_STATS.NUM_ITER", 1)
    model = sn_d2.SNTrainer.build_model(cfg)
    trainable = [m for m in sn_plugin.switch_norm_layers(model).values()
                 if not isinstance(m, sn_plugin.FrozenSwitchNorm)]
    inputs = [{"image": x["image"], "height": 64, "width": 80} for x in synthetic_batch(1)]

    cfg.TEST.SN_BATCH_STATS.ENABLED = False
    assert not sn_d2.SNTrainer.estimate_missing_batch_stats(cfg, model)
    model.eval()
    with pytest.raises(RuntimeError, match="recompute_batch_stats"), torch.no_grad(), EventStorage():
        model(inputs)

    cfg.TEST.SN_BATCH_STATS.ENABLED = True
    assert sn_d2.SNTrainer.estimate_missing_batch_stats(cfg, model)
    assert all(int(m.num_batches_tracked) == 1 for m in trainable)
    assert not model.training  # the estimate leaves the model's mode as it was
    with torch.no_grad():
        model(inputs)
    assert not sn_d2.SNTrainer.estimate_missing_batch_stats(cfg, model)  # nothing missing any more
