"""KD-DETR: point sampling, grouped decoding, the loss by hand, denoising safety, Table 1 baselines.

Tiny random models (dropout 0); parameters HF initialises to exactly zero get small random values
so that predictions are not constant.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from detrkd.box_ops import cxcywh_to_xyxy
from detrkd.config import ConfigError
from detrkd.distill.base import DistillContext, Distiller
from detrkd.distill.kd_detr import (BASELINES, KDDETR, Aligned, aligned_losses, decode_groups,
                                    foreground_pairs, group_mask, inconsistent_pairs,
                                    sample_general_points, specific_points, unmatched_mean)
from detrkd.distill.losses import foreground_weight
from detrkd.distill.methods import build_methods, method_options
from detrkd.models import build_detector
from detrkd.models.base import DetectorOutput, Predictions, Queries

C = 4
X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
LABELS = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
          {"class_labels": torch.tensor([2, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])}]


def build(family: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_detector(family, "tiny", C, dropout=0.0, **overrides)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and bool((p == 0).all()):
                p.normal_(0.0, 0.05)
    return model


@pytest.fixture(scope="module")
def rt_teacher():
    return build("rt_detr", num_queries=20).eval()


@pytest.fixture(scope="module")
def rt_student():
    return build("rt_detr", num_queries=12, d_model=32, encoder_hidden_dim=32,
                 decoder_in_channels=[32, 32, 32]).train()


def make_ctx(teacher, student, labels=None, teacher_grad: bool = False) -> DistillContext:
    with torch.set_grad_enabled(teacher_grad):
        t_out = teacher(X)
    return DistillContext(student, teacher, student(X, labels=labels), t_out, LABELS)


# ---- points ----------------------------------------------------------------------------------------


def test_general_points_uniform_law_and_resampling():
    torch.manual_seed(0)
    a, b = sample_general_points(2, 500), sample_general_points(2, 500)
    assert a.shape == (2, 500, 4) and not torch.allclose(a, b)
    xyxy = cxcywh_to_xyxy(a)
    assert xyxy.min() >= 0 and xyxy.max() <= 1 + 1e-6
    assert a[..., 2:].min() >= 0.05 / 2 - 1e-6 and a[..., 2:].max() <= 1 + 1e-6
    assert a[..., :2].std() > 0.2  # centres spread over the image
    torch.manual_seed(0)
    assert torch.equal(sample_general_points(2, 500), a)
    ln = sample_general_points(2, 500, "logit_normal")
    assert ln.min() > 0 and ln.max() < 1
    with pytest.raises(ValueError):
        sample_general_points(1, 3, "gaussian")


def _fake_out(logits: torch.Tensor, boxes: torch.Tensor, head: str = "sigmoid", reference=None) -> DetectorOutput:
    """A hand-made output: logits [B, Q, K], boxes [B, Q, 4] as a one-layer prediction."""
    return DetectorOutput(Predictions(logits[None], boxes[None]), head, memory=None,
                          queries=Queries(reference_boxes=reference))


def test_specific_points_fill_2d_references_and_fall_back_to_first_layer_boxes():
    ref = torch.tensor([[[0.2, 0.3, 0.0, 0.0], [0.5, 0.5, 0.1, 0.2]]])
    out = _fake_out(torch.zeros(1, 2, C), torch.rand(1, 2, 4), reference=ref)
    torch.testing.assert_close(specific_points(out, point_size=0.07),
                               torch.tensor([[[0.2, 0.3, 0.07, 0.07], [0.5, 0.5, 0.1, 0.2]]]))
    detr_like = _fake_out(torch.zeros(1, 2, C), torch.rand(1, 2, 4))
    torch.testing.assert_close(specific_points(detr_like), detr_like.predictions.boxes[0])


def test_group_mask_is_block_diagonal():
    expected = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 0, 0, 0],
                             [1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(group_mask([2, 3]), expected)
    assert group_mask([4]) is None


@pytest.mark.parametrize("family", ["rt_detr", "deformable_detr"])
def test_one_grouped_call_equals_separate_calls(family):
    model = build(family, num_queries=12).train()
    with torch.no_grad():
        out = model(X)
        g1, g2 = sample_general_points(2, 5), sample_general_points(2, 7)
        together = decode_groups(model, out, [g1, g2])
        for got, alone in zip(together, (model.decode(out, g1), model.decode(out, g2))):
            torch.testing.assert_close(got.logits, alone.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.boxes, alone.boxes, atol=1e-5, rtol=0)
        mixed = model.decode(out, torch.cat((g1, g2), 1))  # without the mask the groups interact
        assert not torch.allclose(mixed.logits[:, :, :5], together[0].logits, atol=1e-4)


def test_teacher_decodes_once_and_points_are_shared_and_resampled(rt_teacher, rt_student, monkeypatch):
    calls = {"teacher": [], "student": []}
    for who, model in (("teacher", rt_teacher), ("student", rt_student)):
        def counted(out, boxes, *args, _who=who, _decode=model.decode, **kwargs):
            calls[_who].append((boxes.clone(), torch.is_grad_enabled()))
            return _decode(out, boxes, *args, **kwargs)
        monkeypatch.setattr(model, "decode", counted)
    ctx = make_ctx(rt_teacher, rt_student)
    expected = {"both": (1, 1), "general": (1, 1), "specific": (1, 1)}
    for points, (n_teacher, n_student) in expected.items():
        calls["teacher"].clear(), calls["student"].clear()
        method = KDDETR(points=points, general=16)
        method(ctx)  # one whole step
        assert (len(calls["teacher"]), len(calls["student"])) == (n_teacher, n_student)
        groups = method.point_groups(ctx)
        assert all(not grad for _, grad in calls["teacher"])  # teacher under no_grad
        torch.testing.assert_close(calls["student"][-1][0], calls["teacher"][-1][0])  # the same points
        assert [g.student.logits.shape[2] for g in groups] == [{"general": 16, "specific": 20}[g.name] for g in groups]
    method = KDDETR(points="general", general=16)
    first, second = method.point_groups(ctx)[0].boxes, method.point_groups(ctx)[0].boxes
    assert not torch.allclose(first, second)
    for boxes in (first, second):
        xyxy = cxcywh_to_xyxy(boxes)
        assert xyxy.min() >= 0 and xyxy.max() <= 1 + 1e-6


def test_specific_teacher_predictions_are_its_default_decode_of_its_reference_boxes(rt_teacher, rt_student):
    ctx = make_ctx(rt_teacher, rt_student)
    group = KDDETR(points="specific").point_groups(ctx)[0]
    q = ctx.teacher_out.queries
    with torch.no_grad():
        again = rt_teacher.decode(ctx.teacher_out, q.reference_boxes)  # the student's rule: default content
    torch.testing.assert_close(group.teacher.logits, again.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(group.teacher.boxes, again.boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(group.boxes, q.reference_boxes)


@pytest.mark.parametrize("family", ["dab_detr", "deformable_detr"])
def test_specific_points_reproduce_detection_outputs_where_default_content_is_the_query(family):
    """DAB (anchor = box, zero content) and two-stage Deformable (the proposal embedding): the
    teacher's decode at its specific points equals its detection outputs (the official reuse)."""
    teacher = lively(build(family, num_queries=12)).eval()
    with torch.no_grad():
        ctx = DistillContext(teacher, teacher, teacher(X), teacher(X), LABELS)
        group = KDDETR(points="specific").point_groups(ctx)[0]
    torch.testing.assert_close(group.teacher.logits, ctx.teacher_out.predictions.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(group.teacher.boxes, ctx.teacher_out.predictions.boxes, atol=1e-5, rtol=0)


# ---- the loss --------------------------------------------------------------------------------------


def lively(model: torch.nn.Module) -> torch.nn.Module:
    """Make a random model behave like a trained one where it matters here: RT-DETR / D-FINE
    proposals off their anchors (the encoder box head's last bias moves every proposal centre by
    ~0.1), and predictions that depend on the query (noise on every transformer weight matrix;
    HF's init leaves them nearly constant)."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        head = getattr(model.model.model, "enc_bbox_head", None)
        if head is not None:
            head.layers[-1].bias[:2] += 0.4
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "backbone" not in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize("family,points", [
    ("deformable_detr", "both"), ("dab_detr", "both"), ("rt_detr", "general"), ("rt_detr", "specific"),
    ("rt_detr", "both"), ("rt_detr_v2", "specific"), ("d_fine", "specific"), ("detr", "specific"),
    ("conditional_detr", "specific")])
def test_identical_teacher_and_student_give_zero_loss(family, points):
    """Same weights: both models are given the same points, so they predict the same there, for
    specific points too on every family (RT-DETR / D-FINE with proposals off their anchors, where
    the teacher's own detection outputs are NOT what a decode of its reference boxes gives)."""
    teacher = lively(build(family, num_queries=12)).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        t_out = teacher(X)
    ctx = DistillContext(student, teacher, student(X), t_out, LABELS)
    for group in KDDETR(points=points, general=16).point_groups(ctx):
        torch.testing.assert_close(group.student.logits[-1], group.teacher.logits[-1], atol=1e-5, rtol=0)
        torch.testing.assert_close(group.student.boxes[-1], group.teacher.boxes[-1], atol=1e-5, rtol=0)
    for layers in (dict(layers="last"), dict(layers="all", pairing="index")):  # (not: every layer vs the last)
        terms = KDDETR(points=points, general=16, **layers)(ctx)
        assert set(terms) == {"cls", "l1", "giou"}
        for name, value in terms.items():
            assert abs(value.item()) < 1e-5, (layers, name, value.item())


def test_foreground_weight_and_official_loss_by_hand():
    t_logits = torch.tensor([[2.0, -1.0, 0.0], [-3.0, 0.0, 1.0]])
    s_logits = torch.zeros(2, 3)
    t_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.35, 0.3, 0.2, 0.2]])
    s_boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]])
    w = torch.sigmoid(torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(foreground_weight(t_logits, "sigmoid"), w)
    # softmax head: the no-object column is not a foreground class
    torch.testing.assert_close(foreground_weight(torch.tensor([[0.0, 0.0, math.log(2.0)]]), "softmax"),
                               torch.tensor([0.25]))
    p = (t_logits / 10).softmax(-1)
    kl = (p * (p * 3).log()).sum(-1) * 100 / 3  # student uniform; T^2 = 100; class mean over C = 3
    # row 1: [.2,.2,.4,.4] vs [.25,.2,.45,.4]: IoU = .03 / .05 = .6, enclosing = union -> GIoU = .6
    # unweighted (the Distiller applies the class / L1 / GIoU weights 1 / 5 / 2)
    expected = {"cls": (w * kl).sum(), "l1": w[1] * 0.05 / 4 / w.sum(), "giou": w[1] * 0.4 / w.sum()}
    terms = aligned_losses(Aligned(s_logits, s_boxes, t_logits, t_boxes), ("sigmoid", "sigmoid"))
    for k in expected:
        torch.testing.assert_close(terms[k], expected[k], atol=1e-6, rtol=1e-5)
    flat = aligned_losses(Aligned(s_logits, s_boxes, t_logits, t_boxes), ("sigmoid", "sigmoid"), rebalance=False)
    torch.testing.assert_close(flat["giou"], torch.tensor(0.4 / 2))
    mean = aligned_losses(Aligned(s_logits, s_boxes, t_logits, t_boxes), ("sigmoid", "sigmoid"), normalise="mean")
    torch.testing.assert_close(mean["cls"], (w * kl * 3).sum() / w.sum())  # summed over classes
    torch.testing.assert_close(mean["l1"], w[1] * 0.05 / w.sum())  # summed over coordinates


def test_gradients_reach_the_student_not_the_teacher(rt_teacher, rt_student):
    rt_teacher.requires_grad_(True)
    for model in (rt_teacher, rt_student):
        model.zero_grad(set_to_none=True)
    try:
        ctx = make_ctx(rt_teacher, rt_student, teacher_grad=True)  # teacher outputs carry a graph
        terms = KDDETR(general=16)(ctx)
        torch.stack(list(terms.values())).sum().backward()
        assert all(p.grad is None for p in rt_teacher.parameters())
        grads = [p.grad for p in rt_student.model.model.decoder.parameters() if p.grad is not None]
        assert grads and any(g.abs().sum() > 0 for g in grads)
        backbone = [p.grad for p in rt_student.backbone_parameters() if p.grad is not None]
        assert backbone and any(g.abs().sum() > 0 for g in backbone)
    finally:
        rt_teacher.requires_grad_(False)
        for model in (rt_teacher, rt_student):
            model.zero_grad(set_to_none=True)


def test_points_never_mix_with_denoising(rt_teacher):
    """Same weights and inputs: the point predictions are identical with denoising on or off."""
    student = build("rt_detr", num_queries=12, num_denoising=20).train()
    with_dn = make_ctx(rt_teacher, student, labels=LABELS)
    assert with_dn.student_out.denoising is not None
    student.model.config.num_denoising = 0
    without = make_ctx(rt_teacher, student, labels=LABELS)
    assert without.student_out.denoising is None
    method, results = KDDETR(general=16), []
    for ctx in (with_dn, without):
        torch.manual_seed(7)
        groups = method.point_groups(ctx)
        torch.manual_seed(7)
        results.append((groups, method(ctx)))
    (groups_dn, terms_dn), (groups, terms) = results
    for a, b in zip(groups_dn, groups):
        torch.testing.assert_close(a.student.logits, b.student.logits, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.student.boxes, b.student.boxes, atol=1e-6, rtol=0)
    for k in terms:
        torch.testing.assert_close(terms_dn[k], terms[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("teacher_kwargs,student_kwargs", [
    (dict(family="rt_detr", num_queries=20), dict(family="deformable_detr", num_queries=12)),
    (dict(family="deformable_detr", num_queries=15, two_stage=False, with_box_refine=False),
     dict(family="rt_detr", num_queries=12, d_model=32, encoder_hidden_dim=32, decoder_in_channels=[32] * 3)),
])
def test_heterogeneous_teacher_and_student(teacher_kwargs, student_kwargs):
    teacher, student = build(**teacher_kwargs).eval(), build(**student_kwargs).train()
    ctx = make_ctx(teacher, student)
    groups = KDDETR(general=16).point_groups(ctx)
    qt = teacher.num_queries
    assert [(g.name, g.student.logits.shape[1:3], g.teacher.logits.shape[1:3]) for g in groups] == [
        ("general", (2, 16), (2, 16)), ("specific", (2, qt), (2, qt))]
    assert groups[0].student.logits.shape[0] == student.num_decoder_layers
    if not teacher.model.config.to_dict().get("two_stage", True):  # 2-d reference points
        assert torch.all(groups[1].boxes[..., 2:] == 0.05)
    terms = KDDETR(general=16)(ctx)
    assert all(torch.isfinite(v) for v in terms.values())
    torch.stack(list(terms.values())).sum().backward()


# ---- Table 1 baselines -----------------------------------------------------------------------------


def test_table1_pair_helpers_by_hand():
    align = inconsistent_pairs(2, num_student=3, num_teacher=4)
    assert align.teacher.tolist() == [0, 1, 2, 4, 5, 6] and align.student.tolist() == [0, 1, 2, 3, 4, 5]
    t_pos, s_pos = torch.tensor([[2, 0], [-1, 1]]), torch.tensor([[1, 3], [0, 2]])
    align = foreground_pairs(s_pos, t_pos, num_student=5, num_teacher=4)
    assert align.teacher.tolist() == [2, 0, 5] and align.student.tolist() == [1, 3, 7]
    x = torch.arange(6.0).view(2, 3, 1)
    mean, valid = unmatched_mean(x, torch.tensor([[True, False, False], [True, True, True]]))
    assert mean[0].item() == 1.5 and valid.tolist() == [True, False]


GT = {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])}


def _table1_ctx() -> DistillContext:
    """Teacher: GT0 at query 2, GT1 at query 0 (of 4); student: GT0 at query 1, GT1 at query 3 (of 5)."""
    def out(at: dict[int, int], q: int) -> DetectorOutput:
        boxes = torch.tensor([[0.1 + 0.02 * i, 0.9, 0.05, 0.05] for i in range(q)])
        logits = torch.full((q, 2), -5.0)
        for gt, i in at.items():
            boxes[i], logits[i, gt] = GT["boxes"][gt], 5.0
        return _fake_out(logits[None], boxes[None])
    return DistillContext(None, None, out({0: 1, 1: 3}, 5), out({0: 2, 1: 0}, 4), [GT])


def test_table1_baselines_pair_queries_through_their_gt():
    ctx = _table1_ctx()
    t_pred, s_pred = ctx.teacher_out.predictions, ctx.student_out.predictions
    incons = KDDETR(points="inconsistent").baseline_pairs(ctx, 0, 0)
    torch.testing.assert_close(incons.teacher_boxes, t_pred.boxes[0, 0, :4])
    torch.testing.assert_close(incons.student_boxes, s_pred.boxes[0, 0, :4])
    fg = KDDETR(points="similar_foreground").baseline_pairs(ctx, 0, 0)
    torch.testing.assert_close(fg.teacher_boxes, GT["boxes"])  # GT order
    torch.testing.assert_close(fg.student_boxes, GT["boxes"])
    torch.testing.assert_close(fg.teacher_logits, t_pred.logits[0, 0, [2, 0]])
    gen = KDDETR(points="similar_general").baseline_pairs(ctx, 0, 0)
    assert gen.teacher_boxes.shape == (3, 4)
    torch.testing.assert_close(gen.teacher_boxes[2], t_pred.boxes[0, 0, [1, 3]].mean(0))
    torch.testing.assert_close(gen.student_boxes[2], s_pred.boxes[0, 0, [0, 2, 4]].mean(0))
    torch.testing.assert_close(gen.student_logits[2], s_pred.logits[0, 0, [0, 2, 4]].mean(0))
    terms = KDDETR(points="similar_foreground")(ctx)
    assert float(terms["l1"]) < 1e-6 and float(terms["giou"]) < 1e-6


# ---- end to end ------------------------------------------------------------------------------------


def test_distiller_step_for_every_point_kind(rt_teacher, rt_student):
    batch = {"pixel_values": X, "pixel_mask": torch.ones(2, 64, 64, dtype=torch.long), "labels": LABELS}
    for points in ("both", "general", "specific") + BASELINES:
        methods, weights = build_methods({"kd_detr": {"points": points, "general": 16, "weight": 2.0}},
                                         rt_student, rt_teacher)
        distiller = Distiller(rt_student, rt_teacher, methods, weights).train()
        loss, terms = distiller(batch)
        assert {"kd_detr/cls", "kd_detr/l1", "kd_detr/giou"} <= set(terms)
        assert torch.isfinite(loss), points
        loss.backward()
        rt_student.zero_grad(set_to_none=True)


def test_options_are_checked(rt_teacher, rt_student):
    for bad in (dict(points="random"), dict(sampling="normal"), dict(class_kd="mse"), dict(layers="first"),
                dict(normalise="sum")):
        with pytest.raises(ConfigError, match=fr"methods\.kd_detr\.{next(iter(bad))}: expected one of"):
            method_options("kd_detr", bad)
    with pytest.raises(ValueError, match="general >= 1"):
        KDDETR(general=0)
    with pytest.raises(ConfigError, match="valid options"):
        build_methods({"kd_detr": {"num_points": 3}}, rt_student, rt_teacher)
    with pytest.raises(ConfigError, match=r"methods\.kd_detr\.terms: unknown term\(s\) \['bbox'\]"):
        method_options("kd_detr", {"terms": {"bbox": 5.0}})
    assert method_options("kd_detr", {"terms": {"l1": 4}})[1].terms == {"cls": 1.0, "l1": 4.0, "giou": 2.0}
