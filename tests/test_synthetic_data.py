"""The built-in synthetic shapes dataset: deterministic, valid COCO, written atomically."""
import filecmp
import json
import os

import numpy as np
import pytest

from sn_plugin.data import CLASSES, ShapesSpec, generate_shapes_dataset, mask_to_rle, rle_to_mask
from sn_plugin.data import synthetic_shapes

TINY = ShapesSpec(num_train=6, num_val=3, image_size=64, seed=3)


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_same_spec_gives_identical_files(tmp_path):
    a = generate_shapes_dataset(str(tmp_path / "a"), TINY)
    b = generate_shapes_dataset(str(tmp_path / "b"), TINY)
    for key in ("train_annotations", "val_annotations"):
        assert filecmp.cmp(a[key], b[key], shallow=False)
    for split in ("train", "val"):
        names = sorted(os.listdir(a[f"{split}_images"]))
        assert names == sorted(os.listdir(b[f"{split}_images"]))
        match, mismatch, errors = filecmp.cmpfiles(a[f"{split}_images"], b[f"{split}_images"], names, shallow=False)
        assert not mismatch and not errors


def test_other_seed_gives_other_images(tmp_path):
    a = generate_shapes_dataset(str(tmp_path / "a"), TINY)
    b = generate_shapes_dataset(str(tmp_path / "b"), ShapesSpec(num_train=6, num_val=3, image_size=64, seed=4))
    assert not filecmp.cmp(a["train_annotations"], b["train_annotations"], shallow=False)


def test_annotations_are_consistent_coco(tmp_path):
    paths = generate_shapes_dataset(str(tmp_path / "d"), TINY)
    for split, count in (("train", TINY.num_train), ("val", TINY.num_val)):
        coco = _load(paths[f"{split}_annotations"])
        assert [c["name"] for c in coco["categories"]] == list(CLASSES)
        assert len(coco["images"]) == count
        image_ids = {im["id"] for im in coco["images"]}
        assert {a["image_id"] for a in coco["annotations"]} == image_ids  # every image has an object
        assert len({a["id"] for a in coco["annotations"]}) == len(coco["annotations"])
        for ann in coco["annotations"]:
            assert 1 <= ann["category_id"] <= len(CLASSES)
            mask = rle_to_mask(ann["segmentation"])
            assert mask.shape == (TINY.image_size, TINY.image_size)
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
            assert ann["area"] == mask.sum() > 0
        for im in coco["images"]:
            assert os.path.isfile(os.path.join(paths[f"{split}_images"], im["file_name"]))


def test_visible_masks_of_one_image_do_not_overlap_and_objects_stay_visible():
    spec = ShapesSpec(num_train=1, num_val=1, image_size=96, seed=0, min_objects=5, max_objects=5, min_visible=0.7)
    for index in range(4):
        image, objects = synthetic_shapes.render_image(spec, "train", index)
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        coverage = sum(visible.astype(int) for _, visible in objects)
        assert coverage.max() <= 1


def test_rle_round_trip_matches_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask")
    rng = np.random.default_rng(0)
    for shape in ((5, 7), (16, 16)):
        for first in (0, 1):
            mask = rng.random(shape) > 0.5
            mask[0, 0] = bool(first)
            rle = mask_to_rle(mask)
            assert np.array_equal(rle_to_mask(rle), mask)
            compressed = mask_utils.frPyObjects(rle, *shape)
            assert np.array_equal(mask_utils.decode(compressed).astype(bool), mask)
            assert int(mask_utils.area(compressed)) == int(mask.sum())


def test_existing_dataset_is_reused_and_a_different_one_is_refused(tmp_path):
    root = str(tmp_path / "d")
    paths = generate_shapes_dataset(root, TINY)
    stamp = os.stat(paths["train_annotations"]).st_mtime_ns
    generate_shapes_dataset(root, TINY)
    assert os.stat(paths["train_annotations"]).st_mtime_ns == stamp
    other = ShapesSpec(num_train=2, num_val=1, image_size=64)
    with pytest.raises(FileExistsError, match="another spec"):
        generate_shapes_dataset(root, other)
    generate_shapes_dataset(root, other, overwrite=True)
    assert len(_load(paths["train_annotations"])["images"]) == 2


def test_foreign_non_empty_folder_is_refused(tmp_path):
    (tmp_path / "mine.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_shapes_dataset(str(tmp_path), TINY)
    assert (tmp_path / "mine.txt").read_text() == "user data"


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    real = synthetic_shapes._render_split

    def fail_on_val(staging, split, count, spec):
        if split == "val":
            raise OSError(28, "No space left on device")
        return real(staging, split, count, spec)

    monkeypatch.setattr(synthetic_shapes, "_render_split", fail_on_val)
    with pytest.raises(OSError, match="No space"):
        generate_shapes_dataset(str(tmp_path / "d"), TINY)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bad, message", [
    (dict(num_train=0), "num_train"),
    (dict(image_size=8), "image_size"),
    (dict(min_objects=3, max_objects=2), "min_objects"),
    (dict(min_object_size=0.5, max_object_size=0.2), "min_object_size"),
    (dict(min_visible=0.0), "min_visible"),
])
def test_bad_spec_is_refused_with_the_field_named(bad, message):
    with pytest.raises(ValueError, match=message):
        ShapesSpec(**bad)


def test_a_dataset_made_meanwhile_by_another_process_is_kept(tmp_path, monkeypatch):
    root = tmp_path / "d"
    real = synthetic_shapes._render_split
    raced = []

    def render_while_another_process_finishes_first(staging, split, count, spec):
        if split == "val" and not raced:
            raced.append("racing")
            other = generate_shapes_dataset(str(root), spec)  # the other process, e.g. a parallel training
            raced.append(os.stat(other["train_annotations"]).st_ino)
        return real(staging, split, count, spec)

    monkeypatch.setattr(synthetic_shapes, "_render_split", render_while_another_process_finishes_first)
    paths = generate_shapes_dataset(str(root), TINY)
    assert raced and os.listdir(tmp_path) == ["d"]  # no staging folder left
    assert os.stat(paths["train_annotations"]).st_ino == raced[1]  # the other's files, which it may be reading
