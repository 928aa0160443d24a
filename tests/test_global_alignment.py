"""Global alignment (DETRDistill-style baseline): the matching equals scipy's optimum for every
solver, shape and thread setting; known permutations; unequal query counts; the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from detrkd.config import ConfigError
from detrkd.distill.base import DistillContext, Distiller
from detrkd.distill.global_alignment import (GlobalAlignment, global_alignment, reference_alignment,
                                             solve_costs, stack_layer_pairs)
from detrkd.distill.methods import METHODS, build_methods, method_options
from detrkd.distill.pairing import prediction_cost
from detrkd.models import build_detector
from detrkd.models.base import DetectorOutput, EncoderMemory, Predictions, Queries

SIGMOID = ("sigmoid", "sigmoid")


def _random_preds(layers: int, batch: int, queries: int, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, batch, queries, classes, generator=g) * 2
    cxcy = torch.rand(layers, batch, queries, 2, generator=g) * 0.8 + 0.1
    wh = torch.rand(layers, batch, queries, 2, generator=g) * 0.3 + 0.02
    return logits, torch.cat([cxcy, wh], -1)


def _output(logits: torch.Tensor, boxes: torch.Tensor, head: str = "sigmoid") -> DetectorOutput:
    b = logits.shape[1]
    memory = EncoderMemory(torch.zeros(b, 1, 4), torch.tensor([[1, 1]]), torch.tensor([0]),
                           torch.zeros(b, 1, dtype=torch.bool))
    return DetectorOutput(Predictions(logits, boxes), head, memory, Queries())


def _ctx(teacher: DetectorOutput, student: DetectorOutput) -> DistillContext:
    return DistillContext(None, None, student, teacher, [])


def _totals(align, cost: np.ndarray) -> np.ndarray:
    """Per-problem total cost of a flat Alignment on cost [P, Qt, Qs]."""
    p, qt, qs = cost.shape
    t, s = align.teacher.numpy(), align.student.numpy()
    assert np.array_equal(t // qt, s // qs)  # pairs stay inside their problem
    totals = np.zeros(p)
    np.add.at(totals, t // qt, cost[t // qt, t % qt, s % qs])
    return totals


# ---- the solver layer --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 70, 70), (3, 100, 97), (3, 300, 8), (3, 8, 300), (2, 40, 90)])
@pytest.mark.parametrize("solver", ["auto", "lapjv", "scipy"])
@pytest.mark.parametrize("workers", [0, 2])
def test_solve_costs_equals_scipy_optimum(shape, solver, workers):
    cost = np.random.default_rng(sum(shape)).random(shape).astype(np.float32)
    solved = solve_costs(cost, solver, workers)
    for c, (rows, cols) in zip(cost, solved):
        assert len(rows) == min(c.shape) and len(set(rows)) == len(rows) and len(set(cols)) == len(cols)
        r, k = linear_sum_assignment(c.astype(np.float64))
        assert c[rows, cols].sum() == pytest.approx(c[r, k].sum(), rel=1e-5)


@pytest.mark.parametrize("qt, qs", [(70, 70), (90, 30), (30, 90), (66, 64)])
@pytest.mark.parametrize("workers", [0, 2])
def test_alignment_equals_scipy_optimum_and_reference(qt, qs, workers):
    t_logits, t_boxes = _random_preds(1, 4, qt, seed=qt)
    s_logits, s_boxes = _random_preds(1, 4, qs, seed=qs + 1)
    args = (s_logits[0], s_boxes[0], t_logits[0], t_boxes[0], SIGMOID)
    cost = prediction_cost(*args).numpy()  # the allocating path: also checks the in-place one
    # small chunks: several chunks per call
    align, timing = global_alignment(*args, workers=workers, chunk_elements=2 * qt * qs)
    assert set(timing) == {"cost", "solve", "match"} and timing["match"] >= timing["cost"] >= 0
    optimum = np.array([c[linear_sum_assignment(c)].sum() for c in cost.astype(np.float64)])
    np.testing.assert_allclose(_totals(align, cost), optimum, rtol=1e-5)
    assert len(align.teacher) == 4 * min(qt, qs)
    np.testing.assert_allclose(_totals(reference_alignment(*args, batch=2), cost), optimum, rtol=1e-5)


def test_known_permutation_and_unequal_counts():
    """Student query j is teacher query perm[j] (jittered): the matching recovers perm; with 5
    student queries copied from 8 teacher ones, each student query finds its original."""
    t_logits, t_boxes = _random_preds(1, 2, 8, seed=4)
    perms = [torch.randperm(8, generator=torch.Generator().manual_seed(b)) for b in range(2)]
    s_logits = torch.stack([t_logits[0, b, p] for b, p in enumerate(perms)])
    s_boxes = torch.stack([t_boxes[0, b, p] + 0.002 for b, p in enumerate(perms)])
    for keep in (8, 5):
        align, _ = global_alignment(s_logits[:, :keep], s_boxes[:, :keep], t_logits[0], t_boxes[0], SIGMOID)
        got = {(int(t) // 8, int(t) % 8, int(s) % keep) for t, s in zip(align.teacher, align.student)}
        assert got == {(b, int(perms[b][j]), j) for b in range(2) for j in range(keep)}


def test_pairwise_cost_out_equals_allocating_path():
    for heads in (SIGMOID, ("sigmoid", "softmax"), ("softmax", "softmax")):  # (student, teacher)
        t_logits, t_boxes = _random_preds(1, 2, 9, classes=3 + (heads[1] == "softmax"), seed=7)
        s_logits, s_boxes = _random_preds(1, 2, 6, classes=3 + (heads[0] == "softmax"), seed=8)
        t_boxes[0, 0, 0, 2:] = 0.0  # a degenerate box stays finite
        args = (s_logits[0], s_boxes[0], t_logits[0], t_boxes[0], heads)
        out = torch.full((2, 9, 6), float("nan"))
        torch.testing.assert_close(prediction_cost(*args, out=out), prediction_cost(*args))
        assert torch.isfinite(out).all()


# ---- the method ----------------------------------------------------------------------------------


def test_layer_pairs_are_stacked_as_problems():
    s_logits, s_boxes = _random_preds(2, 3, 5)
    t_logits, t_boxes = _random_preds(3, 3, 7)
    s, sb, t, tb = stack_layer_pairs(Predictions(s_logits, s_boxes), Predictions(t_logits, t_boxes), [(0, 0), (1, 2)])
    assert s.shape == (6, 5, 3) and t.shape == (6, 7, 3) and sb.shape == (6, 5, 4) and tb.shape == (6, 7, 4)
    torch.testing.assert_close(s[4], s_logits[1, 1])
    torch.testing.assert_close(t[4], t_logits[2, 1])


@pytest.mark.parametrize("layers, problems", [("all", 2 * 3), ("last", 3)])
def test_unequal_queries_and_layers_reference_gives_the_same_loss(layers, problems):
    t_logits, t_boxes = _random_preds(3, 3, 12, seed=1)
    s_logits, s_boxes = _random_preds(2, 3, 7, seed=2)
    ctx = _ctx(_output(t_logits, t_boxes), _output(s_logits, s_boxes))
    fast, ref = GlobalAlignment(layers=layers), GlobalAlignment(layers=layers, reference=True)
    terms, ref_terms = fast(ctx), ref(ctx)
    for key in ("cls", "l1", "giou"):
        torch.testing.assert_close(terms[key], ref_terms[key])
    assert {"cost", "solve", "match", "loss", "total"} <= set(fast.last_timing)
    assert {"match", "loss", "total"} <= set(ref.last_timing)


def test_zero_loss_when_student_equals_teacher():
    logits, boxes = _random_preds(2, 2, 10)
    ctx = _ctx(_output(logits, boxes), _output(logits.clone(), boxes.clone()))
    terms = GlobalAlignment(class_kd="kl")(ctx)
    assert all(abs(v.item()) < 1e-5 for v in terms.values())
    terms = GlobalAlignment()(ctx)  # BCE: box terms 0, class term = the teacher's binary entropy (its minimum)
    assert abs(terms["l1"].item()) < 1e-5 and abs(terms["giou"].item()) < 1e-5
    p = logits.sigmoid()
    entropy = -(p * p.log() + (1 - p) * (1 - p).log()).sum(-1).mean(dim=(1, 2)).sum()
    torch.testing.assert_close(terms["cls"], entropy)


def test_gradients_reach_the_student_only():
    t_logits, t_boxes = (x.requires_grad_(True) for x in _random_preds(2, 2, 6, seed=3))
    s_logits, s_boxes = (x.requires_grad_(True) for x in _random_preds(2, 2, 6, seed=4))
    terms = GlobalAlignment()(_ctx(_output(t_logits, t_boxes), _output(s_logits, s_boxes)))
    sum(terms.values()).backward()
    assert t_logits.grad is None and t_boxes.grad is None
    assert s_logits.grad.abs().sum() > 0 and s_boxes.grad.abs().sum() > 0


def test_teacher_score_weighting_and_layer_mean():
    t_logits, t_boxes = _random_preds(1, 2, 6, seed=5)
    s_logits, s_boxes = _random_preds(1, 2, 6, seed=6)
    ctx = _ctx(_output(t_logits, t_boxes), _output(s_logits, s_boxes))
    align, _ = global_alignment(s_logits[0], s_boxes[0], t_logits[0], t_boxes[0], SIGMOID)
    t_l1 = t_boxes[0].flatten(0, 1)[align.teacher]
    s_l1 = s_boxes[0].flatten(0, 1)[align.student]
    w = t_logits[0].flatten(0, 1)[align.teacher].sigmoid().max(-1).values
    expected = (w * (s_l1 - t_l1).abs().sum(-1)).sum() / w.sum()  # unweighted: the Distiller applies 5
    torch.testing.assert_close(GlobalAlignment(weighting="teacher_score")(ctx)["l1"], expected)
    ctx2 = _ctx(_output(t_logits.repeat(2, 1, 1, 1), t_boxes.repeat(2, 1, 1, 1)),
                _output(s_logits.repeat(2, 1, 1, 1), s_boxes.repeat(2, 1, 1, 1)))
    one = GlobalAlignment()(ctx)["l1"]
    torch.testing.assert_close(GlobalAlignment()(ctx2)["l1"], 2 * one)  # two equal layers: summed
    torch.testing.assert_close(GlobalAlignment(layer_reduction="mean")(ctx2)["l1"], one)


def test_options_are_checked_and_named():
    assert METHODS["global_alignment"] is GlobalAlignment
    for bad in ({"solver": "hungarian"}, {"layers": "first"}, {"weighting": "score"}, {"class_kd": "mse"}):
        with pytest.raises(ConfigError, match=fr"methods\.global_alignment\.{next(iter(bad))}: expected one of"):
            method_options("global_alignment", bad)
    with pytest.raises(ValueError, match="workers must be >= 0"):
        GlobalAlignment(workers=-1)
    with pytest.raises(ConfigError, match=r"methods\.global_alignment: .*valid options: weight, terms, layers"):
        build_methods({"global_alignment": {"solvr": "scipy"}}, None, None)


def test_combined_with_agfd_in_a_distiller_step(two_image_batch):
    torch.manual_seed(0)
    teacher = build_detector("rt_detr", "tiny", 4)
    student = build_detector("rt_detr", "tiny", 4, num_queries=20, d_model=32)
    methods, weights = build_methods({"global_alignment": {"weight": 2.0, "workers": 1},
                                      "agfd": {"weight": 50.0}}, student, teacher)
    loss, terms = Distiller(student, teacher, methods, weights).train()(two_image_batch)
    assert {"global_alignment/cls", "global_alignment/l1", "global_alignment/giou", "agfd/feature"} <= set(terms)
    assert torch.isfinite(loss) and terms["global_alignment/l1"] > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
