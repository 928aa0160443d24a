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
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping, Sequence

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
    "Pixels",
    "Views",
    "detr_max_size",
    "pixel_transforms",
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
    """Final step: image -> float [3, H, W], rescaled (``rescale``: uint8 / PIL pixels times it,
    1/255 by default) and normalised with ``mean``/``std`` (None: not normalised, as transformers'
    RT-DETR / D-FINE processors do); boxes absolute xyxy -> normalised cxcywh in [0, 1] of the
    current (h, w); ``target['size']`` set to (h, w). Float tensors are taken as already rescaled.
    """

    def __init__(self, mean: Sequence[float] | None = IMAGENET_MEAN, std: Sequence[float] | None = IMAGENET_STD,
                 rescale: float = 1 / 255):
        if (mean is None) != (std is None):
            raise ValueError("ToTensorNormalize: give both mean and std, or neither (no normalisation)")
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.rescale = float(rescale)

    def __call__(self, image: ImageLike, target: Target) -> tuple[Tensor, Target]:
        h, w = _hw(image)
        pixels = self._to_float(image)
        if self.mean is not None:
            pixels = (pixels - self.mean) / self.std
        boxes = target["boxes"].to(torch.float32)
        if boxes.numel():
            boxes = boxes / torch.tensor([w, h, w, h], dtype=torch.float32)
            boxes = xyxy_to_cxcywh(boxes.clamp(0.0, 1.0))
        else:
            boxes = boxes.reshape(0, 4)
        return pixels, _with(target, boxes=boxes, size=torch.tensor([h, w], dtype=torch.long))

    def _to_float(self, image: ImageLike) -> Tensor:
        if isinstance(image, Image.Image):
            from detrkd.data.coco import to_rgb8  # (coco imports this module)

            array = np.asarray(to_rgb8(image), dtype=np.uint8)
            return self._scaled(torch.from_numpy(array.copy()).permute(2, 0, 1).float())
        if image.dtype == torch.uint8:
            return self._scaled(image.float())
        return image.float()

    def _scaled(self, pixels: Tensor) -> Tensor:
        if self.rescale == 1 / 255:  # as every run before ``rescale`` existed did it (bit for bit)
            return pixels.div_(255.0)
        return pixels.mul_(self.rescale)

    def __repr__(self) -> str:
        if self.mean is None:
            return f"ToTensorNormalize(mean=None, std=None, rescale={self.rescale})"
        return (f"ToTensorNormalize(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}, "
                f"rescale={self.rescale})")


@dataclass(frozen=True)
class Pixels:
    """How one model's inputs are made from an image (what its transformers image processor does).

    square:   True: resized to ``size`` x ``size`` (aspect not kept), never padded (families that
              ignore the pixel mask: RT-DETR v1 / v2, D-FINE); False: the shorter side to ``size``,
              the longer at most ``max_size``, padded in a batch with a pixel mask (DETR-style).
    rescale:  uint8 pixels are multiplied by it (1/255: [0, 1]).
    mean/std: per-channel normalisation after rescaling; None: not normalised.
    """

    size: int
    square: bool
    max_size: int | None = None
    mean: tuple[float, ...] | None = IMAGENET_MEAN
    std: tuple[float, ...] | None = IMAGENET_STD
    rescale: float = 1 / 255

    def __post_init__(self) -> None:
        if self.square:  # no longer side to cap: one spelling of each recipe, so that equal means equal
            object.__setattr__(self, "max_size", None)

    def to_tensor(self) -> ToTensorNormalize:
        return ToTensorNormalize(self.mean, self.std, self.rescale)

    def resize(self) -> Callable[[ImageLike, Target], tuple[ImageLike, Target]]:
        """The deterministic (evaluation) resize."""
        return SquareResize(self.size) if self.square else Resize(self.size, self.max_size)

    def as_dict(self) -> dict[str, Any]:
        return {"size": self.size, "square": self.square, "max_size": self.max_size,
                "mean": None if self.mean is None else list(self.mean),
                "std": None if self.std is None else list(self.std), "rescale": self.rescale}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Pixels":
        tup = (lambda v: None if v is None else tuple(float(x) for x in v))
        return cls(int(d["size"]), bool(d["square"]), d.get("max_size"), tup(d.get("mean")), tup(d.get("std")),
                   float(d.get("rescale", 1 / 255)))


class Views:
    """The same augmented image seen by several models: ``shared`` (augmentation, e.g. a flip)
    once, then the ``main`` pipeline, and each named view's pipeline (its model's resize and
    normalisation) on that same image: ``target["views"][name]`` = the view's float [3, h, w]
    pixels. The boxes are the main pipeline's: normalised cxcywh do not change with a resize."""

    def __init__(self, shared: Sequence[Callable[..., Any]], main: Compose, views: Mapping[str, Compose]):
        self.shared, self.main, self.views = Compose(shared), main, dict(views)

    def __call__(self, image: ImageLike, target: Target) -> tuple[Tensor, Target]:
        image, target = self.shared(image, target)
        pixels, out = self.main(image, target)
        return pixels, _with(out, views={name: view(image, target)[0] for name, view in self.views.items()})

    def __repr__(self) -> str:
        return f"Views(shared={self.shared!r}, main={self.main!r}, views={self.views!r})"


# DETR trains with shorter sides 480..800 (step 32) and evaluates at 800, long side <= 1333.
# We scale that recipe to ``image_size`` but centre the scales on it (0.75x .. 1.25x).
_TRAIN_SCALES = tuple(0.75 + 0.0625 * i for i in range(9))
_MAX_SIZE_RATIO = 1333 / 800


def detr_max_size(size: int) -> int:
    """DETR's cap on the longer side for a shorter side of ``size`` (800 -> 1333), rounded up."""
    return int(math.ceil(size * _MAX_SIZE_RATIO))


def make_transforms(split: Literal["train", "val"], image_size: int, hflip: bool = True,
                    square: bool = False) -> Compose:
    """DETR-style pipelines sized for ``image_size`` with ImageNet normalisation (detrkd's recipe
    for every family before per-model preprocessing): ``pixel_transforms`` of ``Pixels(image_size,
    square, image_size * 1333 / 800)``."""
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    return pixel_transforms(split, Pixels(image_size, square, detr_max_size(image_size)), hflip)


def pixel_transforms(split: Literal["train", "val"], pixels: Pixels, hflip: bool = True,
                     views: Mapping[str, Pixels] | None = None) -> Compose | Views:
    """The pipeline of ``split`` for a model fed ``pixels``.

    train: RandomHorizontalFlip(0.5) (if ``hflip``) -> RandomResize(shorter side in 0.75x..1.25x size,
           multiples of 8, longer side <= max_size) -> ToTensorNormalize
    val:   Resize(size, max_size) -> ToTensorNormalize
    square pixels: SquareResize(size) in both splits, no multi-scale, so batches are never padded.
    views: other models' pixels of the same (flipped) image (``Views``; a distillation teacher fed
    by its own processor), each with its deterministic resize.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if pixels.size <= 0:
        raise ValueError(f"image_size must be positive, got {pixels.size}")
    flip = [RandomHorizontalFlip(0.5)] if hflip and split == "train" else []
    if pixels.square or split == "val":
        resize = pixels.resize()
    else:
        sizes = sorted({max(8, int(round(pixels.size * s / 8)) * 8) for s in _TRAIN_SCALES})
        resize = RandomResize(sizes, pixels.max_size)
    if not views:
        return Compose([*flip, resize, pixels.to_tensor()])
    return Views(flip, Compose([resize, pixels.to_tensor()]),
                 {name: Compose([p.resize(), p.to_tensor()]) for name, p in views.items()})
