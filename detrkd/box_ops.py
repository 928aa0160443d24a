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


def _inter_union(a: Tensor, b: Tensor, pairwise: bool) -> tuple[Tensor, Tensor]:
    if pairwise:
        a, b = a[..., :, None, :], b[..., None, :, :]
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    union = box_area(a) + box_area(b) - inter
    return inter, union


def _giou(a: Tensor, b: Tensor, pairwise: bool) -> tuple[Tensor, Tensor]:
    inter, union = _inter_union(a, b, pairwise)
    iou = inter / union.clamp(min=_EPS)
    if pairwise:
        a, b = a[..., :, None, :], b[..., None, :, :]
    lt = torch.minimum(a[..., :2], b[..., :2])
    rb = torch.maximum(a[..., 2:], b[..., 2:])
    hull = (rb - lt).clamp(min=0).prod(-1)
    return iou, iou - (hull - union) / hull.clamp(min=_EPS)


def box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """Pairwise IoU: [..., N, 4] x [..., M, 4] -> [..., N, M]."""
    inter, union = _inter_union(a_xyxy, b_xyxy, pairwise=True)
    return inter / union.clamp(min=_EPS)


def generalized_box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """Pairwise GIoU in [-1, 1]: [..., N, 4] x [..., M, 4] -> [..., N, M]."""
    return _giou(a_xyxy, b_xyxy, pairwise=True)[1]


def elementwise_generalized_box_iou(a_xyxy: Tensor, b_xyxy: Tensor) -> Tensor:
    """GIoU of aligned pairs: [..., 4] x [..., 4] -> [...]."""
    return _giou(a_xyxy, b_xyxy, pairwise=False)[1]


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    """logit(x) with x clamped into [eps, 1 - eps] so that 0 and 1 stay finite."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))
