"""Datasets, transforms and batching."""

from detrkd.data.coco import CocoDetection, DatasetError, load_coco_json
from detrkd.data.collate import collate
from detrkd.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    RandomHorizontalFlip,
    RandomResize,
    Resize,
    ToTensorNormalize,
    make_transforms,
    resized_hw,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CocoDetection",
    "Compose",
    "DatasetError",
    "RandomHorizontalFlip",
    "RandomResize",
    "Resize",
    "ToTensorNormalize",
    "collate",
    "load_coco_json",
    "make_transforms",
    "resized_hw",
]
