"""Batching: pad images bottom/right to a common size, build pixel masks, keep HF-style labels."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["collate"]


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]], pad_to_multiple: int | None = 32) -> dict[str, Any]:
    """Collate (image [3, H_i, W_i], target) pairs into a DETR batch.

    Returns dict(
        pixel_values float [B, 3, H, W]: images at the top-left, zeros in the padding,
        pixel_mask   long  [B, H, W]: 1 = real pixel, 0 = padding,
        labels       list of B target dicts, unchanged (boxes stay normalised to the un-padded image),
        NAME_pixel_values / NAME_pixel_mask: the same for each view NAME the targets carry
                     (``transforms.Views``: ``target["views"]``, removed from the labels),
    ) where H, W are the largest image sides rounded up to ``pad_to_multiple`` (None or 1: no rounding).
    Use ``functools.partial(collate, pad_to_multiple=...)`` to change it in a DataLoader.
    """
    if len(batch) == 0:
        raise ValueError("collate got an empty batch")
    labels = [dict(item[1]) for item in batch]
    views = [label.pop("views", {}) for label in labels]
    pixel_values, pixel_mask = pad_images([item[0] for item in batch], pad_to_multiple)
    out = {"pixel_values": pixel_values, "pixel_mask": pixel_mask, "labels": labels}
    for name in views[0]:
        out[f"{name}_pixel_values"], out[f"{name}_pixel_mask"] = pad_images([v[name] for v in views], pad_to_multiple)
    return out


def pad_images(images: Sequence[Tensor], pad_to_multiple: int | None = 32) -> tuple[Tensor, Tensor]:
    """Images [3, H_i, W_i] -> (float [B, 3, H, W] padded bottom / right with zeros, long [B, H, W] mask)."""
    for i, img in enumerate(images):
        if not (isinstance(img, Tensor) and img.ndim == 3):
            raise ValueError(f"batch item {i}: expected an image tensor [C, H, W], got {getattr(img, 'shape', type(img))}")
    channels = {img.shape[0] for img in images}
    if len(channels) != 1:
        raise ValueError(f"images in a batch must have the same number of channels, got {sorted(channels)}")
    h = max(img.shape[1] for img in images)
    w = max(img.shape[2] for img in images)
    if pad_to_multiple and pad_to_multiple > 1:
        h, w = _round_up(h, pad_to_multiple), _round_up(w, pad_to_multiple)
    pixel_values = images[0].new_zeros((len(images), channels.pop(), h, w))
    pixel_mask = torch.zeros((len(images), h, w), dtype=torch.long)
    for i, img in enumerate(images):
        pixel_values[i, :, : img.shape[1], : img.shape[2]] = img
        pixel_mask[i, : img.shape[1], : img.shape[2]] = 1
    return pixel_values, pixel_mask
