"""Box-aware image transforms for detection.

Every transform is called as ``image, target = t(image, target)``. ``image`` is a PIL image or a
tensor [C, H, W] (uint8 in [0, 255] or float in [0, 1]); ``target`` is a dict with at least

- ``boxes``: float [n, 4] **absolute xyxy** pixels of the current image
- ``size``:  long [2] (h, w) of the current image (updated by resizes)

and is returned as a new dict (the input dict is not modified). The last transform of a pipeline
must be :class:`ToTensorNormalize`, which turns the image into a normalised float tensor and the
boxes into **normalised cxcywh** relative to the (un-padded, resized) image, as the DETR losses
and ``detrkd.data.collate`` expect.

Randomness comes only from torch's RNG (``torch.rand``/``torch.randint``), so
``torch.manual_seed`` makes a pipeline deterministic (DataLoader workers are seeded by torch).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from detrkd.box_ops import xyxy_to_cxcywh

ImageLike = Image.Image | Tensor
Target = dict[str, Any]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Compose",
    "RandomHorizontalFlip",
    "RandomResize",
    "Resize",
    "ToTensorNormalize",
    "make_transforms",
    "resized_hw",
]


def _hw(image: ImageLike) -> tuple[int, int]:
    """(h, w) of a PIL image or a [C, H, W] tensor."""
    if isinstance(image, Image.Image):
        return image.height, image.width
    if image.ndim != 3:
        raise ValueError(f"expected an image tensor [C, H, W], got shape {tuple(image.shape)}")
    return int(image.shape[-2]), int(image.shape[-1])


def _with(target: Target, **updates: Any) -> Target:
    out = dict(target)
    out.update(updates)
    return out


def resized_hw(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """DETR's rule: the shorter side becomes ``size``, unless the longer side would then exceed
    ``max_size``, in which case the longer side becomes ``max_size``. Returns (new_h, new_w)."""
    if size <= 0:
        raise ValueError(f"resize size must be positive, got {size}")
    short, long = min(h, w), max(h, w)
    if max_size is not None and long * size > max_size * short:
        size = max(1, int(round(max_size * short / long)))
    if w <= h:
        return max(1, int(size * h / w)), size
    return size, max(1, int(size * w / h))


class Compose:
    """Apply transforms in order."""

    def __init__(self, transforms: Sequence[Callable[[ImageLike, Target], tuple[ImageLike, Target]]]):
        self.transforms = list(transforms)

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


def hflip(image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
    """Mirror left-right; boxes (absolute xyxy) follow: x0' = W - x1, x1' = W - x0."""
    _, w = _hw(image)
    if isinstance(image, Image.Image):
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    else:
        image = image.flip(-1)
    boxes = target["boxes"]
    if boxes.numel():
        boxes = torch.stack((w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]), dim=-1)
    return image, _with(target, boxes=boxes)


class RandomHorizontalFlip:
    """Flip with probability ``p`` (drawn with ``torch.rand``)."""

    def __init__(self, p: float = 0.5):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        if torch.rand(()).item() < self.p:
            return hflip(image, target)
        return image, target

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


def resize(image: ImageLike, target: Target, size: int, max_size: int | None = None) -> tuple[ImageLike, Target]:
    """Resize so that the shorter side is ``size`` (longer side capped at ``max_size``); boxes
    are scaled by (new_w / w, new_h / h) and ``target['size']`` is updated."""
    h, w = _hw(image)
    nh, nw = resized_hw(h, w, size, max_size)
    if (nh, nw) != (h, w):
        if isinstance(image, Image.Image):
            image = image.resize((nw, nh), Image.Resampling.BILINEAR)
        else:
            image = _resize_tensor(image, nh, nw)
    scale = torch.tensor([nw / w, nh / h, nw / w, nh / h], dtype=torch.float32)
    boxes = target["boxes"].to(torch.float32) * scale
    return image, _with(target, boxes=boxes, size=torch.tensor([nh, nw], dtype=torch.long))


def _resize_tensor(image: Tensor, nh: int, nw: int) -> Tensor:
    out = F.interpolate(image[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    if image.dtype == torch.uint8:
        out = out.round().clamp(0, 255).to(torch.uint8)
    return out


class Resize:
    """Deterministic DETR resize: shorter side -> ``size``, longer side <= ``max_size``."""

    def __init__(self, size: int, max_size: int | None = None):
        self.size, self.max_size = int(size), max_size

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        return resize(image, target, self.size, self.max_size)

    def __repr__(self) -> str:
        return f"Resize(size={self.size}, max_size={self.max_size})"


class SquareResize:
    """Resize to exactly ``size`` x ``size`` (aspect not kept), as HF's RT-DETR processor does.

    For families that ignore the pixel mask (RT-DETR, D-FINE): every image of a batch then has
    the same size, so no padding exists that the model cannot see.
    """

    def __init__(self, size: int):
        self.size = int(size)

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        h, w = _hw(image)
        if (h, w) != (self.size, self.size):
            if isinstance(image, Image.Image):
                image = image.resize((self.size, self.size), Image.Resampling.BILINEAR)
            else:
                image = _resize_tensor(image, self.size, self.size)
        scale = torch.tensor([self.size / w, self.size / h] * 2, dtype=torch.float32)
        boxes = target["boxes"].to(torch.float32) * scale
        return image, _with(target, boxes=boxes, size=torch.tensor([self.size, self.size], dtype=torch.long))

    def __repr__(self) -> str:
        return f"SquareResize(size={self.size})"


class RandomResize:
    """Multi-scale resize: the shorter side is drawn uniformly from ``sizes`` (``torch.randint``)."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None):
        if len(sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes, self.max_size = [int(s) for s in sizes], max_size

    def __call__(self, image: ImageLike, target: Target) -> tuple[ImageLike, Target]:
        size = self.sizes[int(torch.randint(len(self.sizes), ()).item())]
        return resize(image, target, size, self.max_size)

    def __repr__(self) -> str:
        return f"RandomResize(sizes={self.sizes}, max_size={self.max_size})"


class ToTensorNormalize:
    """Final step: image -> float [3, H, W] normalised with ``mean``/``std``; boxes absolute xyxy
    -> normalised cxcywh in [0, 1] of the current (h, w); ``target['size']`` set to (h, w).

    PIL images and uint8 tensors are scaled by 1/255; float tensors are assumed to be in [0, 1].
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, image: ImageLike, target: Target) -> tuple[Tensor, Target]:
        h, w = _hw(image)
        pixels = self._to_float(image)
        pixels = (pixels - self.mean) / self.std
        boxes = target["boxes"].to(torch.float32)
        if boxes.numel():
            boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes = xyxy_to_cxcywh(boxes.clamp(0.0, 1.0))
        else:
            boxes = boxes.reshape(0, 4)
        return pixels, _with(target, boxes=boxes, size=torch.tensor([h, w], dtype=torch.long))

    @staticmethod
    def _to_float(image: ImageLike) -> Tensor:
        if isinstance(image, Image.Image):
            from detrkd.data.coco import to_rgb8  # (coco imports this module)

            array = np.asarray(to_rgb8(image), dtype=np.uint8)
            return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)
        if image.dtype == torch.uint8:
            return image.float() / 255.0
        return image.float()

    def __repr__(self) -> str:
        return f"ToTensorNormalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


# DETR trains with shorter sides 480..800 (step 32) and evaluates at 800, long side <= 1333.
# We scale that recipe to ``image_size`` but centre the scales on it (0.75x .. 1.25x).
_TRAIN_SCALES = tuple(0.75 + 0.0625 * i for i in range(9))
_MAX_SIZE_RATIO = 1333 / 800


def make_transforms(split: Literal["train", "val"], image_size: int, hflip: bool = True,
                    square: bool = False) -> Compose:
    """DETR-style pipelines sized for ``image_size`` (the shorter side at evaluation).

    train: RandomHorizontalFlip(0.5) (if ``hflip``) -> RandomResize(shorter side in 0.75x..1.25x image_size,
           multiples of 8) -> ToTensorNormalize
    val:   Resize(image_size) -> ToTensorNormalize
    Both cap the longer side at round(image_size * 1333 / 800), as DETR does for 800 px.
    square=True (families that ignore the pixel mask): SquareResize(image_size) in both splits,
    no multi-scale, so batches are never padded.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    max_size = int(math.ceil(image_size * _MAX_SIZE_RATIO))
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if square:
        flip = [RandomHorizontalFlip(0.5)] if hflip and split == "train" else []
        return Compose([*flip, SquareResize(image_size), ToTensorNormalize()])
    if split == "train":
        sizes = sorted({max(8, int(round(image_size * s / 8)) * 8) for s in _TRAIN_SCALES})
        flip = [RandomHorizontalFlip(0.5)] if hflip else []
        return Compose([*flip, RandomResize(sizes, max_size), ToTensorNormalize()])
    if split == "val":
        return Compose([Resize(image_size, max_size), ToTensorNormalize()])
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")
