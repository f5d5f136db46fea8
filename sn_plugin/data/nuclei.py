"""Real data: the fluorescence nuclei image shipped in stardist's wheel, as a COCO instance-segmentation dataset.

The ``stardist`` wheel on PyPI (BSD-3-Clause) carries ``img2d.tif``, a 512x512
16-bit fluorescence microscopy image from the 2018 Data Science Bowl (Caicedo
et al., Nature Methods 16, 2019), and ``mask2d.tif``, its instance labels (125
nuclei). :func:`prepare_nuclei_dataset` fetches the wheel with pip alone
(``pip download --no-deps``; stardist and its dependencies are never installed),
reads the two TIFFs out of it (zipfile + Pillow), checks they are the files this
converter was written for (SHA-256), and writes a COCO dataset of grey 8-bit
tiles with one class, ``nucleus``, and RLE masks:

* **Intensities**: 16-bit values mapped to 8 bits by percentile normalisation
  over the whole image (the ``low_percentile`` -> 0, ``high_percentile`` -> 255,
  clipped), stardist's own default (1, 99.8), so the few very bright nuclei do
  not squeeze everything else into a handful of grey levels.
* **Split**: the image is cut into ``tile_size`` tiles; the right-most tile
  columns (``val_fraction`` of the width, at least one column) form the val
  region, the rest the train region. Each nucleus belongs to the region that
  holds most of its pixels. In the other region its pixels are a crowd region
  (``iscrowd: 1``): COCO evaluation neither rewards nor penalises detections
  there, and mmdet does not train on it. So no nucleus is an object in both
  splits.
* **Tile borders** inside a region: a tile annotates the part of a nucleus
  inside it as an object when that part holds at least ``min_visible`` of the
  nucleus's pixels (a nucleus halved by a border is an object in both tiles),
  and as a crowd region otherwise (a sliver is ignored, not counted as missed).
  Every labelled pixel is thus either an object or ignored, never background.

The wheel's 3D crop (``img3d.tif``, 31 slices of 61x57 pixels) is not used:
stardist documents it as synthetic nuclei, its slices are smaller than one
tile, and neighbouring slices show the same nuclei again, so it would add
near-duplicate, non-real images to a dataset meant to be real.

numpy and Pillow only (pip is run as a subprocess).
"""
import glob
import hashlib
import io
import os
import shlex
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
from PIL import Image

from .coco import build_dataset_folder, mask_to_rle, write_json

__all__ = ["NUCLEUS_CLASSES", "NucleiDataError", "NucleiSpec", "STARDIST_REQUIREMENT", "default_cache_dir",
           "fetch_stardist_wheel", "nuclei_tiles", "normalize_to_uint8", "prepare_nuclei_dataset",
           "read_stardist_nuclei"]

NUCLEUS_CLASSES: Tuple[str, ...] = ("nucleus",)
STARDIST_REQUIREMENT = "stardist==0.9.2"
IMAGE_MEMBER = "stardist/data/images/img2d.tif"
LABELS_MEMBER = "stardist/data/images/mask2d.tif"
LICENSE_MEMBER = "stardist-0.9.2.dist-info/licenses/LICENSE.txt"
# The two files this converter was written for (identical in every stardist 0.9.2 wheel).
STARDIST_SHA256 = {
    IMAGE_MEMBER: "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750",
    LABELS_MEMBER: "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f",
}
# One wheel for every user, whatever their platform: pip only downloads it, nothing is built or installed.
_PIP_WHEEL_TARGET = ("--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
                     "--implementation", "cp")
_PIP_TIMEOUT_S = 600


class NucleiDataError(RuntimeError):
    """The stardist wheel could not be fetched or read; the message says what to run by hand."""


@dataclass(frozen=True)
class NucleiSpec:
    """How the image becomes tiles; two datasets with equal specs are identical."""

    tile_size: int = 128
    val_fraction: float = 0.25
    low_percentile: float = 1.0
    high_percentile: float = 99.8
    min_visible: float = 0.5

    def __post_init__(self):
        problems = []
        if self.tile_size < 32:
            problems.append(f"tile_size must be >= 32 pixels (got {self.tile_size})")
        if not 0 < self.val_fraction < 1:
            problems.append(f"val_fraction must be in (0, 1) (got {self.val_fraction})")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            problems.append(f"need 0 <= low_percentile < high_percentile <= 100 (got {self.low_percentile}, "
                            f"{self.high_percentile})")
        if not 0 < self.min_visible <= 1:
            problems.append(f"min_visible must be in (0, 1] (got {self.min_visible})")
        if problems:
            raise ValueError("invalid NucleiSpec: " + "; ".join(problems))


def default_cache_dir() -> str:
    """``$XDG_CACHE_HOME/sn_plugin`` (``~/.cache/sn_plugin`` by default): where the wheel is kept."""
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "sn_plugin")


def prepare_nuclei_dataset(root: str, spec: NucleiSpec = NucleiSpec(), wheel: Optional[str] = None,
                           overwrite: bool = False) -> Dict[str, str]:
    """The nuclei dataset under ``root`` (made on the first call, reused later); returns its paths.

    ``wheel`` is a stardist 0.9.2 wheel file; by default the one in
    ``<default_cache_dir()>/wheels``, fetched there with pip when missing
    (:func:`fetch_stardist_wheel`). Layout and caching as for the shapes
    dataset (:func:`.coco.build_dataset_folder`).
    """
    description = {**asdict(spec), "source": f"{STARDIST_REQUIREMENT}: {IMAGE_MEMBER}, {LABELS_MEMBER}"}

    def write(staging: str) -> None:  # called only when the dataset is not there yet
        path = wheel or fetch_stardist_wheel()
        image, labels = read_stardist_nuclei(path)
        splits = nuclei_tiles(normalize_to_uint8(image, spec.low_percentile, spec.high_percentile), labels, spec)
        for split, tiles in splits.items():
            write_json(os.path.join(staging, "annotations", f"instances_{split}.json"),
                       _coco(split, tiles, staging, spec))
        with zipfile.ZipFile(path) as archive:
            license_text = archive.read(LICENSE_MEMBER).decode() if LICENSE_MEMBER in archive.namelist() else ""
        with open(os.path.join(staging, "LICENSE-stardist.txt"), "w") as f:
            f.write(f"The images and masks come from {STARDIST_REQUIREMENT} ({IMAGE_MEMBER}, {LABELS_MEMBER}),\n"
                    f"from the 2018 Data Science Bowl (Caicedo et al., Nature Methods 16, 2019).\n\n{license_text}")

    return build_dataset_folder(root, description, write, kind="nuclei", overwrite=overwrite)


def fetch_stardist_wheel(wheel_dir: Optional[str] = None) -> str:
    """The stardist 0.9.2 wheel in ``wheel_dir`` (default ``<default_cache_dir()>/wheels``), downloaded if missing.

    Any ``stardist-0.9.2-*.whl`` already there is used (e.g. one you
    downloaded elsewhere and copied in); otherwise ``pip download --no-deps``
    fetches the manylinux wheel, whatever this machine's platform. Failing that
    (no network, an index without stardist), :class:`NucleiDataError` names the
    command to run by hand.
    """
    wheel_dir = os.path.abspath(wheel_dir or os.path.join(default_cache_dir(), "wheels"))
    found = _wheels_in(wheel_dir)
    if found:
        return found[0]
    command = [sys.executable, "-m", "pip", "download", "--no-deps", *_PIP_WHEEL_TARGET, STARDIST_REQUIREMENT,
               "-d", wheel_dir]
    by_hand = shlex.join(["python", *command[1:]])
    hint = (f"Run by hand, on a machine that reaches PyPI: `{by_hand}` (or download the wheel elsewhere and copy it "
            f"into {wheel_dir}), then run again")
    print(f"Fetching the nuclei data: {by_hand}", flush=True)
    try:
        os.makedirs(wheel_dir, exist_ok=True)
        result = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise NucleiDataError(f"could not fetch the {STARDIST_REQUIREMENT} wheel, which holds the nuclei images "
                              f"({error}). {hint}") from error
    found = _wheels_in(wheel_dir)
    if result.returncode != 0 or not found:
        said = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
        raise NucleiDataError(f"could not fetch the {STARDIST_REQUIREMENT} wheel, which holds the nuclei images: "
                              f"pip exited with {result.returncode}: {' | '.join(said)}. {hint}")
    return found[0]


def _wheels_in(folder: str) -> List[str]:
    return sorted(glob.glob(os.path.join(glob.escape(folder), "stardist-0.9.2-*.whl")))


def read_stardist_nuclei(wheel: str, checksums: Optional[Dict[str, str]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """The 2D image (H, W) uint16 and its labels (H, W) integers (0 = background) from a stardist wheel.

    Each file's SHA-256 must be ``checksums[member]`` (default: those of
    stardist 0.9.2's files), so a damaged or different wheel is refused rather
    than converted into another dataset under the same name.
    """
    checksums = STARDIST_SHA256 if checksums is None else checksums
    try:
        with zipfile.ZipFile(wheel) as archive:
            payloads = {member: archive.read(member) for member in (IMAGE_MEMBER, LABELS_MEMBER)}
    except (OSError, zipfile.BadZipFile, KeyError) as error:
        raise NucleiDataError(f"cannot read the nuclei image from {wheel} ({error}); delete it and run again to "
                              f"download it anew") from error
    arrays = []
    for member, payload in payloads.items():
        digest = hashlib.sha256(payload).hexdigest()
        if digest != checksums[member]:
            raise NucleiDataError(f"{member} in {wheel} is not the file this converter was written for (SHA-256 "
                                  f"{digest}, expected {checksums[member]}); delete the wheel and run again")
        with Image.open(io.BytesIO(payload)) as tiff:
            arrays.append(np.array(tiff))
    image, labels = arrays
    if image.ndim != 2 or image.shape != labels.shape:
        raise NucleiDataError(f"{wheel}: expected a 2D image and labels of one shape, got {image.shape} and "
                              f"{labels.shape}")
    return image, labels.astype(np.int64)


def normalize_to_uint8(image: np.ndarray, low_percentile: float, high_percentile: float) -> np.ndarray:
    """Percentile normalisation: the ``low_percentile`` value -> 0, the ``high_percentile`` value -> 255, clipped."""
    low, high = np.percentile(image, [low_percentile, high_percentile])
    scaled = (image.astype(np.float64) - low) / max(high - low, 1e-12)
    return np.round(np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


Tile = Tuple[str, np.ndarray, List[Tuple[np.ndarray, bool]]]  # file name, pixels, [(mask, is_crowd)]


def nuclei_tiles(image: np.ndarray, labels: np.ndarray, spec: NucleiSpec) -> Dict[str, List[Tile]]:
    """The train and val tiles of an image and its instance labels (split and borders as the module says).

    Pixels right or below the last whole tile are not used.
    """
    size = spec.tile_size
    columns, rows = image.shape[1] // size, image.shape[0] // size
    val_columns = max(1, round(spec.val_fraction * columns))
    if columns - val_columns < 1 or rows < 1:
        raise ValueError(f"a {image.shape[1]}x{image.shape[0]} image holds {columns}x{rows} tiles of {size} pixels: "
                         f"too few for a train and a val region; use smaller tiles")
    val_start = (columns - val_columns) * size
    used = labels[:rows * size, :columns * size]
    ids, totals = np.unique(used[used > 0], return_counts=True)
    in_val = np.unique(used[:, val_start:][used[:, val_start:] > 0], return_counts=True)
    val_pixels = dict(zip(in_val[0].tolist(), in_val[1].tolist()))
    owner_is_val = {int(i): 2 * val_pixels.get(int(i), 0) > int(total) for i, total in zip(ids, totals)}
    total_of = dict(zip(ids.tolist(), totals.tolist()))

    splits: Dict[str, List[Tile]] = {"train": [], "val": []}
    for row in range(rows):
        for column in range(columns):
            y, x = row * size, column * size
            is_val = x >= val_start
            tile_labels = labels[y:y + size, x:x + size]
            objects = []
            for label in np.unique(tile_labels[tile_labels > 0]).tolist():
                mask = tile_labels == label
                is_object = owner_is_val[label] == is_val and mask.sum() >= spec.min_visible * total_of[label]
                objects.append((mask, not is_object))
            splits["val" if is_val else "train"].append(
                (f"x{x:04d}_y{y:04d}.png", image[y:y + size, x:x + size], objects))
    return splits


def _coco(split: str, tiles: List[Tile], staging: str, spec: NucleiSpec) -> dict:
    images, annotations = [], []
    for image_id, (file_name, pixels, objects) in enumerate(tiles, start=1):
        Image.fromarray(pixels).save(os.path.join(staging, split, file_name))
        images.append({"id": image_id, "file_name": file_name, "height": int(pixels.shape[0]),
                       "width": int(pixels.shape[1])})
        for mask, is_crowd in objects:
            ys, xs = np.nonzero(mask)
            x0, y0 = int(xs.min()), int(ys.min())
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],
                "area": int(mask.sum()), "segmentation": mask_to_rle(mask), "iscrowd": int(is_crowd),
            })
    return {
        "info": {"description": f"nuclei from {STARDIST_REQUIREMENT}'s img2d.tif (2018 Data Science Bowl), "
                                f"{split} tiles", "spec": asdict(spec)},
        "licenses": [{"id": 1, "name": "BSD-3-Clause (stardist)"}],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": NUCLEUS_CLASSES[0], "supercategory": "cell"}],
    }
