"""AGFD (QSKD Sec. 3.3): Eq. 4 mask on hand-made attention, Table 5 switches, the BN-MSE loss,
connector/adapter, gradients, grid checks, and a Distiller step on tiny models of several families."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from detrkd.distill.agfd import AGFD, chosen_queries, foreground_mask
from detrkd.distill.features import masked_feature_mse, token_batch_norm
from detrkd.config import ConfigError
from detrkd.distill.base import DistillContext, Distiller, Weights
from detrkd.distill.methods import method_options
from detrkd.distill.query_selection import QuerySelection
from detrkd.models import build_detector
from detrkd.models.base import DetectorOutput, EncoderMemory, Predictions, Queries

NUM_CLASSES = 5

# ---- hand-made data ------------------------------------------------------------------------------

# 2 queries x 4 tokens; G = (0.5, -0.5) -> weights (1.5, 0.5)
ATTN = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]]])
GIOU = torch.tensor([[0.5, -0.5]])

# GQS data of tests/test_query_selection.py image A (6 predictions, 2 GT): q0, q2 positives,
# q1 (G .6), q4 (G .25) hard negatives at threshold 0, q3, q5 easy negatives (G < 0)
GT_A = {"class_labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.25, 0.25, 0.2, 0.2], [0.75, 0.75, 0.2, 0.2]])}
PRED_A = torch.tensor([[0.75, 0.75, 0.2, 0.2], [0.30, 0.25, 0.2, 0.2], [0.25, 0.25, 0.2, 0.2],
                       [0.90, 0.05, 0.1, 0.1], [0.75, 0.75, 0.4, 0.4], [0.91, 0.75, 0.1, 0.2]])
G_A = torch.tensor([1.0, 0.6, 1.0, -0.205 / 0.255, 0.25, -0.002 / 0.062])
KIND_QUERIES = {"gqs": [0, 1, 2, 4], "positives": [0, 2], "easy_negatives": [3, 5], "all": [0, 1, 2, 3, 4, 5]}


def logits_a() -> torch.Tensor:
    out = torch.full((6, 2), -4.0)
    for i, c in enumerate([1, 0, 0, -1, 1, -1]):
        if c >= 0:
            out[i, c] = 4.0
    return out


def hand_output(tokens: torch.Tensor, attention: torch.Tensor | None = None, padding: torch.Tensor | None = None,
                shapes: list[list[int]] | None = None, logits: torch.Tensor | None = None,
                boxes: torch.Tensor | None = None) -> DetectorOutput:
    """A DetectorOutput with given memory tokens [B, N, D] (one level, 1 x N unless ``shapes``)."""
    b, n, _ = tokens.shape
    shapes_t = torch.tensor(shapes or [[1, n]])
    starts = torch.cat([torch.zeros(1, dtype=torch.long), (shapes_t[:, 0] * shapes_t[:, 1]).cumsum(0)[:-1]])
    q = 6 if logits is None else logits.shape[1]
    logits = torch.zeros(b, q, 2) if logits is None else logits
    boxes = torch.full((b, q, 4), 0.5) if boxes is None else boxes
    pad = torch.zeros(b, n, dtype=torch.bool) if padding is None else padding
    return DetectorOutput(predictions=Predictions(logits[None], boxes[None]), class_head="sigmoid",
                          memory=EncoderMemory(tokens, shapes_t, starts, pad), queries=Queries(),
                          cross_attention=attention)


def hand_ctx(teacher_out: DetectorOutput, student_out: DetectorOutput, targets=None) -> DistillContext:
    return DistillContext(None, None, student_out, teacher_out, targets or [GT_A] * teacher_out.memory.tokens.shape[0])


def image_a_ctx(padding: torch.Tensor | None = None) -> DistillContext:
    """Image A's predictions as the teacher's; query i attends token i only (6 tokens)."""
    tokens = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(0))
    out = hand_output(tokens, torch.eye(6)[None], padding, logits=logits_a()[None], boxes=PRED_A[None])
    return hand_ctx(out, out)


# ---- Eq. 4 ---------------------------------------------------------------------------------------


def test_mask_golden_numbers():
    both = torch.tensor([[True, True]])
    # (1.5 * A0 + 0.5 * A1) / 2
    torch.testing.assert_close(foreground_mask(ATTN, both, GIOU), torch.tensor([[0.4, 0.425, 0.075, 0.1]]))
    # no GIoU weight: the plain mean of the two rows
    torch.testing.assert_close(foreground_mask(ATTN, both, None), torch.tensor([[0.3, 0.35, 0.15, 0.2]]))
    # only q1 chosen: |I~| = 1
    torch.testing.assert_close(foreground_mask(ATTN, torch.tensor([[False, True]]), GIOU),
                               torch.tensor([[0.05, 0.1, 0.15, 0.2]]))


def test_mask_batched_empty_selection_and_padding():
    attn = torch.cat([ATTN, ATTN.flip(-1)])
    chosen = torch.tensor([[True, True], [False, False]])
    padding = torch.tensor([[False, False, False, True], [False] * 4])
    w = foreground_mask(attn, chosen, GIOU.expand(2, 2), padding)
    torch.testing.assert_close(w, torch.tensor([[0.4, 0.425, 0.075, 0.0], [0.0] * 4]))


def test_switches_select_the_right_queries():
    ctx = image_a_ctx()
    sel = ctx.selection("teacher", -1, 0.0)
    torch.testing.assert_close(sel.giou[0], G_A, atol=1e-6, rtol=0)
    for kind, queries in KIND_QUERIES.items():
        assert chosen_queries(sel, kind)[0].nonzero()[:, 0].tolist() == queries, kind
        expected = torch.zeros(6)
        expected[queries] = (1 + G_A[queries]) / len(queries)
        w = AGFD(8, 8, mask=kind, adapter=False).token_mask(ctx)
        torch.testing.assert_close(w[0], expected, atol=1e-6, rtol=0)
        w = AGFD(8, 8, mask=kind, adapter=False, giou_weight=False).token_mask(ctx)
        torch.testing.assert_close(w[0], torch.isin(torch.arange(6), torch.tensor(queries)).float() / len(queries))
    # a higher threshold drops the hard negative q4 (G = 0.25); the result is cached per threshold
    assert chosen_queries(ctx.selection("teacher", -1, 0.5), "gqs")[0].nonzero()[:, 0].tolist() == [0, 1, 2]
    layer = ctx.teacher_out.predictions.num_layers - 1
    assert set(ctx.cache) == {f"gqs/teacher/layer{layer}/threshold{t}" for t in (0.0, 0.5)}
    assert AGFD(8, 8, mask="none").token_mask(ctx).tolist() == [[1.0] * 6]
    with pytest.raises(ConfigError, match=r"methods\.agfd\.mask: expected one of 'gqs', 'all'"):
        method_options("agfd", {"mask": "negatives"})


def test_all_mask_gives_zero_weight_to_images_without_gt():
    sel = QuerySelection(group=torch.full((1, 2), -1), giou=torch.full((1, 2), -1.0),
                         positive=torch.zeros(1, 2, dtype=torch.bool),
                         hard_negative=torch.zeros(1, 2, dtype=torch.bool),
                         easy_negative=torch.ones(1, 2, dtype=torch.bool),
                         positive_index=torch.zeros(1, 0, dtype=torch.long), num_gt=torch.zeros(1, dtype=torch.long),
                         threshold=0.0)
    assert chosen_queries(sel, "gqs").sum() == 0
    assert foreground_mask(ATTN, chosen_queries(sel, "all"), sel.giou).abs().sum() == 0


def test_token_mask_is_zero_on_padding():
    padding = torch.tensor([[False, True, False, False, True, False]])
    w = AGFD(8, 8, adapter=False).token_mask(image_a_ctx(padding))
    assert w[0, 1] == 0 and w[0, 4] == 0 and w[0, 0] > 0


# ---- Eq. 5 ---------------------------------------------------------------------------------------


def test_mask_none_equals_plain_bn_mse_and_padding_is_excluded():
    g = torch.Generator().manual_seed(3)
    t, s = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[1, 4:] = True
    ctx = hand_ctx(hand_output(t, padding=padding), hand_output(s, padding=padding))
    valid = ~padding
    bn = lambda x: F.batch_norm(x[valid], None, None, training=True, eps=1e-5)  # noqa: E731
    loss = AGFD(8, 8, mask="none", adapter=False)(ctx)["feature"]
    torch.testing.assert_close(loss, F.mse_loss(bn(s), bn(t)))
    plain = AGFD(8, 8, mask="none", adapter=False, batch_norm=False)(ctx)["feature"]
    torch.testing.assert_close(plain, F.mse_loss(s[valid], t[valid]))
    # padding tokens change neither the statistics nor the mean
    t2, s2 = t.clone(), s.clone()
    t2[1, 4:], s2[1, 4:] = 100.0, -100.0
    ctx2 = hand_ctx(hand_output(t2, padding=padding), hand_output(s2, padding=padding))
    torch.testing.assert_close(AGFD(8, 8, mask="none", adapter=False)(ctx2)["feature"], loss)


def test_mask_none_is_the_fitnet_bn_row():
    """AGFD with mask "none" is FitNet with normalise "batch_norm" (loss and student gradient), so the
    benchmark's fitnet row (configs/digits_fitnet.yaml) is QSKD Table 5's no-mask baseline."""
    from detrkd.distill.fitnet import FitNet

    g = torch.Generator().manual_seed(5)
    t = torch.randn(2, 6, 8, generator=g)
    padding = torch.zeros(2, 6, dtype=torch.bool)
    padding[0, 5:] = True
    grads = []
    for method in (AGFD(8, 8, mask="none"), FitNet(8, 8, normalise="batch_norm")):
        s = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(6)).requires_grad_()
        loss = method(hand_ctx(hand_output(t, padding=padding), hand_output(s, padding=padding)))["feature"]
        loss.backward()
        grads.append((loss.detach(), s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=0, atol=0)


def test_attention_mask_loss_matches_hand_formula():
    ctx = image_a_ctx()
    s = torch.randn(1, 6, 8, generator=torch.Generator().manual_seed(4))
    ctx.student_out = hand_output(s)
    w = 6 * (1 + G_A[[0, 1, 2, 4]]) / 4  # N * W on tokens 0, 1, 2, 4 (query i attends token i)
    weight = torch.zeros(1, 6)
    weight[0, [0, 1, 2, 4]] = w
    t = ctx.teacher_out.memory.tokens
    expected = F.mse_loss(token_batch_norm((weight[..., None] * s)[0]), token_batch_norm((weight[..., None] * t)[0]))
    torch.testing.assert_close(AGFD(8, 8, adapter=False)(ctx)["feature"], expected)
    # BN makes the loss invariant to the mask's global scale (up to eps)
    valid = torch.ones(1, 6, dtype=torch.bool)
    torch.testing.assert_close(masked_feature_mse(s, t, weight / 6, valid, eps=1e-12),
                               masked_feature_mse(s, t, weight, valid, eps=1e-12), atol=1e-5, rtol=1e-5)


def test_loss_is_zero_for_identical_features():
    model = build_detector("deformable_detr", "tiny", NUM_CLASSES).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x, with_attention=True)
    ctx = DistillContext(model, model, out, out, [GT_A, GT_A])
    for mask in ("gqs", "none", "all"):
        assert AGFD(model, model, mask=mask, adapter=False)(ctx)["feature"].item() == pytest.approx(0.0, abs=1e-10)


def test_missing_teacher_attention_and_width_errors():
    t = torch.randn(1, 4, 8)
    ctx = hand_ctx(hand_output(t), hand_output(t))
    with pytest.raises(ValueError, match="with_attention=True"):
        AGFD(8, 8)(ctx)
    with pytest.raises(ValueError, match="student width 16"):
        AGFD(16, 8, mask="none")(ctx)


def test_mismatched_widths_without_a_connector_name_both_widths():
    t, s = torch.randn(1, 4, 16), torch.randn(1, 4, 8)
    ctx = hand_ctx(hand_output(t), hand_output(s))
    with pytest.raises(ValueError, match=r"teacher width 8 \(no connector\).*teacher memory has width 16"):
        AGFD(8, 8, mask="none")(ctx)  # built as if both were 8 wide: no connector to bridge 8 -> 16
    assert AGFD(8, 16, mask="none")(ctx)["feature"].isfinite()  # built from the real widths: connector


def test_grid_mismatch_raises_naming_both_shapes():
    t, s = torch.randn(1, 6, 8), torch.randn(1, 6, 8)
    ctx = hand_ctx(hand_output(t, shapes=[[2, 3]]), hand_output(s, shapes=[[3, 2]]))
    with pytest.raises(ValueError, match=r"\[\[2, 3\]\].*\[\[3, 2\]\]"):
        AGFD(8, 8, mask="none")(ctx)


# ---- learned parts -------------------------------------------------------------------------------


def test_connector_only_when_widths_differ_and_adapter_at_teacher_width():
    teacher = build_detector("rt_detr", "tiny", NUM_CLASSES, d_model=128)
    student = build_detector("rt_detr", "tiny", NUM_CLASSES)
    m = AGFD(student, teacher, adapter=True)
    assert (m.connector.in_features, m.connector.out_features) == (64, 128)
    assert m.adapter.attn.embed_dim == 128 and m.adapter.attn.num_heads == teacher.config.encoder_attention_heads
    assert m.adapter.ffn[0].out_features == teacher.config.encoder_ffn_dim
    assert AGFD(student, student).connector is None
    assert AGFD(student, student).adapter is None  # off by default (equal encoder depth)
    assert AGFD(64, 96, adapter=True, adapter_heads=5).adapter.attn.num_heads == 1  # gcd(96, 5)
    out = m.student_features(torch.randn(2, 21, 64), torch.tensor([[4, 4], [2, 2], [1, 1]]),
                             torch.zeros(2, 21, dtype=torch.bool))
    assert out.shape == (2, 21, 128) and torch.isfinite(out).all()


# ---- Distiller steps on tiny models ---------------------------------------------------------------


def batch(padded: bool) -> dict:
    g = torch.Generator().manual_seed(6)
    pixel_values = torch.randn(2, 3, 96, 96, generator=g)
    pixel_mask = torch.ones(2, 96, 96, dtype=torch.long)
    if padded:  # image 1: the last third of the columns is padding (whole tokens at stride 32)
        pixel_mask[1, :, 64:] = 0
        pixel_values[1] *= pixel_mask[1]
    labels = [dict(class_labels=torch.tensor([1, 2]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])),
              dict(class_labels=torch.tensor([3]), boxes=torch.tensor([[0.4, 0.6, 0.3, 0.2]]))]
    return dict(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)


PAIRS = [  # (family, teacher overrides, student overrides, padded batch)
    ("rt_detr", dict(d_model=128), dict(), False),               # deformable, sigmoid, width mismatch
    ("deformable_detr", dict(), dict(encoder_layers=0), True),  # deformable, 0-layer student
    ("dab_detr", dict(encoder_layers=3), dict(encoder_layers=3), True),  # dense, 3-layer student
    ("detr", dict(), dict(), True),                             # dense, softmax head
]


@pytest.mark.parametrize("family, t_over, s_over, padded", PAIRS, ids=[p[0] for p in PAIRS])
def test_distiller_step(family, t_over, s_over, padded):
    torch.manual_seed(0)
    teacher = build_detector(family, "tiny", NUM_CLASSES, **t_over)
    student = build_detector(family, "tiny", NUM_CLASSES, **s_over)
    method = AGFD(student, teacher, adapter=True)
    distiller = Distiller(student, teacher, {"agfd": method}, {"agfd": Weights(50.0, {"feature": 1.0})}).train()
    b = batch(padded)
    loss, terms = distiller(b)
    assert torch.isfinite(loss) and set(terms) == {"det/loss", "agfd/feature", "agfd/feature:unscaled"}
    assert terms["agfd/feature"].item() > 0
    terms["agfd/feature"].backward(retain_graph=True)  # the AGFD term alone: its gradients only
    learned = list(method.adapter.parameters()) + (list(method.connector.parameters()) if method.connector else [])
    assert (method.connector is not None) == ("d_model" in t_over)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in learned)
    # a 0-layer student's memory is its input projection of the backbone features
    core = student.model.model
    graded = list((core.encoder if s_over.get("encoder_layers") != 0 else core.input_proj).parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in graded)
    assert all(p.grad is None for p in teacher.parameters())
    if padded:  # the mask of the padded image is zero on its padding tokens
        with torch.no_grad():
            t_out = teacher(b["pixel_values"], b["pixel_mask"], with_attention=True)
        ctx = DistillContext(teacher, student, t_out, t_out, b["labels"])
        pad = t_out.memory.padding_mask
        assert pad[1].any() and method.token_mask(ctx)[pad].abs().sum() == 0
    loss.backward()  # the whole loss backpropagates too
