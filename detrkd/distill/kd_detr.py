"""KD-DETR: distillation through consistent distillation points (KD-DETR, Sec. 3-4, Eq. 1-6).

Distillation points are extra queries fed to BOTH decoders, each over its own encoder memory
(``DetrAdapter.decode``); the student mimics the teacher's predictions at the same points. The
student's detection (and denoising) queries are trained by the detection loss only: ``decode``
never includes denoising queries, so points and denoising never mix.

Points (``points``):
- "general" (Sec. 4.1): ``general`` random boxes per image, not learnable, re-sampled at every call
  from torch's global RNG (seed torch to fix them); image b gets its own draw, teacher and student
  the same boxes. ``sampling="uniform"`` (default, the paper's U(0, 1)): cx, cy ~ U(0, 1) and
  w, h ~ U(min_size, 1), independent; the box is then clipped to the image (xyxy clamped to
  [0, 1]) and converted back to cxcywh, so every box lies inside the image with
  min_size / 2 <= w, h <= 1 (a clipped box keeps at least half its width). ``"logit_normal"``: the
  official code's law, all four cxcywh coordinates sigmoid(N(0, 1)) (the code draws one set per
  batch; here per image); coordinates are in (0, 1) but a box may extend past the border.
- "specific": the teacher's own detection queries, as boxes: its reference boxes
  (``teacher_out.queries.reference_boxes``, detached). BOTH models decode these boxes with their
  default content and position for a box (``decode(boxes)``: zeros for DETR/DAB/Conditional/plain
  Deformable, the box embedding for two-stage Deformable, memory content at the box centre for
  RT-DETR/D-FINE), so they are given the same points by the same rule, which is what KD-DETR
  requires. The teacher's own detection outputs are NOT reused as targets (the official code,
  on DAB-DETR, does): a family's detection queries carry content the student cannot be given
  (RT-DETR / D-FINE: the memory at the top-k token, whose anchor is not the refined box; DETR,
  Conditional: learned query embeddings), so a student identical to its teacher would be pulled
  away from it. Where the default content IS the query's own (DAB, two-stage Deformable) the
  decode reproduces the detection outputs (tested). 2-d reference points (Conditional, plain
  Deformable: w = h = 0) get w = h = ``point_size``; a teacher without reference boxes (DETR)
  uses its first decoder layer's predicted boxes.
- "both" (default): the two groups, general first.

Efficiency: each model decodes all groups in ONE ``decode`` call (the teacher's under
``torch.no_grad``) whose ``self_attn_mask`` is block-diagonal, so groups never attend to each
other (each point attends to its own group only, in both models).

Table 1 baselines (no extra points, no decode; the same loss on detection-query pairs):
"inconsistent" (student query i <-> teacher query i, i < min(Qs, Qt)), "similar_foreground"
(teacher and student queries matched to the same GT by the detector's Hungarian matcher, in GT
order; ``ctx.selection``), "similar_general" (+ per image one background point: the mean logits
and mean box of each model's unmatched queries). The paper's Table 1 predates the foreground
weight: set ``rebalance: false`` to reproduce it.

Loss (Eq. 6) on P aligned (student, teacher) pairs, per group and per (student layer, teacher layer):
w_i = max_c p_t(c | i) (``rebalance``; the teacher's real-class probabilities at that layer,
softmax no-object excluded; w_i = 1 otherwise), class KD ``class_kd`` ("kl": KL(softmax(t / T) ||
softmax(s / T)) * T^2 over the real-class logits, T = ``temperature``; "bce"), L1 and 1 - GIoU on
boxes, weights (1, 5, 2). ``normalise="official"`` (default, the official code):
cls = 1 * sum_i w_i * cls_i / C (class-mean), l1 = 5 * sum_i w_i * mean_coord|b_s - b_t| / sum_i w_i,
giou = 2 * sum_i w_i * (1 - GIoU_i) / sum_i w_i; so the class term grows with B * M.
``normalise="mean"``: every term a weighted mean, sum_i w_i * x_i / sum_i w_i, with
``pair_losses``' conventions (class KD summed over classes, L1 summed over coordinates). Terms are
summed over groups and layer pairs. Layers: ``layers="all"`` + ``pairing="last"`` (default, the
official rule): every student layer vs the teacher's last; ``pairing="index"`` as in LAPD
(``layer_pairs``); ``layers="last"``: last vs last. T = 10 is the official code's value (the paper
does not state T).

"The official code": github.com/Myleswork/KD-DETR (self-described official, DAB-DETR), read for
``models/DAB_DETR/kd_loss.py`` (T = 10; KL over a softmax of the sigmoid logits, mean over the class
dimension, x T^2, weighted and summed over points; L1 mean over coordinates and GIoU, weighted and
divided by the sum of weights; each point group normalised on its own; every student layer vs the
teacher's last), ``kd_dab_detr.py`` (specific points = the teacher's anchors, compared with the
teacher's own detection outputs) and ``kd_engine.py`` (general points = a fresh
``nn.Embedding(M, 4).weight`` per step, i.e. N(0, 1) anchor logits shared by the batch).
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Sequence

import torch
from torch import Tensor
from torch.profiler import record_function

from ..box_ops import xyxy_to_cxcywh
from ..models.base import DetectorOutput, DetrAdapter, Predictions
from .base import DistillContext, DistillMethod
from .losses import Aligned, ClassKD, aligned_losses
from .pairing import Alignment, gather_flat, layer_pairs

PointKind = Literal["general", "specific", "both", "inconsistent", "similar_foreground", "similar_general"]
POINT_KINDS: tuple[str, ...] = ("general", "specific", "both")
BASELINES: tuple[str, ...] = ("inconsistent", "similar_foreground", "similar_general")


class PointGroup(NamedTuple):
    """One group of distillation points and both models' predictions at them.

    name: "general" | "specific"; boxes: [B, M, 4] the points (cxcywh, detached);
    student: Predictions [Ls, B, M, Ks] / [Ls, B, M, 4] (with gradients);
    teacher: Predictions [Lt, B, M, Kt] / [Lt, B, M, 4] (detached).
    """

    name: str
    boxes: Tensor
    student: Predictions
    teacher: Predictions


# ---- points ----------------------------------------------------------------------------------------


def sample_general_points(batch: int, num: int, sampling: str = "uniform", min_size: float = 0.05,
                          device: torch.device | str | None = None) -> Tensor:
    """``num`` random boxes per image, [B, M, 4] cxcywh, from torch's global RNG (module docstring: the laws)."""
    if sampling == "logit_normal":
        return torch.randn(batch, num, 4, device=device).sigmoid()
    if sampling != "uniform":
        raise ValueError(f"unknown sampling {sampling!r}; use 'uniform' or 'logit_normal'")
    u = torch.rand(batch, num, 4, device=device)
    centre, size = u[..., :2], min_size + (1.0 - min_size) * u[..., 2:]
    xyxy = torch.cat((centre - size / 2, centre + size / 2), dim=-1).clamp(0.0, 1.0)
    return xyxy_to_cxcywh(xyxy)


def specific_points(teacher_out: DetectorOutput, point_size: float = 0.05) -> Tensor:
    """The teacher's detection queries as boxes: [B, Qt, 4] cxcywh, detached.

    Reference boxes with w or h = 0 (2-d reference points) get ``point_size`` there; without
    reference boxes (DETR) the teacher's first-layer predicted boxes are used.
    """
    ref = teacher_out.queries.reference_boxes
    if ref is None:
        return teacher_out.predictions.boxes[0].detach()
    ref = ref.detach()
    wh = ref[..., 2:]
    return torch.cat((ref[..., :2], torch.where(wh > 0, wh, torch.full_like(wh, point_size))), dim=-1)


def group_mask(sizes: Sequence[int], device: torch.device | str | None = None) -> Tensor | None:
    """[M, M] bool self-attention mask, True = blocked, that keeps consecutive groups apart
    (block-diagonal, M = sum(sizes)); None for a single group."""
    if len(sizes) < 2:
        return None
    ids = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    return ids[:, None] != ids[None, :]


def decode_groups(model: DetrAdapter, out: DetectorOutput, groups: Sequence[Tensor]) -> list[Predictions]:
    """Decode groups of boxes ([B, M_g, 4] each) in ONE ``decode`` call with the group mask;
    returns each group's Predictions ([L, B, M_g, .])."""
    sizes = [g.shape[1] for g in groups]
    with record_function("detrkd::decode"):
        preds = model.decode(out, torch.cat(list(groups), dim=1), self_attn_mask=group_mask(sizes, groups[0].device))
    ends = torch.tensor(sizes).cumsum(0).tolist()
    return [preds.select(slice(end - size, end)) for size, end in zip(sizes, ends)]


def _detached(p: Predictions) -> Predictions:
    return Predictions(p.logits.detach(), p.boxes.detach())


# ---- Table 1 pairs ---------------------------------------------------------------------------------


def inconsistent_pairs(batch: int, num_student: int, num_teacher: int,
                       device: torch.device | str | None = None) -> Alignment:
    """Query i <-> query i for i < min(Qs, Qt) in every image, as flat (b * Q + q) indices [P]."""
    q = torch.arange(min(num_teacher, num_student), device=device)
    b = torch.arange(batch, device=device)[:, None]
    return Alignment((b * num_student + q).flatten(), (b * num_teacher + q).flatten())


def foreground_pairs(student_positive: Tensor, teacher_positive: Tensor, num_student: int,
                     num_teacher: int) -> Alignment:
    """GT-matched queries paired through their GT, ordered by (image, GT).

    student_positive, teacher_positive: [B, T] long, the query matched to each GT, -1 if none
    (``QuerySelection.positive_index``) -> flat (b * Q + q) indices [P].
    """
    both = (teacher_positive >= 0) & (student_positive >= 0)
    img, gt = both.nonzero(as_tuple=True)
    return Alignment(img * num_student + student_positive[img, gt], img * num_teacher + teacher_positive[img, gt])


def unmatched_mean(x: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
    """Per image mean of the unmatched queries: x [B, Q, D], positive [B, Q] bool ->
    (mean [B, D], valid [B] bool: the image has an unmatched query)."""
    keep = (~positive).to(x.dtype)[..., None]
    count = keep.sum(1)
    return (x * keep).sum(1) / count.clamp(min=1), count[:, 0] > 0


# ---- loss ------------------------------------------------------------------------------------------


class KDDETR(DistillMethod):
    """KD-DETR; ``forward(ctx) -> {"cls", "l1", "giou"}`` (module docstring: the rules).

    points: "general" | "specific" | "both" (KD-DETR) or a Table 1 baseline ("inconsistent",
    "similar_foreground", "similar_general"); general: number of general points per image
    (300: the paper's DAB/Deformable value, Table 7 saturates there); sampling: "uniform" |
    "logit_normal"; min_size: smallest w, h of a uniform point; point_size: w, h given to 2-d
    reference points; rebalance: foreground weight (Eq. 5); class_kd: "kl" | "bce"; temperature;
    normalise: "official" | "mean"; layers: "all" | "last"; pairing: "last" | "index" (for
    layers="all"). The terms are unweighted: the paper's class / L1 / GIoU weights 1 / 5 / 2 are
    ``terms``, applied by the ``Distiller``. ``student`` / ``teacher`` are accepted (and unused) so
    that ``build_methods`` can construct it as ``KDDETR(student, teacher, **options)``.
    """

    terms = {"cls": 1.0, "l1": 5.0, "giou": 2.0}

    def __init__(self, student: object = None, teacher: object = None, *, points: PointKind = "both",
                 general: int = 300, sampling: Literal["uniform", "logit_normal"] = "uniform",
                 min_size: float = 0.05, point_size: float = 0.05, rebalance: bool = True,
                 class_kd: ClassKD = "kl", temperature: float = 10.0,
                 normalise: Literal["official", "mean"] = "official", layers: Literal["all", "last"] = "all",
                 pairing: Literal["last", "index"] = "last"):
        super().__init__()
        if points in ("general", "both") and int(general) < 1:
            raise ValueError(f"KD-DETR points={points!r} needs general >= 1, got {general}")
        if not 0.0 < min_size <= 1.0 or not 0.0 < point_size <= 1.0:
            raise ValueError("min_size and point_size must be in (0, 1]")
        self.points, self.general, self.sampling = points, int(general), sampling
        self.min_size, self.point_size, self.rebalance = float(min_size), float(point_size), bool(rebalance)
        self.class_kd, self.temperature = class_kd, float(temperature)
        self.normalise, self.layers, self.pairing = normalise, layers, pairing

    # ---- points ------------------------------------------------------------------------------
    def point_groups(self, ctx: DistillContext) -> list[PointGroup]:
        """Sample the points and decode them: one teacher call (no_grad), one student call, both
        with the same boxes, group mask and default-content rule."""
        boxes = []
        if self.points in ("general", "both"):
            tokens = ctx.student_out.memory.tokens
            boxes.append(sample_general_points(tokens.shape[0], self.general, self.sampling, self.min_size,
                                               tokens.device).to(tokens.dtype))
        if self.points in ("specific", "both"):
            boxes.append(specific_points(ctx.teacher_out, self.point_size))
        with torch.no_grad():
            teacher = [_detached(p) for p in decode_groups(ctx.teacher, ctx.teacher_out, boxes)]
        student = decode_groups(ctx.student, ctx.student_out, boxes)
        names = ("general", "specific") if self.points == "both" else (self.points,)
        return [PointGroup(*g) for g in zip(names, boxes, student, teacher)]

    # ---- Table 1 baselines --------------------------------------------------------------------
    def baseline_pairs(self, ctx: DistillContext, student_layer: int, teacher_layer: int) -> Aligned:
        """The Table 1 pairs of one (student layer, teacher layer) among the detection queries."""
        s_logits, s_boxes = ctx.student_out.predictions.layer(student_layer)  # [B, Qs, Ks], [B, Qs, 4]
        t_logits, t_boxes = (x.detach() for x in ctx.teacher_out.predictions.layer(teacher_layer))
        (b, qs), qt = s_logits.shape[:2], t_logits.shape[1]
        if self.points == "inconsistent":
            align = inconsistent_pairs(b, qs, qt, s_logits.device)
            return Aligned(gather_flat(s_logits, align.student), gather_flat(s_boxes, align.student),
                           gather_flat(t_logits, align.teacher), gather_flat(t_boxes, align.teacher))
        t_sel, s_sel = ctx.selection("teacher", teacher_layer), ctx.selection("student", student_layer)
        align = foreground_pairs(s_sel.positive_index.to(s_logits.device),
                                 t_sel.positive_index.to(s_logits.device), qs, qt)
        parts = [[gather_flat(s_logits, align.student)], [gather_flat(s_boxes, align.student)],
                 [gather_flat(t_logits, align.teacher)], [gather_flat(t_boxes, align.teacher)]]
        if self.points == "similar_general":
            means = [unmatched_mean(x, sel.positive.to(x.device))
                     for x, sel in ((s_logits, s_sel), (s_boxes, s_sel), (t_logits, t_sel), (t_boxes, t_sel))]
            valid = means[0][1] & means[2][1]
            for part, (mean, _) in zip(parts, means):
                part.append(mean[valid])
        return Aligned(*(torch.cat(p) for p in parts))

    # ---- loss --------------------------------------------------------------------------------
    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        heads = (ctx.student_out.class_head, ctx.teacher_out.class_head)
        pairs = layer_pairs(ctx.student_out.predictions.num_layers, ctx.teacher_out.predictions.num_layers,
                            self.layers, self.pairing)
        if self.points in BASELINES:
            aligned = [self.baseline_pairs(ctx, s, t) for s, t in pairs]
        else:
            aligned = [Aligned(g.student.logits[s].flatten(0, 1), g.student.boxes[s].flatten(0, 1),
                               g.teacher.logits[t].flatten(0, 1), g.teacher.boxes[t].flatten(0, 1))
                       for g in self.point_groups(ctx) for s, t in pairs]
        terms = [aligned_losses(a, heads, self.class_kd, self.temperature, self.rebalance, self.normalise)
                 for a in aligned]
        return {k: torch.stack([t[k] for t in terms]).sum() for k in self.terms}

    def extra_repr(self) -> str:
        return (f"points={self.points}, general={self.general}, sampling={self.sampling}, "
                f"rebalance={self.rebalance}, class_kd={self.class_kd}, T={self.temperature}, "
                f"normalise={self.normalise}, layers={self.layers}, pairing={self.pairing}")
