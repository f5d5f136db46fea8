"""COCO-format instance datasets: the folder layout, RLE masks, building a dataset folder, checking a user's files.

The built-in datasets (:mod:`.synthetic_shapes`, :mod:`.nuclei`) are written in
one layout (:func:`dataset_paths`) through :func:`build_dataset_folder`, which
makes a folder appear only when complete. :func:`check_coco_dataset` reads a
train and a val annotation file the way the detector will, and raises
:class:`CocoFormatError` naming the file and the problem (a missing file, a file
that is not COCO, boxes outside their image, an empty category list, a val set
without objects, an image listed but missing...) before any training starts.

numpy and Pillow only.
"""
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "BOX_TOLERANCE", "CocoFormatError", "CocoSplit", "build_dataset_folder", "check_coco_dataset", "check_coco_split",
    "dataset_paths", "mask_to_rle", "rle_to_mask", "write_json",
]

SPEC_FILE = "dataset_spec.json"
DONE_MARKER = "COMPLETE"
# A box may reach this many pixels past the image border: datasets that count the last pixel inclusively
# (x + w = width + 1) are fine; anything further is an error in the annotations or in the image size.
BOX_TOLERANCE = 1.0
_EXAMPLES = 5  # problems of one kind quoted in an error message
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height when applied


class CocoFormatError(ValueError):
    """A dataset the detector cannot train or evaluate on; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class CocoSplit:
    """What training needs to know about one checked split."""

    annotations: str  # the annotation file (absolute path)
    images: str  # the image folder (absolute path)
    classes: Tuple[str, ...]  # category names in the file's order (the order mmdet and pycocotools use)
    num_images: int
    num_objects: int  # annotations that are not crowd regions
    has_masks: bool  # every annotation has a segmentation
    max_side: int  # the longest image side, in pixels
    max_objects_per_image: int


def dataset_paths(root: str) -> Dict[str, str]:
    """The image folders and annotation files of a dataset folder made by :func:`build_dataset_folder`."""
    return {
        "root": root,
        "train_images": os.path.join(root, "train"),
        "val_images": os.path.join(root, "val"),
        "train_annotations": os.path.join(root, "annotations", "instances_train.json"),
        "val_annotations": os.path.join(root, "annotations", "instances_val.json"),
    }


def build_dataset_folder(root: str, spec: dict, write: Callable[[str], None], kind: str,
                         overwrite: bool = False) -> Dict[str, str]:
    """Make the dataset described by ``spec`` under ``root`` with ``write(folder)``; return :func:`dataset_paths`.

    ``write`` fills a staging folder beside ``root`` (``train/``, ``val/``,
    ``annotations/``), which is renamed to ``root`` when complete, so an
    interrupted run never leaves a folder that looks finished. A complete
    dataset with the same ``spec`` is reused; one with another spec, or a
    non-empty folder that is not a dataset, is replaced only if ``overwrite``.
    ``kind`` names the dataset in messages.
    """
    root = os.path.abspath(root)
    existing = _read_spec(root)
    if existing == spec:
        return dataset_paths(root)
    replacing = os.path.exists(root) and bool(os.listdir(root))
    if replacing and not overwrite:
        if existing is not None:
            raise FileExistsError(
                f"{root} holds a {kind} dataset made with another spec ({existing}); pass overwrite=True "
                f"(or choose another folder) to replace it with {spec}")
        raise FileExistsError(
            f"{root} exists, is not empty and is not a complete {kind} dataset; remove it or pass overwrite=True")

    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}-", dir=parent)
    try:
        for folder in ("train", "val", "annotations"):
            os.makedirs(os.path.join(staging, folder))
        write(staging)
        write_json(os.path.join(staging, SPEC_FILE), spec)
        with open(os.path.join(staging, DONE_MARKER), "w") as f:
            f.write(f"a complete {kind} dataset, made by sn_plugin.data\n")
        if replacing:
            shutil.rmtree(root)
        try:
            os.rename(staging, root)  # also replaces an empty folder
        except OSError:
            if _read_spec(root) != spec:
                raise
            shutil.rmtree(staging)  # another process made the same dataset meanwhile
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dataset_paths(root)


def _read_spec(root: str) -> Optional[dict]:
    """The spec of a complete dataset under ``root``, or None."""
    if not os.path.exists(os.path.join(root, DONE_MARKER)):
        return None
    with open(os.path.join(root, SPEC_FILE)) as f:
        return json.load(f)


def write_json(path: str, payload: object) -> None:
    with open(path, "w") as f:
        json.dump(payload, f)


# -- masks --------------------------------------------------------------------------------------------------------

def mask_to_rle(mask: np.ndarray) -> Dict[str, object]:
    """COCO's uncompressed RLE of a bool (H, W) mask: run lengths in column-major order, zeros first."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change_points = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change_points, [flat.size]]))
    if flat.size and flat[0] == 1:
        runs = np.concatenate([[0], runs])
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(r) for r in runs]}


def rle_to_mask(rle: Dict[str, object]) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`."""
    height, width = rle["size"]
    values = np.zeros(len(rle["counts"]), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, rle["counts"])
    return flat.reshape((width, height)).T


# -- checking a user's dataset ------------------------------------------------------------------------------------

def check_coco_dataset(train_annotations: str, train_images: str, val_annotations: str,
                       val_images: str) -> Tuple[CocoSplit, CocoSplit]:
    """Check both splits (:func:`check_coco_split`) and that they list the same categories in the same order.

    mmdet and pycocotools number the classes in the order of each file's
    ``categories`` list, so a val file listing them in another order would
    silently score every class against another one.
    """
    train = check_coco_split(train_annotations, train_images, "train")
    val = check_coco_split(val_annotations, val_images, "val")
    if train.classes != val.classes:
        raise CocoFormatError(
            f"the train and val annotation files list different categories: {train.annotations} has "
            f"{list(train.classes)}, {val.annotations} has {list(val.classes)}. Both must list the same category "
            f"names in the same order (the class numbering follows that order)")
    return train, val


def check_coco_split(annotations: str, images: str, role: str) -> CocoSplit:
    """Read a COCO instance annotation file and its image folder; raise :class:`CocoFormatError` on any problem.

    Checks: the file and folder exist; the file is JSON with ``images``,
    ``annotations`` and ``categories`` lists; categories are not empty and
    have unique ids and names; images have unique ids, a file name and a
    positive size; annotations have unique ids, a known image and category,
    a box ``[x, y, w, h]`` with ``w, h > 0`` inside its image (up to
    :data:`BOX_TOLERANCE` pixels over) and, where given, a segmentation that
    is a list of polygons or an RLE of the image's size; at least one
    annotation is not a crowd region; every listed image file exists and has
    the size the file gives it (read from the image header; an EXIF rotation
    by 90 degrees is allowed). ``role`` ("train" or "val") names the split in
    messages.
    """
    annotations, images = os.path.abspath(annotations), os.path.abspath(images)
    what = f"{role} annotations {annotations}"
    if not os.path.isdir(images):
        problem = "is not a folder" if os.path.exists(images) else "does not exist"
        raise CocoFormatError(f"{role} image folder {images} {problem}")
    if not os.path.isfile(annotations):
        problem = "is not a file" if os.path.exists(annotations) else "does not exist"
        raise CocoFormatError(f"{role} annotation file {annotations} {problem}")
    coco = _load_json(annotations, what)
    categories = _check_categories(coco, what)
    image_sizes = _check_images(coco["images"], what)
    objects_per_image, has_masks = _check_annotations(coco["annotations"], image_sizes, categories, what)
    if not objects_per_image:
        raise CocoFormatError(
            f"{what} has no annotated objects ({len(coco['annotations'])} annotations, none outside crowd regions): "
            f"{'training' if role == 'train' else 'COCO AP'} needs at least one object in the {role} set")
    _check_image_files(coco["images"], images, what)
    return CocoSplit(
        annotations=annotations, images=images, classes=tuple(c["name"] for c in coco["categories"]),
        num_images=len(image_sizes), num_objects=sum(objects_per_image.values()), has_masks=has_masks,
        max_side=max(max(size) for size in image_sizes.values()),
        max_objects_per_image=max(objects_per_image.values()))


class _Problems:
    """Problems of one kind, reported together with a few examples."""

    def __init__(self, what: str, kind: str, fix: str):
        self.what, self.kind, self.fix = what, kind, fix
        self.examples: List[str] = []
        self.count = 0

    def add(self, example: str) -> None:
        self.count += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(example)

    def raise_if_any(self) -> None:
        if self.count:
            more = f" (and {self.count - len(self.examples)} more)" if self.count > len(self.examples) else ""
            raise CocoFormatError(f"{self.what}: {self.count} {self.kind}: " + "; ".join(self.examples) + more
                                  + f". {self.fix}")


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            coco = json.load(f)
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{what} is not JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
                              f"a COCO annotation file is a JSON object") from error
    except UnicodeDecodeError as error:
        raise CocoFormatError(f"{what} is not JSON (not UTF-8 text: {error}); a COCO annotation file is a JSON "
                              f"object") from error
    required = ("images", "annotations", "categories")
    if not isinstance(coco, dict):
        raise CocoFormatError(f"{what} is not a COCO annotation file: it holds a JSON {type(coco).__name__}, not an "
                              f"object with {', '.join(map(repr, required))} lists")
    missing = [key for key in required if key not in coco]
    if missing:
        raise CocoFormatError(f"{what} is not a COCO annotation file: no {', '.join(map(repr, missing))} "
                              f"(a COCO instance annotation file has {', '.join(map(repr, required))} lists)")
    for key in required:
        if not isinstance(coco[key], list):
            raise CocoFormatError(f"{what} is not a COCO annotation file: {key!r} is a "
                                  f"{type(coco[key]).__name__}, not a list")
    return coco


def _check_categories(coco: dict, what: str) -> Dict[int, str]:
    categories = coco["categories"]
    if not categories:
        raise CocoFormatError(f"{what} has an empty category list: list the classes, e.g. "
                              f"\"categories\": [{{\"id\": 1, \"name\": \"cat\"}}, ...]")
    bad = _Problems(what, "categories without an integer 'id' and a non-empty 'name'",
                    "Each category needs both, e.g. {\"id\": 1, \"name\": \"cat\"}")
    for index, category in enumerate(categories):
        if not (isinstance(category, dict) and _is_int(category.get("id"))
                and isinstance(category.get("name"), str) and category["name"]):
            bad.add(f"categories[{index}] = {_short(category)}")
    bad.raise_if_any()
    for key in ("id", "name"):
        repeated = _repeated([category[key] for category in categories])
        if repeated:
            raise CocoFormatError(f"{what}: category {key}s must be unique; repeated: {repeated}")
    return {category["id"]: category["name"] for category in categories}


def _check_images(entries: list, what: str) -> Dict[int, Tuple[int, int]]:
    """Image id -> (width, height)."""
    bad = _Problems(what, "image entries without an integer 'id', a 'file_name' and positive integer 'width' and "
                          "'height'", "Each image needs all four")
    sizes: Dict[int, Tuple[int, int]] = {}
    repeated = set()
    for index, image in enumerate(entries):
        if not (isinstance(image, dict) and _is_int(image.get("id")) and isinstance(image.get("file_name"), str)
                and image["file_name"] and all(_is_int(image.get(k)) and image[k] > 0 for k in ("width", "height"))):
            bad.add(f"images[{index}] = {_short(image)}")
            continue
        if image["id"] in sizes:
            repeated.add(image["id"])
        sizes[image["id"]] = (image["width"], image["height"])
    bad.raise_if_any()
    if repeated:
        raise CocoFormatError(f"{what}: image ids must be unique; repeated: {sorted(repeated)[:_EXAMPLES]}")
    if not sizes:
        raise CocoFormatError(f"{what} lists no images")
    return sizes


def _check_annotations(entries: list, sizes: Dict[int, Tuple[int, int]], categories: Dict[int, str],
                       what: str) -> Tuple[Dict[int, int], bool]:
    """Per image id, its number of non-crowd objects; and whether every annotation has a segmentation."""
    malformed = _Problems(what, "annotations without an integer 'id', 'image_id' and 'category_id' and a 'bbox' of "
                                "4 numbers", "COCO's box is [x, y, width, height] in pixels")
    unknown = _Problems(what, "annotations refer to an image or category that is not listed",
                        "Every annotation's image_id must be in 'images' and its category_id in 'categories'")
    outside = _Problems(what, "annotations have boxes outside their image",
                        "Clip the boxes to the image (or correct the image's width and height)")
    empty = _Problems(what, "annotations have boxes of zero or negative width or height",
                      "Remove them or give them their real size")
    bad_masks = _Problems(what, "annotations have a malformed 'segmentation'",
                          "A segmentation is a list of polygons [[x1, y1, x2, y2, x3, y3, ...], ...] or an RLE "
                          "{'size': [height, width], 'counts': ...} of its image's size")
    ids = set()
    repeated = set()
    objects: Dict[int, int] = {}
    has_masks = True
    for index, ann in enumerate(entries):
        box = ann.get("bbox") if isinstance(ann, dict) else None
        if not (isinstance(ann, dict) and all(_is_int(ann.get(k)) for k in ("id", "image_id", "category_id"))
                and isinstance(box, list) and len(box) == 4 and all(_is_number(v) for v in box)):
            malformed.add(f"annotations[{index}] = {_short(ann)}")
            continue
        if ann["id"] in ids:
            repeated.add(ann["id"])
        ids.add(ann["id"])
        if ann["image_id"] not in sizes or ann["category_id"] not in categories:
            unknown.add(f"annotation {ann['id']} (image_id {ann['image_id']}, category_id {ann['category_id']})")
            continue
        width, height = sizes[ann["image_id"]]
        x, y, w, h = box
        if w <= 0 or h <= 0:
            empty.add(f"annotation {ann['id']} on image {ann['image_id']}: bbox {box}")
        elif x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE \
                or y + h > height + BOX_TOLERANCE:
            outside.add(f"annotation {ann['id']} on image {ann['image_id']} ({width}x{height}): bbox {box} spans "
                        f"x {x:g}..{x + w:g}, y {y:g}..{y + h:g}")
        if "segmentation" not in ann:
            has_masks = False
        elif not _valid_segmentation(ann["segmentation"], width, height):
            bad_masks.add(f"annotation {ann['id']} on image {ann['image_id']} ({width}x{height}): "
                          f"{_short(ann['segmentation'])}")
        if not ann.get("iscrowd", 0):
            objects[ann["image_id"]] = objects.get(ann["image_id"], 0) + 1
    for problems in (malformed, unknown, empty, outside, bad_masks):
        problems.raise_if_any()
    if repeated:
        raise CocoFormatError(f"{what}: annotation ids must be unique; repeated: {sorted(repeated)[:_EXAMPLES]}")
    return objects, has_masks


def _valid_segmentation(segmentation, width: int, height: int) -> bool:
    if isinstance(segmentation, list):
        return bool(segmentation) and all(
            isinstance(polygon, list) and len(polygon) >= 6 and len(polygon) % 2 == 0
            and all(_is_number(v) for v in polygon) for polygon in segmentation)
    if isinstance(segmentation, dict):
        return list(segmentation.get("size", ())) == [height, width] and isinstance(segmentation.get("counts"),
                                                                                    (list, str))
    return False


def _check_image_files(entries: list, folder: str, what: str) -> None:
    from PIL import Image, UnidentifiedImageError

    missing = _Problems(what, f"images listed are missing from the image folder {folder}",
                        "Check the image folder and the 'file_name' entries")
    unreadable = _Problems(what, f"image files in {folder} cannot be read as images",
                           "Replace them or remove them from the annotation file")
    resized = _Problems(what, "images have another size than the annotation file gives them",
                        "Correct 'width' and 'height' in the annotation file (boxes and masks are in those pixels)")
    for image in entries:
        path = os.path.join(folder, image["file_name"])
        if not os.path.isfile(path):
            missing.add(repr(image["file_name"]))
            continue
        try:
            with Image.open(path) as opened:
                size = opened.size
                orientation = opened.getexif().get(_EXIF_ORIENTATION)
        except (OSError, UnidentifiedImageError) as error:
            unreadable.add(f"{image['file_name']!r} ({error})")
            continue
        expected = (image["width"], image["height"])
        if size != expected and not (orientation in _TRANSPOSING_ORIENTATIONS and size[::-1] == expected):
            resized.add(f"{image['file_name']!r} is {size[0]}x{size[1]}, the file says {expected[0]}x{expected[1]}")
    for problems in (missing, unreadable, resized):
        problems.raise_if_any()


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(value, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _repeated(values: Sequence) -> List:
    return sorted({value for value in values if values.count(value) > 1}, key=str)
