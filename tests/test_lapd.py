"""Local-Alignment Prediction Distillation: pairing on hand-made predictions, brute force, the loss."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import detrkd.matching
from detrkd.config import ConfigError
from detrkd.distill.base import DistillContext, Distiller
from detrkd.distill import lapd as lapd_module
from detrkd.distill.lapd import LAPD, local_alignment, parse_kinds
from detrkd.distill.methods import build_methods, method_options
from detrkd.distill.pairing import layer_pairs, prediction_cost
from detrkd.distill.query_selection import QuerySelection, group_query_selection
from detrkd.models import build_detector
from detrkd.models.base import DetectorOutput, Predictions

# ---- the hand-made scene ---------------------------------------------------------------------------
# GT0 = cxcywh (.25, .25, .2, .2) class 0, GT1 = (.75, .75, .2, .2) class 1. Teacher queries:
# positives t0 (GT0 exact), t3 (GT1 exact); hard negatives of GT0: t1 (shifted, G = .6), t2 (larger,
# G = .444); of GT1: t4 (shifted, G = .6), t5 (smaller, G = .49); easy negatives t6, t7 (far corners).
GTS = {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])}
TEACHER_BOXES = torch.tensor([
    [0.25, 0.25, 0.20, 0.20], [0.30, 0.25, 0.20, 0.20], [0.25, 0.25, 0.30, 0.30],
    [0.75, 0.75, 0.20, 0.20], [0.75, 0.80, 0.20, 0.20], [0.75, 0.75, 0.14, 0.14],
    [0.05, 0.95, 0.06, 0.06], [0.95, 0.05, 0.06, 0.06],
])
# (class, logit): confident positives, uncertain hard negatives, background easy negatives
TEACHER_CLASSES = [(0, 4.0), (0, 0.0), (0, 0.0), (1, 4.0), (1, 0.0), (1, 0.0), (-1, 4.0), (-1, 4.0)]
KIND_OF = {"positive": {0, 3}, "hard_negative": {1, 2, 4, 5}, "easy_negative": {6, 7}}
# student query j is teacher query PERMS[b][j], its box jittered by a few thousandths
PERMS = [[5, 2, 7, 3, 0, 4, 6, 1], [1, 6, 4, 0, 7, 2, 3, 5]]


def _logits(classes: list[tuple[int, float]], head: str, num_classes: int = 2) -> torch.Tensor:
    """[Q, K]: the given logit on the given class (-1 = background: the no-object logit), -4 elsewhere."""
    out = torch.full((len(classes), num_classes + (head == "softmax")), -4.0)
    for i, (c, value) in enumerate(classes):
        if c >= 0:
            out[i, c] = value
            if head == "softmax" and value <= 0:
                out[i, -1] = value  # uncertain: as likely no-object as the class
        elif head == "softmax":
            out[i, -1] = value
    return out


def _scene(heads: tuple[str, str] = ("sigmoid", "sigmoid")):
    """(teacher logits [2, 8, Kt], boxes [2, 8, 4], student logits [2, 8, Ks], boxes, targets)."""
    t_logits = _logits(TEACHER_CLASSES, heads[1]).expand(2, -1, -1).clone()
    t_boxes = TEACHER_BOXES.expand(2, -1, -1).clone()
    jitter = torch.tensor([[0.003 * ((j % 3) - 1), 0.002 * ((j % 2) - 0.5), 0, 0] for j in range(8)])
    s_logits = torch.stack([_logits([TEACHER_CLASSES[i] for i in p], heads[0]) for p in PERMS])
    s_boxes = torch.stack([TEACHER_BOXES[p] + jitter for p in PERMS])
    return t_logits, t_boxes, s_logits, s_boxes, [GTS, GTS]


def _gqs(logits, boxes, targets, head, threshold=0.0) -> QuerySelection:
    return group_query_selection(logits, boxes, targets, head, threshold=threshold)


def _align(heads=("sigmoid", "sigmoid"), threshold=0.0, **kwargs):
    t_logits, t_boxes, s_logits, s_boxes, targets = _scene(heads)
    t_sel = _gqs(t_logits, t_boxes, targets, heads[1], threshold)
    s_sel = _gqs(s_logits, s_boxes, targets, heads[0], threshold)
    return local_alignment(s_sel, t_sel, s_logits, s_boxes, t_logits, t_boxes, heads, **kwargs)


def _pairs(align, qt: int, qs: int) -> set[tuple[int, int, int]]:
    """Flat indices -> {(image, teacher query, student query)}; asserts they are one-to-one."""
    t, s = align.teacher.tolist(), align.student.tolist()
    assert len(set(t)) == len(t) and len(set(s)) == len(s)
    assert all(a // qt == b // qs for a, b in zip(t, s))
    return {(a // qt, a % qt, b % qs) for a, b in zip(t, s)}


def _expected(kinds: tuple[str, ...]) -> set[tuple[int, int, int]]:
    return {(b, p[j], j) for b, p in enumerate(PERMS) for j in range(8)
            if any(p[j] in KIND_OF[k] for k in kinds)}


def test_scene_selection_is_as_designed():
    t_logits, t_boxes, s_logits, s_boxes, targets = _scene()
    t_sel = _gqs(t_logits, t_boxes, targets, "sigmoid")
    assert t_sel.positive[0].nonzero().flatten().tolist() == [0, 3]
    assert t_sel.hard_negative[0].nonzero().flatten().tolist() == [1, 2, 4, 5]
    assert t_sel.group[0].tolist()[:6] == [0, 0, 0, 1, 1, 1]
    s_sel = _gqs(s_logits, s_boxes, targets, "sigmoid")
    for b, perm in enumerate(PERMS):  # the student's selection is the teacher's, permuted
        assert s_sel.positive[b].tolist() == t_sel.positive[b, perm].tolist()
        assert s_sel.hard_negative[b].tolist() == t_sel.hard_negative[b, perm].tolist()
        selected = s_sel.selected[b]  # easy negatives' groups do not matter (far from both GTs)
        assert s_sel.group[b][selected].tolist() == t_sel.group[b, perm][selected].tolist()


@pytest.mark.parametrize("heads", [("sigmoid", "sigmoid"), ("softmax", "sigmoid"), ("sigmoid", "softmax"),
                                   ("softmax", "softmax")])
def test_pairs_are_exactly_the_permutation(heads):
    assert _pairs(_align(heads), 8, 8) == _expected(("positive", "hard_negative"))


@pytest.mark.parametrize("kinds, expected", [
    ("positives", ("positive",)),
    ("hard", ("hard_negative",)),
    ("positives+hard", ("positive", "hard_negative")),
    (("positive", "hard"), ("positive", "hard_negative")),
    ("easy", ("easy_negative",)),
    (["positives", "hard", "easy"], ("positive", "hard_negative", "easy_negative")),
])
def test_kinds_switches(kinds, expected):
    assert parse_kinds(kinds) == expected
    assert _pairs(_align(kinds=kinds), 8, 8) == _expected(expected)


def test_threshold_is_given_to_gqs():
    # at 0.55 only t1 / t4 (G = .6) stay hard; t2 (.444) and t5 (.49) become easy negatives
    pairs = _pairs(_align(threshold=0.55, kinds="hard"), 8, 8)
    assert {t for _, t, _ in pairs} == {1, 4} and len(pairs) == 4
    easy = _pairs(_align(threshold=0.55, kinds="easy"), 8, 8)
    assert {t for _, t, _ in easy} == {2, 5, 6, 7} and easy <= _expected(("hard_negative", "easy_negative"))


def test_unknown_kind_and_bad_options_are_rejected():
    with pytest.raises(ValueError, match="pair kind"):
        parse_kinds("positives+medium")
    with pytest.raises(ConfigError, match=r"methods\.lapd\.layers: expected one of 'last', 'all', got 'first'"):
        method_options("lapd", {"layers": "first"})
    with pytest.raises(ConfigError, match=r"methods\.lapd\.class_kd: expected one of 'bce', 'kl'"):
        method_options("lapd", {"class_kd": "mse"})
    with pytest.raises(ConfigError, match=r"methods\.lapd\.weights: per-term weights are methods\.lapd\.terms now"):
        method_options("lapd", {"weights": [1, 5, 2]})  # per-term weights are ``terms`` now


def test_hard_negatives_of_different_gts_never_pair():
    torch.manual_seed(0)
    t_logits, t_boxes, s_logits, s_boxes, targets = _random(4, 40, 25, 3, 4)
    t_sel = _gqs(t_logits, t_boxes, targets, "sigmoid", -math.inf)
    s_sel = _gqs(s_logits, s_boxes, targets, "sigmoid", -math.inf)
    align = local_alignment(s_sel, t_sel, s_logits, s_boxes, t_logits, t_boxes, ("sigmoid", "sigmoid"), kinds="hard")
    t_group, s_group = t_sel.group.flatten()[align.teacher], s_sel.group.flatten()[align.student]
    assert len(align.teacher) > 20 and torch.equal(t_group, s_group)
    cross = local_alignment(s_sel, t_sel, s_logits, s_boxes, t_logits, t_boxes, ("sigmoid", "sigmoid"),
                            kinds="hard", per_image=True)
    assert not torch.equal(t_sel.group.flatten()[cross.teacher], s_sel.group.flatten()[cross.student])


def test_per_image_pairs_across_groups_where_cheaper():
    # GT0 / GT1 touch at x = .5. The teacher's "just right of centre" box t2 is closer to GT0, the
    # student's s2 (nearly the same box) closer to GT1; the big boxes t3 / s3 sit on GT1 / GT0.
    gts = {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.4, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2]])}
    t_boxes = torch.tensor([[[0.4, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2], [0.49, 0.5, 0.2, 0.2], [0.6, 0.5, 0.3, 0.3]]])
    s_boxes = torch.tensor([[[0.4, 0.5, 0.2, 0.2], [0.6, 0.5, 0.2, 0.2], [0.51, 0.5, 0.2, 0.2], [0.4, 0.5, 0.3, 0.3]]])
    logits = _logits([(0, 4.0), (1, 4.0), (0, 0.0), (0, 0.0)], "sigmoid")[None]
    t_sel, s_sel = _gqs(logits, t_boxes, [gts], "sigmoid"), _gqs(logits, s_boxes, [gts], "sigmoid")
    assert t_sel.group[0].tolist() == [0, 1, 0, 1] and s_sel.group[0].tolist() == [0, 1, 1, 0]
    heads = ("sigmoid", "sigmoid")
    per_gt = local_alignment(s_sel, t_sel, logits, s_boxes, logits, t_boxes, heads)
    per_image = local_alignment(s_sel, t_sel, logits, s_boxes, logits, t_boxes, heads, per_image=True)
    assert _pairs(per_gt, 4, 4) == {(0, 0, 0), (0, 1, 1), (0, 2, 3), (0, 3, 2)}
    assert _pairs(per_image, 4, 4) == {(0, 0, 0), (0, 1, 1), (0, 2, 2), (0, 3, 3)}
    cost = prediction_cost(logits, s_boxes, logits, t_boxes, heads).flatten(1)[0].view(4, 4)
    total = lambda a: cost[a.teacher, a.student].sum().item()  # noqa: E731
    assert total(per_image) < total(per_gt) - 1.0


def _random(b, qt, qs, n_gt, num_classes, heads=("sigmoid", "sigmoid")):
    """Random predictions around random GTs: (t_logits, t_boxes, s_logits, s_boxes, targets);
    heads = (student head, teacher head)."""
    gt_boxes = torch.cat([torch.rand(b, n_gt, 2) * 0.6 + 0.2, torch.rand(b, n_gt, 2) * 0.2 + 0.1], -1)
    targets = [{"class_labels": torch.randint(num_classes, (n_gt,)), "boxes": gt_boxes[i]} for i in range(b)]

    def preds(q, head):
        near = gt_boxes[:, torch.randint(n_gt, (q,))] + torch.randn(b, q, 4) * 0.05
        far = torch.cat([torch.rand(b, q, 2), torch.rand(b, q, 2) * 0.3 + 0.02], -1)
        boxes = torch.where(torch.rand(b, q, 1) < 0.7, near, far)
        boxes = torch.cat([boxes[..., :2].clamp(0.05, 0.95), boxes[..., 2:].clamp(0.02, 0.6)], -1)
        return torch.randn(b, q, num_classes + (head == "softmax")) * 2, boxes

    return (*preds(qt, heads[1]), *preds(qs, heads[0]), targets)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("per_image", [False, True])
def test_pairing_is_the_brute_force_optimum(seed, per_image):
    torch.manual_seed(seed)
    t_logits, t_boxes, s_logits, s_boxes, targets = _random(2, 7, 6, 2, 3)
    heads = ("sigmoid", "sigmoid")
    t_sel = _gqs(t_logits, t_boxes, targets, "sigmoid", -math.inf)
    s_sel = _gqs(s_logits, s_boxes, targets, "sigmoid", -math.inf)
    align = local_alignment(s_sel, t_sel, s_logits, s_boxes, t_logits, t_boxes, heads, per_image, "hard")
    cost = prediction_cost(s_logits, s_boxes, t_logits, t_boxes, heads).numpy()
    t_img, t_q = (align.teacher // 7).numpy(), (align.teacher % 7).numpy()
    s_q = (align.student % 6).numpy()
    for b in range(2):
        groups = [None] if per_image else range(2)
        for g in groups:
            t_mask = t_sel.hard_negative[b] & ((t_sel.group[b] == g) if g is not None else True)
            s_mask = s_sel.hard_negative[b] & ((s_sel.group[b] == g) if g is not None else True)
            ti, si = t_mask.nonzero().flatten().tolist(), s_mask.nonzero().flatten().tolist()
            chosen = [(t, s) for i, t, s in zip(t_img, t_q, s_q) if i == b and t in ti]
            assert len(chosen) == min(len(ti), len(si)) and all(s in si for _, s in chosen)
            got = sum(cost[b, t, s] for t, s in chosen)
            assert got == pytest.approx(_brute_force(cost[b][np.ix_(ti, si)]), abs=1e-5)


@pytest.mark.parametrize("heads", [("sigmoid", "sigmoid"), ("sigmoid", "softmax"), ("softmax", "softmax")])
@pytest.mark.parametrize("per_image", [False, True])
def test_block_costs_are_the_full_cost_sub_blocks(heads, per_image):
    """Only the pairs inside a problem are costed; each value is the full [B, Qt, Qs] matrix's (to
    float32 rounding: vectorised kernels may round a value differently at another position)."""
    torch.manual_seed(4)
    t_logits, t_boxes, s_logits, s_boxes, targets = _random(4, 60, 25, 5, 4, heads)
    t_sel, s_sel = _gqs(t_logits, t_boxes, targets, heads[1]), _gqs(s_logits, s_boxes, targets, heads[0])
    blocks = list(lapd_module._hard_blocks(lapd_module._to_cpu(t_sel), lapd_module._to_cpu(s_sel), per_image))
    costs = lapd_module._block_costs(blocks, s_logits, s_boxes, t_logits, t_boxes, heads, (1.0, 5.0, 2.0))
    full = prediction_cost(s_logits, s_boxes, t_logits, t_boxes, heads).numpy()
    assert len(blocks) > (1 if per_image else 4)
    for cost, (b, t, s) in zip(costs, blocks):
        np.testing.assert_allclose(cost, full[b][np.ix_(t, s)], rtol=1e-6, atol=1e-6)


def _brute_force(block: np.ndarray) -> float:
    """Minimum total cost of a full assignment of the smaller side, by enumeration."""
    n, m = block.shape
    if n == 0 or m == 0:
        return 0.0
    if n > m:
        block, n, m = block.T, m, n
    return min(sum(block[i, j] for i, j in enumerate(cols)) for cols in itertools.permutations(range(m), n))


@pytest.fixture
def solver_calls(monkeypatch):
    """Records the shape of every ``detrkd.matching.linear_assignment`` call."""
    calls: list[tuple[int, int]] = []
    real = detrkd.matching.linear_assignment

    def counting(cost, *args, **kwargs):
        calls.append(tuple(cost.shape))
        return real(cost, *args, **kwargs)

    monkeypatch.setattr(detrkd.matching, "linear_assignment", counting)
    return calls


@pytest.mark.parametrize("kinds, per_image, shapes", [
    ("positives+hard", False, [(2, 2)] * 4),  # one call per (image, GT): 2 images x 2 GTs
    ("positives+hard", True, [(4, 4)] * 2),   # one call per image
    ("positives", False, []),                 # positives need no solver
    ("easy", False, [(2, 2)] * 2),
    ("positives+hard+easy", False, [(2, 2)] * 6),
])
def test_one_solver_call_per_group(solver_calls, kinds, per_image, shapes):
    t_logits, t_boxes, s_logits, s_boxes, targets = _scene()
    t_sel, s_sel = _gqs(t_logits, t_boxes, targets, "sigmoid"), _gqs(s_logits, s_boxes, targets, "sigmoid")
    solver_calls.clear()
    local_alignment(s_sel, t_sel, s_logits, s_boxes, t_logits, t_boxes, ("sigmoid", "sigmoid"), per_image, kinds)
    assert solver_calls == shapes


def test_solver_calls_on_a_random_batch(solver_calls):
    torch.manual_seed(3)
    t_logits, t_boxes, s_logits, s_boxes, targets = _random(4, 50, 20, 5, 4)
    t_sel, s_sel = _gqs(t_logits, t_boxes, targets, "sigmoid"), _gqs(s_logits, s_boxes, targets, "sigmoid")
    both = sum(len(t) > 0 and len(s) > 0 for t_img, s_img in zip(t_sel.group_indices(), s_sel.group_indices())
               for t, s in zip(t_img, s_img))
    solver_calls.clear()
    local_alignment(s_sel, t_sel, s_logits, s_boxes, t_logits, t_boxes, ("sigmoid", "sigmoid"))
    assert len(solver_calls) == both > 4


# ---- the method on hand-made outputs ----------------------------------------------------------------


def _ctx(t_logits, t_boxes, s_logits, s_boxes, targets, heads=("sigmoid", "sigmoid")) -> DistillContext:
    """A context from [L, B, Q, .] predictions (no models needed); heads = (student, teacher)."""
    t_out = DetectorOutput(Predictions(t_logits, t_boxes), heads[1], memory=None, queries=None)
    s_out = DetectorOutput(Predictions(s_logits, s_boxes), heads[0], memory=None, queries=None)
    return DistillContext(None, None, s_out, t_out, targets)


def _layered(n_layers, b, q, n_gt, num_classes, head, requires_grad=False):
    layers = [_random(b, q, q, n_gt, num_classes, (head, head))[:2] for _ in range(n_layers)]
    logits, boxes = (torch.stack(x).requires_grad_(requires_grad) for x in zip(*layers))
    return logits, boxes


def test_teacher_100_queries_softmax_student_30_sigmoid():
    torch.manual_seed(4)
    t_logits, t_boxes, s_logits, s_boxes, targets = _random(3, 100, 30, 5, 6, ("sigmoid", "softmax"))
    heads = ("sigmoid", "softmax")
    t_sel, s_sel = _gqs(t_logits, t_boxes, targets, "softmax"), _gqs(s_logits, s_boxes, targets, "sigmoid")
    align = local_alignment(s_sel, t_sel, s_logits, s_boxes, t_logits, t_boxes, heads)
    pairs = _pairs(align, 100, 30)
    assert len(pairs) >= 15 and all(t < 100 and s < 30 for _, t, s in pairs)
    assert torch.equal(t_sel.group.flatten()[align.teacher], s_sel.group.flatten()[align.student])
    s_logits.requires_grad_(True)
    terms = LAPD()(_ctx(t_logits[None], t_boxes[None], s_logits[None], s_boxes[None], targets, heads))
    assert set(terms) == {"cls", "l1", "giou"} and all(torch.isfinite(v) and v > 0 for v in terms.values())
    terms["cls"].backward()
    assert s_logits.grad.abs().sum() > 0


def test_mixed_heads_cost_compares_real_class_probabilities():
    t = torch.tensor([[[0.0, math.log(3.0), 0.0]]])  # softmax over (c0, c1, no-object): (.2, .6, .2)
    s = torch.logit(torch.tensor([[[0.2, 0.6]]]))
    box = torch.tensor([[[0.5, 0.5, 0.2, 0.2]]])
    same = prediction_cost(s, box, t, box, ("sigmoid", "softmax"))
    assert same.item() == pytest.approx(-2.0, abs=1e-5)  # class 0 + L1 0 - 2 * GIoU 1
    other = prediction_cost(torch.logit(torch.tensor([[[0.6, 0.2]]])), box, t, box, ("sigmoid", "softmax"))
    assert other.item() == pytest.approx(-2.0 + 0.8, abs=1e-5)


def test_layer_pairing_rules():
    assert layer_pairs(2, 3, "all") == [(0, 0), (1, 2)]
    assert layer_pairs(3, 2, "all") == [(0, 0), (1, 1), (2, 1)]
    assert layer_pairs(3, 6, "all") == [(0, 0), (1, 3), (2, 5)]
    assert layer_pairs(4, 4, "all") == [(i, i) for i in range(4)]
    assert layer_pairs(3, 6, "all", "last") == [(0, 5), (1, 5), (2, 5)]
    assert layer_pairs(1, 6, "all") == [(0, 5)] and layer_pairs(3, 6, "last") == [(2, 5)]


@pytest.mark.parametrize("n_teacher, n_student", [(3, 2), (2, 3)])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_layers_all_is_the_sum_of_paired_layers(n_teacher, n_student, reduction):
    torch.manual_seed(5)
    t_logits, t_boxes = _layered(n_teacher, 2, 12, 2, 3, "sigmoid")
    s_logits, s_boxes = _layered(n_student, 2, 12, 2, 3, "sigmoid")
    targets = _random(2, 1, 1, 2, 3)[-1]
    for x in (t_boxes, s_boxes):  # keep the layers near the same GTs
        centres = torch.stack([t["boxes"][:, :2].repeat(6, 1)[:12] for t in targets])  # [2, 12, 2]
        x[..., :2] = centres + 0.03 * torch.randn(x.shape[0], 2, 12, 2)
    ctx = _ctx(t_logits, t_boxes, s_logits, s_boxes, targets)
    terms = LAPD(layers="all", layer_reduction=reduction)(ctx)
    scale = 1.0 / n_student if reduction == "mean" else 1.0
    for k in ("cls", "l1", "giou"):
        expected = sum(LAPD()(_ctx(t_logits[j:j + 1], t_boxes[j:j + 1], s_logits[i:i + 1], s_boxes[i:i + 1],
                                   targets))[k] for i, j in layer_pairs(n_student, n_teacher, "all"))
        torch.testing.assert_close(terms[k], scale * expected)
    assert {f"gqs/teacher/layer{j}/threshold0.0" for _, j in layer_pairs(n_student, n_teacher, "all")} <= set(ctx.cache)


@pytest.mark.parametrize("layers", ["last", "all"])
def test_zero_loss_when_student_equals_teacher(layers):
    torch.manual_seed(6)
    t_logits, t_boxes = _layered(2, 3, 15, 3, 4, "sigmoid")
    targets = _random(3, 1, 1, 3, 4)[-1]
    s_logits, s_boxes = t_logits.clone().requires_grad_(True), t_boxes.clone().requires_grad_(True)
    ctx = _ctx(t_logits, t_boxes, s_logits, s_boxes, targets)
    kl = LAPD(layers=layers, class_kd="kl")(ctx)
    for v in kl.values():
        assert abs(v.item()) < 1e-5
    bce = LAPD(layers=layers)(ctx)  # BCE's minimum is the teacher's entropy, with zero gradient there
    assert abs(bce["l1"].item()) < 1e-5 and abs(bce["giou"].item()) < 1e-5 and bce["cls"] > 0
    bce["cls"].backward()
    assert s_logits.grad.abs().max() < 1e-5
    align = local_alignment(*(ctx.cache[f"gqs/{w}/layer1/threshold0.0"] for w in ("student", "teacher")),
                            s_logits[1], s_boxes[1], t_logits[1], t_boxes[1], ("sigmoid", "sigmoid"))
    assert torch.equal(align.teacher, align.student) and len(align.teacher) > 9


def test_gradients_reach_the_student_only():
    torch.manual_seed(7)
    t_logits, t_boxes = _layered(2, 2, 20, 3, 4, "softmax", requires_grad=True)
    s_logits, s_boxes = _layered(2, 2, 10, 3, 4, "sigmoid", requires_grad=True)
    targets = _random(2, 1, 1, 3, 4)[-1]
    terms = LAPD(layers="all")(_ctx(t_logits, t_boxes, s_logits, s_boxes, targets, ("sigmoid", "softmax")))
    sum(terms.values()).backward()
    assert s_logits.grad.abs().sum() > 0 and s_boxes.grad.abs().sum() > 0
    assert t_logits.grad is None and t_boxes.grad is None


def test_normalise_by_gt_count():
    t_logits, t_boxes, s_logits, s_boxes, targets = _scene()
    ctx = _ctx(t_logits[None], t_boxes[None], s_logits[None], s_boxes[None], targets)
    by_pairs, by_gt = LAPD()(ctx), LAPD(normalise="gt")(ctx)
    for k in by_pairs:  # 12 pairs (2 images x 6), 4 GTs
        torch.testing.assert_close(by_gt[k], by_pairs[k] * 12 / 4)


def test_gqs_results_are_cached_per_step(monkeypatch):
    import detrkd.distill.base as base

    calls = []
    real = base.group_query_selection
    monkeypatch.setattr(base, "group_query_selection", lambda *a, **k: calls.append(1) or real(*a, **k))
    t_logits, t_boxes, s_logits, s_boxes, targets = _scene()
    ctx = _ctx(t_logits[None], t_boxes[None], s_logits[None], s_boxes[None], targets)
    first = LAPD()(ctx)
    second = LAPD(kinds="positives+hard+easy")(ctx)
    assert len(calls) == 2 and second["l1"] > 0 and first["l1"] > 0
    LAPD(threshold=0.5)(ctx)
    assert len(calls) == 4


def test_empty_alignment_gives_zero_loss_with_gradient():
    t_logits, t_boxes, s_logits, s_boxes, _ = _scene()
    s_logits.requires_grad_(True)
    empty = [{"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4)}] * 2
    terms = LAPD()(_ctx(t_logits[None], t_boxes[None], s_logits[None], s_boxes[None], empty))
    assert all(v.item() == 0 for v in terms.values())
    terms["cls"].backward()  # no pairs: still differentiable


# ---- end to end ----------------------------------------------------------------------------------


def test_distiller_step_with_tiny_rt_detr():
    torch.manual_seed(0)
    teacher = build_detector("rt_detr", "tiny", 4)
    student = build_detector("rt_detr", "tiny", 4, num_queries=20)
    batch = {"pixel_values": torch.randn(2, 3, 64, 64), "pixel_mask": torch.ones(2, 64, 64, dtype=torch.long),
             "labels": [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
                        {"class_labels": torch.tensor([2, 3]),
                         "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])}]}
    methods, weights = build_methods({"lapd": {"weight": 2.0, "layers": "all", "kinds": ["positives", "hard"]}},
                                     student, teacher)
    distiller = Distiller(student, teacher, methods, weights).train()
    loss, terms = distiller(batch)
    assert {"lapd/cls", "lapd/l1", "lapd/giou"} <= set(terms) and torch.isfinite(loss)
    assert terms["lapd/l1"] > 0
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
