"""Data that ships with the project: a synthetic instance-segmentation dataset (numpy and PIL only)."""
from .synthetic_shapes import CLASSES, ShapesSpec, dataset_paths, generate_shapes_dataset, mask_to_rle, rle_to_mask

__all__ = ["CLASSES", "ShapesSpec", "dataset_paths", "generate_shapes_dataset", "mask_to_rle", "rle_to_mask"]
