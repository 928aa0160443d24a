"""Hungarian matching: assignment solvers, DETR-style matching costs, the batched GT matcher.

- ``linear_assignment(cost [N, M])``: minimum-cost assignment, picking the fastest solver for the
  shape (scipy for tall/wide/small matrices, the optional ``lapjv`` package for large (near-)square
  ones, e.g. teacher-vs-student matching).
- ``pairwise_cost(...)``: class + L1 + GIoU matching cost as ONE broadcast tensor op, either
  predictions vs ground truth (labels) or predictions vs predictions (logits).
- ``hungarian_match(logits [B, Q, K], boxes [B, Q, 4], targets, class_head)``: the matcher of the
  detector's own loss (HF / DETR ``HungarianMatcher`` semantics): one cost tensor for the batch,
  split per image, solved on CPU; ``matcher_costs(config)`` gives a model's own cost weights.

Boxes are normalised cxcywh. Class heads: ``"softmax"`` (K = C + 1, last logit = no-object) or
``"sigmoid"`` (K = C).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal, NamedTuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torch.profiler import record_function

from detrkd.box_ops import _EPS, box_area, cxcywh_to_xyxy, generalized_box_iou
from detrkd.models.base import ClassHead


def _import_lapjv() -> Any:
    try:
        from lapjv import lapjv  # optional extra "fast-lap"
    except ImportError:
        return None
    return lapjv


# the lapjv solver function, or None when the package is missing (tests monkeypatch this)
_lapjv = _import_lapjv()

# lapjv is used for matrices with max(N, M) >= LAPJV_MIN_SIZE and min/max >= LAPJV_MIN_RATIO.
# Measured on 2 cores: square 64x64 lapjv 0.01 ms vs scipy 0.09 ms, 300x300 0.3 vs 3 ms, 900x900
# 7-17 vs 50 ms; but zero-padding a 300x240 matrix makes lapjv 3x SLOWER than scipy (300x290 is
# still faster), and tall matrices (300x8) are 10-40x faster in scipy.
LAPJV_MIN_SIZE = 64
LAPJV_MIN_RATIO = 0.95

Solver = Literal["auto", "scipy", "lapjv"]


class CostWeights(NamedTuple):
    """Matching cost weights (DETR / Deformable DETR defaults: class 1, L1 5, GIoU 2)."""

    cls: float = 1.0
    l1: float = 5.0
    giou: float = 2.0


class MatcherCosts(NamedTuple):
    """Everything a DETR Hungarian matcher's cost depends on: weights (class, L1, GIoU), whether a
    sigmoid head's class cost is the focal one, and its alpha / gamma."""

    weights: CostWeights = CostWeights()
    focal: bool = True
    alpha: float = 0.25
    gamma: float = 2.0


def matcher_costs(config: Any) -> MatcherCosts:
    """The matcher costs of a model, read from its HF config as transformers' own loss builds its
    matcher: RT-DETR / RT-DETRv2 / D-FINE (``RTDetrHungarianMatcher``): ``matcher_{class,bbox,giou}_cost``,
    focal iff ``use_focal_loss``, ``matcher_alpha`` / ``matcher_gamma``; DETR (``HungarianMatcher``)
    and Deformable / Conditional / DAB-DETR (``DeformableDetrHungarianMatcher``, alpha 0.25 and gamma
    2 fixed there): ``{class,bbox,giou}_cost``, focal for their sigmoid heads (DETR's softmax head
    ignores ``focal``). transformers' defaults: class 2 / L1 5 / GIoU 2 for RT-DETR, D-FINE,
    Conditional and DAB; 1 / 5 / 2 for DETR and Deformable DETR."""
    if hasattr(config, "matcher_class_cost"):
        weights = CostWeights(config.matcher_class_cost, config.matcher_bbox_cost, config.matcher_giou_cost)
        return MatcherCosts(weights, bool(getattr(config, "use_focal_loss", True)),
                            float(config.matcher_alpha), float(config.matcher_gamma))
    if hasattr(config, "class_cost"):
        return MatcherCosts(CostWeights(config.class_cost, config.bbox_cost, config.giou_cost))
    raise ValueError(f"{type(config).__name__} has no matcher costs (no matcher_class_cost / class_cost)")


# ---- solvers ---------------------------------------------------------------------------------------


def linear_assignment(cost: np.ndarray | Tensor, solver: Solver = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Minimum-cost assignment of a rectangular matrix, as scipy's ``linear_sum_assignment``.

    cost: [N, M] (numpy or torch, any float dtype). Returns ``(rows, cols)``, int64 arrays of
    length min(N, M), rows ascending; the total ``cost[rows, cols].sum()`` equals scipy's optimum
    (ties may pick other pairs). N == 0 or M == 0 gives two empty arrays.

    solver: ``"auto"`` picks by shape (see ``LAPJV_MIN_SIZE`` / ``LAPJV_MIN_RATIO``); ``"lapjv"``
    uses lapjv for any shape (a rectangular matrix is padded to square with zeros: every full
    assignment of the padded matrix uses the same number of padding cells, so the constant does
    not change the optimum); ``"scipy"`` always scipy. Without the lapjv package every choice
    falls back to scipy. lapjv solves float32 matrices in float32 and float64 ones in float64.

    Non-finite costs (NaN, +inf, -inf) are NOT an error: they are replaced by one finite value
    larger than the total cost of any assignment of finite entries, so they are assigned only
    when no assignment avoids them (HF's matchers do the same with ``finfo.max``), and a
    ``RuntimeWarning`` is emitted (Python's default filter shows it once per call site).
    """
    if isinstance(cost, Tensor):
        low_precision = cost.dtype in (torch.float32, torch.float16, torch.bfloat16)
        cost = cost.detach().to("cpu", torch.float32 if low_precision else torch.float64).numpy()
    cost = np.asarray(cost)
    if cost.ndim != 2:
        raise ValueError(f"cost must be a 2-d matrix, got shape {cost.shape}")
    if cost.dtype not in (np.float32, np.float64):
        cost = cost.astype(np.float64)
    n, m = cost.shape
    if n == 0 or m == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy()
    cost = _finite(cost)
    with record_function("detrkd::solve"):  # a profiler range (free when not profiling)
        if _use_lapjv(n, m, solver):
            return _solve_lapjv(cost)
        rows, cols = linear_sum_assignment(cost)
    return rows.astype(np.int64), cols.astype(np.int64)


def _use_lapjv(n: int, m: int, solver: Solver) -> bool:
    if _lapjv is None or solver == "scipy":
        return False
    if solver == "lapjv":
        return True
    return max(n, m) >= LAPJV_MIN_SIZE and min(n, m) >= LAPJV_MIN_RATIO * max(n, m)


def _solve_lapjv(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """lapjv on the zero-padded square matrix; [N, M] -> (rows, cols) like scipy."""
    n, m = cost.shape
    size = max(n, m)
    if n != m:
        square = np.zeros((size, size), dtype=cost.dtype)
        square[:n, :m] = cost
        cost = square
    col_of_row = _lapjv(np.ascontiguousarray(cost), force_doubles=cost.dtype == np.float64)[0]
    rows = np.arange(n, dtype=np.int64)
    cols = col_of_row[:n].astype(np.int64)
    keep = cols < m
    return rows[keep], cols[keep]


def _finite(cost: np.ndarray) -> np.ndarray:
    """Replace non-finite entries by a value no finite assignment can beat (warns)."""
    bad = ~np.isfinite(cost)
    if not bad.any():
        return cost
    warnings.warn(
        "linear_assignment: cost matrix has non-finite entries (NaN/inf); they are treated as the "
        "largest cost and assigned only if unavoidable",
        RuntimeWarning,
        stacklevel=3,
    )
    finite = cost[~bad]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    big = hi + min(cost.shape) * (hi - lo) + 1.0
    return np.where(bad, np.asarray(big, dtype=cost.dtype), cost)


# ---- costs -----------------------------------------------------------------------------------------


def head_probabilities(logits: Tensor, class_head: ClassHead) -> Tensor:
    """[..., K] logits -> [..., K] probabilities of every output of the head: softmax INCLUDING the
    no-object column, or per-class sigmoid (``distill.losses.class_probabilities`` drops no-object)."""
    if class_head == "softmax":
        return logits.softmax(-1)
    if class_head == "sigmoid":
        return logits.sigmoid()
    raise ValueError(f"class_head must be 'softmax' or 'sigmoid', got {class_head!r}")


def pairwise_cost(
    logits_a: Tensor,
    boxes_a: Tensor,
    classes_b: Tensor,
    boxes_b: Tensor,
    class_head: ClassHead,
    weights: CostWeights | tuple[float, float, float] = CostWeights(),
    focal: bool = True,
    soft_class: Literal["l1", "dot"] = "l1",
    alpha: float = 0.25,
    gamma: float = 2.0,
    out: Tensor | None = None,
) -> Tensor:
    """DETR matching cost between every a and every b, one broadcast op over leading dims.

    logits_a:  [..., N, K] raw class logits of predictions a
    boxes_a:   [..., N, 4] normalised cxcywh
    classes_b: either integer labels [..., M] (b = ground truth) or float logits [..., M, K]
               (b = other predictions, e.g. the student's for teacher-vs-student matching)
    boxes_b:   [..., M, 4] normalised cxcywh
    returns    [..., N, M] = w.cls * class + w.l1 * L1(boxes) - w.giou * GIoU(boxes)

    Class cost against labels (p = probabilities of a, gathered at b's label):
      softmax head: -p (HF/DETR ``HungarianMatcher``; ``focal`` is ignored);
      sigmoid head, focal: alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))
      (Deformable DETR's matcher, alpha 0.25, gamma 2); sigmoid, not focal: -p.
    Class cost against logits (probability vectors p_a, p_b from the same head type; softmax
    vectors include the no-object entry):
      soft_class "l1":  sum_k |p_a,k - p_b,k|   (0 when the class distributions agree)
      soft_class "dot": -sum_k p_a,k * p_b,k    (-prob that both pick the same class)

    out: an optional float32 [..., N, M] tensor to write the cost into (returned), without
    autograd: the box terms are then computed in place in a few reused buffers, ~3x faster for
    large matrices (900 x 900: 20 vs 60 ms on one thread; fresh [N, M] allocations dominate).
    """
    w = CostWeights(*weights)
    prob_a = head_probabilities(logits_a, class_head)
    if classes_b.is_floating_point():
        cls = _soft_class_cost(prob_a, head_probabilities(classes_b, class_head), soft_class)
    else:
        cls = _label_class_cost(prob_a, classes_b, class_head, focal, alpha, gamma)
    if out is not None:
        with torch.no_grad():
            torch.mul(cls, w.cls, out=out)
            return _add_box_cost_(out, boxes_a, boxes_b, w.l1, w.giou)
    l1 = torch.cdist(boxes_a, boxes_b, p=1)
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes_a), cxcywh_to_xyxy(boxes_b))
    return w.cls * cls + w.l1 * l1 - w.giou * giou


def _add_box_cost_(out: Tensor, boxes_a: Tensor, boxes_b: Tensor, w_l1: float, w_giou: float) -> Tensor:
    """out [..., N, M] += w_l1 * L1(a, b) - w_giou * GIoU(a, b), boxes [..., N, 4] / [..., M, 4]
    cxcywh; in place (three scratch planes), the same formulas as ``box_ops.generalized_box_iou``
    with GIoU = IoU - 1 + union / hull."""
    out.add_(torch.cdist(boxes_a, boxes_b, p=1), alpha=w_l1)
    a, b = cxcywh_to_xyxy(boxes_a.to(out.dtype)), cxcywh_to_xyxy(boxes_b.to(out.dtype))
    ax0, ay0, ax1, ay1 = (x[..., :, None] for x in a.unbind(-1))
    bx0, by0, bx1, by1 = (x[..., None, :] for x in b.unbind(-1))
    s1, s2, s3 = (torch.empty_like(out) for _ in range(3))
    torch.minimum(ax1, bx1, out=s1).sub_(torch.maximum(ax0, bx0, out=s2)).clamp_(min=0)
    torch.minimum(ay1, by1, out=s2).sub_(torch.maximum(ay0, by0, out=s3)).clamp_(min=0)
    inter = s1.mul_(s2)
    union = torch.add(box_area(a)[..., :, None], box_area(b)[..., None, :], out=s2).sub_(inter)
    out.sub_(inter.div_(torch.clamp(union, min=_EPS, out=s3)), alpha=w_giou)  # - w * IoU; s1 free
    torch.maximum(ax1, bx1, out=s1).sub_(torch.minimum(ax0, bx0, out=s3)).clamp_(min=0)
    hull_h = torch.maximum(ay1, by1, out=s3).sub_(torch.minimum(ay0, by0)).clamp_(min=0)
    hull = s1.mul_(hull_h).clamp_(min=_EPS)
    return out.sub_(union.div_(hull), alpha=w_giou).add_(w_giou)  # - w * (union / hull - 1)


def _label_class_cost(
    prob: Tensor, labels: Tensor, class_head: ClassHead, focal: bool, alpha: float, gamma: float
) -> Tensor:
    """prob [..., N, K], labels [..., M] -> [..., N, M] class cost of each prediction for each label."""
    n, m = prob.shape[-2], labels.shape[-1]
    batch = torch.broadcast_shapes(prob.shape[:-2], labels.shape[:-1])
    index = labels[..., None, :].expand(*batch, n, m)
    p = prob.expand(*batch, *prob.shape[-2:]).gather(-1, index)
    if class_head == "softmax" or not focal:
        return -p
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
    return pos - neg


def _soft_class_cost(prob_a: Tensor, prob_b: Tensor, kind: str) -> Tensor:
    """[..., N, K] x [..., M, K] -> [..., N, M]."""
    if kind == "l1":
        return torch.cdist(prob_a, prob_b, p=1)
    if kind == "dot":
        return -(prob_a @ prob_b.transpose(-1, -2))
    raise ValueError(f"soft_class must be 'l1' or 'dot', got {kind!r}")


# ---- the batched matcher ---------------------------------------------------------------------------


def pad_targets(
    targets: list[dict[str, Tensor]], device: torch.device | str | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """HF-style targets -> padded (labels [B, T] long, boxes [B, T, 4], valid [B, T] bool).

    T = the largest GT count in the batch (may be 0); padding has label 0 and an all-zero box.
    """
    sizes = [len(t["class_labels"]) for t in targets]
    b, t = len(targets), max(sizes, default=0)
    labels = torch.zeros(b, t, dtype=torch.long, device=device)
    boxes = torch.zeros(b, t, 4, device=device)
    valid = torch.zeros(b, t, dtype=torch.bool, device=device)
    for i, (target, n) in enumerate(zip(targets, sizes)):
        labels[i, :n] = target["class_labels"]
        boxes[i, :n] = target["boxes"].to(boxes.dtype)
        valid[i, :n] = True
    return labels, boxes, valid


@torch.no_grad()
def hungarian_match(
    logits: Tensor,
    boxes: Tensor,
    targets: list[dict[str, Tensor]],
    class_head: ClassHead,
    weights: CostWeights | tuple[float, float, float] = CostWeights(),
    focal: bool = True,
    solver: Solver = "auto",
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> list[tuple[Tensor, Tensor]]:
    """Match predictions to ground truth, per image, like HF/DETR ``HungarianMatcher``.

    logits: [B, Q, K]; boxes: [B, Q, 4] normalised cxcywh;
    targets: B dicts with ``class_labels`` [n_b] long and ``boxes`` [n_b, 4] normalised cxcywh.
    weights / focal / alpha / gamma: the cost (``pairwise_cost``); a model's own are
    ``matcher_costs(model.config)``.
    Returns B pairs ``(pred_idx, gt_idx)``, CPU int64 tensors of length min(Q, n_b), pred_idx
    ascending. The cost is ONE [B, Q, T] tensor (targets padded to T = max n_b, rather than DETR's
    [B*Q, sum n_b] which computes every cross-image pair) copied to the CPU once; each image's
    [Q, n_b] block is then solved with ``linear_assignment``.
    """
    sizes = [len(t["class_labels"]) for t in targets]
    if len(sizes) != logits.shape[0]:
        raise ValueError(f"{len(sizes)} targets for a batch of {logits.shape[0]}")
    labels, gt_boxes, _ = pad_targets(targets, logits.device)
    cost = pairwise_cost(logits.float(), boxes.float(), labels, gt_boxes, class_head, weights, focal,
                         alpha=alpha, gamma=gamma)
    cost = cost.cpu().numpy()
    matches = []
    for i, n in enumerate(sizes):
        rows, cols = linear_assignment(cost[i, :, :n], solver)
        matches.append((torch.from_numpy(rows), torch.from_numpy(cols)))
    return matches
