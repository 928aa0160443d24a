"""Group Query Selection on hand-made boxes whose GIoU values are worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from detrkd.box_ops import cxcywh_to_xyxy, generalized_box_iou
from detrkd.distill.query_selection import (
    QuerySelection,
    count_queries_per_gt,
    group_query_selection,
    queries_per_gt,
)
from detrkd.matching import CostWeights, MatcherCosts, hungarian_match

# Image A: GT0 = xyxy (0.15, 0.15, 0.35, 0.35) class 0, GT1 = (0.65, 0.65, 0.85, 0.85) class 1.
GT_A = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])
PRED_A = torch.tensor([
    [0.75, 0.75, 0.2, 0.2],  # q0: exactly GT1 -> positive, G = 1
    [0.30, 0.25, 0.2, 0.2],  # q1: GT0 shifted right by 0.05: inter .15*.2=.03, union .05, hull .05 -> G = 0.6
    [0.25, 0.25, 0.2, 0.2],  # q2: exactly GT0 -> positive, G = 1
    [0.90, 0.05, 0.1, 0.1],  # q3: far corner (.85,0,.95,.1): GT1 hull .3*.85=.255 -> -(.255-.05)/.255;
                             #     GT0 hull .8*.35=.28 -> -(.28-.05)/.28, lower -> group 1
    [0.75, 0.75, 0.4, 0.4],  # q4: contains GT1: IoU .04/.16 = .25, hull = itself -> G = 0.25 (GT0: -0.6875)
    [0.91, 0.75, 0.1, 0.2],  # q5: 0.01 right of GT1: hull .31*.2=.062, union .06 -> -(.002/.062)
])
G_A = [1.0, 0.6, 1.0, -0.205 / 0.255, 0.25, -0.002 / 0.062]
GROUP_A = [1, 0, 0, 1, 1, 1]
POSITIVE_A = [True, False, True, False, False, False]


def _logits(labels: list[int], class_head: str, num_classes: int = 2) -> torch.Tensor:
    """Confident logits [Q, K] for the given class of each query (-1 = background)."""
    k = num_classes + (class_head == "softmax")
    out = torch.full((len(labels), k), -4.0)
    for i, c in enumerate(labels):
        if c >= 0 or class_head == "softmax":
            out[i, c] = 4.0  # softmax background: c = -1 = the no-object logit
    return out


def _next_float32(x: torch.Tensor, toward: float) -> float:
    """The float32 neighbour of x in the direction of ``toward``, as a Python float."""
    return torch.nextafter(x, torch.tensor(toward, dtype=x.dtype)).item()


def _image_a(class_head: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    logits = _logits([1, 0, 0, -1, 1, -1], class_head)
    return logits[None], PRED_A[None], {"class_labels": torch.tensor([0, 1]), "boxes": GT_A}


def _select(class_head: str = "sigmoid", threshold: float = 0.0) -> QuerySelection:
    logits, boxes, target = _image_a(class_head)
    return group_query_selection(logits, boxes, [target], class_head, threshold=threshold)


def test_hand_computed_gious_match_box_ops():
    giou = generalized_box_iou(cxcywh_to_xyxy(PRED_A), cxcywh_to_xyxy(GT_A))
    assert giou[3, 0].item() == pytest.approx(-0.23 / 0.28, abs=1e-6)
    assert giou[4, 0].item() == pytest.approx(-0.6875, abs=1e-6)


@pytest.mark.parametrize("class_head", ["softmax", "sigmoid"])
def test_groups_gious_and_kinds(class_head):
    sel = _select(class_head)
    assert sel.group.tolist() == [GROUP_A]
    torch.testing.assert_close(sel.giou, torch.tensor([G_A]), atol=1e-6, rtol=0)
    assert sel.positive.tolist() == [POSITIVE_A]
    assert sel.hard_negative.tolist() == [[False, True, False, False, True, False]]
    assert sel.easy_negative.tolist() == [[False, False, False, True, False, True]]
    assert sel.selected.tolist() == [[True, True, True, False, True, False]]
    assert sel.positive_index.tolist() == [[2, 0]] and sel.num_gt.tolist() == [2]
    assert sel.group.dtype == torch.long and sel.giou.dtype == torch.float32


@pytest.mark.parametrize(
    "threshold, hard",
    [
        (0.5, [1]),
        (0.1, [1, 4]),
        (0.0, [1, 4]),
        (-0.1, [1, 4, 5]),
        (-math.inf, [1, 3, 4, 5]),
        (0.7, []),
    ],
)
def test_threshold(threshold, hard):
    sel = _select(threshold=threshold)
    assert sel.hard_negative[0].nonzero().flatten().tolist() == hard
    assert sel.positive[0].nonzero().flatten().tolist() == [0, 2]  # never affected
    assert not (sel.positive & sel.hard_negative).any()
    assert torch.equal(sel.easy_negative, ~(sel.positive | sel.hard_negative))
    assert sel.threshold == threshold


def test_threshold_is_strict():
    g = _select().giou[0, 1]  # exactly what the selection computes for q1 (float32)
    assert not _select(threshold=g.item()).hard_negative[0, 1]
    assert _select(threshold=_next_float32(g, -1.0)).hard_negative[0, 1]


def test_positive_keeps_its_own_giou_even_if_another_gt_overlaps_more():
    # q0's class strongly says GT1 while its box is GT0's: matched to GT1 anyway, G = GIoU with GT1
    gt = torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])
    boxes = torch.tensor([[[0.25, 0.25, 0.2, 0.2], [0.26, 0.25, 0.2, 0.2]]])
    logits = torch.tensor([[[-9.0, 9.0], [9.0, -9.0]]])
    sel = group_query_selection(logits, boxes, [{"class_labels": torch.tensor([0, 1]), "boxes": gt}], "sigmoid",
                                costs=MatcherCosts(CostWeights(100.0, 0.0, 1.0)))
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes[0]), cxcywh_to_xyxy(gt))
    assert sel.positive.tolist() == [[True, True]] and sel.group.tolist() == [[1, 0]]
    torch.testing.assert_close(sel.giou[0], torch.stack([giou[0, 1], giou[1, 0]]))


def test_image_without_gt():
    logits, boxes, _ = _image_a("sigmoid")
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    for threshold in (0.0, -math.inf):
        sel = group_query_selection(logits, boxes, [empty], "sigmoid", threshold=threshold)
        assert sel.group.tolist() == [[-1] * 6] and sel.giou.tolist() == [[-1.0] * 6]
        assert sel.easy_negative.all() and not sel.selected.any()
        assert sel.positive_index.shape == (1, 0) and sel.num_gt.tolist() == [0]
        assert sel.selected_indices()[0].numel() == 0 and sel.group_indices() == [[]]
    assert math.isnan(queries_per_gt(sel)[0.0])


def test_batch_equals_per_image_calls():
    logits_a, boxes_a, target_a = _image_a("sigmoid")
    # image B: one GT, 6 random-ish predictions; image C: no GT
    boxes_b = torch.tensor([[[0.5, 0.5, 0.3, 0.3], [0.55, 0.5, 0.3, 0.3], [0.1, 0.9, 0.1, 0.1],
                             [0.5, 0.45, 0.2, 0.4], [0.9, 0.9, 0.1, 0.1], [0.5, 0.5, 0.6, 0.6]]])
    target_b = {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.52, 0.5, 0.3, 0.3]])}
    target_c = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    logits = torch.cat([logits_a, torch.randn(2, 6, 2, generator=torch.Generator().manual_seed(0))])
    boxes = torch.cat([boxes_a, boxes_b, boxes_b])
    targets = [target_a, target_b, target_c]
    for threshold in (0.5, 0.0, -math.inf):
        batch = group_query_selection(logits, boxes, targets, "sigmoid", threshold=threshold)
        for i, t in enumerate(targets):
            one = group_query_selection(logits[i : i + 1], boxes[i : i + 1], [t], "sigmoid", threshold=threshold)
            for name in ("group", "giou", "positive", "hard_negative", "easy_negative", "num_gt"):
                assert torch.equal(getattr(batch, name)[i], getattr(one, name)[0]), name
            n = len(t["boxes"])
            assert torch.equal(batch.positive_index[i, :n], one.positive_index[0])
            assert (batch.positive_index[i, n:] == -1).all()
            assert torch.equal(batch.selected_indices()[i], one.selected_indices()[0])
            assert len(batch.group_indices()[i]) == n
            for a, b in zip(batch.group_indices()[i], one.group_indices()[0]):
                assert torch.equal(a, b)
    assert batch.positive_index.shape == (3, 2)


def test_random_batch_against_reference_loop():
    g = torch.Generator().manual_seed(0)
    b, q, threshold = 3, 40, 0.1
    boxes = torch.cat([torch.rand(b, q, 2, generator=g) * 0.8 + 0.1, torch.rand(b, q, 2, generator=g) * 0.3 + 0.05], -1)
    logits = torch.randn(b, q, 4, generator=g)
    targets = [{"class_labels": torch.randint(3, (n,), generator=g), "boxes": boxes[i, :n] + 0.02}
               for i, n in enumerate([5, 1, 12])]
    sel = group_query_selection(logits, boxes, targets, "softmax", threshold=threshold)
    matches = hungarian_match(logits, boxes, targets, "softmax")
    for i, (t, (pred, gt)) in enumerate(zip(targets, matches)):
        giou = generalized_box_iou(cxcywh_to_xyxy(boxes[i]), cxcywh_to_xyxy(t["boxes"]))
        matched = dict(zip(pred.tolist(), gt.tolist()))
        for j in range(q):
            grp = matched[j] if j in matched else int(giou[j].argmax())
            assert sel.group[i, j] == grp and sel.giou[i, j] == giou[j, grp]
            assert sel.positive[i, j] == (j in matched)
            assert sel.hard_negative[i, j] == (j not in matched and giou[j, grp] > threshold)
        assert sel.positive_index[i, gt].tolist() == pred.tolist()
    # precomputed matches give the same selection
    again = group_query_selection(logits, boxes, targets, "softmax", threshold=threshold, matches=matches)
    assert torch.equal(again.hard_negative, sel.hard_negative) and torch.equal(again.group, sel.group)


def test_index_helpers():
    sel = _select(threshold=-math.inf)
    assert sel.selected_indices()[0].tolist() == [0, 1, 2, 3, 4, 5]
    assert sel.selected_indices("positive")[0].tolist() == [0, 2]
    assert [x.tolist() for x in sel.group_indices()[0]] == [[1], [3, 4, 5]]
    assert [x.tolist() for x in sel.group_indices("positive")[0]] == [[2], [0]]
    assert [x.tolist() for x in sel.group_indices("all")[0]] == [[1, 2], [0, 3, 4, 5]]
    sel = _select(threshold=0.0)
    assert sel.selected_indices()[0].tolist() == [0, 1, 2, 4]
    assert [x.tolist() for x in sel.group_indices()[0]] == [[1], [4]]
    assert [x.tolist() for x in sel.group_indices("easy_negative")[0]] == [[], [3, 5]]
    with pytest.raises(ValueError, match="kind"):
        sel.mask("negative")


def test_queries_per_gt_statistic():
    # group 0: {q2 (positive, G 1), q1 (0.6)}; group 1: {q0 (positive, 1), q4 (.25), q5 (-.03), q3 (-.80)}
    logits_a, boxes_a, target_a = _image_a("sigmoid")
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}
    sel = group_query_selection(torch.cat([logits_a, logits_a]), torch.cat([boxes_a, boxes_a]),
                                [target_a, empty], "sigmoid", threshold=0.5)  # threshold: irrelevant
    stats = queries_per_gt(sel)
    assert stats == {0.75: 1.0, 0.5: 1.5, 0.3: 1.5, 0.1: 2.0, 0.0: 2.0, -math.inf: 3.0}
    counts, num_gt = count_queries_per_gt(sel, thresholds=(0.55, -0.5))
    assert counts.tolist() == [3, 5] and num_gt == 2
    g = sel.giou[0, 1]  # ">=": a query whose G equals the threshold counts
    assert count_queries_per_gt(sel, thresholds=(g.item(), _next_float32(g, 2.0)))[0].tolist() == [3, 2]


# ---- positives are the detector's own Hungarian matches ------------------------------------------------


def _hf_matcher(model):
    """transformers' own matcher for a detrkd adapter, built the way its loss builds it."""
    from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher
    from transformers.loss.loss_for_object_detection import HungarianMatcher
    from transformers.loss.loss_rt_detr import RTDetrHungarianMatcher

    cfg = model.config
    if model.family in ("rt_detr", "rt_detr_v2", "d_fine", "deimv2"):
        return RTDetrHungarianMatcher(cfg)
    if model.family in ("lw_detr", "rf_detr"):  # one Group-DETR group: what the view's predictions are
        from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher

        matcher = LwDetrHungarianMatcher(class_cost=cfg.class_cost, bbox_cost=cfg.bbox_cost, giou_cost=cfg.giou_cost)
        return lambda outputs, targets: matcher(outputs, targets, group_detr=1)
    cls = HungarianMatcher if model.family == "detr" else DeformableDetrHungarianMatcher
    return cls(class_cost=cfg.class_cost, bbox_cost=cfg.bbox_cost, giou_cost=cfg.giou_cost)


@pytest.mark.parametrize("family", ["detr", "conditional_detr", "dab_detr", "deformable_detr", "rt_detr",
                                    "rt_detr_v2", "d_fine", "deimv2", "lw_detr", "rf_detr"])
def test_gqs_positives_are_the_matches_of_the_models_own_matcher(family):
    """DistillContext.selection (what AGFD, LAPD and KD-DETR's Table 1 pairs use) picks the
    positives transformers' matcher of that model picks, with the model's config costs (RT-DETR:
    class 2 / L1 5 / GIoU 2, not DETR's 1 / 5 / 2)."""
    from detrkd.distill.base import DistillContext
    from detrkd.models import build_detector
    from detrkd.models.base import DetectorOutput, Predictions, Queries

    model = build_detector(family, "tiny", 5)
    gen = torch.Generator().manual_seed(5)
    b, q, k = 4, 30, 5 + (model.class_head == "softmax")
    logits = 3 * torch.randn(b, q, k, generator=gen)
    boxes = torch.cat([0.2 + 0.6 * torch.rand(b, q, 2, generator=gen), 0.05 + 0.3 * torch.rand(b, q, 2, generator=gen)], -1)
    targets = [{"class_labels": torch.randint(0, 5, (n,), generator=gen),
                "boxes": torch.cat([0.2 + 0.6 * torch.rand(n, 2, generator=gen), 0.05 + 0.3 * torch.rand(n, 2, generator=gen)], -1)}
               for n in (6, 3, 8, 5)]
    out = DetectorOutput(predictions=Predictions(logits[None], boxes[None]), class_head=model.class_head,
                         memory=None, queries=Queries(None, None, None))
    sel = DistillContext(model, model, out, out, targets).selection("student")
    theirs = _hf_matcher(model)({"logits": logits, "pred_boxes": boxes}, targets)
    for i, (pred, gt) in enumerate(theirs):
        expected = torch.full((8,), -1, dtype=torch.long)
        expected[gt] = pred
        assert sel.positive_index[i, :len(gt)].tolist() == expected[:len(gt)].tolist()
    if family == "rt_detr":  # the check can tell the costs apart: DETR's 1 / 5 / 2 picks other positives
        detr_costs = group_query_selection(logits, boxes, targets, model.class_head)
        assert not torch.equal(detr_costs.positive_index, sel.positive_index)
