"""Local-Alignment Prediction Distillation (LAPD), QSKD Sec. 3.4, Eq. 7.

Group Query Selection (GQS) runs on the teacher's and on the student's predictions of a decoder
layer (same ground truth). Aligned (teacher, student) pairs, per image:

- positives: for each GT, the teacher's positive <-> the student's positive (if both exist);
- hard negatives: for each GT, the teacher's hard negatives of that GT are Hungarian-matched to the
  student's hard negatives of that GT (never across GTs). ``per_image=True`` puts all hard
  negatives of an image in ONE problem (a public re-implementation's variant; the paper says per GT);
- easy negatives (Table 6's Q^en, off by default): the teacher's easy negatives Hungarian-matched
  to the student's easy negatives, one problem per image (images without GT included).

The matching cost is class + L1 + GIoU between the two predictions (``pairwise_cost`` in
prediction-vs-prediction mode, weights 1/5/2), computed only for the pairs inside an assignment
problem (each problem's queries are gathered and costed, and all costs are copied to the CPU at
once); each problem is solved with ``detrkd.matching.linear_assignment``
(one solver call per problem with both sides non-empty).
With different class heads (softmax teacher, sigmoid student, or the reverse) the class cost is
the L1 distance of the C real-class probability vectors; with equal heads it is ``pairwise_cost``'s
native one (softmax vectors include the no-object entry).

The loss on the P pairs is ``pair_losses`` (class KD + L1 + GIoU, unweighted; the Distiller applies
the paper's 1/5/2). Decisions:
- class KD default "bce": binary cross-entropy of the student's per-class probabilities against
  the teacher's (as in QSKD/DETRDistill); its minimum is the teacher's binary entropy, not 0
  (the gradient is 0 there); "kl" = temperature-scaled KL over the real classes (0 at equality).
- normalisation: per layer by the number of pairs of that layer (``normalise="pairs"``, default)
  or by the number of GTs in the batch (``"gt"``); the layers' terms are summed (as DETR sums its
  auxiliary decoder losses) or averaged (``layer_reduction="mean"``).
- ``layers="all"``: student layer i vs teacher layer round_half_up(i * (Lt - 1) / (Ls - 1)) (equal
  counts: i vs i; the last student layer always meets the teacher's last; one student layer -> the
  teacher's last); ``pairing="last"``: every student layer vs the teacher's last layer.
- GQS results come from ``ctx.selection`` (computed once per step, shared with AGFD). Only
  detection queries are distilled (denoising queries have no counterpart).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Literal, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import matching
from ..matching import CostWeights
from ..models.base import ClassHead
from .base import DistillContext, DistillMethod
from .losses import ClassKD, pair_losses
from .pairing import Alignment, empty_alignment, gather_flat, layer_pairs, prediction_cost
from .query_selection import QuerySelection

PairKind = Literal["positive", "hard_negative", "easy_negative"]
KINDS: tuple[PairKind, ...] = ("positive", "hard_negative", "easy_negative")
_KIND_ALIASES: dict[str, PairKind] = {
    "positive": "positive", "positives": "positive", "pos": "positive",
    "hard": "hard_negative", "hard_negative": "hard_negative", "hard_negatives": "hard_negative",
    "easy": "easy_negative", "easy_negative": "easy_negative", "easy_negatives": "easy_negative",
}
DEFAULT_KINDS = "positives+hard"

# (image, teacher query indices [n_t], student query indices [n_s]) of one assignment problem
Block = tuple[int, np.ndarray, np.ndarray]


def parse_kinds(kinds: str | Sequence[str]) -> tuple[PairKind, ...]:
    """"positives+hard" / ("positive", "hard") / "easy" ... -> canonical kinds in ``KINDS`` order."""
    tokens = kinds.split("+") if isinstance(kinds, str) else [t for k in kinds for t in str(k).split("+")]
    names = set()
    for token in tokens:
        name = _KIND_ALIASES.get(token.strip().lower())
        if name is None:
            raise ValueError(f"unknown LAPD pair kind {token!r}; use positives, hard, easy "
                             f"(joined with '+', or a list)")
        names.add(name)
    if not names:
        raise ValueError("LAPD needs at least one pair kind")
    return tuple(k for k in KINDS if k in names)


def local_alignment(student_sel: QuerySelection, teacher_sel: QuerySelection, student_logits: Tensor,
                    student_boxes: Tensor, teacher_logits: Tensor, teacher_boxes: Tensor,
                    heads: tuple[ClassHead, ClassHead], per_image: bool = False,
                    kinds: str | Sequence[str] = DEFAULT_KINDS,
                    cost_weights: CostWeights | tuple[float, float, float] = CostWeights()) -> Alignment:
    """LAPD pairs for a batch (module docstring: the rules).

    student_sel / teacher_sel: GQS of student_logits [B, Qs, Ks] / boxes [B, Qs, 4] and of
    teacher_logits [B, Qt, Kt] / boxes [B, Qt, 4] against the same targets; heads = (student,
    teacher). Costs are computed only for the pairs inside non-empty assignment problems.
    """
    _check_selections(teacher_sel, student_sel, teacher_logits.shape[:2], student_logits.shape[:2])
    kinds = parse_kinds(kinds)
    t_sel, s_sel = _to_cpu(teacher_sel), _to_cpu(student_sel)
    parts = [_positive_pairs(t_sel, s_sel)] if "positive" in kinds else []
    blocks = list(_hard_blocks(t_sel, s_sel, per_image)) if "hard_negative" in kinds else []
    blocks += list(_image_blocks(t_sel, s_sel, "easy_negative")) if "easy_negative" in kinds else []
    if blocks:
        costs = _block_costs(blocks, student_logits, student_boxes, teacher_logits, teacher_boxes, heads,
                             cost_weights)
        parts.append(_solve_blocks(costs, blocks))
    return _flat_alignment(parts, teacher_logits.shape[1], student_logits.shape[1], teacher_logits.device)


def _check_selections(t_sel: QuerySelection, s_sel: QuerySelection, t_shape: torch.Size,
                      s_shape: torch.Size) -> None:
    if tuple(t_sel.group.shape) != tuple(t_shape) or tuple(s_sel.group.shape) != tuple(s_shape):
        raise ValueError(f"selections {tuple(t_sel.group.shape)} / {tuple(s_sel.group.shape)} do not fit "
                         f"the predictions {tuple(t_shape)} / {tuple(s_shape)}")
    if not torch.equal(t_sel.num_gt.cpu(), s_sel.num_gt.cpu()):
        raise ValueError("teacher and student selections were computed against different targets")


def _to_cpu(sel: QuerySelection) -> QuerySelection:
    """The selection with every tensor on the CPU (the per-group index lists are built there)."""
    return dataclasses.replace(sel, **{f.name: getattr(sel, f.name).cpu() for f in dataclasses.fields(sel)
                                       if isinstance(getattr(sel, f.name), Tensor)})


def _positive_pairs(t_sel: QuerySelection, s_sel: QuerySelection) -> tuple[np.ndarray, ...]:
    """(image [P], teacher query [P], student query [P]) of the GTs positive on both sides."""
    t_pos, s_pos = t_sel.positive_index, s_sel.positive_index  # [B, T]
    img, gt = ((t_pos >= 0) & (s_pos >= 0)).nonzero(as_tuple=True)
    return img.numpy(), t_pos[img, gt].numpy(), s_pos[img, gt].numpy()


def _hard_blocks(t_sel: QuerySelection, s_sel: QuerySelection, per_image: bool) -> Iterator[Block]:
    """Hard-negative problems: one per (image, GT) with hard negatives on both sides, or per image."""
    if per_image:
        yield from _image_blocks(t_sel, s_sel, "hard_negative")
        return
    t_groups, s_groups = t_sel.group_indices("hard_negative"), s_sel.group_indices("hard_negative")
    for b, (t_img, s_img) in enumerate(zip(t_groups, s_groups)):
        for t, s in zip(t_img, s_img):
            if len(t) and len(s):
                yield b, t.numpy(), s.numpy()


def _image_blocks(t_sel: QuerySelection, s_sel: QuerySelection, kind: PairKind) -> Iterator[Block]:
    """One problem per image: all its teacher vs all its student queries of ``kind``."""
    for b, (t, s) in enumerate(zip(t_sel.selected_indices(kind), s_sel.selected_indices(kind))):
        if len(t) and len(s):
            yield b, t.numpy(), s.numpy()


def _block_costs(blocks: list[Block], student_logits: Tensor, student_boxes: Tensor, teacher_logits: Tensor,
                 teacher_boxes: Tensor, heads: tuple[ClassHead, ClassHead],
                 weights: CostWeights | tuple[float, float, float]) -> list[np.ndarray]:
    """Each block's [len(t), len(s)] teacher x student cost (numpy), copied to the host at once.

    Only the pairs inside an assignment problem are costed: the per-GT hard-negative groups hold a
    small part of the full [B, Qt, Qs] (at 900 x 900 queries, 6% of its pairs on the overhead
    benchmark's batch; CPU time on one thread 43 ms, against 272-507 ms for the full matrix and
    116-145 ms for one padded [blocks, Tmax, Smax] call). Each entry is the same per-pair
    arithmetic as in the full matrix, equal up to float32 rounding (vectorised kernels may round a
    value differently at another position).
    """
    device, costs = teacher_logits.device, []
    for b, t, s in blocks:
        ti, si = torch.from_numpy(t).to(device), torch.from_numpy(s).to(device)
        costs.append(prediction_cost(student_logits[b, si][None], student_boxes[b, si][None],
                                     teacher_logits[b, ti][None], teacher_boxes[b, ti][None], heads, weights))
    flat = torch.cat([c.flatten() for c in costs]).cpu().numpy()
    parts = np.split(flat, np.cumsum([c.numel() for c in costs])[:-1])
    return [part.reshape(len(t), len(s)) for part, (_, t, s) in zip(parts, blocks)]


def _solve_blocks(costs: list[np.ndarray], blocks: list[Block]) -> tuple[np.ndarray, ...]:
    """costs: per block [len(t), len(s)] (``_block_costs``); one ``linear_assignment`` per block
    -> (image, teacher query, student query) [P]."""
    img, teacher, student = [], [], []
    for cost, (b, t, s) in zip(costs, blocks):
        rows, cols = matching.linear_assignment(cost)
        img.append(np.full(len(rows), b, dtype=np.int64))
        teacher.append(t[rows])
        student.append(s[cols])
    return np.concatenate(img), np.concatenate(teacher), np.concatenate(student)


def _flat_alignment(parts: list[tuple[np.ndarray, ...]], qt: int, qs: int, device: torch.device) -> Alignment:
    if not parts:
        return empty_alignment(device)
    img, teacher, student = (torch.from_numpy(np.concatenate(x).astype(np.int64)) for x in zip(*parts))
    return Alignment((img * qs + student).to(device), (img * qt + teacher).to(device))


class LAPD(DistillMethod):
    """Local-Alignment Prediction Distillation; ``forward(ctx) -> {"cls", "l1", "giou"}``, unweighted
    (the paper's weights 1 / 5 / 2 are ``terms``, applied by the ``Distiller``).

    threshold: GQS hard-negative threshold (Table 6: 0.5 / 0.1 / 0.0); per_image: one hard-negative
    problem per image instead of per GT; kinds: pair kinds (Table 6), e.g. "positives+hard"
    (default), "positives", "hard", "easy", or a list; layers: "last" | "all"; pairing: "index" |
    "last" (for layers="all"); cost_weights: matching cost (class, L1, GIoU); class_kd: "bce" |
    "kl"; temperature: for "kl"; normalise: "pairs" | "gt"; layer_reduction: "sum" | "mean".
    ``student`` / ``teacher`` are accepted (and unused) so that ``build_methods`` can construct it as
    ``LAPD(student, teacher, **options)``.
    """

    terms = {"cls": 1.0, "l1": 5.0, "giou": 2.0}

    def __init__(self, student: object = None, teacher: object = None, *, threshold: float = 0.0,
                 per_image: bool = False, kinds: str | Sequence[str] = DEFAULT_KINDS,
                 layers: Literal["last", "all"] = "last", pairing: Literal["index", "last"] = "index",
                 cost_weights: Sequence[float] = (1.0, 5.0, 2.0), class_kd: ClassKD = "bce",
                 temperature: float = 1.0, normalise: Literal["pairs", "gt"] = "pairs",
                 layer_reduction: Literal["sum", "mean"] = "sum"):
        super().__init__()
        if len(cost_weights) != 3:
            raise ValueError("LAPD cost_weights is a (class, L1, GIoU) triple")
        self.threshold, self.per_image, self.kinds = float(threshold), bool(per_image), parse_kinds(kinds)
        self.layers, self.pairing = layers, pairing
        self.cost_weights = CostWeights(*(float(w) for w in cost_weights))
        self.class_kd, self.temperature = class_kd, float(temperature)
        self.normalise, self.layer_reduction = normalise, layer_reduction

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        pairs = layer_pairs(ctx.student_out.predictions.num_layers, ctx.teacher_out.predictions.num_layers,
                            self.layers, self.pairing)
        per_layer = [self.layer_loss(ctx, s, t) for s, t in pairs]
        scale = 1.0 / len(pairs) if self.layer_reduction == "mean" else 1.0
        return {k: scale * torch.stack([terms[k] for terms in per_layer]).sum() for k in self.terms}

    def layer_loss(self, ctx: DistillContext, student_layer: int, teacher_layer: int) -> dict[str, Tensor]:
        """Unweighted {"cls", "l1", "giou"} of one (student layer, teacher layer) pair."""
        s_logits, s_boxes = ctx.student_out.predictions.layer(student_layer)  # [B, Qs, Ks], [B, Qs, 4]
        t_logits, t_boxes = ctx.teacher_out.predictions.layer(teacher_layer)  # [B, Qt, Kt], [B, Qt, 4]
        heads = (ctx.student_out.class_head, ctx.teacher_out.class_head)
        align = local_alignment(ctx.selection("student", student_layer, self.threshold),
                                ctx.selection("teacher", teacher_layer, self.threshold), s_logits.detach(),
                                s_boxes.detach(), t_logits, t_boxes, heads, self.per_image, self.kinds,
                                self.cost_weights)
        normaliser = None if self.normalise == "pairs" else max(sum(len(t["boxes"]) for t in ctx.targets), 1)
        return pair_losses(gather_flat(s_logits, align.student), gather_flat(s_boxes, align.student),
                           gather_flat(t_logits, align.teacher), gather_flat(t_boxes, align.teacher), *heads,
                           self.class_kd, self.temperature, normaliser=normaliser)

    def extra_repr(self) -> str:
        return (f"threshold={self.threshold}, per_image={self.per_image}, kinds={'+'.join(self.kinds)}, "
                f"layers={self.layers}, pairing={self.pairing}, class_kd={self.class_kd}")
