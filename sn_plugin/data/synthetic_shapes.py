"""A deterministic synthetic instance-segmentation dataset in COCO format.

The demo and the detection benchmark need data that ships with the project
(nothing can be downloaded here) and that a detector trained from scratch on
CPU can learn in minutes, yet does not solve perfectly. Each image holds a few
filled shapes of five classes on a textured, cluttered background:

* the class is carried by the outline only: colour, texture, size and rotation
  are drawn independently of it, so the model must learn shape;
* objects may overlap (each keeps at least ``min_visible`` of its area), so the
  visible masks are not convex and are stored as COCO RLE rather than polygons;
* the background has colour gradients, noise, lines and small blobs that look
  like shape fragments, so an untrained or weak model produces false positives.

Everything is drawn with numpy and PIL from ``numpy.random.default_rng`` seeded
per image, so the same arguments give byte-identical files on every machine.
"""
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw

from .coco import build_dataset_folder, mask_to_rle, write_json

CLASSES: Tuple[str, ...] = ("circle", "triangle", "square", "star", "cross")


@dataclass(frozen=True)
class ShapesSpec:
    """What to generate; two datasets with equal specs are identical.

    Sizes are fractions of ``image_size`` so the difficulty does not change
    with the resolution.
    """

    num_train: int = 600
    num_val: int = 100
    image_size: int = 128
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 5
    min_object_size: float = 0.12
    max_object_size: float = 0.40
    min_visible: float = 0.6
    clutter: int = 10

    def __post_init__(self):
        problems = []
        if self.num_train < 1 or self.num_val < 1:
            problems.append(f"num_train and num_val must be >= 1 (got {self.num_train}, {self.num_val})")
        if self.image_size < 32:
            problems.append(f"image_size must be >= 32 pixels (got {self.image_size})")
        if not 1 <= self.min_objects <= self.max_objects:
            problems.append(f"need 1 <= min_objects <= max_objects (got {self.min_objects}, {self.max_objects})")
        if not 0 < self.min_object_size <= self.max_object_size <= 1:
            problems.append(
                f"need 0 < min_object_size <= max_object_size <= 1 (got {self.min_object_size}, "
                f"{self.max_object_size})")
        if not 0 < self.min_visible <= 1:
            problems.append(f"min_visible must be in (0, 1] (got {self.min_visible})")
        if self.clutter < 0:
            problems.append(f"clutter must be >= 0 (got {self.clutter})")
        if problems:
            raise ValueError("invalid ShapesSpec: " + "; ".join(problems))


def generate_shapes_dataset(root: str, spec: ShapesSpec = ShapesSpec(), overwrite: bool = False) -> Dict[str, str]:
    """Write the dataset under ``root`` and return its paths (:func:`.coco.dataset_paths`).

    Layout: ``root/{train,val}/NNNNNN.png`` and
    ``root/annotations/instances_{train,val}.json``. If ``root`` already holds a
    complete dataset with the same spec it is reused; one with another spec
    raises unless ``overwrite``. The folder appears only when complete
    (:func:`.coco.build_dataset_folder`).
    """
    def write(staging: str) -> None:
        for split, count in (("train", spec.num_train), ("val", spec.num_val)):
            coco = _render_split(staging, split, count, spec)
            write_json(os.path.join(staging, "annotations", f"instances_{split}.json"), coco)

    return build_dataset_folder(root, asdict(spec), write, kind="shapes", overwrite=overwrite)


def render_image(spec: ShapesSpec, split: str, index: int) -> Tuple[np.ndarray, List[Tuple[int, np.ndarray]]]:
    """One image (H, W, 3) uint8 and its objects as (class index, visible bool mask)."""
    split_key = {"train": 0, "val": 1}[split]
    rng = np.random.default_rng([spec.seed, split_key, index])
    size = spec.image_size
    image = _background(rng, size)
    _draw_clutter(rng, image, spec)
    objects = _place_objects(rng, spec)
    for _, shape_mask, _ in objects:
        texture = _texture(rng, size)
        image[shape_mask] = texture[shape_mask]
    return image, [(label, visible) for label, _, visible in objects]


def _render_split(staging: str, split: str, count: int, spec: ShapesSpec) -> dict:
    image_dir = os.path.join(staging, split)
    images, annotations = [], []
    for index in range(count):
        pixels, objects = render_image(spec, split, index)
        file_name = f"{index:06d}.png"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name))
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": spec.image_size, "width": spec.image_size})
        for label, visible in objects:
            ys, xs = np.nonzero(visible)
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": label + 1,
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(visible.sum()),
                "segmentation": mask_to_rle(visible),
                "iscrowd": 0,
            })
    return {
        "info": {"description": f"sn_plugin synthetic shapes, {split} split", "spec": asdict(spec)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)],
    }


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A linear colour gradient in a random direction plus pixel noise."""
    start, end = rng.uniform(0, 255, size=(2, 3))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
    t = (math.cos(angle) * xs + math.sin(angle) * ys)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    image = start + (end - start) * t[..., None]
    image += rng.normal(0, rng.uniform(4, 16), size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def _draw_clutter(rng: np.random.Generator, image: np.ndarray, spec: ShapesSpec) -> None:
    """Lines, arcs and small blobs: distractors below the smallest object size."""
    size = spec.image_size
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    small = max(2, int(spec.min_object_size * size * 0.5))
    for _ in range(int(rng.integers(spec.clutter // 2, spec.clutter + 1))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        kind = rng.integers(3)
        x, y = rng.uniform(0, size, size=2)
        if kind == 0:
            length, angle = rng.uniform(0.2, 0.8) * size, rng.uniform(0, math.pi)
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 1:
            r = rng.uniform(0.5, 1.0) * small
            start = float(rng.uniform(0, 360))
            draw.arc([x - r, y - r, x + r, y + r], start, start + float(rng.uniform(60, 200)), fill=colour, width=2)
        else:
            r = rng.uniform(0.3, 0.6) * small
            draw.polygon(_regular_polygon(x, y, r, int(rng.integers(3, 7)), rng.uniform(0, math.pi)), fill=colour)
    image[...] = np.asarray(canvas)


def _place_objects(rng: np.random.Generator, spec: ShapesSpec):
    """Shapes drawn back to front, each placed so every earlier one keeps ``min_visible`` of its area.

    Returns (class index, full shape mask, visible mask) per object, in drawing order.
    """
    size = spec.image_size
    objects = []
    for _ in range(int(rng.integers(spec.min_objects, spec.max_objects + 1))):
        for _attempt in range(20):
            label = int(rng.integers(len(CLASSES)))
            extent = rng.uniform(spec.min_object_size, spec.max_object_size) * size
            cx, cy = rng.uniform(extent / 2, size - extent / 2, size=2)
            shape = _shape_mask(label, cx, cy, extent / 2, rng.uniform(0, 2 * math.pi), size)
            if shape.sum() < 16:
                continue
            if all((visible & ~shape).sum() >= spec.min_visible * full.sum() for _, full, visible in objects):
                for _, _, visible in objects:
                    visible &= ~shape
                objects.append((label, shape, shape.copy()))
                break
    return objects


def _shape_mask(label: int, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    canvas = Image.new("1", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    name = CLASSES[label]
    if name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    elif name == "triangle":
        draw.polygon(_regular_polygon(cx, cy, radius, 3, angle), fill=1)
    elif name == "square":
        draw.polygon(_regular_polygon(cx, cy, radius, 4, angle), fill=1)
    elif name == "star":
        outer = _regular_polygon(cx, cy, radius, 5, angle)
        inner = _regular_polygon(cx, cy, radius * 0.42, 5, angle + math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner) for p in pair], fill=1)
    else:  # cross: two bars of a third of the extent
        half = radius * 0.33
        for bar in (0.0, math.pi / 2):
            a = angle + bar
            dx, dy = math.cos(a), math.sin(a)
            draw.polygon([(cx + s * radius * dx - t * half * dy, cy + s * radius * dy + t * half * dx)
                          for s, t in ((-1, -1), (1, -1), (1, 1), (-1, 1))], fill=1)
    return np.asarray(canvas, dtype=bool)


def _regular_polygon(cx: float, cy: float, radius: float, sides: int, angle: float) -> List[Tuple[float, float]]:
    return [(cx + radius * math.cos(angle + 2 * math.pi * k / sides),
             cy + radius * math.sin(angle + 2 * math.pi * k / sides)) for k in range(sides)]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A full-image fill: solid colour, two-colour stripes, or a colour with strong noise."""
    colour = rng.uniform(0, 255, size=3)
    kind = rng.integers(3)
    if kind == 0:
        fill = np.broadcast_to(colour, (size, size, 3)).copy()
    elif kind == 1:
        other = rng.uniform(0, 255, size=3)
        period, angle = rng.uniform(3, 8), rng.uniform(0, math.pi)
        ys, xs = np.mgrid[0:size, 0:size]
        stripes = (np.floor((math.cos(angle) * xs + math.sin(angle) * ys) / period) % 2)[..., None]
        fill = colour * (1 - stripes) + other * stripes
    else:
        fill = colour + rng.normal(0, 40, size=(size, size, 3))
    return np.clip(fill, 0, 255).astype(np.uint8)
