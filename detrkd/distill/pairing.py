"""Pairing student and teacher predictions: the blocks every prediction-level method shares.

- ``layer_pairs``: which student decoder layer is compared with which teacher layer;
- ``Alignment``: P aligned (student, teacher) prediction pairs as flat (image, query) indices,
  gathered with ``gather_flat``;
- ``prediction_cost``: the student-vs-teacher matching cost (class + L1 + GIoU) that LAPD and
  global alignment solve assignment problems on.

Arguments and tuples are student first, teacher second (``heads = (student head, teacher head)``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..matching import CostWeights, pairwise_cost
from ..models.base import ClassHead
from .losses import class_probabilities


class Alignment(NamedTuple):
    """P aligned pairs as flat indices over (image, query): ``student`` [P] = b * Qs + q_s,
    ``teacher`` [P] = b * Qt + q_t (long, on the predictions' device). Gather with
    ``gather_flat(x, index)``."""

    student: Tensor
    teacher: Tensor


def empty_alignment(device: torch.device | str | None = None) -> Alignment:
    """No pairs."""
    empty = torch.zeros(0, dtype=torch.long, device=device)
    return Alignment(empty, empty.clone())


def gather_flat(x: Tensor, flat_index: Tensor) -> Tensor:
    """[B, Q, D] -> [P, D]: rows at flat (image * Q + query) indices."""
    return x.flatten(0, 1)[flat_index]


def layer_pairs(num_student: int, num_teacher: int, layers: str = "last",
                pairing: str = "index") -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs, non-negative indices.

    ``layers="last"``: last vs last. ``layers="all"``: student layer i vs teacher layer
    round_half_up(i * (Lt - 1) / (Ls - 1)) (equal counts: i vs i; the last student layer always meets
    the teacher's last; one student layer -> the teacher's last); ``pairing="last"``: every student
    layer vs the teacher's last layer.
    """
    if layers == "last":
        return [(num_student - 1, num_teacher - 1)]
    if pairing == "last" or num_student == 1:
        return [(i, num_teacher - 1) for i in range(num_student)]
    span_s, span_t = num_student - 1, num_teacher - 1
    # floor(i * span_t / span_s + 1/2) in integers: half-way cases go to the later teacher layer
    return [(i, (2 * i * span_t + span_s) // (2 * span_s)) for i in range(num_student)]


@torch.no_grad()
def prediction_cost(student_logits: Tensor, student_boxes: Tensor, teacher_logits: Tensor,
                    teacher_boxes: Tensor, heads: tuple[ClassHead, ClassHead],
                    weights: CostWeights | tuple[float, float, float] = CostWeights(),
                    out: Tensor | None = None) -> Tensor:
    """Matching cost of every teacher prediction (rows) against every student prediction (columns),
    detached float32.

    student_logits [B, Qs, Ks], student_boxes [B, Qs, 4], teacher_logits [B, Qt, Kt], teacher_boxes
    [B, Qt, 4]; heads = (student head, teacher head) -> [B, Qt, Qs] (written into ``out``, float32
    [B, Qt, Qs] on the inputs' device, when given: faster). Mixed heads: both sides become
    real-class probabilities [.., C], passed to ``pairwise_cost`` as sigmoid logits
    (sigmoid(logit(p)) = p), so the class cost is their L1 distance.
    """
    t, s = teacher_logits.detach().float(), student_logits.detach().float()
    student_head, teacher_head = heads
    head = teacher_head
    if teacher_head != student_head:
        t = torch.logit(class_probabilities(t, teacher_head), eps=1e-6)
        s = torch.logit(class_probabilities(s, student_head), eps=1e-6)
        head = "sigmoid"
    return pairwise_cost(t, teacher_boxes.detach().float(), s, student_boxes.detach().float(), head, weights,
                         out=out)
