"""RT-DETR v1 / v2 and D-FINE adapters: normalised view, denoising separation, decode, attention maps.

Tiny random models built offline (HF-ResNet backbone, d_model 64, 2 decoder layers, 30 queries);
dropout is 0 in every config, so train-mode runs are deterministic apart from the denoising noise.
"""

from __future__ import annotations

import pytest
import torch

from detrkd.models import build_detector, count_hooks, load_detector, save_detector
from detrkd.models.attention import splat_deformable_attention
from detrkd.models.base import PRESETS
from detrkd.models.families.d_fine import DFineAdapter
from detrkd.models.families.rt_detr import RTDETRAdapter, RTDETRv2Adapter, box_content

FAMILIES = ["rt_detr", "rt_detr_v2", "d_fine", "deimv2"]
FDR = ("d_fine", "deimv2")  # D-FINE's decoder (DEIMv2 has it too)
NUM_CLASSES = 5


def make(family: str, calibrate: bool = True, **overrides) -> torch.nn.Module:
    """A tiny detector with non-degenerate weights.

    ``calibrate``: (1) parameters HF initialises to exactly zero (box-head last layers, so D-FINE's
    FDR corners would all be 0; attention-weight projections, so deformable weights would be uniform;
    sampling-offset weights; LQE and gate weights; biases) get small random values, and (2) BatchNorm
    running stats are set to one batch's statistics so that eval-mode memory is O(1) (fresh running
    stats shrink it ~1000x). Without this most checks below would compare constants.
    """
    torch.manual_seed(0)
    adapter = build_detector(family, "tiny", NUM_CLASSES, **overrides)
    if calibrate:
        with torch.no_grad():
            for param in adapter.model.parameters():
                if param.requires_grad and bool((param == 0).all()):
                    param.normal_(0.0, 0.05)
        norms = [m for m in adapter.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        for m in norms:
            m.momentum = 1.0
        with torch.no_grad():
            adapter.train()(images())
        for m in norms:
            m.momentum = 0.1
    return adapter.eval()


def _backbone(adapter) -> torch.nn.Module:
    """The HF backbone wrapper (DEIMv2 calls it ``conv_encoder``)."""
    core = adapter.model.model
    return core.conv_encoder if adapter.family == "deimv2" else core.backbone


def images(batch: int = 2, h: int = 64, w: int = 96) -> torch.Tensor:
    return torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(1))


def labels() -> list[dict[str, torch.Tensor]]:
    return [
        dict(class_labels=torch.tensor([1, 2]),
             boxes=torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.3, 0.3, 0.1, 0.1]])),
        dict(class_labels=torch.tensor([3]), boxes=torch.tensor([[0.4, 0.6, 0.3, 0.2]])),
    ]


def random_boxes(batch: int, m: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.rand(batch, m, 2, generator=g) * 0.8 + 0.1,
                      torch.rand(batch, m, 2, generator=g) * 0.4 + 0.05], dim=-1)


def hf_layers(adapter, hf_out, num_denoising: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's own per-layer detection-query outputs as [L, B, Q, .] (D-FINE train: drop pre-bbox)."""
    logits, boxes = hf_out.intermediate_logits, hf_out.intermediate_reference_points
    if isinstance(adapter, DFineAdapter):
        logits, boxes = logits[:, 1:], boxes[:, 1:]
    return logits[:, :, num_denoising:].transpose(0, 1), boxes[:, :, num_denoising:].transpose(0, 1)


# ---- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_config_maps_preset(family):
    adapter = make(family)
    cfg, size = adapter.config, PRESETS["tiny"]
    assert cfg.model_type == family and adapter.family == family
    assert adapter.class_head == "sigmoid" and adapter.attention_kind == "deformable"
    assert cfg.d_model == size.d_model and cfg.decoder_layers == size.decoder_layers
    assert cfg.num_queries == size.queries and cfg.decoder_attention_heads == size.heads
    assert cfg.decoder_ffn_dim == size.ffn and cfg.encoder_ffn_dim == size.ffn
    assert list(cfg.encoder_in_channels) == list(_backbone(adapter).intermediate_channel_sizes)
    assert list(cfg.decoder_in_channels) == [cfg.encoder_hidden_dim] * 3
    assert adapter.num_classes == NUM_CLASSES and adapter.hidden_size == size.d_model
    overridden = make(family, num_queries=12, decoder_layers=3)
    assert overridden.num_queries == 12 and overridden.num_decoder_layers == 3


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_model_has_unit_batch_norms(family):
    """HF's RT-DETR init draws BatchNorm weights from N(0, 0.01), leaving ~1e-5 memory; from_config
    restores PyTorch's default so a fresh model's memory is O(1) in training mode."""
    adapter = make(family, calibrate=False)
    norms = [m for m in adapter.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)
    with torch.no_grad():
        out = adapter.train()(images())
    assert out.memory.tokens.abs().mean() > 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_trainable(family):
    adapter = make(family)
    params = list(adapter.backbone_parameters())
    assert params and all(p.requires_grad for p in params)
    assert not any("Frozen" in type(m).__name__ for m in _backbone(adapter).modules())
    adapter.train()
    out = adapter(images(), labels=labels())
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)


def test_wrong_model_type():
    rt, v2, dfine = make("rt_detr"), make("rt_detr_v2"), make("d_fine")
    with pytest.raises(ValueError, match="rt_detr_v2"):
        RTDETRv2Adapter(rt.model)
    with pytest.raises(ValueError, match="'d_fine'"):
        RTDETRAdapter(dfine.model)
    with pytest.raises(ValueError, match="'rt_detr_v2'"):
        DFineAdapter(v2.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_unsupported_configs_rejected(family):
    with pytest.raises(ValueError, match="learn_initial_query"):
        make(family, learn_initial_query=True)
    if family in FDR:
        with pytest.raises(ValueError, match="eval_idx"):
            make(family, eval_idx=0)


# ---- forward view --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_predictions_match_hf_eval(family):
    adapter = make(family).eval()
    x = images()
    with torch.no_grad():
        out = adapter(x, pixel_mask=torch.ones(2, 64, 96, dtype=torch.long))
        hf = adapter.model(pixel_values=x)
    L, Q = adapter.num_decoder_layers, adapter.num_queries
    assert out.predictions.logits.shape == (L, 2, Q, NUM_CLASSES)
    assert out.predictions.boxes.shape == (L, 2, Q, 4)
    assert out.denoising is None and out.loss is None
    assert (out.predictions.logits[-1] - hf.logits).abs().max() < 1e-5
    assert (out.predictions.boxes[-1] - hf.pred_boxes).abs().max() < 1e-5
    if family not in FDR:  # D-FINE's (and DEIMv2's) eval outputs only hold the last layer
        logits, boxes = hf_layers(adapter, hf, 0)
        assert torch.allclose(out.predictions.logits, logits, atol=1e-5)
        assert torch.allclose(out.predictions.boxes, boxes, atol=1e-5)
    # memory and queries
    mem, d = out.memory, adapter.hidden_size
    n = int((mem.spatial_shapes[:, 0] * mem.spatial_shapes[:, 1]).sum())
    assert mem.tokens.shape == (2, n, d) and mem.spatial_shapes.tolist() == [[8, 12], [4, 6], [2, 3]]
    assert mem.level_start.tolist() == [0, 96, 120]
    assert mem.padding_mask.shape == (2, n) and not mem.padding_mask.any()
    assert out.queries.content.shape == (2, Q, d) and out.queries.position is None
    ref = out.queries.reference_boxes
    assert ref.shape == (2, Q, 4) and ((ref >= 0) & (ref <= 1)).all()
    assert torch.allclose(ref, hf.init_reference_points.sigmoid())


@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_with_labels_separates_denoising(family):
    adapter = make(family).train()
    x = images()
    torch.manual_seed(5)
    out = adapter(x, labels=labels())
    torch.manual_seed(5)  # same denoising noise
    hf = adapter.model(pixel_values=x, labels=labels())
    dn = hf.denoising_meta_values["dn_num_split"][0]
    L, Q = adapter.num_decoder_layers, adapter.num_queries
    assert dn > 0 and hf.logits.shape[1] == dn + Q  # HF's own outputs carry the denoising queries
    assert out.predictions.logits.shape == (L, 2, Q, NUM_CLASSES)
    assert out.denoising is not None and out.denoising.logits.shape == (L, 2, dn, NUM_CLASSES)
    assert out.queries.content.shape == (2, Q, adapter.hidden_size)
    assert out.queries.reference_boxes.shape == (2, Q, 4)
    logits, boxes = hf_layers(adapter, hf, dn)
    assert torch.allclose(out.predictions.logits, logits, atol=1e-5)
    assert torch.allclose(out.predictions.boxes, boxes, atol=1e-5)
    assert (out.predictions.logits[-1] - hf.logits[:, dn:]).abs().max() < 1e-5
    assert torch.isfinite(out.loss) and out.loss_dict
    assert torch.allclose(out.loss, hf.loss, rtol=1e-5)
    # detection queries cannot see the denoising ones: same predictions as without labels
    plain = adapter(x)
    assert plain.denoising is None and plain.loss is None
    assert torch.allclose(plain.predictions.logits, out.predictions.logits, atol=1e-4)
    assert torch.allclose(plain.predictions.boxes, out.predictions.boxes, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_in_eval_mode(family):
    adapter = make(family).eval()
    out = adapter(images(), labels=labels())
    assert out.denoising is None and torch.isfinite(out.loss)
    out.loss.backward()


# ---- decode ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES + ["rt_detr_v2-discrete"])
def test_decode_own_queries_reproduces_predictions(family):
    if family == "rt_detr_v2-discrete":
        adapter = make("rt_detr_v2", decoder_method="discrete").eval()
    else:
        adapter = make(family).eval()
    with torch.no_grad():
        out = adapter(images())
        again = adapter.decode(out, out.queries.reference_boxes, out.queries.content)
    assert again.logits.shape == out.predictions.logits.shape
    assert (again.logits - out.predictions.logits).abs().max() < 1e-4
    assert (again.boxes - out.predictions.boxes).abs().max() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_default_content_is_the_models_token_content(family):
    """At a token's anchor box (its centre, anchor size of its level) the default content is exactly
    what top-k selection of that token gives: enc_output of the valid-masked memory."""
    adapter = make(family)
    with torch.no_grad():
        out = adapter(images(w=416))  # level 0 is 8 x 52: its border tokens' anchors are invalid
        kw = out.decoder_inputs
        core = adapter.model.model
        _, valid = core.generate_anchors(tuple(kw["spatial_shapes_list"]))
        expected = core.enc_output(out.memory.tokens * valid)  # [B, N, D]
        anchors = []
        for lvl, (h, w) in enumerate(out.memory.spatial_shapes.tolist()):
            ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            centre = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(-1, 2)
            anchors.append(torch.cat([centre, torch.full_like(centre, 0.05 * 2**lvl)], -1))
        anchors = torch.cat(anchors)[None].expand(2, -1, -1)
        got = box_content(core, kw, anchors)
    assert not valid.all()
    assert torch.allclose(got, expected, atol=1e-5)
    assert not got.requires_grad
    # decoding with default content is well-formed (the model's own top-k boxes are its anchors
    # moved by enc_bbox_head, so their default content is a bilinear blend, not the exact gather)
    with torch.no_grad():
        default = adapter.decode(out, out.queries.reference_boxes)
    assert default.logits.shape == out.predictions.logits.shape
    assert torch.isfinite(default.logits).all() and torch.isfinite(default.boxes).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_independent_of_denoising(family):
    """Same weights and inputs: decode is identical whether forward ran with denoising or not."""
    adapter = make(family, num_denoising=50).train()
    x, m = images(), 7
    boxes = random_boxes(2, m)
    content = torch.randn(2, m, adapter.hidden_size, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(m, m, dtype=torch.bool)
    mask[:3, 3:] = mask[3:, :3] = True

    with_dn = adapter(x, labels=labels())
    assert with_dn.denoising is not None
    without = adapter(x)  # train mode, no labels -> no denoising
    adapter.model.config.num_denoising = 0  # train mode, labels, denoising switched off
    no_dn_cfg = adapter(x, labels=labels())
    adapter.model.config.num_denoising = 50
    assert without.denoising is None and no_dn_cfg.denoising is None
    for kwargs in (dict(content=content), dict(), dict(content=content, self_attn_mask=mask)):
        ref = adapter.decode(without, boxes, **kwargs)
        assert ref.logits.shape == (adapter.num_decoder_layers, 2, m, NUM_CLASSES)
        for other in (with_dn, no_dn_cfg):
            got = adapter.decode(other, boxes, **kwargs)
            assert torch.allclose(got.logits, ref.logits, atol=1e-6)
            assert torch.allclose(got.boxes, ref.boxes, atol=1e-6)
    # and in eval mode (no denoising at all) the same holds against a train-mode-free reference
    adapter.eval()
    with torch.no_grad():
        ev = adapter(x)
        ev_labels = adapter(x, labels=labels())
        a = adapter.decode(ev, boxes, content)
        b = adapter.decode(ev_labels, boxes, content)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.boxes, b.boxes)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_self_attn_mask_keeps_groups_apart(family):
    adapter = make(family).eval()
    boxes = random_boxes(2, 10)
    with torch.no_grad():
        out = adapter(images())
        content = out.queries.content[:, :10]
        group = torch.arange(10) // 4  # groups of 4, 4, 2
        mask = group[:, None] != group[None, :]
        together = adapter.decode(out, boxes, content, self_attn_mask=mask)
        for g in range(3):
            idx = (group == g).nonzero().squeeze(1)
            alone = adapter.decode(out, boxes[:, idx], content[:, idx])
            assert torch.allclose(together.logits[:, :, idx], alone.logits, atol=1e-5)
            assert torch.allclose(together.boxes[:, :, idx], alone.boxes, atol=1e-5)
        unmasked = adapter.decode(out, boxes, content, self_attn_mask=torch.zeros(10, 10, dtype=torch.bool))
        plain = adapter.decode(out, boxes, content)
        assert torch.allclose(unmasked.logits, plain.logits, atol=1e-6)
        assert not torch.allclose(together.logits, plain.logits, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_gradients_reach_encoder(family):
    adapter = make(family).train()
    out = adapter(images())
    pred = adapter.decode(out, random_boxes(2, 6))
    assert pred.logits.shape == (adapter.num_decoder_layers, 2, 6, NUM_CLASSES)
    assert pred.boxes.shape == (adapter.num_decoder_layers, 2, 6, 4)
    assert ((pred.boxes >= 0) & (pred.boxes <= 1)).all() or family in FDR
    (pred.logits.sum() + pred.boxes.sum()).backward()
    encoder = list(adapter.model.model.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.backbone_parameters())
    layer0 = adapter.model.model.decoder.layers[0]
    assert layer0.encoder_attn.sampling_offsets.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_decode_argument_errors(family):
    adapter = make(family).eval()
    with torch.no_grad():
        out = adapter(images())
    boxes = random_boxes(2, 4)
    with pytest.raises(ValueError, match="position"):
        adapter.decode(out, boxes, position=torch.zeros(2, 4, adapter.hidden_size))
    with pytest.raises(ValueError, match="boxes"):
        adapter.decode(out, boxes[:1])
    with pytest.raises(ValueError, match="content"):
        adapter.decode(out, boxes, torch.zeros(2, 3, adapter.hidden_size))
    with pytest.raises(ValueError, match="self_attn_mask"):
        adapter.decode(out, boxes, self_attn_mask=torch.zeros(3, 3, dtype=torch.bool))


# ---- hooks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_removed(family):
    adapter = make(family).train()
    before = count_hooks(adapter)
    out = adapter(images(), labels=labels(), with_attention=True)
    assert count_hooks(adapter) == before
    adapter.decode(out, random_boxes(2, 3))
    assert count_hooks(adapter) == before
    adapter.eval()
    with pytest.raises(Exception):
        adapter(images(), labels=[{"boxes": torch.zeros(0, 4)}], with_attention=True)  # no class_labels
    assert count_hooks(adapter) == before
    with pytest.raises(Exception):
        adapter(images()[:, :2], with_attention=True)  # wrong channel count
    assert count_hooks(adapter) == before


# ---- cross-attention maps -----------------------------------------------------------------------------


ATTENTION_VARIANTS = [
    ("rt_detr", {}),
    ("rt_detr_v2", {}),
    ("rt_detr_v2", {"decoder_method": "discrete"}),
    ("d_fine", {}),
    ("d_fine", {"decoder_n_points": [2, 4, 3]}),
    ("d_fine", {"decoder_method": "discrete"}),
    ("deimv2", {}),
]


@pytest.mark.parametrize("family,overrides", ATTENTION_VARIANTS)
def test_cross_attention_maps(family, overrides):
    adapter = make(family, **overrides)
    for train, lab in ((False, None), (True, labels())):
        adapter.train(train)
        with torch.no_grad():
            out = adapter(images(), labels=lab, with_attention=True)
        att, n = out.cross_attention, out.memory.tokens.shape[1]
        assert att.shape == (2, adapter.num_queries, n)
        assert (att >= 0).all()
        assert torch.allclose(att.sum(-1), torch.ones(2, adapter.num_queries), atol=1e-5)
        assert adapter(images()).cross_attention is None
    # train mode: the map of the detection queries is the same with or without denoising queries
    adapter.train()
    with torch.no_grad():
        with_dn = adapter(images(), labels=labels(), with_attention=True)
        without = adapter(images(), with_attention=True)
    assert with_dn.denoising is not None and without.denoising is None
    assert torch.allclose(with_dn.cross_attention, without.cross_attention, atol=1e-5)


@pytest.mark.parametrize("family,overrides", ATTENTION_VARIANTS)
def test_rasterised_attention_reproduces_module_output(family, overrides):
    """Per head, map @ value equals the deformable attention's own output (for queries whose bilinear
    samples stay inside the feature maps: outside samples read zeros in the model but are
    renormalised away in the map)."""
    adapter = make(family, **overrides).eval()
    module = adapter.model.model.decoder.layers[0].encoder_attn
    captured = {}

    def pre(mod, args, kwargs):
        captured["kw"] = dict(kwargs)

    def post(mod, args, kwargs, output):
        captured["out"] = output[0]

    h1 = module.register_forward_pre_hook(pre, with_kwargs=True)
    h2 = module.register_forward_hook(post, with_kwargs=True)
    try:
        with torch.no_grad():
            out = adapter(images())
    finally:
        h1.remove()
        h2.remove()
    kw = captured["kw"]
    with torch.no_grad():
        locations, weights = adapter._samples(kw)
        enc = kw["encoder_hidden_states"]
        value = module.value_proj(enc) if hasattr(module, "value_proj") else enc
        heads = weights.shape[2]
        value = value.view(*value.shape[:2], heads, -1)
        per_head = []
        for h in range(heads):
            amap = splat_deformable_attention(locations[:, :, h:h + 1], weights[:, :, h:h + 1],
                                              out.memory.spatial_shapes, out.memory.level_start)
            per_head.append(amap @ value[:, :, h])
        result = torch.cat(per_head, -1)
        if hasattr(module, "output_proj"):
            result = module.output_proj(result)
    inside = torch.ones(locations.shape[:2], dtype=torch.bool)
    for lvl, (h, w) in enumerate(out.memory.spatial_shapes.tolist()):
        x, y = locations[:, :, :, lvl, ..., 0], locations[:, :, :, lvl, ..., 1]
        used = weights[:, :, :, lvl] > 0
        ok = (x >= 0.5 / w) & (x <= 1 - 0.5 / w) & (y >= 0.5 / h) & (y <= 1 - 0.5 / h)
        inside &= (ok | ~used).flatten(2).all(-1)
    if overrides.get("decoder_method") == "discrete":
        inside[:] = True  # discrete sampling clamps to the border token, as the map does
    assert inside.sum() >= 5
    expected = captured["out"][inside]
    assert expected.abs().max() > 1e-2  # a real signal (calibrated memory)
    assert (result[inside] - expected).abs().max() < 1e-5 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_roundtrip(family, tmp_path):
    adapter = make(family)
    save_detector(adapter, tmp_path / family)
    loaded = load_detector(tmp_path / family).eval()
    assert type(loaded) is type(adapter)
    with torch.no_grad():
        a, b = adapter(images()), loaded(images())
    assert torch.allclose(a.predictions.logits, b.predictions.logits, atol=1e-5)
    assert torch.allclose(a.predictions.boxes, b.predictions.boxes, atol=1e-5)
    assert all(p.requires_grad for p in loaded.backbone_parameters())
    if family in FDR:  # FDR constants stay constant
        decoder = loaded.model.model.decoder
        assert not decoder.up.requires_grad and not decoder.reg_scale.requires_grad
