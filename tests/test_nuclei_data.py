"""sn_plugin.data.nuclei: stardist's nuclei image as COCO tiles, tested on a fake wheel (no network)."""
import glob
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from fake_datasets import fake_nuclei, make_fake_stardist_wheel
from sn_plugin.data import NucleiDataError, NucleiSpec, check_coco_dataset, prepare_nuclei_dataset, rle_to_mask
from sn_plugin.data import nuclei


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    image, labels = fake_nuclei()
    path, checksums = make_fake_stardist_wheel(str(tmp_path / "wheels"), image, labels)
    for member, digest in checksums.items():
        monkeypatch.setitem(nuclei.STARDIST_SHA256, member, digest)
    return path, image, labels


SPEC = NucleiSpec(tile_size=64)


def _tile_origin(file_name):
    x, y = re.match(r"x(\d+)_y(\d+)\.png", file_name).groups()
    return int(x), int(y)


def _objects_by_label(paths, labels):
    """Per split, {original label: [(file, is_crowd)]}, checking each annotation against the labels under it."""
    found = {}
    for split in ("train", "val"):
        with open(paths[f"{split}_annotations"]) as f:
            coco = json.load(f)
        images = {im["id"]: im for im in coco["images"]}
        found[split] = {}
        covered = {im["id"]: np.zeros((im["height"], im["width"]), dtype=int) for im in coco["images"]}
        for ann in coco["annotations"]:
            image = images[ann["image_id"]]
            x0, y0 = _tile_origin(image["file_name"])
            mask = rle_to_mask(ann["segmentation"])
            under = labels[y0:y0 + image["height"], x0:x0 + image["width"]][mask]
            assert len(set(under.tolist())) == 1 and under[0] > 0  # one nucleus, no background
            ys, xs = np.nonzero(mask)
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w - 1, y + h - 1) == (xs.min(), ys.min(), xs.max(), ys.max())
            assert ann["area"] == mask.sum()
            found[split].setdefault(int(under[0]), []).append((image["file_name"], bool(ann["iscrowd"])))
            covered[ann["image_id"]] += mask
        for image_id, coverage in covered.items():  # every labelled pixel annotated exactly once
            x0, y0 = _tile_origin(images[image_id]["file_name"])
            tile_labels = labels[y0:y0 + coverage.shape[0], x0:x0 + coverage.shape[1]]
            assert np.array_equal(coverage, (tile_labels > 0).astype(int))
    return found


def test_fake_wheel_becomes_disjoint_train_and_val_tiles(tmp_path, fake_wheel):
    wheel, image, labels = fake_wheel
    paths = prepare_nuclei_dataset(str(tmp_path / "nuclei"), SPEC, wheel=wheel)
    train, val = check_coco_dataset(paths["train_annotations"], paths["train_images"], paths["val_annotations"],
                                    paths["val_images"])
    assert train.classes == ("nucleus",) and (train.num_images, val.num_images) == (12, 4)  # 4x4 tiles of 64
    assert {_tile_origin(f)[0] for f in os.listdir(paths["val_images"])} == {192}  # the right-most column
    found = _objects_by_label(paths, labels)
    objects = {split: {label for label, places in found[split].items() if any(not crowd for _, crowd in places)}
               for split in found}
    assert objects["train"] and objects["val"] and not objects["train"] & objects["val"]
    assert objects["train"] | objects["val"] <= set(np.unique(labels[labels > 0]).tolist())
    # a nucleus is an object only in the region holding most of its pixels
    for label in objects["val"]:
        columns = np.nonzero(labels == label)[1]
        assert (columns >= 192).sum() * 2 > columns.size
    with Image.open(os.path.join(paths["train_images"], "x0064_y0064.png")) as tile:
        assert tile.mode == "L" and tile.size == (64, 64)
    assert "BSD 3-Clause License (fake)" in (tmp_path / "nuclei" / "LICENSE-stardist.txt").read_text()


def test_a_complete_dataset_is_reused_without_the_wheel(tmp_path, fake_wheel):
    root = str(tmp_path / "nuclei")
    first = prepare_nuclei_dataset(root, SPEC, wheel=fake_wheel[0])
    stamp = os.stat(first["train_annotations"]).st_mtime_ns
    assert prepare_nuclei_dataset(root, SPEC, wheel=str(tmp_path / "gone.whl")) == first
    assert os.stat(first["train_annotations"]).st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="another spec"):
        prepare_nuclei_dataset(root, NucleiSpec(tile_size=128), wheel=fake_wheel[0])


def test_percentile_normalisation_ignores_a_few_hot_pixels():
    image = np.concatenate([np.arange(1000, dtype=np.uint16), [60000]])
    scaled = nuclei.normalize_to_uint8(image, 1.0, 99.8)
    assert scaled.dtype == np.uint8 and scaled[-1] == 255 and scaled[:10].max() == 0
    assert 120 <= scaled[500] <= 135  # the bulk spans the 8 bits instead of the bottom 4 grey levels


def test_a_different_file_in_the_wheel_is_refused(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setitem(nuclei.STARDIST_SHA256, nuclei.LABELS_MEMBER, "0" * 64)
    with pytest.raises(NucleiDataError, match="not the file this converter was written for"):
        prepare_nuclei_dataset(str(tmp_path / "nuclei"), SPEC, wheel=fake_wheel[0])
    assert not (tmp_path / "nuclei").exists() and sorted(os.listdir(tmp_path)) == ["wheels"]


def test_a_wheel_already_in_the_folder_is_used_without_pip(fake_wheel):
    assert nuclei.fetch_stardist_wheel(os.path.dirname(fake_wheel[0])) == fake_wheel[0]


def test_fetch_failure_names_the_command_to_run_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip finds nothing and fails at once, as without a network
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    with pytest.raises(NucleiDataError) as caught:
        nuclei.fetch_stardist_wheel(str(tmp_path / "wheels"))
    message = str(caught.value)
    assert "could not fetch the stardist==0.9.2 wheel" in message and "pip exited with" in message
    assert "Run by hand" in message and "pip download --no-deps" in message
    assert str(tmp_path / "wheels") in message


def test_tiles_too_large_for_a_split_are_refused():
    with pytest.raises(ValueError, match="too few for a train and a val region"):
        nuclei.nuclei_tiles(np.zeros((100, 100), np.uint8), np.zeros((100, 100), int), NucleiSpec(tile_size=64))


@pytest.mark.parametrize("bad, match", [(dict(tile_size=8), "tile_size"), (dict(val_fraction=1.0), "val_fraction"),
                                        (dict(low_percentile=50, high_percentile=10), "percentile"),
                                        (dict(min_visible=0), "min_visible")])
def test_bad_spec_is_refused_with_the_field_named(bad, match):
    with pytest.raises(ValueError, match=match):
        NucleiSpec(**bad)


def _cached_wheel():
    found = sorted(glob.glob(os.path.join(nuclei.default_cache_dir(), "wheels", "stardist-0.9.2-*.whl")))
    return found[0] if found else None


@pytest.mark.skipif(_cached_wheel() is None,
                    reason="the stardist 0.9.2 wheel is not in the cache (~/.cache/sn_plugin/wheels); tests do not "
                           "download it")
def test_real_wheel_gives_125_nuclei_split_without_overlap(tmp_path):
    image, labels = nuclei.read_stardist_nuclei(_cached_wheel())
    assert image.shape == labels.shape == (512, 512) and image.dtype == np.uint16
    assert len(np.unique(labels[labels > 0])) == 125
    paths = prepare_nuclei_dataset(str(tmp_path / "nuclei"), wheel=_cached_wheel())
    train, val = check_coco_dataset(paths["train_annotations"], paths["train_images"], paths["val_annotations"],
                                    paths["val_images"])
    assert (train.num_images, val.num_images) == (12, 4) and train.num_objects > 3 * val.num_objects > 0
    found = _objects_by_label(paths, labels)
    objects = {split: {label for label, places in found[split].items() if any(not crowd for _, crowd in places)}
               for split in found}
    assert not objects["train"] & objects["val"]
