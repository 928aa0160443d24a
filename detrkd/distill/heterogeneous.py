"""KD-DETR heterogeneous distillation (KD-DETR Sec. 4.2, Table 4): a DETR teacher into a torchvision
CNN student (``models.cnn``: Faster R-CNN, RetinaNet).

Distillation points are the student's own anchors (or Faster R-CNN's proposals): per GT box the
``k`` (10) candidates of highest IoU with it. Each point is one box seen by both models:

- the teacher decodes it as an extra query (box -> query: ``DetrAdapter.decode`` with the box as its
  reference, the family's default content for a box), over its own encoder memory of the same image;
- the student predicts at it with its own head: Faster R-CNN runs its RoI head on the box (the box
  regressed at the point's GT class, the class ``fastrcnn_loss`` trains for a RoI of that GT),
  RetinaNet reads its dense head at that anchor (class logits, box decoded from the anchor).

The student mimics the teacher's prediction at every point with KD-DETR's loss: KL on the classes,
L1 and GIoU on the boxes, the paper's weights 1 / 5 / 2 (``terms``), weighted per point by the
teacher's foreground probability (Eq. 5, ``rebalance``).

Geometry. Both models look at the same image content: detrkd feeds the student its batch unchanged
(``models.cnn.base``: torchvision's transform is made an identity) and the teacher its own view of
the same augmented image where its preprocessing differs (``transforms.Views``). A point is moved
between the two as normalised cxcywh of the un-padded image: the student's pixel box (clipped to
its image) divided by that image's (w, h); the student's predicted pixel boxes likewise. Teacher
and student therefore agree on every point whatever their input sizes or padding.

Class conversion (explicit). ``distill.losses`` compares real classes only and knows two heads:
sigmoid over C, and softmax over C + 1 with "no object" LAST. Faster R-CNN's softmax puts the
background FIRST (torchvision's column 0), so its logits are reordered to [1..C, 0] (background
last) by ``FasterRCNNStudent.predict_points``; RetinaNet is sigmoid over C like most DETR
teachers. Then, teacher sigmoid (RT-DETR, Deformable, DAB, ...) vs student softmax-with-background:
- ``class_kd: kl`` (default, the paper's): KL(softmax(t / T) || softmax(s / T)) over the C
  real-class logits, i.e. the teacher's sigmoid logits against the student's logits with the
  background column left out: which class the point is, not whether it is an object;
- ``class_kd: bce``: per class, BCE of the student's softmax probability p_s(c) (background kept
  in the normaliser, so a background point must put its mass on the background) against the
  teacher's sigmoid probability; whether and which, the background mass implied.
A softmax teacher (DETR) is compared on its C real-class logits / probabilities the same way.

Self-attention. Decoder queries attend to each other; a CNN predicts at each box alone. The points
are decoded with a diagonal self-attention mask (each point attends to itself only), so a point's
teacher prediction depends on its box and the image only (and padding slots change nothing).

Normalisation (``normalise``): "mean" (default) = every term the rebalance-weighted mean over the
batch's points (``distill.losses.pair_losses``: class KD summed over classes, L1 over the 4
coordinates); "official" = KD-DETR's official-code normalisation (class term summed over points /
C; ``losses.aligned_losses``). The default differs from homogeneous ``kd_detr``: on the digits
benchmark the summed class term outweighed the detection loss (``benchmarks/results/kd_detr.md``:
"official" -0.78 of the gap, "mean" +0.10).

Weights. ``forward`` returns ``{"cls", "l1", "giou"}`` unweighted; the ``Distiller`` applies the
per-term weights (``methods.kd_detr_hetero.terms``, default ``terms``: the paper's 1 / 5 / 2) and the
method's lambda (``weight``).

Not in the paper's text (its Appendix 7 is not in the provided copy): RPN objectness is not
distilled; which class's box a Faster R-CNN point uses (its GT class); the diagonal mask; the
default normalisation.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import Tensor
from torchvision.ops import clip_boxes_to_image

from ..box_ops import box_iou, xyxy_to_cxcywh
from ..models.base import Predictions
from ..models.cnn import is_cnn_detector
from ..models.cnn.base import CnnOutput, Points
from .base import DistillContext, DistillMethod
from .losses import Aligned, ClassKD, aligned_losses


# ---- points ----------------------------------------------------------------------------------------
def topk_points(candidates: list[Tensor], targets: list[dict[str, Tensor]], sizes: list[tuple[int, int]],
                k: int, label_offset: int = 0) -> Points:
    """The ``k`` candidates of highest IoU with each GT box, ordered by image (then GT, then IoU).

    candidates: B tensors [A_b, 4] absolute xyxy; targets: B torchvision targets (``boxes`` [G_b, 4]
    absolute xyxy, ``labels`` [G_b] the model's labels = class + ``label_offset``); sizes: B (h, w).
    Returns ``Points`` (P = sum_b G_b * min(k, A_b)) with the boxes clipped to their image. A
    candidate may be a point of two GTs (once for each).
    """
    parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
    for b, (cand, target, size) in enumerate(zip(candidates, targets, sizes)):
        gt = target["boxes"]
        if gt.numel() == 0 or cand.numel() == 0:
            continue
        top = box_iou(gt, cand).topk(min(k, cand.shape[0]), dim=1).indices  # [G, k]
        index = top.flatten()
        parts.append((torch.full_like(index, b), index, clip_boxes_to_image(cand[index], size),
                      (target["labels"] - label_offset).repeat_interleave(top.shape[1])))
    if not parts:
        device = candidates[0].device if candidates else None
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return Points(empty, empty, torch.zeros(0, 4, device=device), empty)
    return Points(*(torch.cat(p) for p in zip(*parts)))


def normalised_cxcywh(boxes: Tensor, image: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
    """[P, 4] absolute xyxy of image ``image[p]`` -> [P, 4] cxcywh normalised by that image's (w, h)."""
    hw = torch.tensor(sizes, dtype=boxes.dtype, device=boxes.device)[image]  # [P, 2] (h, w)
    return xyxy_to_cxcywh(boxes / hw.flip(-1).repeat(1, 2))


def query_layout(image: Tensor, batch: int) -> tuple[Tensor, int]:
    """(slot [P]: each point's position among its image's points, M: the most points of any image)
    for points ordered by image."""
    counts = torch.bincount(image, minlength=batch)
    starts = counts.cumsum(0) - counts
    return torch.arange(image.numel(), device=image.device) - starts[image], int(counts.max()) if batch else 0


def teacher_at_points(ctx: DistillContext, queries: Tensor, image: Tensor) -> tuple[Tensor, Tensor]:
    """The teacher's final-layer (logits [P, K], boxes [P, 4] cxcywh) at the points (no gradients).

    queries: [P, 4] normalised cxcywh, ordered by image; decoded as [B, M, 4] extra queries with a
    diagonal self-attention mask (module docstring), padding slots a centred box."""
    batch = ctx.teacher_out.memory.tokens.shape[0]
    slot, m = query_layout(image, batch)
    boxes = queries.new_full((batch, m, 4), 0.5)
    boxes[image, slot] = queries.clamp(1e-4, 1.0)  # w, h > 0: a clipped box may touch the border
    alone = ~torch.eye(m, dtype=torch.bool, device=queries.device)
    with torch.no_grad():
        preds: Predictions = ctx.teacher.decode(ctx.teacher_out, boxes, self_attn_mask=alone)
    return preds.logits[-1][image, slot].detach(), preds.boxes[-1][image, slot].detach()


# ---- the method ------------------------------------------------------------------------------------
class HeterogeneousKDDETR(DistillMethod):
    """KD-DETR into a CNN student; ``forward(ctx) -> {"cls", "l1", "giou"}`` (module docstring).

    k: points per GT (the paper's 10); points: "anchors" | "proposals" (Faster R-CNN's RPN output);
    rebalance: teacher foreground weight (Eq. 5); class_kd: "kl" | "bce"; temperature: of the KL;
    normalise: "mean" | "official". The terms are unweighted: the paper's 1 / 5 / 2 are ``terms``,
    applied by the ``Distiller``.
    """

    student_kinds: ClassVar[tuple[str, ...]] = ("cnn",)
    terms: ClassVar[dict[str, float]] = {"cls": 1.0, "l1": 5.0, "giou": 2.0}

    def __init__(self, student: Any = None, teacher: Any = None, *, k: int = 10,
                 points: Literal["anchors", "proposals"] = "anchors", rebalance: bool = True,
                 class_kd: ClassKD = "kl", temperature: float = 10.0,
                 normalise: Literal["mean", "official"] = "mean"):
        super().__init__()
        if int(k) < 1:
            raise ValueError(f"kd_detr_hetero k must be >= 1, got {k}")
        if points == "proposals" and student is not None and getattr(student, "family", None) != "faster_rcnn":
            raise ValueError(f"kd_detr_hetero points: proposals needs a faster_rcnn student "
                             f"(a {getattr(student, 'family', None)} student has anchors only)")
        self.k, self.points, self.rebalance = int(k), points, bool(rebalance)
        self.class_kd, self.temperature, self.normalise = class_kd, float(temperature), normalise

    def distillation_points(self, ctx: DistillContext) -> Points:
        """The batch's points (``topk_points`` of the student's candidates against the GT)."""
        out: CnnOutput = ctx.student_out
        return topk_points(ctx.student.candidates(out, self.points), out.targets, out.image_sizes, self.k,
                           ctx.student.label_offset)

    def aligned(self, ctx: DistillContext) -> Aligned | None:
        """Student (with gradients) and teacher predictions at the points, normalised cxcywh boxes;
        None when the batch has no GT box."""
        if not is_cnn_detector(ctx.student):
            raise ValueError(f"kd_detr_hetero distils into a torchvision CNN student, got a {ctx.student.family} "
                             f"student (use kd_detr)")
        points = self.distillation_points(ctx)
        if points.image.numel() == 0:
            return None
        sizes = ctx.student_out.image_sizes
        s_logits, s_boxes = ctx.student.predict_points(ctx.student_out, points)
        t_logits, t_boxes = teacher_at_points(ctx, normalised_cxcywh(points.boxes, points.image, sizes), points.image)
        return Aligned(s_logits, normalised_cxcywh(s_boxes, points.image, sizes), t_logits.to(s_logits.dtype),
                       t_boxes.to(s_logits.dtype))

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        """The unweighted {"cls", "l1", "giou"} (zeros with a graph when the batch has no GT)."""
        pairs = self.aligned(ctx)
        if pairs is None:
            zero = ctx.student_out.loss * 0.0
            return {name: zero for name in self.terms}
        heads = (ctx.student_out.class_head, ctx.teacher_out.class_head)
        return aligned_losses(pairs, heads, self.class_kd, self.temperature, self.rebalance, self.normalise)

    def extra_repr(self) -> str:
        return (f"k={self.k}, points={self.points}, rebalance={self.rebalance}, class_kd={self.class_kd}, "
                f"T={self.temperature}, normalise={self.normalise}")
