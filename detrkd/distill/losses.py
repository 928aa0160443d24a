"""Prediction-distillation losses on aligned (student, teacher) pairs, batched (unweighted: the
``Distiller`` applies every weight).

Aligned pairs are flat tensors: P pairs of class logits [P, K] and boxes [P, 4] (normalised
cxcywh). Heads may differ between teacher and student (softmax over C + 1 vs sigmoid over C):
everything is compared on the C real classes.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..box_ops import cxcywh_to_xyxy, elementwise_generalized_box_iou
from ..models.base import ClassHead

ClassKD = Literal["bce", "kl"]


def class_probabilities(logits: Tensor, head: ClassHead) -> Tensor:
    """[..., K] logits -> [..., C] probabilities of the real classes.

    softmax head: softmax over C + 1, no-object column dropped (rows sum to <= 1);
    sigmoid head: independent sigmoids.
    """
    if head == "softmax":
        return logits.softmax(-1)[..., :-1]
    return logits.sigmoid()


def class_logits(logits: Tensor, head: ClassHead) -> Tensor:
    """[..., K] -> [..., C] logits over the real classes (softmax head: no-object dropped)."""
    return logits[..., :-1] if head == "softmax" else logits


def class_kd(student_logits: Tensor, teacher_logits: Tensor, student_head: ClassHead,
             teacher_head: ClassHead, mode: ClassKD = "bce", temperature: float = 1.0) -> Tensor:
    """Per-pair class distillation loss [P] (summed over classes).

    bce: binary cross-entropy of the student's per-class probabilities against the teacher's
         (DETRDistill / QSKD style; for a softmax student the student's probabilities are used).
    kl:  KL(softmax(t / T) || softmax(s / T)) * T^2 over the C real-class logits (KD-DETR style).
    """
    if mode == "bce":
        target = class_probabilities(teacher_logits, teacher_head).detach()
        if student_head == "sigmoid":
            return F.binary_cross_entropy_with_logits(student_logits, target, reduction="none").sum(-1)
        prob = class_probabilities(student_logits, student_head).clamp(1e-6, 1 - 1e-6)
        return F.binary_cross_entropy(prob, target, reduction="none").sum(-1)
    if mode == "kl":
        t = class_logits(teacher_logits, teacher_head).detach() / temperature
        s = class_logits(student_logits, student_head) / temperature
        kl = F.kl_div(s.log_softmax(-1), t.log_softmax(-1), reduction="none", log_target=True)
        return kl.sum(-1) * temperature**2
    raise ValueError(f"unknown class KD mode {mode!r}; use 'bce' or 'kl'")


def box_l1_giou(student_boxes: Tensor, teacher_boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Per-pair box losses ([P] L1 summed over the 4 coordinates, [P] 1 - GIoU); teacher detached."""
    teacher_boxes = teacher_boxes.detach()
    l1 = (student_boxes - teacher_boxes).abs().sum(-1)
    giou = elementwise_generalized_box_iou(cxcywh_to_xyxy(student_boxes), cxcywh_to_xyxy(teacher_boxes))
    return l1, 1 - giou


def pair_losses(student_logits: Tensor, student_boxes: Tensor, teacher_logits: Tensor,
                teacher_boxes: Tensor, student_head: ClassHead, teacher_head: ClassHead,
                mode: ClassKD = "bce", temperature: float = 1.0, pair_weight: Tensor | None = None,
                normaliser: float | Tensor | None = None) -> dict[str, Tensor]:
    """Unweighted class / L1 / GIoU terms over P aligned pairs (the ``Distiller`` weighs them).

    pair_weight: [P] optional per-pair weight (e.g. the KD-DETR foreground weight); normaliser:
    divides the sums (default: number of pairs, >= 1). Returns {"cls", "l1", "giou"} scalars
    (zero, with gradient, when P = 0).
    """
    cls = class_kd(student_logits, teacher_logits, student_head, teacher_head, mode, temperature)
    l1, giou = box_l1_giou(student_boxes, teacher_boxes)
    if pair_weight is not None:
        cls, l1, giou = cls * pair_weight, l1 * pair_weight, giou * pair_weight
    norm = torch.as_tensor(max(len(cls), 1) if normaliser is None else normaliser, dtype=cls.dtype)
    norm = norm.clamp(min=1e-6)
    return {"cls": cls.sum() / norm, "l1": l1.sum() / norm, "giou": giou.sum() / norm}


def foreground_weight(teacher_logits: Tensor, head: ClassHead) -> Tensor:
    """KD-DETR Eq. 5: [..., K] teacher logits -> [...] max real-class probability (detached)."""
    return class_probabilities(teacher_logits.detach(), head).max(-1).values


class Aligned(NamedTuple):
    """P aligned pairs: student logits [P, Ks], boxes [P, 4]; teacher logits [P, Kt], boxes [P, 4]."""

    student_logits: Tensor
    student_boxes: Tensor
    teacher_logits: Tensor
    teacher_boxes: Tensor


def aligned_losses(pairs: Aligned, heads: tuple[ClassHead, ClassHead], mode: ClassKD = "kl",
                   temperature: float = 10.0, rebalance: bool = True, normalise: str = "official") -> dict[str, Tensor]:
    """KD-DETR's unweighted {"cls", "l1", "giou"} of P aligned pairs; heads = (student, teacher).

    w_i = the teacher's foreground weight (``rebalance``, Eq. 5) or 1. ``normalise="official"`` (the
    official code): class KD summed over pairs / C, L1 (/ 4 coordinates) and GIoU w-weighted means;
    ``"mean"``: every term a w-weighted mean (``pair_losses``). Used by ``kd_detr`` and
    ``kd_detr_hetero`` (their module docstrings: why).
    """
    s_logits, s_boxes, t_logits, t_boxes = pairs
    student_head, teacher_head = heads
    w = foreground_weight(t_logits, teacher_head) if rebalance else t_logits.new_ones(t_logits.shape[0])
    if normalise == "mean":
        return pair_losses(s_logits, s_boxes, t_logits, t_boxes, student_head, teacher_head, mode,
                           temperature, pair_weight=w, normaliser=w.sum())
    num_classes = t_logits.shape[-1] - (teacher_head == "softmax")
    cls = class_kd(s_logits, t_logits, student_head, teacher_head, mode, temperature) / num_classes
    l1, giou = box_l1_giou(s_boxes, t_boxes)
    norm = w.sum().clamp(min=1e-6)
    return {"cls": (w * cls).sum(), "l1": (w * l1 / 4).sum() / norm, "giou": (w * giou).sum() / norm}
