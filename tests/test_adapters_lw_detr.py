"""LW-DETR and RF-DETR adapters: Group-DETR queries in the view, decode without a mask argument,
the loss in both modes, input sizes, presets.

Tiny random models built offline (ViT 64 x 4 layers, patch 8, d_model 64, 2 decoder layers, 30
queries, 13 groups in training); dropout is 0, so train-mode runs are deterministic.
"""

from __future__ import annotations

import pytest
import torch

from detrkd.models import adapter_class, build_detector
from detrkd.models.attention import splat_deformable_attention
from detrkd.models.base import PRESETS
from detrkd.models.families.deformable_detr import deformable_samples
from detrkd.models.families.lw_detr import VIT_SIZES, group_split_off, mask_blocks

FAMILIES = ["lw_detr", "rf_detr"]
NUM_CLASSES = 5


def make(family: str, **overrides) -> torch.nn.Module:
    """A tiny detector whose zero-initialised parameters (box-head last layers, attention-weight
    projections, sampling offsets, biases) get small random values, so that boxes move off their
    references and attention is not uniform."""
    torch.manual_seed(0)
    adapter = build_detector(family, "tiny", NUM_CLASSES, **overrides)
    with torch.no_grad():
        for param in adapter.model.parameters():
            if bool((param == 0).all()):
                param.normal_(0.0, 0.05)
    return adapter.eval()


def images(batch: int = 2, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def padded_mask(h: int = 64, w: int = 96) -> torch.Tensor:
    mask = torch.ones(2, h, w, dtype=torch.long)
    mask[1, :, w - 32:] = 0  # the second image is padded on the right
    return mask


def labels() -> list[dict[str, torch.Tensor]]:
    return [dict(class_labels=torch.tensor([1, 2]), boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])),
            dict(class_labels=torch.tensor([3]), boxes=torch.tensor([[0.4, 0.6, 0.3, 0.2]]))]


def random_boxes(batch: int, m: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(batch, m, 2, generator=g) * 0.8 + 0.1,
                      torch.rand(batch, m, 2, generator=g) * 0.4 + 0.05], dim=-1)


# ---- construction ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_config_maps_preset(family):
    adapter = make(family)
    cfg, size, vit = adapter.config, PRESETS["tiny"], VIT_SIZES[PRESETS["tiny"].backbone_widths]
    assert cfg.model_type == family and adapter.family == family and adapter.class_head == "sigmoid"
    assert (cfg.d_model, cfg.decoder_layers, cfg.num_queries, cfg.decoder_ffn_dim) == (
        size.d_model, size.decoder_layers, size.queries, size.ffn)
    assert cfg.decoder_self_attention_heads == cfg.decoder_cross_attention_heads == size.heads
    assert cfg.group_detr == 13 and cfg.dropout == 0.0
    bb = cfg.backbone_config
    assert (bb.hidden_size, bb.num_hidden_layers, bb.num_attention_heads, bb.patch_size) == (
        vit.hidden, vit.layers, vit.heads, vit.patch)
    assert not any("Frozen" in type(m).__name__ for m in adapter.modules())
    vit_params = {id(p) for p in adapter.model.model.backbone.backbone.parameters()}
    assert {id(p) for p in adapter.backbone_parameters()} == vit_params  # projector: main learning rate
    small_vit = build_detector(family, "tiny", NUM_CLASSES, backbone="small").config.backbone_config
    assert small_vit.hidden_size == VIT_SIZES[PRESETS["small"].backbone_widths].hidden


def test_lw_projector_levels_and_rf_single_level():
    assert make("lw_detr").config.projector_scale_factors == [1.0]  # the paper's tiny / small: P4
    base = adapter_class("lw_detr").make_config(PRESETS["base"], 3)
    assert base.projector_scale_factors == [2.0, 0.5]  # large / xlarge: P3 + P5
    with pytest.raises(ValueError, match="num_feature_levels must be 1"):
        build_detector("rf_detr", "tiny", 3, num_feature_levels=2)
    with pytest.raises(ValueError, match="projector_scale_factors"):
        build_detector("lw_detr", "tiny", 3, projector_scale_factors=[])


@pytest.mark.parametrize("family", FAMILIES)
def test_input_sizes_are_checked_with_a_clear_error(family):
    adapter = make(family)
    with pytest.raises(ValueError, match=r"multiples of 16 .*got 64x72"):
        adapter(images(w=72))
    with pytest.raises(ValueError, match=r"32x32 images give 16 memory tokens, fewer than num_queries=30"):
        adapter(images(h=32, w=32))


# ---- Group-DETR in the view ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_group_detr_counts_train_vs_eval(family):
    """Training runs 13 groups of 30 queries; the view exposes group 0 as ``predictions`` in both
    modes (30, as the eval model) and the other 12 groups as ``denoising``; eval mode has 1 group."""
    adapter = make(family)
    q, g, layers = adapter.num_queries, adapter.config.group_detr, adapter.num_decoder_layers
    x, mask = images(), padded_mask()
    adapter.train()
    with torch.no_grad():
        out = adapter(x, mask, labels=labels(), with_attention=True)
        hf = adapter.model(pixel_values=x, pixel_mask=mask)
    assert hf.logits.shape[1] == g * q
    assert out.predictions.logits.shape == (layers, 2, q, NUM_CLASSES)
    assert out.denoising.logits.shape == (layers, 2, (g - 1) * q, NUM_CLASSES)
    assert out.queries.reference_boxes.shape == (2, q, 4) and out.queries.content.shape == (2, q, 64)
    assert out.cross_attention.shape == (2, q, out.memory.tokens.shape[1])
    torch.testing.assert_close(out.predictions.logits[-1], hf.logits[:, :q], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.predictions.boxes[-1], hf.pred_boxes[:, :q], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.denoising.boxes[-1], hf.pred_boxes[:, q:], atol=1e-5, rtol=0)
    adapter.eval()
    with torch.no_grad():
        ev = adapter(x, mask, labels=labels())
        hf = adapter.model(pixel_values=x, pixel_mask=mask)
    assert hf.logits.shape[1] == q and ev.denoising is None
    assert ev.predictions.logits.shape == (layers, 2, q, NUM_CLASSES)


def test_train_group_zero_is_the_inference_group():
    """RF-DETR has no BatchNorm: its train-mode group 0 is exactly the eval-mode model."""
    adapter = make("rf_detr")
    x, mask = images(), padded_mask()
    with torch.no_grad():
        ev = adapter.eval()(x, mask)
        tr = adapter.train()(x, mask)
    torch.testing.assert_close(tr.predictions.logits, ev.predictions.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(tr.predictions.boxes, ev.predictions.boxes, atol=1e-5, rtol=0)
    torch.testing.assert_close(tr.queries.reference_boxes, ev.queries.reference_boxes, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_layer_matches_hf_aux_outputs(family):
    adapter = make(family).train()
    x, mask = images(), padded_mask()
    with torch.no_grad():
        out = adapter(x, mask, labels=labels())
        hf = adapter.model(pixel_values=x, pixel_mask=mask, labels=labels())
    q = adapter.num_queries
    for layer, aux in enumerate(hf.auxiliary_outputs):
        torch.testing.assert_close(out.predictions.logits[layer], aux["logits"][:, :q], atol=1e-5, rtol=0)
        torch.testing.assert_close(out.predictions.boxes[layer], aux["pred_boxes"][:, :q], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, hf.loss)  # train mode: HF's own loss, unchanged


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_is_the_projector_output_with_the_pixel_mask(family):
    adapter = make(family, **({"projector_scale_factors": [2.0, 0.5]} if family == "lw_detr" else {}))
    with torch.no_grad():
        out = adapter(images(), padded_mask())
    shapes = out.memory.spatial_shapes.tolist()
    assert shapes == ([[16, 24], [4, 6]] if family == "lw_detr" else [[8, 12]])
    pad = out.memory.padding_mask
    assert not pad[0].any()
    first = pad[1, :shapes[0][0] * shapes[0][1]].view(*shapes[0])  # level 0 of image 1: right third padded
    assert first[:, -shapes[0][1] // 3:].all() and not first[:, :-shapes[0][1] // 3].any()


# ---- decode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_in_train_mode_reproduces_group_zero(family):
    """Train mode: decoding the model's own group-0 queries reproduces its predictions (the
    Group-DETR split is off during decode), and any number of points decodes (7, not a multiple of
    13, would crash the split)."""
    adapter = make(family).train()
    out = adapter(images(), padded_mask(), labels=labels())
    again = adapter.decode(out, out.queries.reference_boxes, content=out.queries.content)
    torch.testing.assert_close(again.logits, out.predictions.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(again.boxes, out.predictions.boxes, atol=1e-5, rtol=0)
    extra = adapter.decode(out, random_boxes(2, 7))
    assert extra.logits.shape == (adapter.num_decoder_layers, 2, 7, NUM_CLASSES)
    assert all(layer.self_attn.training for layer in adapter.decoder.layers)  # restored


@pytest.mark.parametrize("family", FAMILIES)
def test_extra_points_are_their_own_groups(family):
    """KD-DETR's groups of points (a block-diagonal mask) decode exactly as separate calls in train
    mode, never mixed with each other or with the detection groups (whose inputs do not matter)."""
    adapter = make(family).train()
    out = adapter(images(), padded_mask(), labels=labels())
    points = random_boxes(2, 9)
    blocked = torch.ones(9, 9, dtype=torch.bool)
    blocked[:4, :4] = blocked[4:, 4:] = False
    with torch.no_grad():
        together = adapter.decode(out, points, self_attn_mask=blocked)
        first, second = adapter.decode(out, points[:, :4]), adapter.decode(out, points[:, 4:])
        out.decoder_inputs["inputs_embeds"] = torch.randn_like(out.decoder_inputs["inputs_embeds"])
        after = adapter.decode(out, points, self_attn_mask=blocked)
    torch.testing.assert_close(together.logits, torch.cat([first.logits, second.logits], 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(together.boxes, torch.cat([first.boxes, second.boxes], 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(after.logits, together.logits, atol=0, rtol=0)
    # and the groups do see their own members: one group of all 9 differs
    whole = adapter.decode(out, points)
    assert (whole.logits - together.logits).abs().max() > 1e-4


def test_mask_blocks_accepts_only_contiguous_block_diagonal_masks():
    assert mask_blocks(None, 5) == [(0, 5)]
    blocked = torch.ones(6, 6, dtype=torch.bool)
    blocked[:1, :1] = blocked[1:4, 1:4] = blocked[4:, 4:] = False
    assert mask_blocks(blocked, 6) == [(0, 1), (1, 4), (4, 6)]
    assert mask_blocks(torch.zeros(3, 3, dtype=torch.bool), 3) == [(0, 3)]
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    with pytest.raises(ValueError, match="only block-diagonal"):
        mask_blocks(causal, 4)
    interleaved = torch.arange(4)[:, None] % 2 != torch.arange(4)[None, :] % 2
    with pytest.raises(ValueError, match="only block-diagonal"):
        mask_blocks(interleaved, 4)
    with pytest.raises(ValueError, match=r"shape \[4, 4\]"):
        mask_blocks(torch.zeros(3, 3, dtype=torch.bool), 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_group_split_switch_is_restored_on_error(family):
    adapter = make(family).train()
    out = adapter(images(), padded_mask())

    def fail(module, args, kwargs):
        assert not any(layer.self_attn.training for layer in module.layers)  # off inside decode
        raise RuntimeError("boom")

    handle = adapter.decoder.register_forward_pre_hook(fail, with_kwargs=True)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            adapter.decode(out, random_boxes(2, 3))
    finally:
        handle.remove()
    assert all(layer.self_attn.training for layer in adapter.decoder.layers)
    with group_split_off(adapter.decoder):
        pass
    assert all(layer.self_attn.training for layer in adapter.decoder.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_argument_errors(family):
    adapter = make(family)
    with torch.no_grad():
        out = adapter(images())
    with pytest.raises(ValueError, match="'position' cannot be given"):
        adapter.decode(out, random_boxes(2, 3), position=torch.zeros(2, 3, 64))
    with pytest.raises(ValueError, match="boxes must be"):
        adapter.decode(out, random_boxes(3, 3))
    with pytest.raises(ValueError, match="content must be"):
        adapter.decode(out, random_boxes(2, 3), content=torch.zeros(2, 3, 32))


def test_default_content_is_zero():
    adapter = make("lw_detr")
    with torch.no_grad():
        out = adapter(images())
        boxes = random_boxes(2, 5)
        default = adapter.decode(out, boxes)
        zeros = adapter.decode(out, boxes, content=torch.zeros(2, 5, 64))
    torch.testing.assert_close(default.logits, zeros.logits, atol=0, rtol=0)


# ---- attention --------------------------------------------------------------------------------------


def test_rasterised_attention_reproduces_module_output():
    """Per head, map @ (padding-masked) value equals the cross-attention's own output, on a
    two-level LW-DETR memory with a padded image (queries whose samples stay inside the maps)."""
    adapter = make("lw_detr", projector_scale_factors=[2.0, 0.5])
    module = adapter.decoder.layers[0].cross_attn
    captured = {}
    h1 = module.register_forward_pre_hook(lambda m, a, kw: captured.update(kw=dict(kw)), with_kwargs=True)
    h2 = module.register_forward_hook(lambda m, a, kw, o: captured.update(out=o[0]), with_kwargs=True)
    try:
        with torch.no_grad():
            out = adapter(images(), padded_mask(), with_attention=True)
    finally:
        h1.remove()
        h2.remove()
    kw, mem = captured["kw"], out.memory
    with torch.no_grad():
        loc, w = deformable_samples(module, kw["hidden_states"], kw["position_embeddings"], kw["reference_points"],
                                    kw["spatial_shapes"])
        value = module.value_proj(kw["encoder_hidden_states"]).masked_fill(mem.padding_mask[..., None], 0)
        value = value.view(*value.shape[:2], module.n_heads, -1)
        result = module.output_proj(torch.cat(
            [splat_deformable_attention(loc[:, :, h:h + 1], w[:, :, h:h + 1], mem.spatial_shapes, mem.level_start)
             @ value[:, :, h] for h in range(module.n_heads)], -1))
    inside = torch.ones(loc.shape[:2], dtype=torch.bool)
    for lvl, (h, wd) in enumerate(mem.spatial_shapes.tolist()):
        x, y = loc[:, :, :, lvl, :, 0], loc[:, :, :, lvl, :, 1]
        inside &= ((x >= 0.5 / wd) & (x <= 1 - 0.5 / wd) & (y >= 0.5 / h) & (y <= 1 - 0.5 / h)).flatten(2).all(-1)
    assert inside.sum() >= 5
    expected = captured["out"][inside]
    assert expected.abs().max() > 1e-3
    assert (result[inside] - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max()))
    attn = out.cross_attention
    assert (attn * mem.padding_mask[:, None]).abs().sum() == 0
    torch.testing.assert_close(attn.sum(-1), torch.ones_like(attn.sum(-1)), atol=1e-5, rtol=0)


# ---- loss ---------------------------------------------------------------------------------------


def _matched_l1(adapter, out, targets) -> float:
    """sum over images of L1 between the final layer's matched boxes and their GT, / number of GT:
    what one group's ``loss_bbox`` is (transformers' matcher with one group)."""
    from transformers.loss.loss_lw_detr import LwDetrHungarianMatcher

    cfg = adapter.config
    matcher = LwDetrHungarianMatcher(class_cost=cfg.class_cost, bbox_cost=cfg.bbox_cost, giou_cost=cfg.giou_cost)
    logits, boxes = out.predictions.layer(-1)
    total = 0.0
    for b, (pred, gt) in enumerate(matcher({"logits": logits, "pred_boxes": boxes}, targets, group_detr=1)):
        total += float((boxes[b, pred] - targets[b]["boxes"][gt]).abs().sum())
    return total / sum(len(t["boxes"]) for t in targets)


@pytest.mark.parametrize("family", FAMILIES)
def test_eval_mode_loss_uses_one_group(family):
    """HF's criterion would match eval outputs in 13 chunks of 2 queries and divide by 13 x GT; the
    adapter's eval-mode loss matches the 30 queries once and divides by the GT count."""
    adapter = make(family).eval()
    x, mask = images(), padded_mask()
    with torch.no_grad():
        out = adapter(x, mask, labels=labels())
        hf = adapter.model(pixel_values=x, pixel_mask=mask, labels=labels())
    assert out.loss_dict["loss_bbox"].item() == pytest.approx(_matched_l1(adapter, out, labels()), rel=1e-5)
    assert abs(hf.loss_dict["loss_bbox"].item() - out.loss_dict["loss_bbox"].item()) > 1e-3  # HF's differs
    torch.testing.assert_close(out.predictions.logits[-1], hf.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_box_normalised_loss_is_zero(family):
    """HF's loss averages num_boxes over processes itself: nothing for detrkd.distributed to rescale."""
    adapter = make(family).train()
    out = adapter(images(), padded_mask(), labels=labels())
    part = adapter.box_normalised_loss(out)
    assert part.item() == 0.0 and out.loss.item() > 0 and part.requires_grad
    with pytest.raises(ValueError, match="needs a forward with labels"):
        adapter.box_normalised_loss(adapter(images()))


@pytest.mark.parametrize("family", FAMILIES)
def test_detection_loss_trains(family):
    torch.manual_seed(0)
    adapter = build_detector(family, "tiny", NUM_CLASSES, group_detr=3).train()
    optimiser = torch.optim.AdamW(adapter.parameters(), lr=2e-3)
    x, mask = images(), padded_mask()
    losses = []
    for _ in range(20):
        loss = adapter(x, mask, labels=labels()).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) / 3 < 0.85 * losses[0], losses
