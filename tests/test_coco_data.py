"""sn_plugin.data.coco: a user's COCO files are checked before training, each problem named with its file."""
import os

import pytest
from PIL import Image

from fake_datasets import CATEGORIES, HEIGHT, WIDTH, load, make_coco_folder, write
from sn_plugin.data import CocoFormatError, check_coco_dataset, check_coco_split


@pytest.fixture
def folder(tmp_path):
    return make_coco_folder(str(tmp_path))


def _check(paths):
    return check_coco_dataset(paths["train_annotations"], paths["train_images"], paths["val_annotations"],
                              paths["val_images"])


def _edit(path, change):
    coco = load(path)
    change(coco)
    write(path, coco)


def test_a_good_dataset_gives_classes_in_file_order_and_its_sizes(folder):
    train, val = _check(folder)
    assert train.classes == val.classes == ("dog", "cat")  # the file's order, not sorted by id
    assert (train.num_images, val.num_images) == (4, 2)
    assert train.num_objects == 8 and train.max_objects_per_image == 2  # the crowd regions are not objects
    assert train.has_masks and train.max_side == WIDTH
    assert train.annotations == os.path.abspath(folder["train_annotations"])


def _fail(folder, match):
    with pytest.raises(CocoFormatError, match=match) as caught:
        _check(folder)
    return str(caught.value)


@pytest.mark.parametrize("key", ["train_annotations", "val_images"])
def test_missing_file_or_folder_is_named(folder, key):
    os.rename(folder[key], folder[key] + ".moved")
    message = _fail(folder, "does not exist")
    assert folder[key] in message


def test_annotation_file_that_is_not_json(folder):
    with open(folder["val_annotations"], "w") as f:
        f.write("images: [1, 2]\n")
    message = _fail(folder, "is not JSON")
    assert folder["val_annotations"] in message and "line 1" in message


@pytest.mark.parametrize("content, match", [
    ([1, 2], "holds a JSON list"),
    ({"images": [], "annotations": []}, "no 'categories'"),
    ({"images": {}, "annotations": [], "categories": []}, "'images' is a dict"),
])
def test_annotation_file_that_is_not_coco(folder, content, match):
    write(folder["train_annotations"], content)
    message = _fail(folder, "not a COCO annotation file")
    assert match in message and folder["train_annotations"] in message


def test_boxes_outside_the_image(folder):
    def push_out(coco):
        coco["annotations"][0]["bbox"] = [WIDTH - 10, 5, 30, 20]
        coco["annotations"][3]["bbox"] = [-5, 5, 10, 10]
    _edit(folder["train_annotations"], push_out)
    message = _fail(folder, "2 annotations have boxes outside their image")
    assert folder["train_annotations"] in message and "annotation 1 on image 100" in message
    assert f"({WIDTH}x{HEIGHT})" in message and "Clip the boxes" in message


def test_a_box_one_pixel_over_the_border_is_accepted(folder):
    _edit(folder["train_annotations"], lambda coco: coco["annotations"][0].update(bbox=[WIDTH - 30, 5, 31, 20]))
    _check(folder)


def test_empty_category_list(folder):
    _edit(folder["val_annotations"], lambda coco: coco.update(categories=[]))
    message = _fail(folder, "empty category list")
    assert folder["val_annotations"] in message


def test_val_set_without_objects(folder):
    _edit(folder["val_annotations"],
          lambda coco: coco.update(annotations=[a for a in coco["annotations"] if a["iscrowd"]]))
    message = _fail(folder, "has no annotated objects")
    assert folder["val_annotations"] in message and "COCO AP needs at least one object in the val set" in message


def test_listed_image_missing_from_the_folder(folder):
    os.remove(os.path.join(folder["val_images"], "val_1.png"))
    message = _fail(folder, "images listed are missing")
    assert "'val_1.png'" in message and folder["val_images"] in message


def test_image_of_another_size_than_the_file_says(folder):
    Image.new("RGB", (HEIGHT, WIDTH)).save(os.path.join(folder["train_images"], "train_2.png"))
    message = _fail(folder, "another size")
    assert f"'train_2.png' is {HEIGHT}x{WIDTH}, the file says {WIDTH}x{HEIGHT}" in message


def test_categories_in_another_order_in_val(folder):
    _edit(folder["val_annotations"], lambda coco: coco.update(categories=CATEGORIES[::-1]))
    _fail(folder, "list different categories")


@pytest.mark.parametrize("change, match", [
    (lambda c: c["annotations"][0].update(category_id=99), "refer to an image or category that is not listed"),
    (lambda c: c["annotations"][0].update(image_id=5), "refer to an image or category that is not listed"),
    (lambda c: c["annotations"][1].pop("bbox"), "without an integer 'id', 'image_id' and 'category_id' and a 'bbox'"),
    (lambda c: c["annotations"][1].update(bbox=[1, 2, 0, 5]), "zero or negative width or height"),
    (lambda c: c["annotations"][1].update(segmentation=[[1, 2, 3]]), "malformed 'segmentation'"),
    (lambda c: c["annotations"][1].update(segmentation={"size": [1, 1], "counts": [1]}), "malformed 'segmentation'"),
    (lambda c: c["annotations"][1].update(id=1), "annotation ids must be unique"),
    (lambda c: c["images"][1].update(id=100), "image ids must be unique"),
    (lambda c: c["images"][1].pop("width"), "image entries without"),
    (lambda c: c["categories"].append({"id": 9, "name": "dog"}), "category names must be unique"),
    (lambda c: c["categories"].append({"id": 9}), "categories without an integer 'id' and a non-empty 'name'"),
])
def test_malformed_entries_are_named(folder, change, match):
    _edit(folder["train_annotations"], change)
    message = _fail(folder, match)
    assert folder["train_annotations"] in message


def test_many_problems_are_counted_and_a_few_quoted(folder):
    _edit(folder["train_annotations"], lambda c: [a.update(bbox=[0, 0, 500, 5]) for a in c["annotations"]])
    message = _fail(folder, "12 annotations have boxes outside")
    assert "(and 7 more)" in message


def test_annotations_without_masks_are_reported_as_such(folder):
    _edit(folder["train_annotations"], lambda c: c["annotations"][2].pop("segmentation"))
    train = check_coco_split(folder["train_annotations"], folder["train_images"], "train")
    assert not train.has_masks
