"""Matching-free active-sampling distillation: sampling module, losses, gradient routing, no matching."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import scipy.optimize
import torch

import detrkd.matching
from detrkd.distill.active_sampling import (ActiveSampling, SamplingModule, class_distance, prediction_vectors,
                                            sample, sampling_logits, sampling_loss, sampling_weights)
from detrkd.config import ConfigError
from detrkd.distill.base import DistillContext, Distiller, scaled_terms
from detrkd.distill.methods import build_methods, method_options
from detrkd.models import build_detector
from detrkd.models.base import DetectorOutput, Predictions

C = 4


@pytest.fixture(scope="module")
def models():
    """rt_detr (sigmoid head, Qt = 30) teacher, detr (softmax head, Qs = 10) student."""
    torch.manual_seed(0)
    teacher = build_detector("rt_detr", "tiny", C, dropout=0.0)
    student = build_detector("detr", "tiny", C, dropout=0.0, num_queries=10)
    return teacher, student


def _output(logits: torch.Tensor, boxes: torch.Tensor, head: str) -> DetectorOutput:
    """A DetectorOutput holding only predictions (all the method reads); logits [L, B, Q, K]."""
    return DetectorOutput(predictions=Predictions(logits, boxes), class_head=head, memory=None, queries=None)


def _ctx(teacher_out: DetectorOutput, student_out: DetectorOutput, teacher=None, student=None) -> DistillContext:
    return DistillContext(student, teacher, student_out, teacher_out, targets=[])


def _random_predictions(head: str, layers: int = 1, b: int = 2, q: int = 30, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(layers, b, q, C + (head == "softmax"), generator=g) * 2
    boxes = torch.rand(layers, b, q, 4, generator=g) * 0.6 + 0.2
    return logits, boxes


def _grads(module: torch.nn.Module) -> list[bool]:
    """Per trainable parameter: has a non-zero gradient."""
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in module.parameters() if p.requires_grad]


# ---- building blocks ------------------------------------------------------------------------------


def test_prediction_vectors_put_both_heads_on_the_real_classes():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0, 5.0]]])  # softmax, mostly no-object
    y = prediction_vectors(logits, torch.full((1, 1, 4), 0.5), "softmax")
    assert y.shape == (1, 1, 4 + C)
    torch.testing.assert_close(y[..., 4:], logits.softmax(-1)[..., :-1])
    y = prediction_vectors(torch.zeros(1, 1, C), torch.full((1, 1, 4), 0.5), "sigmoid")
    torch.testing.assert_close(y[..., 4:], torch.full((1, 1, C), 0.5))


def test_sampling_loss_decreases_and_sharpens_when_the_asm_is_trained():
    torch.manual_seed(0)
    logits, boxes = _random_predictions("sigmoid")
    y_t = prediction_vectors(logits[-1], boxes[-1], "sigmoid")  # fixed teacher outputs [2, 30, 8]
    asm = SamplingModule(4 + C, hidden=64)
    opt = torch.optim.Adam(asm.parameters(), lr=1e-2)

    def diag() -> float:
        with torch.no_grad():
            return sampling_weights(*asm(y_t)).diagonal(dim1=-2, dim2=-1).mean().item()

    w0, losses = diag(), []
    for _ in range(60):
        loss = sampling_loss(*asm(y_t))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0] and np.mean(losses[-5:]) < np.mean(losses[:5])
    assert diag() > w0 + 0.1  # W_ii rises from ~1/30


def test_temperature_flattens_the_sampling_weights():
    torch.manual_seed(0)
    q, k = torch.randn(2, 30, 16) * 2, torch.randn(2, 30, 16) * 2  # a sharp sampler (a trained ASM's scale)
    entropy = []
    for t in (0.5, 1.0, 2.0, 4.0, 8.0):
        w = sampling_weights(q, k, temperature=t)
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
        entropy.append(-(w * w.clamp_min(1e-12).log()).sum(-1).mean().item())
    assert all(a + 1e-3 < b for a, b in zip(entropy, entropy[1:])), entropy
    assert entropy[-1] < np.log(30) + 1e-5


def test_multi_head_samples_are_the_average_of_the_heads_samples():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 7, 8), torch.randn(2, 7, 3)
    s, w = sample(q, k, v, heads=2, temperature=2.0)
    per_head = [sample(q[..., i * 4:(i + 1) * 4], k[..., i * 4:(i + 1) * 4], v, 1, 2.0)[0] for i in range(2)]
    torch.testing.assert_close(s, (per_head[0] + per_head[1]) / 2)
    assert w.shape == (2, 5, 7) and sampling_logits(q, k, heads=2).shape == (2, 2, 5, 7)
    with pytest.raises(ValueError, match="heads"):
        ActiveSampling(num_classes=C, hidden=30, heads=4)


@pytest.mark.parametrize("heads", [1, 2])
def test_the_fast_forms_equal_the_papers_formulas(heads):
    """The scale folded into the queries, Eq. 16 as logsumexp minus the diagonal and the key-only
    frozen projection give the textbook values: softmax(q k^T / (sqrt(d / h) T)), -mean log W_ii,
    and the ASM's own keys (gradients to the input only)."""
    torch.manual_seed(0)
    q, k = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    h = heads
    qh, kh = (x.view(2, 6, h, 8 // h).transpose(1, 2) for x in (q, k))
    textbook = (qh @ kh.transpose(-1, -2) / (np.sqrt(8 / h) * 3.0)).softmax(-1).mean(1)
    torch.testing.assert_close(sampling_weights(q, k, heads=h, temperature=3.0), textbook)
    log_w = (qh @ kh.transpose(-1, -2) / np.sqrt(8 / h)).log_softmax(-1)
    torch.testing.assert_close(sampling_loss(q, k, h), -log_w.diagonal(dim1=-2, dim2=-1).mean())
    asm = SamplingModule(4 + C, hidden=16, layers=2)
    y = torch.rand(3, 5, 4 + C, requires_grad=True)
    keys = asm.frozen_keys(y)
    torch.testing.assert_close(keys, asm(y)[1])
    keys.sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0
    assert all(p.grad is None for p in asm.parameters())


@pytest.mark.parametrize("heads", [1, 4])
def test_teacher_samples_reuse_the_sampling_loss_scores(heads):
    """With the teacher's predictions as points, S_t comes from the scores the sampling loss already
    computed (one Qt x Qt product fewer): the same samples as sampling afresh, and a constant."""
    torch.manual_seed(0)
    method = ActiveSampling(num_classes=3, hidden=16, heads=heads, temperature=4.0)
    y_t, y_s = torch.rand(2, 7, 7), torch.rand(2, 5, 7)
    q_t, k_t = method.asm(y_t)
    s_t, _ = method.samples((y_t, q_t, k_t, sampling_logits(q_t, k_t, heads)), y_s)
    expected, _ = sample(q_t, k_t, y_t, heads, 4.0)
    torch.testing.assert_close(s_t, expected)
    assert not s_t.requires_grad


def test_class_distances_are_zero_only_at_equality():
    t = torch.tensor([[0.7, 0.1, 0.0, 0.0], [0.9, 0.8, 0.6, 0.1]])  # softmax-like, sigmoid-like (sum > 1)
    for mode in ("kl", "bernoulli"):
        torch.testing.assert_close(class_distance(t.clone(), t, mode), torch.zeros(2))
        assert (class_distance(t.flip(-1), t, mode) > 0.1).all()
    with pytest.raises(ValueError):
        class_distance(t, t, "bce")


def _sigmoid_student_over_one(q: int = 10, seed: int = 4) -> DetectorOutput:
    """A sigmoid student whose every query's class probabilities sum to more than 1 (as most of a
    fresh RT-DETR student's do), with gradients."""
    g = torch.Generator().manual_seed(seed)
    logits = (0.5 + torch.rand(1, 2, q, C, generator=g)).requires_grad_(True)  # sigmoid >= 0.62 each
    boxes = torch.rand(1, 2, q, 4, generator=g) * 0.6 + 0.2
    return _output(logits, boxes, "sigmoid")


def test_sigmoid_student_over_one_gets_a_class_gradient_by_default():
    """Defect: the C + 1 KL clamps the student's no-object mass at 0 where its probabilities sum to
    >= 1; the term then saturates with no gradient towards fewer confident classes. The default
    (``class_kd: auto``) uses the per-class Bernoulli KL for sigmoid students: gradient everywhere."""
    logits, boxes = _random_predictions("sigmoid", q=30)
    teacher = _output(logits - 3.0, boxes, "sigmoid")  # a mostly-background teacher
    student = _sigmoid_student_over_one()
    assert (student.predictions.logits.sigmoid().sum(-1) > 1).all()
    method = ActiveSampling(num_classes=C, hidden=32)
    assert method.class_kd == "auto"
    (grad,) = torch.autograd.grad(method(_ctx(teacher, student))["cls"], student.predictions.logits)
    assert grad.abs().sum() > 1e-3 and (grad > 0).float().mean() > 0.9  # lower every class probability
    saturated = ActiveSampling(num_classes=C, hidden=32, class_kd="kl")
    (kl_grad,) = torch.autograd.grad(saturated(_ctx(teacher, student))["cls"], student.predictions.logits)
    assert kl_grad.sum().abs() < 1e-3 * grad.sum().abs()  # the paper's C + 1 form: no pull down


def test_auto_class_distance_follows_the_student_head():
    logits, boxes = _random_predictions("softmax", q=30)
    teacher = _output(logits, boxes, "softmax")
    s_logits, s_boxes = _random_predictions("softmax", q=10, seed=2)
    for head, expected in (("softmax", "kl"), ("sigmoid", "bernoulli")):
        student = _output(s_logits if head == "softmax" else s_logits[..., :-1], s_boxes, head)
        terms = {}
        for mode in ("auto", expected):
            torch.manual_seed(0)
            terms[mode] = ActiveSampling(num_classes=C, hidden=32, class_kd=mode)(_ctx(teacher, student))["cls"]
        torch.testing.assert_close(terms["auto"], terms[expected])


# ---- the method -----------------------------------------------------------------------------------


@pytest.mark.parametrize("points,m", [("teacher", 30), ("teacher+student", 40), ("random", 30)])
def test_shapes_with_different_query_counts_and_mixed_heads(models, two_image_batch, points, m):
    teacher, student = models
    with torch.no_grad():
        t_out = teacher(two_image_batch["pixel_values"], two_image_batch["pixel_mask"])
        s_out = student(two_image_batch["pixel_values"], two_image_batch["pixel_mask"])
    assert t_out.class_head == "sigmoid" and s_out.class_head == "softmax"
    method = ActiveSampling(student, teacher, hidden=32, points=points)
    side = method.teacher_side(t_out, -1)
    y_s = prediction_vectors(*s_out.predictions.layer(-1), "softmax")
    assert side[0].shape == (2, 30, 4 + C) and y_s.shape == (2, 10, 4 + C) and side[1].shape == (2, 30, 32)
    s_t, s_s = method.samples(side, y_s)
    assert s_t.shape == s_s.shape == (2, m, 4 + C)
    terms = method(_ctx(t_out, s_out, teacher, student))
    assert set(terms) == {"sampling", "l1", "cls"}
    assert all(v.shape == () and torch.isfinite(v) and v >= 0 for v in terms.values())


@pytest.mark.parametrize("class_kd", ["kl", "bernoulli"])
def test_student_equal_to_teacher_gives_zero_distillation(class_kd):
    logits, boxes = _random_predictions("softmax", layers=2)
    method = ActiveSampling(num_classes=C, hidden=32, class_kd=class_kd, layers="all")
    same = method(_ctx(_output(logits, boxes, "softmax"), _output(logits.clone(), boxes.clone(), "softmax")))
    assert same["l1"].abs() < 1e-6 and same["cls"].abs() < 1e-6 and same["sampling"] > 0
    # a sigmoid student with the same real-class probabilities (mixed heads), in a shuffled order
    probs = logits.softmax(-1)[..., :-1]
    perm = torch.randperm(30)
    mixed = method(_ctx(_output(logits, boxes, "softmax"),
                        _output(torch.logit(probs)[:, :, perm], boxes[:, :, perm], "sigmoid")))
    assert mixed["l1"].abs() < 1e-5 and mixed["cls"].abs() < 1e-5
    other = method(_ctx(_output(logits, boxes, "softmax"), _output(*_random_predictions("softmax", 2, seed=1),
                                                                   "softmax")))
    assert other["l1"] > 1e-2 and other["cls"] > 1e-2


def test_terms_are_unweighted_and_their_weights_are_the_papers():
    """The method returns the plain terms; its ``terms`` (sampling 1, L1 5, class 1) are applied
    by the Distiller, and a config's ``terms`` overrides them one by one."""
    assert ActiveSampling.terms == {"sampling": 1.0, "l1": 5.0, "cls": 1.0}
    logits, boxes = _random_predictions("sigmoid")
    s_logits, s_boxes = _random_predictions("sigmoid", q=10, seed=3)
    ctx = _ctx(_output(logits, boxes, "sigmoid"), _output(s_logits, s_boxes, "sigmoid"))
    torch.manual_seed(0)
    raw = ActiveSampling(num_classes=C, hidden=32)(ctx)
    _, weights = method_options("active_sampling", {"weight": 2.0, "terms": {"sampling": 3.0}})
    scaled = scaled_terms("active_sampling", raw, weights)
    for name, w in (("sampling", 6.0), ("l1", 10.0), ("cls", 2.0)):
        torch.testing.assert_close(scaled[f"active_sampling/{name}"], w * raw[name])
    with pytest.raises(ConfigError, match=r"methods\.active_sampling\.bbox_weight: per-term weights are .*terms now, a mapping of sampling, l1, cls"):
        method_options("active_sampling", {"bbox_weight": 5.0})


def test_rebalance_weights_points_by_teacher_confidence(monkeypatch):
    """rebalance: each point's terms weighted by the teacher sample's max class score. Equal
    confidences give the plain means; a point the teacher calls background drops out, however far
    the student's sample is from the teacher's there."""
    g = torch.Generator().manual_seed(0)
    s_t = torch.cat([torch.rand(2, 6, 4, generator=g), torch.full((2, 6, C), 0.5)], -1)
    s_s = torch.cat([torch.rand(2, 6, 4, generator=g), torch.rand(2, 6, C, generator=g)], -1)
    plain, weighted = ActiveSampling(num_classes=C, hidden=8), ActiveSampling(num_classes=C, hidden=8, rebalance=True)
    for m in (plain, weighted):
        monkeypatch.setattr(m, "samples", lambda teacher, y_s: (s_t, s_s))
    for got, want in zip(weighted.distill(None, None), plain.distill(None, None)):
        torch.testing.assert_close(got, want)
    s_t[:, 1:, 4:] = torch.rand(2, 5, C, generator=g)
    s_t[:, 0, 4:] = 0.0  # point 0: background for the teacher
    before = weighted.distill(None, None)
    s_s[:, 0] = 10.0  # ... and the student far off there
    after = weighted.distill(None, None)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b)
    assert all(x > y for x, y in zip(plain.distill(None, None), after))  # the plain mean does see it
    w = s_t[:, 1:, 4:].max(-1).values
    l1 = (s_s[:, 1:, :4] - s_t[:, 1:, :4]).abs().sum(-1)
    torch.testing.assert_close(after[0], (w * l1).sum() / w.sum())


@pytest.mark.parametrize("points", ["teacher", "teacher+student"])
def test_gradient_routing(models, two_image_batch, points):
    """sampling -> ASM only; l1 and cls -> student only; teacher never (even with a teacher graph)."""
    teacher, student = models
    teacher.requires_grad_(True)
    try:
        t_out = teacher(two_image_batch["pixel_values"], two_image_batch["pixel_mask"])  # WITH a graph: the method must detach
        s_out = student(two_image_batch["pixel_values"], two_image_batch["pixel_mask"])
        assert t_out.predictions.logits.requires_grad
        method = ActiveSampling(student, teacher, hidden=32, points=points, layers="all")
        terms = method(_ctx(t_out, s_out, teacher, student))
        for name, expect in (("sampling", "asm"), ("l1", "student"), ("cls", "student")):
            for m in (teacher, student, method):
                m.zero_grad(set_to_none=True)
            terms[name].backward(retain_graph=True)
            assert all(p.grad is None for p in teacher.parameters()), name
            assert all(p.grad is None for p in method.parameters()) == (expect != "asm"), name
            assert all(_grads(method)) == (expect == "asm"), name
            assert all(p.grad is None for p in student.parameters()) == (expect != "student"), name
            assert any(_grads(student)) == (expect == "student"), name
    finally:
        teacher.requires_grad_(False)
        for m in (teacher, student):
            m.zero_grad(set_to_none=True)


# ---- with the Distiller ---------------------------------------------------------------------------


def test_distiller_step_end_to_end(models, two_image_batch):
    teacher, student = models
    methods, weights = build_methods({"active_sampling": {"weight": 2.0, "hidden": 32, "layers": "all",
                                                          "temperature": 4.0}}, student, teacher)
    distiller = Distiller(student, teacher, methods, weights).train()
    assert "active_sampling" in distiller.trainable_modules()
    loss, terms = distiller(two_image_batch)
    assert {"active_sampling/sampling", "active_sampling/l1", "active_sampling/cls"} <= set(terms)
    assert torch.isfinite(loss) and terms["active_sampling/l1"] > 0
    loss.backward()
    assert all(_grads(distiller.methods["active_sampling"]))
    assert any(_grads(student))
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)


def test_no_matching_inside_the_method(models, two_image_batch, monkeypatch):
    """Every assignment solver is wrapped to count calls and to RAISE when called inside the method's
    forward. The student's own DETR loss calls HF's matcher (scipy) outside it: those calls are
    counted too, which shows the wrappers are live, and are allowed."""
    teacher, student = models
    inside, calls = {"flag": False}, {"inside": 0, "outside": 0}

    def guard(fn):
        def wrapped(*args, **kwargs):
            calls["inside" if inside["flag"] else "outside"] += 1
            if inside["flag"]:
                raise AssertionError(f"{fn.__name__} called inside ActiveSampling.forward")
            return fn(*args, **kwargs)
        return wrapped

    hf_loss = pytest.importorskip("transformers.loss.loss_for_object_detection")
    for owner in (scipy.optimize, detrkd.matching, hf_loss):
        if hasattr(owner, "linear_sum_assignment"):
            monkeypatch.setattr(owner, "linear_sum_assignment", guard(owner.linear_sum_assignment))
    monkeypatch.setattr(detrkd.matching, "linear_assignment", guard(detrkd.matching.linear_assignment))
    monkeypatch.setattr(detrkd.matching, "hungarian_match", guard(detrkd.matching.hungarian_match))

    @contextlib.contextmanager
    def flagged():
        inside["flag"] = True
        try:
            yield
        finally:
            inside["flag"] = False

    # positive control: the guard catches a solver call made inside
    with pytest.raises(AssertionError), flagged():
        detrkd.matching.linear_assignment(np.eye(3))
    calls["inside"] = 0

    method = ActiveSampling(student, teacher, hidden=32, layers="all", points="teacher+student")
    forward = method.forward

    def guarded_forward(ctx):
        with flagged():
            return forward(ctx)

    monkeypatch.setattr(method, "forward", guarded_forward)
    loss, _ = Distiller(student, teacher, {"active_sampling": method}).train()(two_image_batch)
    loss.backward()
    student.zero_grad(set_to_none=True)
    assert calls["inside"] == 0
    assert calls["outside"] > 0  # HF's matcher in the student's detection loss went through a wrapper


def test_bad_options_are_rejected():
    for bad in ({"points": "student"}, {"class_kd": "l2"}, {"layers": "first"}, {"precision": "float16"}):
        with pytest.raises(ConfigError, match=fr"methods\.active_sampling\.{next(iter(bad))}: expected one of"):
            method_options("active_sampling", bad)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ActiveSampling(num_classes=C, temperature=0)
    with pytest.raises(ValueError, match="num_classes"):
        ActiveSampling()


def _losses_and_grads(method: ActiveSampling, teacher_out: DetectorOutput, student_logits: torch.Tensor,
                      boxes: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(terms, grad of the student's logits, the ASM's gradients flattened) of one backward."""
    logits = student_logits.clone().requires_grad_()
    method.zero_grad()
    terms = method(_ctx(teacher_out, _output(logits, boxes, "sigmoid")))
    sum(terms.values()).backward()
    asm_grads = torch.cat([p.grad.flatten() for p in method.parameters()])
    return {k: v.detach() for k, v in terms.items()}, logits.grad, asm_grads


def test_bfloat16_products_agree_with_float32_and_run_in_bfloat16():
    """precision="bfloat16": the ASM's MLP and q.k products in bfloat16 (the queries are bfloat16),
    the scores float32; the terms and both gradients stay close to float32's, and the ASM's
    parameters and gradients stay float32."""
    teacher_out = _output(*_random_predictions("sigmoid", q=200, seed=1), "sigmoid")
    s_logits, s_boxes = _random_predictions("sigmoid", q=200, seed=2)
    results = {}
    for precision in ("float32", "bfloat16"):
        torch.manual_seed(0)
        method = ActiveSampling(num_classes=C, precision=precision)
        side = method.teacher_side(teacher_out, 0)
        assert side[1].dtype == (torch.bfloat16 if precision == "bfloat16" else torch.float32)
        assert side[3].dtype == torch.float32  # scores, before every softmax
        results[precision] = _losses_and_grads(method, teacher_out, s_logits, s_boxes)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in method.parameters())
    (t32, g32, a32), (t16, g16, a16) = results["float32"], results["bfloat16"]
    for k in t32:
        torch.testing.assert_close(t16[k], t32[k], rtol=1e-2, atol=1e-4)
    assert 0 < (g16 - g32).norm() / g32.norm() < 0.05  # bfloat16 did run (not bit-equal), and is close
    assert 0 < (a16 - a32).norm() / a32.norm() < 0.05
