"""Adapters of the dense-attention families: DETR, Conditional DETR, DAB-DETR (tiny, offline)."""

from __future__ import annotations

import copy

import pytest
import torch

from detrkd.models.base import PRESETS, count_hooks
from detrkd.models.families.conditional_detr import ConditionalDETRAdapter
from detrkd.models.families.dab_detr import DABDETRAdapter
from detrkd.models.families.detr import DETRAdapter

ADAPTERS = [DETRAdapter, ConditionalDETRAdapter, DABDETRAdapter]
NUM_CLASSES = 5
TOL = 1e-5


def build(adapter_cls, **overrides):
    torch.manual_seed(0)
    return adapter_cls.from_config(adapter_cls.make_config(PRESETS["tiny"], NUM_CLASSES, **overrides))


@pytest.fixture(scope="module", params=ADAPTERS, ids=lambda a: a.family)
def adapter(request):
    return build(request.param)


@pytest.fixture(scope="module")
def batch():
    """Two images; the second is padded on the right and bottom (4 x 5 feature map)."""
    g = torch.Generator().manual_seed(1)
    pixel_values = torch.randn(2, 3, 128, 160, generator=g)
    pixel_mask = torch.ones(2, 128, 160, dtype=torch.long)
    pixel_mask[1, :, 96:] = 0
    pixel_mask[1, 96:, :] = 0
    pixel_values[1] *= pixel_mask[1]
    labels = [
        {"class_labels": torch.tensor([1, 3]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.6, 0.5, 0.3, 0.4]])},
        {"class_labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]])},
    ]
    return pixel_values, pixel_mask, labels


def own_queries(adapter, out):
    """(boxes, content, position) that re-create the model's own detection queries."""
    q = out.queries
    if isinstance(adapter, DABDETRAdapter):
        return dict(boxes=q.reference_boxes, content=q.content)
    return dict(content=q.content, position=q.position)


def random_boxes(b, m, seed=2):
    g = torch.Generator().manual_seed(seed)
    centre = torch.rand(b, m, 2, generator=g) * 0.6 + 0.2
    size = torch.rand(b, m, 2, generator=g) * 0.3 + 0.05
    return torch.cat((centre, size), dim=-1)


# ---- construction ------------------------------------------------------------------------------
def test_config_and_facts(adapter):
    cfg = adapter.config
    size = PRESETS["tiny"]
    assert cfg.model_type in adapter.model_types
    assert cfg.backbone_config.model_type == "resnet"
    assert cfg.auxiliary_loss
    assert adapter.hidden_size == size.d_model
    assert adapter.num_queries == size.queries
    assert adapter.num_decoder_layers == size.decoder_layers
    assert adapter.num_classes == NUM_CLASSES
    assert adapter.attention_kind == "dense"
    assert adapter.class_head == ("softmax" if isinstance(adapter, DETRAdapter) else "sigmoid")


def test_backbone_trainable(adapter, batch):
    params = list(adapter.backbone_parameters())
    assert params and all(p.requires_grad for p in params)
    assert all(p.requires_grad for p in adapter.parameters())
    pixel_values, pixel_mask, labels = batch
    adapter.train()
    adapter.zero_grad()
    out = adapter(pixel_values, pixel_mask, labels=labels)
    out.loss.backward()
    assert all(p.grad is not None for p in params)
    assert any(p.grad.abs().sum() > 0 for p in params)
    adapter.zero_grad()


@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=lambda a: a.family)
def test_wrong_model_type_rejected(adapter_cls):
    other = ADAPTERS[(ADAPTERS.index(adapter_cls) + 1) % len(ADAPTERS)]
    model = build(other).model
    with pytest.raises(ValueError, match="expects a model of type"):
        adapter_cls(model)


# ---- forward -----------------------------------------------------------------------------------
def test_forward_matches_hf(adapter, batch):
    pixel_values, pixel_mask, _ = batch
    adapter.eval()
    with torch.no_grad():
        hf = adapter.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        out = adapter(pixel_values, pixel_mask)
    b, q, k = 2, adapter.num_queries, NUM_CLASSES + (1 if adapter.class_head == "softmax" else 0)
    assert out.predictions.logits.shape == (adapter.num_decoder_layers, b, q, k)
    assert out.predictions.boxes.shape == (adapter.num_decoder_layers, b, q, 4)
    assert (out.predictions.logits[-1] - hf.logits).abs().max() < TOL
    assert (out.predictions.boxes[-1] - hf.pred_boxes).abs().max() < TOL
    assert out.class_head == adapter.class_head
    assert out.cross_attention is None and out.loss is None and out.denoising is None


def test_auxiliary_layers_match_hf_loss_inputs(adapter, batch):
    """Layers 0..L-2 are exactly the auxiliary outputs HF's own loss uses."""
    pixel_values, pixel_mask, labels = batch
    adapter.eval()
    with torch.no_grad():
        hf = adapter.model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)
        out = adapter(pixel_values, pixel_mask)
    assert len(hf.auxiliary_outputs) == adapter.num_decoder_layers - 1
    for i, aux in enumerate(hf.auxiliary_outputs):
        assert (out.predictions.logits[i] - aux["logits"]).abs().max() < TOL
        assert (out.predictions.boxes[i] - aux["pred_boxes"]).abs().max() < TOL


def test_memory_and_queries(adapter, batch):
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        out = adapter.eval()(pixel_values, pixel_mask)
    mem = out.memory
    assert mem.spatial_shapes.tolist() == [[4, 5]]
    assert mem.level_start.tolist() == [0]
    assert mem.tokens.shape == (2, 20, adapter.hidden_size)
    assert mem.padding_mask.dtype == torch.bool and mem.padding_mask.shape == (2, 20)
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[:, 3:] = True  # columns 96..159 of 160 px
    expected[3:, :] = True  # rows 96..127 of 128 px
    assert not mem.padding_mask[0].any()
    assert torch.equal(mem.padding_mask[1], expected.flatten())
    q = out.queries
    assert q.content.shape == (2, adapter.num_queries, adapter.hidden_size)
    if isinstance(adapter, DETRAdapter):
        assert q.position.shape == q.content.shape and q.reference_boxes is None
    elif isinstance(adapter, ConditionalDETRAdapter):
        assert q.position.shape == q.content.shape
        assert q.reference_boxes.shape == (2, adapter.num_queries, 4)
        assert (q.reference_boxes[..., 2:] == 0).all()
    else:
        assert q.position is None
        assert q.reference_boxes.shape == (2, adapter.num_queries, 4)
        assert ((q.reference_boxes > 0) & (q.reference_boxes < 1)).all()


def test_cross_attention(adapter, batch):
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        out = adapter.eval()(pixel_values, pixel_mask, with_attention=True)
    attn = out.cross_attention
    assert attn.shape == (2, adapter.num_queries, 20)
    assert (attn >= 0).all()
    assert (attn.sum(-1) - 1).abs().max() < 1e-5
    assert (attn[1][:, out.memory.padding_mask[1]] == 0).all()
    assert (attn[1][:, ~out.memory.padding_mask[1]] > 0).all()


def test_loss_with_labels(adapter, batch):
    pixel_values, pixel_mask, labels = batch
    adapter.train()
    with torch.no_grad():
        out = adapter(pixel_values, pixel_mask, labels=labels)
    assert out.loss is not None and torch.isfinite(out.loss)
    assert "loss_giou" in out.loss_dict and "loss_giou_0" in out.loss_dict  # auxiliary terms present
    assert out.predictions.num_layers == adapter.num_decoder_layers


# ---- decode ------------------------------------------------------------------------------------
def test_decode_own_queries_reproduces_predictions(adapter, batch):
    pixel_values, pixel_mask, _ = batch
    adapter.eval()
    with torch.no_grad():
        out = adapter(pixel_values, pixel_mask)
        again = adapter.decode(out, **own_queries(adapter, out))
    assert (again.logits - out.predictions.logits).abs().max() < TOL
    assert (again.boxes - out.predictions.boxes).abs().max() < TOL


def test_conditional_decode_with_reference_boxes_reproduces_predictions(batch):
    """Giving the model's own reference points as boxes takes the override path: same result."""
    adapter = build(ConditionalDETRAdapter).eval()
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        out = adapter(pixel_values, pixel_mask)
        again = adapter.decode(out, boxes=out.queries.reference_boxes, position=out.queries.position)
    assert (again.logits - out.predictions.logits).abs().max() < TOL
    assert (again.boxes - out.predictions.boxes).abs().max() < TOL


def test_decode_boxes_anchor_predictions(adapter, batch):
    """With a zero box-regression output, predictions sit on the query's reference.

    DAB: the whole box is the anchor (every layer); Conditional: the centre is the box centre;
    DETR has no reference, so a zero head gives the image centre whatever the box.
    """
    model = copy.deepcopy(adapter).eval()
    last = model.model.bbox_predictor.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        pixel_values, pixel_mask, _ = batch
        out = model(pixel_values, pixel_mask)
        boxes = random_boxes(2, 6)
        pred = model.decode(out, boxes)
    assert pred.boxes.shape == (model.num_decoder_layers, 2, 6, 4)
    if isinstance(model, DABDETRAdapter):
        assert (pred.boxes - boxes).abs().max() < 1e-5
    elif isinstance(model, ConditionalDETRAdapter):
        assert (pred.boxes[..., :2] - boxes[..., :2]).abs().max() < 1e-5
        assert (pred.boxes[..., 2:] - 0.5).abs().max() < 1e-6
    else:
        assert (pred.boxes - 0.5).abs().max() < 1e-6


def test_decode_boxes_distinguish_queries(adapter, batch):
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        out = adapter.eval()(pixel_values, pixel_mask)
        boxes = random_boxes(2, 5)
        pred = adapter.decode(out, boxes)
        same = adapter.decode(out, boxes.clone())
    assert pred.logits.shape[:3] == (adapter.num_decoder_layers, 2, 5)
    assert torch.equal(pred.logits, same.logits)
    assert (pred.logits[:, :, 0] - pred.logits[:, :, 1]).abs().max() > 0


def test_decode_gradients_reach_encoder(adapter, batch):
    pixel_values, pixel_mask, _ = batch
    adapter.train()
    adapter.zero_grad()
    out = adapter(pixel_values, pixel_mask)
    pred = adapter.decode(out, random_boxes(2, 8))
    (pred.logits.square().mean() + pred.boxes.mean()).backward()
    m = adapter.model.model
    for module in (m.encoder, m.input_projection):
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapter.backbone_parameters())
    adapter.zero_grad()


def test_self_attn_mask_keeps_groups_apart(adapter, batch):
    pixel_values, pixel_mask, _ = batch
    adapter.eval()
    g = torch.Generator().manual_seed(3)
    boxes = random_boxes(2, 7)
    content = torch.randn(2, 7, adapter.hidden_size, generator=g) * 3
    blocked = torch.ones(7, 7, dtype=torch.bool)
    blocked[:4, :4] = False
    blocked[4:, 4:] = False
    with torch.no_grad():
        out = adapter(pixel_values, pixel_mask)
        grouped = adapter.decode(out, boxes, content, self_attn_mask=blocked)
        first = adapter.decode(out, boxes[:, :4], content[:, :4])
        second = adapter.decode(out, boxes[:, 4:], content[:, 4:])
        mixed = adapter.decode(out, boxes, content)
    assert (grouped.logits[:, :, :4] - first.logits).abs().max() < TOL
    assert (grouped.logits[:, :, 4:] - second.logits).abs().max() < TOL
    assert (grouped.boxes[:, :, :4] - first.boxes).abs().max() < TOL
    assert (mixed.logits[:, :, :4] - first.logits).abs().max() > 1e-4  # the mask did something
    with pytest.raises(ValueError, match="self_attn_mask"):
        adapter.decode(out, boxes, content, self_attn_mask=blocked.float())


def test_decode_argument_errors(adapter, batch):
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        out = adapter.eval()(pixel_values, pixel_mask)
        with pytest.raises(ValueError):
            adapter.decode(out, None)
        with pytest.raises(ValueError, match="images"):
            adapter.decode(out, random_boxes(3, 4))
        with pytest.raises(ValueError, match="content"):
            adapter.decode(out, random_boxes(2, 4), content=torch.zeros(2, 4, 3))
        if isinstance(adapter, DABDETRAdapter):
            with pytest.raises(ValueError, match="position"):
                adapter.decode(out, random_boxes(2, 4), position=torch.zeros(2, 4, adapter.hidden_size))


# ---- hooks -------------------------------------------------------------------------------------
def test_hooks_removed(adapter, batch, monkeypatch):
    pixel_values, pixel_mask, labels = batch
    before = count_hooks(adapter)
    adapter.eval()
    out = adapter(pixel_values, pixel_mask, labels=labels, with_attention=True)
    assert count_hooks(adapter) == before
    blocked = torch.eye(3, dtype=torch.bool).logical_not()
    adapter.decode(out, random_boxes(2, 3), self_attn_mask=blocked)
    assert count_hooks(adapter) == before

    with pytest.raises((RuntimeError, ValueError)):  # 2 colour channels: the backbone rejects them
        adapter(pixel_values[:, :2], pixel_mask, with_attention=True)
    assert count_hooks(adapter) == before

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(adapter.decoder.layers[-1], "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        adapter(pixel_values, pixel_mask, with_attention=True)
    assert count_hooks(adapter) == before
    with pytest.raises(RuntimeError, match="boom"):
        adapter.decode(out, random_boxes(2, 3), self_attn_mask=blocked)
    assert count_hooks(adapter) == before
    assert adapter._capture is None


@pytest.mark.parametrize("adapter_cls", ADAPTERS, ids=lambda a: a.family)
def test_rebuilt_from_saved_config_keeps_maps(adapter_cls, batch):
    """HF does not save the attention implementation; from_config restores eager attention."""
    from transformers import AutoConfig

    saved = adapter_cls.make_config(PRESETS["tiny"], NUM_CLASSES).to_dict()
    model_type = saved.pop("model_type")
    adapter = adapter_cls.from_config(AutoConfig.for_model(model_type, **saved)).eval()
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        out = adapter(pixel_values, pixel_mask, with_attention=True)
    assert (out.cross_attention.sum(-1) - 1).abs().max() < 1e-5


# ---- HF-specific behaviour ---------------------------------------------------------------------
@pytest.mark.parametrize("adapter_cls", [DETRAdapter, ConditionalDETRAdapter], ids=lambda a: a.family)
def test_auxiliary_loss_off_model_supported(adapter_cls, batch):
    """A model configured without auxiliary loss (e.g. a converted checkpoint) is not switched:
    per-layer predictions come from hooks and the last layer still equals HF's output."""
    adapter = build(adapter_cls, auxiliary_loss=False).eval()
    with torch.no_grad():
        for mod in adapter.modules():  # trained-like norms: HF's aux=True path would now differ
            if isinstance(mod, torch.nn.LayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0, 0.3)
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        hf = adapter.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        out = adapter(pixel_values, pixel_mask)
        again = adapter.decode(out, **own_queries(adapter, out))
    assert not adapter.config.auxiliary_loss
    assert out.predictions.num_layers == adapter.num_decoder_layers
    assert (out.predictions.logits[-1] - hf.logits).abs().max() < TOL
    assert (out.predictions.boxes[-1] - hf.pred_boxes).abs().max() < TOL
    assert (again.logits - out.predictions.logits).abs().max() < TOL


@pytest.mark.parametrize("adapter_cls", [DETRAdapter, ConditionalDETRAdapter], ids=lambda a: a.family)
def test_sdpa_model_without_maps(adapter_cls, batch):
    """HF's default (SDPA, e.g. from_pretrained without attn_implementation) runs with the same
    predictions but gives no attention maps: a clear error."""
    config = adapter_cls.make_config(PRESETS["tiny"], NUM_CLASSES, attn_implementation=None)
    torch.manual_seed(0)
    adapter = adapter_cls(adapter_cls._model_class()(config)).eval()
    assert adapter.model.model.decoder.config._attn_implementation == "sdpa"
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        hf = adapter.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        out = adapter(pixel_values, pixel_mask)
        assert (out.predictions.logits[-1] - hf.logits).abs().max() < TOL
        with pytest.raises(RuntimeError, match="eager"):
            adapter(pixel_values, pixel_mask, with_attention=True)


def test_dab_patterns(batch):
    """DAB with num_patterns: Q = anchors x patterns; the pattern contents are the queries' content."""
    adapter = build(DABDETRAdapter, num_patterns=2).eval()
    pixel_values, pixel_mask, _ = batch
    with torch.no_grad():
        hf = adapter.model(pixel_values=pixel_values, pixel_mask=pixel_mask)
        out = adapter(pixel_values, pixel_mask, with_attention=True)
        again = adapter.decode(out, out.queries.reference_boxes, out.queries.content)
    assert adapter.num_queries == 2 * PRESETS["tiny"].queries
    assert out.predictions.logits.shape[2] == adapter.num_queries
    assert out.cross_attention.shape[1] == adapter.num_queries
    assert (out.predictions.logits[-1] - hf.logits).abs().max() < TOL
    assert (again.logits - out.predictions.logits).abs().max() < TOL
    assert (again.boxes - out.predictions.boxes).abs().max() < TOL
