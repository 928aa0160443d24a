"""The normalised-view contract, checked identically on every detector family (tiny configs).

Family-specific behaviour (box-to-query mappings, denoising, HF quirks) is tested in
``test_adapters_*.py``; this file proves the families are interchangeable for the methods.
"""

from __future__ import annotations

import pytest
import torch

from detrkd.models import ADAPTERS, build_detector, count_hooks

FAMILIES = sorted(ADAPTERS)
NUM_CLASSES = 5


@pytest.fixture(scope="module", params=FAMILIES)
def detector(request):
    torch.manual_seed(0)
    return build_detector(request.param, "tiny", NUM_CLASSES, dropout=0.0)


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 96, 128)
    pixel_mask = torch.ones(2, 96, 128, dtype=torch.long)
    pixel_mask[1, :, 96:] = 0  # second image padded on the right
    labels = [
        {"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.4, 0.2, 0.3], [0.7, 0.6, 0.3, 0.2]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return pixel_values, pixel_mask, labels


def _eval_forward(detector, batch, **kw):
    pixel_values, pixel_mask, _ = batch
    detector.eval()
    with torch.no_grad():
        return detector(pixel_values, pixel_mask, **kw)


def test_shapes_and_class_head(detector, batch):
    out = _eval_forward(detector, batch)
    layers, b, q, k = out.predictions.logits.shape
    assert (layers, b, q) == (detector.num_decoder_layers, 2, detector.num_queries)
    assert k == NUM_CLASSES + (1 if out.class_head == "softmax" else 0)
    assert out.predictions.boxes.shape == (layers, b, q, 4)
    assert 0 <= out.predictions.boxes.min() and out.predictions.boxes.max() <= 1
    mem = out.memory
    assert mem.tokens.shape[:2] == mem.padding_mask.shape
    assert mem.tokens.shape[-1] == detector.hidden_size
    assert int((mem.spatial_shapes[:, 0] * mem.spatial_shapes[:, 1]).sum()) == mem.tokens.shape[1]
    assert mem.level_start[0] == 0 and out.denoising is None


def test_final_layer_equals_hf_outputs(detector, batch):
    out = _eval_forward(detector, batch)
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        hf = detector.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    torch.testing.assert_close(out.predictions.logits[-1], hf.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.predictions.boxes[-1], hf.pred_boxes, atol=1e-5, rtol=0)


def test_redecoding_own_queries_reproduces_predictions(detector, batch):
    out = _eval_forward(detector, batch)
    q = out.queries
    with torch.no_grad():
        again = detector.decode(out, q.reference_boxes, content=q.content, position=q.position)
    torch.testing.assert_close(again.logits, out.predictions.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(again.boxes, out.predictions.boxes, atol=1e-4, rtol=0)


def test_cross_attention_is_a_distribution_off_padding(detector, batch):
    out = _eval_forward(detector, batch, with_attention=True)
    attn = out.cross_attention
    assert attn.shape == (2, detector.num_queries, out.memory.tokens.shape[1])
    assert attn.min() >= 0
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, detector.num_queries), atol=1e-4, rtol=0)
    assert (attn * out.memory.padding_mask[:, None, :]).abs().sum() == 0


def test_hooks_are_removed(detector, batch):
    before = count_hooks(detector)
    out = _eval_forward(detector, batch, with_attention=True)
    detector.decode(out, torch.rand(2, 3, 4) * 0.5 + 0.25)
    assert count_hooks(detector) == before
    with pytest.raises(Exception):
        detector(torch.randn(2, 4, 64, 64))  # wrong channel count fails inside the HF model
    assert count_hooks(detector) == before


def test_decode_extra_points_has_gradients_to_encoder(detector, batch):
    pixel_values, pixel_mask, labels = batch
    detector.train()
    detector.zero_grad()
    out = detector(pixel_values, pixel_mask, labels=labels)
    points = torch.rand(2, 7, 4) * 0.5 + 0.25
    extra = detector.decode(out, points)
    assert extra.logits.shape[:3] == (detector.num_decoder_layers, 2, 7)
    (extra.logits.sum() + extra.boxes.sum()).backward()
    grads = [p.grad for p in detector.backbone_parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert torch.isfinite(out.loss)


def test_group_mask_equals_separate_calls(detector, batch):
    out = _eval_forward(detector, batch)
    points = torch.rand(2, 6, 4) * 0.5 + 0.25
    blocked = torch.ones(6, 6, dtype=torch.bool)
    blocked[:2, :2] = blocked[2:, 2:] = False
    with torch.no_grad():
        together = detector.decode(out, points, self_attn_mask=blocked)
        first = detector.decode(out, points[:, :2])
        second = detector.decode(out, points[:, 2:])
    torch.testing.assert_close(together.logits[:, :, :2], first.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.logits[:, :, 2:], second.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(together.boxes[:, :, 2:], second.boxes, atol=1e-5, rtol=0)


# families with no BatchNorm in the model (RF-DETR: a DINOv2 and a LayerNorm projector)
WITHOUT_BATCH_NORM = {"rf_detr"}


def test_backbone_is_trainable(detector):
    params = list(detector.backbone_parameters())
    assert params and all(p.requires_grad for p in params)
    # from scratch, normalisation must train too: no HF FrozenBatchNorm2d left anywhere
    norms = [type(m).__name__ for m in detector.model.modules() if "BatchNorm" in type(m).__name__]
    assert all(name == "BatchNorm2d" for name in norms)
    assert bool(norms) != (detector.family in WITHOUT_BATCH_NORM)


def test_save_and_load_roundtrip(detector, batch, tmp_path):
    from detrkd.models import load_detector, save_detector

    save_detector(detector, tmp_path / "m")
    loaded = load_detector(tmp_path / "m")
    assert type(loaded) is type(detector)
    a = _eval_forward(detector, batch)
    b = _eval_forward(loaded, batch)
    torch.testing.assert_close(a.predictions.logits, b.predictions.logits, atol=1e-5, rtol=0)
