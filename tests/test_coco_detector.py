"""tools/train_coco_detector.py on a user's COCO folder: arguments, checks before training, model choices, outputs."""
import json
import os
import subprocess
import sys

import pytest

from fake_datasets import load, make_coco_folder, write
from sn_plugin.apps import coco_detector
from sn_plugin.data import check_coco_dataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = os.path.join(REPO, "tools", "train_coco_detector.py")


def _own_data_args(paths):
    return ["--train-ann", paths["train_annotations"], "--train-images", paths["train_images"],
            "--val-ann", paths["val_annotations"], "--val-images", paths["val_images"]]


def _main(argv):
    return coco_detector.main(argv, prog="train_coco_detector")


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "shapes", "--train-ann", "a.json"], "either --dataset or your own files"),
    (["--train-ann", "a.json", "--val-ann", "b.json"], "missing: --train-images, --val-images"),
    ([], "say what to train on"),
    (["--dataset", "shapes", "--max-iters", "0"], "--max-iters must be >= 1"),
    (["--dataset", "shapes", "--image-size", "16"], "--image-size must be >= 32"),
    (["--dataset", "shapes", "--depth", "20"], "invalid choice: 20"),
    (["--dataset", "shapes", "--norm", "GN", "--width", "24"], "--width must be a multiple of 16"),
])
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        _main(argv)
    assert message in capsys.readouterr().err


def test_bad_dataset_stops_before_training_with_the_file_named(tmp_path, capsys):
    paths = make_coco_folder(str(tmp_path / "data"))
    coco = load(paths["train_annotations"])
    coco["annotations"][0]["bbox"] = [80, 10, 40, 10]  # beyond the 96-pixel width
    write(paths["train_annotations"], coco)
    out = tmp_path / "out"
    assert _main(_own_data_args(paths) + ["--out", str(out)]) == 1
    message = capsys.readouterr().err
    assert message.startswith("\ntrain_coco_detector: error: train annotations " + paths["train_annotations"])
    assert "boxes outside their image" in message
    assert not out.exists() and sorted(os.listdir(tmp_path)) == ["data"]  # nothing started


def test_missing_config_is_named_before_training(tmp_path, capsys):
    pytest.importorskip("mmdet")
    paths = make_coco_folder(str(tmp_path / "data"))
    config = str(tmp_path / "nowhere.py")
    assert _main(_own_data_args(paths) + ["--out", str(tmp_path / "out"), "--config", config]) == 1
    assert f"--config {config} does not exist" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["data"]


def test_mask_rcnn_on_boxes_only_is_refused_with_the_way_out(tmp_path, capsys):
    pytest.importorskip("mmdet")
    paths = make_coco_folder(str(tmp_path / "data"))
    coco = load(paths["train_annotations"])
    for ann in coco["annotations"]:
        ann.pop("segmentation")
    write(paths["train_annotations"], coco)
    assert _main(_own_data_args(paths) + ["--out", str(tmp_path / "out")]) == 1
    assert "--model faster_rcnn" in capsys.readouterr().err


@pytest.mark.parametrize("model, depth, width", [("faster_rcnn", 50, 16), ("mask_rcnn", 34, 8)])
def test_model_depth_and_width_reach_the_built_detector(tmp_path, model, depth, width):
    pytest.importorskip("mmdet")
    import torch
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    from sn_plugin import SwitchNormBase

    paths = make_coco_folder(str(tmp_path / "data"))
    train, val = check_coco_dataset(paths["train_annotations"], paths["train_images"], paths["val_annotations"],
                                    paths["val_images"])
    plan = coco_detector.Plan(model=model, depth=depth, width=width, image_size=96, max_iters=4)
    cfg = coco_detector.build_config(coco_detector.default_config(), plan, train, val, str(tmp_path / "out"))
    assert cfg.train_dataloader.dataset.metainfo.classes == ("dog", "cat")
    resize = [step for step in cfg.train_dataloader.dataset.pipeline if step["type"] == "Resize"]
    assert resize[0]["scale"] == (96, 96)
    register_all_modules()
    detector = MODELS.build(cfg.model)
    assert type(detector).__name__ == ("FasterRCNN" if model == "faster_rcnn" else "MaskRCNN")
    assert detector.roi_head.bbox_head.num_classes == 2
    assert detector.roi_head.with_mask == (model == "mask_rcnn")
    assert [e.metric for e in cfg.val_evaluator] == (["bbox"] if model == "faster_rcnn" else ["bbox", "segm"])
    assert detector.backbone.depth == depth and detector.backbone.conv1.out_channels == width
    expansion = 4 if depth >= 50 else 1
    assert detector.neck.in_channels == [width * expansion * 2 ** i for i in range(4)]
    norms = [m for m in detector.modules() if isinstance(m, (torch.nn.modules.batchnorm._NormBase,
                                                             torch.nn.GroupNorm))]
    assert norms and all(isinstance(m, SwitchNormBase) for m in norms)
    images = torch.rand(1, 3, 64, 96)
    features = detector.extract_feat(images)  # the FPN accepts what the backbone gives it
    assert len(features) == 5 and features[0].shape[1] == cfg.model.neck.out_channels


def test_own_coco_folder_end_to_end(tmp_path):
    pytest.importorskip("mmdet")
    paths = make_coco_folder(str(tmp_path / "data"))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, COMMAND, *_own_data_args(paths), "--quick", "--max-iters", "2",
                             "--val-interval", "1", "--out", str(out), "--num-images", "2"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("COMPLETE", "ap_table.json", "ap_table.md", "sn_importance_weights.png", "sn_importance_weights.csv",
                 "val_predictions.png", "val_predictions.bbox.json", "val_predictions.segm.json",
                 "training_curve.png", "config.py", os.path.join("logs", "iter_2.pth")):
        assert (out / name).is_file(), name
    with open(out / "ap_table.json") as f:
        table = json.load(f)
    assert table["dataset"]["name"] == "own" and table["dataset"]["classes"] == ["dog", "cat"]
    assert table["image_size"] == 96  # the images' longest side
    assert set(table["per_class"]) == {"dog", "cat"}
    assert [row["iteration"] for row in table["history"]] == [1, 2]  # --val-interval 1
    assert "| dog |" in (out / "ap_table.md").read_text()


def test_pictures_draw_truth_and_predictions_from_coco_files(tmp_path):
    pytest.importorskip("pycocotools")
    paths = make_coco_folder(str(tmp_path / "data"))
    pictures = coco_detector.CocoPictures(paths["val_annotations"], paths["val_images"])
    assert pictures.classes == ["dog", "cat"] and pictures.image_ids == [100, 101]
    prefix = str(tmp_path / "predictions")
    write(prefix + ".bbox.json", [{"image_id": 100, "category_id": 3, "bbox": [50, 10, 30, 28], "score": 0.9},
                                  {"image_id": 100, "category_id": 7, "bbox": [5, 5, 10, 10], "score": 0.1}])
    truth, predicted = pictures.draw(100), pictures.draw(100, prefix)
    assert truth.size == predicted.size == (384, 256)  # the longer side scaled to 384
    import numpy as np

    nothing = np.asarray(pictures.draw(100, prefix, score_threshold=1.0))  # no prediction scores that high
    only_the_cat = np.asarray(predicted)
    both = np.asarray(pictures.draw(100, prefix, score_threshold=0.0))
    assert not np.array_equal(nothing, only_the_cat) and not np.array_equal(only_the_cat, both)
    assert np.array_equal(only_the_cat[:60, :60], nothing[:60, :60])  # the low-score dog (top left) is not drawn
    assert not np.array_equal(both[:60, :60], nothing[:60, :60])
