"""Datasets in COCO format (numpy and Pillow only): the synthetic shapes that ship with the project, the real
nuclei image from stardist's wheel, and the checks a user's own COCO files go through before training."""
from .coco import (CocoFormatError, CocoSplit, build_dataset_folder, check_coco_dataset, check_coco_split,
                   dataset_paths, mask_to_rle, rle_to_mask)
from .nuclei import NUCLEUS_CLASSES, NucleiDataError, NucleiSpec, prepare_nuclei_dataset
from .synthetic_shapes import CLASSES, ShapesSpec, generate_shapes_dataset

__all__ = ["CLASSES", "CocoFormatError", "CocoSplit", "NUCLEUS_CLASSES", "NucleiDataError", "NucleiSpec",
           "ShapesSpec", "build_dataset_folder", "check_coco_dataset", "check_coco_split", "dataset_paths",
           "generate_shapes_dataset", "mask_to_rle", "prepare_nuclei_dataset", "rle_to_mask"]
