"""Small datasets for tests, made on the spot (no network).

* :func:`make_coco_folder`: a COCO-format dataset as a user would bring it, two
  folders of images and two annotation files. Rectangles on noise, two classes
  with non-consecutive category ids, polygon masks, non-square images, crowd
  regions: what the built-in datasets do not exercise.
* :func:`make_fake_stardist_wheel`: a zip laid out like stardist's wheel, with a
  synthetic nuclei image and its labels in place of the real ones.
"""
import hashlib
import io
import json
import os
import zipfile

import numpy as np
from PIL import Image

from sn_plugin.data import mask_to_rle

WIDTH, HEIGHT = 96, 64
CATEGORIES = [{"id": 7, "name": "dog"}, {"id": 3, "name": "cat"}]


def make_coco_folder(root, num_train: int = 4, num_val: int = 2) -> dict:
    """Write ``root/{train,val}/*.png`` and ``root/{train,val}.json``; return the four paths."""
    rng = np.random.default_rng(0)
    paths = {}
    for split, count in (("train", num_train), ("val", num_val)):
        folder = os.path.join(root, split)
        os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for index in range(count):
            pixels = rng.integers(0, 60, size=(HEIGHT, WIDTH, 3)).astype(np.uint8)
            file_name = f"{split}_{index}.png"
            image_id = 100 + index
            for slot, category in enumerate(CATEGORIES):
                x, y = 8 + slot * 44 + index % 3, 10 + index % 5
                w, h = 30, 24 + 4 * slot
                pixels[y:y + h, x:x + w] = (200, 80 + 100 * slot, 40)
                annotations.append({
                    "id": len(annotations) + 1, "image_id": image_id, "category_id": category["id"],
                    "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0,
                    "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
            crowd = np.zeros((HEIGHT, WIDTH), dtype=bool)
            crowd[50:56, 0:6] = True
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 7,
                                "bbox": [0, 50, 6, 6], "area": 36, "iscrowd": 1, "segmentation": mask_to_rle(crowd)})
            Image.fromarray(pixels).save(os.path.join(folder, file_name))
            images.append({"id": image_id, "file_name": file_name, "width": WIDTH, "height": HEIGHT})
        annotation_file = os.path.join(root, f"{split}.json")
        write(annotation_file, {"images": images, "annotations": annotations, "categories": CATEGORIES})
        paths[f"{split}_annotations"], paths[f"{split}_images"] = annotation_file, folder
    return paths


def load(path):
    with open(path) as f:
        return json.load(f)


def write(path, payload):
    with open(path, "w") as f:
        json.dump(payload, f)


def fake_nuclei(size=256, count=30, seed=0):
    """A uint16 image of bright ellipses on a dim background and its instance labels (non-consecutive ids)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:size, 0:size]
    image = rng.integers(5, 20, size=(size, size)).astype(np.float64)
    labels = np.zeros((size, size), dtype=np.int64)
    for index in range(count):
        cy, cx = rng.uniform(0, size, size=2)
        ry, rx = rng.uniform(5, 12, size=2)
        inside = ((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 <= 1
        labels[inside & (labels == 0)] = 3 * index + 7
        image[inside] = rng.uniform(60, 200) + rng.normal(0, 5, size=int(inside.sum()))
    image[0, 0] = 3000  # one hot pixel: percentile normalisation must not let it squeeze the rest
    return np.clip(image, 0, 65535).astype(np.uint16), labels


def make_fake_stardist_wheel(folder, image, labels) -> tuple:
    """The wheel file, and the SHA-256 of its two TIFFs by member name (to stand in for the real checksums)."""
    from sn_plugin.data import nuclei

    payloads = {nuclei.IMAGE_MEMBER: _tiff(image), nuclei.LABELS_MEMBER: _tiff(labels)}
    path = os.path.join(folder, "stardist-0.9.2-cp311-cp311-manylinux_2_28_x86_64.whl")
    os.makedirs(folder, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        for member, payload in payloads.items():
            archive.writestr(member, payload)
        archive.writestr(nuclei.LICENSE_MEMBER, "BSD 3-Clause License (fake)")
    return path, {member: hashlib.sha256(payload).hexdigest() for member, payload in payloads.items()}


def _tiff(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array.astype(np.uint16)).save(buffer, format="TIFF")
    return buffer.getvalue()
