"""Deformable DETR's three variants (plain, box refine, two-stage + box refine) in the view.

The contract suite runs the default (two-stage); this covers the other two and the box-to-query
mapping of each.
"""

from __future__ import annotations

import pytest
import torch

from detrkd.models import build_detector

VARIANTS = {
    "plain": dict(two_stage=False, with_box_refine=False),
    "box_refine": dict(two_stage=False, with_box_refine=True),
    "two_stage": dict(two_stage=True, with_box_refine=True),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request):
    torch.manual_seed(0)
    model = build_detector("deformable_detr", "tiny", 4, dropout=0.0, **VARIANTS[request.param]).eval()
    pixel_values = torch.randn(2, 3, 64, 96)
    pixel_mask = torch.ones(2, 64, 96, dtype=torch.long)
    pixel_mask[1, :, 64:] = 0
    with torch.no_grad():
        out = model(pixel_values, pixel_mask, with_attention=True)
        hf = model.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
    return request.param, model, out, hf


def test_predictions_match_hf_and_redecode_exactly(variant):
    _, model, out, hf = variant
    torch.testing.assert_close(out.predictions.logits[-1], hf.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.predictions.boxes[-1], hf.pred_boxes, atol=1e-6, rtol=0)
    q = out.queries
    with torch.no_grad():
        again = model.decode(out, q.reference_boxes, content=q.content, position=q.position)
    torch.testing.assert_close(again.logits, out.predictions.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.boxes, out.predictions.boxes, atol=1e-5, rtol=0)


def test_reference_boxes_by_variant(variant):
    name, model, out, _ = variant
    boxes = out.queries.reference_boxes
    if name == "two_stage":  # proposals are real boxes
        assert (boxes[..., 2:] > 0).all()
    else:  # 2-d reference points: w = h = 0
        assert (boxes[..., 2:] == 0).all()


def test_box_queries_follow_the_box(variant):
    """Two-stage maps a box to the model's own proposal embedding; the others use its centre."""
    name, model, out, _ = variant
    boxes = torch.tensor([[[0.3, 0.4, 0.2, 0.2], [0.7, 0.6, 0.3, 0.1]]]).expand(2, -1, -1)
    content, position, reference = model._box_queries(boxes, None, None)
    assert content.shape == position.shape == (2, 2, model.hidden_size)
    if name == "two_stage":
        torch.testing.assert_close(reference, boxes)
    else:
        torch.testing.assert_close(reference, boxes[..., :2])
        assert (content == 0).all()


def test_attention_is_a_distribution_without_padding(variant):
    _, model, out, _ = variant
    attn = out.cross_attention
    torch.testing.assert_close(attn.sum(-1), torch.ones(attn.shape[:2]), atol=1e-4, rtol=0)
    assert (attn[1][:, out.memory.padding_mask[1]] == 0).all()
    assert out.memory.padding_mask[1].any() and not out.memory.padding_mask[0].any()
