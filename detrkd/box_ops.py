"""Box utilities. Boxes are float tensors, normalised cxcywh unless a name says xyxy.

All pairwise functions broadcast over leading batch dimensions:
``box_iou(a [..., N, 4], b [..., M, 4]) -> [..., N, M]``.
Degenerate boxes (zero width or height) give IoU 0 and finite GIoU, never NaN.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-7


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack(((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0), dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    """COCO [..., 4] (x, y, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    x, y, w, h = boxes.unbind(-1)
    return torch.stack((x, y, x + w, y + h), dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> COCO [..., 4] (x, y, w, h)."""
    x0, y0, x1, y1 = boxes.unbind(-1)
    return torch.stack((x0, y0, x1 - x0, y1 - y0), dim=-1)


def box_area(xyxy: Tensor) -> Tensor:
    """[..., 4] xyxy -> [...] area (0 for inverted boxes)."""
    return (xyxy[..., 2] - xyxy[..., 0]).clamp(min=0) * (xyxy[..., 3] - xyxy[..., 1]).clamp(min=0)


def _elementwise_giou(a: Tensor, b: Tensor) -> Tensor:
    """GIoU of aligned boxes a [..., 4], b [..., 4] xyxy -> [...]."""
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    hull = (torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])).clamp(min=0).prod(-1)
    return inter / union.clamp(min=_EPS) - (hull - union) / hull.clamp(min=_EPS)


def _pairwise_terms(a: Tensor, b: Tensor, hull: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """(inter, union, hull area or None), each [..., N, M], for a [..., N, 4] x b [..., M, 4] xyxy.

    Works on per-coordinate [..., N, 1] x [..., 1, M] broadcasts, so every intermediate is one
    [..., N, M] plane: ~3x faster than stacking [..., N, M, 2] corner tensors (900 x 900 GIoU:
    11 vs 36 ms on one thread), which matters for teacher-vs-student matching costs.
    """
    ax0, ay0, ax1, ay1 = (x[..., :, None] for x in a.unbind(-1))
    bx0, by0, bx1, by1 = (x[..., None, :] for x in b.unbind(-1))
    inter = ((torch.minimum(ax1, bx1) - torch.maximum(ax0, bx0)).clamp(min=0)
             * (torch.minimum(ay1, by1) - torch.maximum(ay0, by0)).clamp(min=0))
    union = box_area(a)[..., :, None] + box_area(b)[..., None, :] - inter
    if not hull:
        return inter, union, None
    enclosing = ((torch.maximum(ax1, bx1) - torch.minimum(ax0, bx0)).clamp(min=0)
                 * (torch.maximum(ay1, by1) - torch.minimum(ay0, by0)).clamp(min=0))
    return inter, union, enclosing


def box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """Pairwise IoU: [..., N, 4] x [..., M, 4] -> [..., N, M]."""
    inter, union, _ = _pairwise_terms(a_xyxy, b_xyxy, hull=False)
    return inter / union.clamp(min=_EPS)


def generalized_box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """Pairwise GIoU in [-1, 1]: [..., N, 4] x [..., M, 4] -> [..., N, M]."""
    inter, union, hull = _pairwise_terms(a_xyxy, b_xyxy, hull=True)
    return inter / union.clamp(min=_EPS) - (hull - union) / hull.clamp(min=_EPS)


def elementwise_generalized_box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """GIoU of aligned pairs: [..., 4] x [..., 4] -> [...]."""
    return _elementwise_giou(a_xyxy, b_xyxy)


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped into [eps, 1 - eps] so that 0 and 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
