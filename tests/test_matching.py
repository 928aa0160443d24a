"""Assignment solvers, matching costs and the batched Hungarian matcher."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from detrkd import matching
from detrkd.box_ops import cxcywh_to_xyxy, generalized_box_iou
from detrkd.matching import CostWeights, hungarian_match, linear_assignment, pad_targets, pairwise_cost

HAS_LAPJV = matching._lapjv is not None
SHAPES = [(1, 1), (5, 3), (3, 5), (300, 8), (64, 64), (200, 200), (200, 195), (195, 200)]


@pytest.fixture(params=["with_lapjv", "without_lapjv"])
def lapjv_mode(request, monkeypatch):
    if request.param == "with_lapjv":
        if not HAS_LAPJV:
            pytest.skip("lapjv is not installed")
    else:
        monkeypatch.setattr(matching, "_lapjv", None)
    return request.param


def _check_optimal(cost: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    n, m = cost.shape
    assert len(rows) == len(cols) == min(n, m)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    assert rows.dtype == cols.dtype == np.int64 and np.all(np.diff(rows) > 0)
    r, c = linear_sum_assignment(cost)
    best = cost[r, c].astype(np.float64).sum()
    assert cost[rows, cols].astype(np.float64).sum() == pytest.approx(best, rel=1e-6, abs=1e-6)


# ---- linear_assignment -----------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_solver_matches_scipy(shape, dtype, lapjv_mode):
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        cost = (rng.random(shape) * 4 - 2).astype(dtype)
        _check_optimal(cost, *linear_assignment(cost))


@pytest.mark.skipif(not HAS_LAPJV, reason="lapjv is not installed")
@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (3, 5), (300, 8), (8, 40), (30, 30)])
def test_forced_lapjv_pads_rectangular(shape):
    rng = np.random.default_rng(0)
    cost = rng.random(shape) * 10
    _check_optimal(cost, *linear_assignment(cost, solver="lapjv"))


@pytest.mark.skipif(not HAS_LAPJV, reason="lapjv is not installed")
def test_auto_picks_solver_by_shape(monkeypatch):
    calls = []
    real = matching._lapjv

    def spy(cost, **kwargs):
        calls.append(cost.shape)
        return real(cost, **kwargs)

    monkeypatch.setattr(matching, "_lapjv", spy)
    rng = np.random.default_rng(0)
    for shape in [(300, 8), (8, 300), (10, 10), (300, 240)]:
        linear_assignment(rng.random(shape))
    assert calls == []  # tall/wide/small: scipy
    linear_assignment(rng.random((200, 200)))
    linear_assignment(rng.random((200, 195)))
    assert calls == [(200, 200), (200, 200)]
    linear_assignment(rng.random((200, 200)), solver="scipy")
    assert len(calls) == 2


def test_torch_and_integer_inputs():
    cost = torch.tensor([[4, 1, 3], [2, 0, 5], [3, 2, 2]])
    rows, cols = linear_assignment(cost)
    assert rows.tolist() == [0, 1, 2] and cols.tolist() == [1, 0, 2]
    rows, cols = linear_assignment(cost.float().requires_grad_())
    assert cols.tolist() == [1, 0, 2]


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
@pytest.mark.parametrize("solver", ["auto", "lapjv", "scipy"])
def test_empty(shape, solver):
    rows, cols = linear_assignment(np.zeros(shape), solver=solver)
    assert rows.shape == cols.shape == (0,) and rows.dtype == np.int64


def test_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-d"):
        linear_assignment(np.zeros((2, 2, 2)))


@pytest.mark.parametrize("solver", ["auto", "lapjv", "scipy"])
def test_non_finite_avoided_when_possible(solver):
    cost = np.array([[np.nan, 1.0, 5.0], [np.inf, -np.inf, 2.0], [0.5, 3.0, np.nan], [1.0, 1.0, 1.0]])
    with pytest.warns(RuntimeWarning, match="non-finite"):
        rows, cols = linear_assignment(cost, solver=solver)
    assert np.isfinite(cost[rows, cols]).all()
    # the best finite assignment: (0,1) + (2,0) + (3,2) = 2.5 (row 1 unassigned)
    assert cost[rows, cols].sum() == pytest.approx(2.5)


@pytest.mark.parametrize("solver", ["auto", "lapjv", "scipy"])
def test_non_finite_unavoidable(solver):
    cost = np.array([[np.inf, np.inf], [1.0, 2.0]])  # row 0 must take a non-finite cell
    with pytest.warns(RuntimeWarning):
        rows, cols = linear_assignment(cost, solver=solver)
    assert rows.tolist() == [0, 1] and cols[1] == 0
    with pytest.warns(RuntimeWarning):
        rows, cols = linear_assignment(np.full((3, 2), np.nan), solver=solver)
    assert len(rows) == 2 and len(set(cols.tolist())) == 2


def test_finite_matrix_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        linear_assignment(np.random.default_rng(0).random((4, 3)))


# ---- pairwise_cost ---------------------------------------------------------------------------------


def _random_preds(b: int, q: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, q, k, generator=g) * 2
    cxcy = torch.rand(b, q, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(b, q, 2, generator=g) * 0.3 + 0.02
    return logits, torch.cat([cxcy, wh], -1)


def _random_targets(sizes: list[int], num_classes: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        cxcy = torch.rand(n, 2, generator=g) * 0.8 + 0.1
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.02
        out.append({"class_labels": torch.randint(num_classes, (n,), generator=g), "boxes": torch.cat([cxcy, wh], -1)})
    return out


def _reference_cost(logits, boxes, labels, gt_boxes, class_head, w=(1.0, 5.0, 2.0)):
    """The HF formulas, on flat [N, K] predictions and [M] labels."""
    if class_head == "softmax":
        cls = -logits.softmax(-1)[:, labels]
    else:
        p = logits.sigmoid()
        neg = 0.75 * p**2 * -(1 - p + 1e-8).log()
        pos = 0.25 * (1 - p) ** 2 * -(p + 1e-8).log()
        cls = pos[:, labels] - neg[:, labels]
    giou = generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(gt_boxes))
    return w[0] * cls + w[1] * torch.cdist(boxes, gt_boxes, p=1) - w[2] * giou


@pytest.mark.parametrize("class_head", ["softmax", "sigmoid"])
def test_pairwise_cost_against_labels(class_head):
    logits, boxes = _random_preds(3, 7, 4)
    targets = _random_targets([2, 0, 5], 3 if class_head == "softmax" else 4)
    labels, gt_boxes, valid = pad_targets(targets)
    cost = pairwise_cost(logits, boxes, labels, gt_boxes, class_head)  # [B, Q, T]
    assert cost.shape == (3, 7, 5)
    for i, t in enumerate(targets):
        n = len(t["boxes"])
        ref = _reference_cost(logits[i], boxes[i], t["class_labels"], t["boxes"], class_head)
        torch.testing.assert_close(cost[i, :, :n], ref)
    # the flat DETR layout gives the same numbers
    flat = pairwise_cost(logits.flatten(0, 1), boxes.flatten(0, 1), labels[0, :2], gt_boxes[0, :2], class_head)
    torch.testing.assert_close(flat.view(3, 7, 2)[0], cost[0, :, :2])


def test_pairwise_cost_weights_and_plain_sigmoid():
    logits, boxes = _random_preds(1, 4, 3)
    labels, gt = torch.tensor([[2, 0]]), boxes[:, :2].flip(1)
    c = pairwise_cost(logits, boxes, labels, gt, "sigmoid", weights=(0.0, 1.0, 0.0))
    torch.testing.assert_close(c, torch.cdist(boxes, gt, p=1))
    c = pairwise_cost(logits, boxes, labels, gt, "sigmoid", weights=CostWeights(1.0, 0.0, 0.0), focal=False)
    torch.testing.assert_close(c, -logits.sigmoid()[..., [2, 0]])
    with pytest.raises(ValueError, match="class_head"):
        pairwise_cost(logits, boxes, labels, gt, "softmx")


@pytest.mark.parametrize("class_head", ["softmax", "sigmoid"])
@pytest.mark.parametrize("soft_class", ["l1", "dot"])
def test_prediction_vs_prediction_recovers_permutation(class_head, soft_class):
    logits, boxes = _random_preds(2, 50, 5, seed=3)
    perm = torch.stack([torch.randperm(50, generator=torch.Generator().manual_seed(i)) for i in range(2)])
    logits_s = logits.gather(1, perm[..., None].expand(-1, -1, 5))
    boxes_s = boxes.gather(1, perm[..., None].expand(-1, -1, 4))
    cost = pairwise_cost(logits, boxes, logits_s, boxes_s, class_head, soft_class=soft_class)  # [B, Q, Q]
    assert cost.shape == (2, 50, 50)
    p = matching.head_probabilities(logits[0], class_head)
    ps = matching.head_probabilities(logits_s[0], class_head)
    expected_cls = (p[:, None] - ps[None]).abs().sum(-1) if soft_class == "l1" else -(p @ ps.T)
    expected = expected_cls + 5 * torch.cdist(boxes[0], boxes_s[0], p=1) - 2 * generalized_box_iou(
        cxcywh_to_xyxy(boxes[0]), cxcywh_to_xyxy(boxes_s[0]))
    torch.testing.assert_close(cost[0], expected)
    for i in range(2):
        rows, cols = linear_assignment(cost[i])
        assert torch.equal(perm[i][torch.from_numpy(cols)], torch.from_numpy(rows))


# ---- hungarian_match -------------------------------------------------------------------------------


@pytest.mark.parametrize("class_head", ["softmax", "sigmoid"])
def test_batched_equals_per_image(class_head):
    logits, boxes = _random_preds(4, 30, 6, seed=5)
    targets = _random_targets([3, 0, 8, 1], 5, seed=6)
    batched = hungarian_match(logits, boxes, targets, class_head)
    assert len(batched) == 4
    for i, t in enumerate(targets):
        (single,) = hungarian_match(logits[i : i + 1], boxes[i : i + 1], [t], class_head)
        for a, b in zip(batched[i], single):
            assert a.dtype == torch.int64 and a.device.type == "cpu"
            assert torch.equal(a, b)
        assert len(batched[i][0]) == min(30, len(t["boxes"]))


def test_more_gt_than_queries_and_all_empty():
    logits, boxes = _random_preds(2, 3, 4)
    (pred, gt), (pred1, gt1) = hungarian_match(logits, boxes, _random_targets([5, 0], 4), "sigmoid")
    assert len(pred) == 3 and pred.tolist() == [0, 1, 2] and len(set(gt.tolist())) == 3
    assert len(pred1) == len(gt1) == 0
    for p, g in hungarian_match(logits, boxes, _random_targets([0, 0], 4), "sigmoid"):
        assert p.shape == g.shape == (0,)
    with pytest.raises(ValueError, match="targets"):
        hungarian_match(logits, boxes, _random_targets([1], 4), "sigmoid")


def test_exact_boxes_are_matched():
    logits, boxes = _random_preds(1, 20, 4, seed=8)
    targets = [{"class_labels": torch.tensor([1, 3]), "boxes": boxes[0, [12, 4]].clone()}]
    logits[0, 12, 1] = logits[0, 4, 3] = 8.0
    ((pred, gt),) = hungarian_match(logits, boxes, targets, "sigmoid")
    assert pred.tolist() == [4, 12] and gt.tolist() == [1, 0]


@pytest.mark.parametrize("class_head", ["softmax", "sigmoid"])
def test_agrees_with_transformers_matcher(class_head, lapjv_mode):
    if class_head == "softmax":
        from transformers.loss.loss_for_object_detection import HungarianMatcher as Matcher
    else:
        from transformers.loss.loss_deformable_detr import DeformableDetrHungarianMatcher as Matcher
    hf = Matcher(class_cost=1, bbox_cost=5, giou_cost=2)
    num_classes = 7
    logits, boxes = _random_preds(3, 64, num_classes + (class_head == "softmax"), seed=11)
    targets = _random_targets([4, 64, 0], num_classes, seed=12)  # 64x64: the lapjv path
    ours = hungarian_match(logits, boxes, targets, class_head)
    theirs = hf({"logits": logits, "pred_boxes": boxes}, targets)
    for i, t in enumerate(targets):
        ref = _reference_cost(logits[i], boxes[i], t["class_labels"], t["boxes"], class_head)
        total = [ref[p, g].sum().item() for p, g in (ours[i], theirs[i])]
        assert len(ours[i][0]) == len(theirs[i][0])
        assert total[0] == pytest.approx(total[1], rel=1e-5, abs=1e-5)
