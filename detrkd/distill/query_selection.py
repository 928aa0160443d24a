"""Group Query Selection (GQS), QSKD Sec. 3.2, and the queries-per-GT statistic of its Table 1.

Per image, with predictions matched to ground truth by the detector's Hungarian matcher (its own
cost weights, ``matcher_costs(model.config)``):
- positives: the matched predictions; each is in the group of its matched GT, and its GIoU
  metric G is its GIoU with that GT (not necessarily its highest GIoU);
- every unmatched prediction gets G = its highest GIoU over the image's GTs and joins the group of
  that GT (ties: the lowest GT index);
- hard negatives: unmatched predictions with G > threshold (strictly "higher than the threshold",
  as the paper says; with threshold -inf every unmatched prediction of an image with GT);
- easy negatives: all the others.
Images without GT have no positives and no groups: every prediction is an easy negative with
group -1 and G = -1 (the lowest possible GIoU) by convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from detrkd.box_ops import cxcywh_to_xyxy, generalized_box_iou
from detrkd.matching import MatcherCosts, hungarian_match, pad_targets
from detrkd.models.base import ClassHead

Kind = Literal["positive", "hard_negative", "easy_negative", "selected", "all"]

TABLE1_THRESHOLDS: tuple[float, ...] = (0.75, 0.5, 0.3, 0.1, 0.0, -math.inf)


@dataclass
class QuerySelection:
    """GQS result for a batch, as flat tensors (B images, Q queries, T = max GT count).

    group:          [B, Q] long, the GT index (within the image) of each query's group, -1 if none
    giou:           [B, Q] float, the GIoU metric G_i (-1 for images without GT)
    positive:       [B, Q] bool, matched to a GT by the Hungarian matcher
    hard_negative:  [B, Q] bool, unmatched with G_i > threshold (and the image has GT)
    easy_negative:  [B, Q] bool, the rest; the three masks partition every image's queries
    positive_index: [B, T] long, the query matched to each GT, -1 if none (padding, or Q < n_b)
    num_gt:         [B] long, GT count per image (columns >= num_gt[b] of positive_index are padding)
    threshold:      the hard-negative threshold used
    """

    group: Tensor
    giou: Tensor
    positive: Tensor
    hard_negative: Tensor
    easy_negative: Tensor
    positive_index: Tensor
    num_gt: Tensor
    threshold: float

    @property
    def selected(self) -> Tensor:
        """[B, Q] bool, positives | hard negatives (the paper's I~)."""
        return self.positive | self.hard_negative

    def mask(self, kind: Kind) -> Tensor:
        """[B, Q] bool mask of one kind; "all" = every query that belongs to a group."""
        if kind == "all":
            return self.group >= 0
        if kind not in ("positive", "hard_negative", "easy_negative", "selected"):
            raise ValueError(f"unknown kind {kind!r}")
        return getattr(self, kind)

    def selected_indices(self, kind: Kind = "selected") -> list[Tensor]:
        """Per image, the ascending query indices of one kind (default positives + hard negatives)."""
        mask = self.mask(kind)
        return list(mask.nonzero()[:, 1].split(mask.sum(1).tolist()))

    def group_indices(self, kind: Kind = "hard_negative") -> list[list[Tensor]]:
        """Per image, per GT (num_gt[b] entries), the ascending query indices of one kind in that
        GT's group; e.g. ``group_indices()[b][g]`` = the hard negatives of GT g in image b."""
        b, t = self.positive_index.shape
        if t == 0:
            return [[] for _ in range(b)]
        mask = self.mask(kind) & (self.group >= 0)
        img, query = mask.nonzero().unbind(1)  # sorted by image, then query
        key = img * t + self.group[img, query]
        key, order = key.sort(stable=True)  # stable: queries stay ascending within a group
        counts = torch.bincount(key, minlength=b * t).tolist()
        chunks = query[order].split(counts)
        return [list(chunks[i * t : i * t + n]) for i, n in enumerate(self.num_gt.tolist())]


@torch.no_grad()
def group_query_selection(
    logits: Tensor,
    boxes: Tensor,
    targets: list[dict[str, Tensor]],
    class_head: ClassHead,
    threshold: float = 0.0,
    costs: MatcherCosts = MatcherCosts(),
    matches: list[tuple[Tensor, Tensor]] | None = None,
) -> QuerySelection:
    """GQS for a batch in one call (module docstring: the rules).

    logits: [B, Q, K]; boxes: [B, Q, 4] normalised cxcywh; targets: B dicts (class_labels [n_b],
    boxes [n_b, 4]). costs: the matcher's cost; positives are the detector's own Hungarian
    matches only with the detector's own costs, ``matcher_costs(model.config)`` (the default is
    DETR's 1 / 5 / 2 with a focal class cost). ``matches``: per-image (pred_idx, gt_idx) if already
    computed (e.g. by the detection loss), else ``hungarian_match`` with ``costs``.
    """
    if matches is None:
        matches = hungarian_match(logits, boxes, targets, class_head, costs.weights, costs.focal,
                                  alpha=costs.alpha, gamma=costs.gamma)
    device = boxes.device
    _, gt_boxes, valid = pad_targets(targets, device)
    giou_all = generalized_box_iou(cxcywh_to_xyxy(boxes.float()), cxcywh_to_xyxy(gt_boxes))  # [B, Q, T]
    giou, group = _best_gt(giou_all, valid)

    img, query, gt = _flat_matches(matches, device)
    positive = torch.zeros_like(group, dtype=torch.bool)
    positive[img, query] = True
    group[img, query] = gt
    giou[img, query] = giou_all[img, query, gt]
    positive_index = torch.full(valid.shape, -1, dtype=torch.long, device=device)
    positive_index[img, gt] = query

    hard = ~positive & (group >= 0) & (giou > threshold)
    return QuerySelection(
        group=group,
        giou=giou,
        positive=positive,
        hard_negative=hard,
        easy_negative=~(positive | hard),
        positive_index=positive_index,
        num_gt=valid.sum(1),
        threshold=float(threshold),
    )


def _best_gt(giou_all: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """[B, Q, T] GIoU, [B, T] valid -> (max GIoU [B, Q], argmax GT [B, Q]); -1 / -1 without GT."""
    b, q, t = giou_all.shape
    has_gt = valid.any(1)[:, None]  # [B, 1]
    if t == 0:
        return giou_all.new_full((b, q), -1.0), torch.full((b, q), -1, dtype=torch.long, device=valid.device)
    best, arg = giou_all.masked_fill(~valid[:, None, :], -math.inf).max(-1)
    return torch.where(has_gt, best, -1.0), torch.where(has_gt, arg, -1)


def _flat_matches(matches: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (pred_idx, gt_idx) -> flat (image [P], query [P], gt [P]) long tensors."""
    img = torch.cat([torch.full((len(p),), i, dtype=torch.long) for i, (p, _) in enumerate(matches)])
    query = torch.cat([p.long().cpu() for p, _ in matches])
    gt = torch.cat([g.long().cpu() for _, g in matches])
    return img.to(device), query.to(device), gt.to(device)


# ---- Table 1 statistic ---------------------------------------------------------------------------


def count_queries_per_gt(
    selection: QuerySelection, thresholds: Sequence[float] = TABLE1_THRESHOLDS
) -> tuple[Tensor, int]:
    """(counts [len(thresholds)] long, total GT count) to accumulate over batches.

    counts[j] = number of queries, summed over all GTs of the batch, that are in a GT's group
    with G >= thresholds[j] (Table 1 uses ">="). The positive counts too, with its own GIoU:
    Table 1 at -inf (41 queries per GT for 300 queries and ~7.3 objects per COCO image) is the
    full group size, which only adds up to Q per image if positives are included.
    """
    member = selection.group >= 0
    g = selection.giou[member]  # [P]
    thr = torch.tensor(list(thresholds), dtype=g.dtype, device=g.device)
    counts = (g[None, :] >= thr[:, None]).sum(1)
    return counts, int(selection.num_gt.sum())


def queries_per_gt(
    selection: QuerySelection, thresholds: Sequence[float] = TABLE1_THRESHOLDS
) -> dict[float, float]:
    """Mean number of queries per GT with G >= each threshold (QSKD Table 1; see
    ``count_queries_per_gt``). The mean is over GTs (total count / total GTs), not over images;
    NaN where the batch has no GT."""
    counts, num_gt = count_queries_per_gt(selection, thresholds)
    return {float(t): (c / num_gt if num_gt else math.nan) for t, c in zip(thresholds, counts.tolist())}
