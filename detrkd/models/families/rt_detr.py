"""RT-DETR (v1) and RT-DETRv2 in the normalised view.

How the HF model builds its queries (``RTDetrModel.forward``), and what ``decode`` replaces:
- the memory the decoder attends to is ``source_flatten`` (the hybrid encoder's 3 levels after
  ``decoder_input_proj``, flattened); ``memory = valid_mask * source_flatten`` (tokens whose anchor
  lies within 1% of the border are zeroed) feeds the encoder head ``enc_output`` (Linear+LayerNorm);
- the top-k tokens by encoder class score become the detection queries: reference = the token's
  anchor logit + ``enc_bbox_head`` (box LOGITS), content = ``enc_output(memory)`` at the token,
  detached. The decoder takes ``reference_points`` as logits and applies the sigmoid itself; every
  layer derives its positional query from the current box (``query_pos_head``), so there is no
  positional input to replace.
- ``decode(boxes, content)`` calls the decoder with ``reference_points = logit(boxes)`` and
  ``inputs_embeds = content``. Default content (``content=None``): the same projection the model uses
  for its top-k queries, ``enc_output`` applied to the valid-masked memory sampled bilinearly at the
  box centre (border padding) on the level whose anchor size (``0.05 * 2**level``, as in
  ``generate_anchors``) is closest to the box's sqrt(w*h); detached, as the model detaches its own.
  For a box at a token centre of the matching level this equals the model's own gathered content.
  ``position`` cannot be given (the decoder computes it from the boxes at every layer).
- ``learn_initial_query=True`` is rejected: HF's ``RTDetrModel`` crashes on it
  (``self.weight_embedding.tile``, an ``nn.Embedding`` has no ``tile``) in transformers 5.23.

Denoising: in training mode with labels (and ``num_denoising > 0``) HF prepends the contrastive
denoising queries to the decoder input and passes their self-attention mask as the decoder's
``encoder_attention_mask`` (an additive [T, T] float mask; the name is HF's). HF's own ``logits`` /
``pred_boxes`` then include them. Here ``predictions`` holds the last ``num_queries`` (detection)
queries only and ``denoising`` the first ``T - num_queries``. ``decode`` never includes denoising
queries and never reuses the recorded mask: the extra queries run alone, with a mask built from
``self_attn_mask`` only.

Layout: the decoder returns ``intermediate_logits`` / ``intermediate_reference_points`` as
(B, L, T, .) in train and eval mode alike (boxes already sigmoid-ed); they are permuted to (L, B, .).

Initialisation (``from_config``): HF's RT-DETR/RT-DETRv2 ``_init_weights`` draws the BatchNorm
weights of the input projections and the hybrid encoder from N(0, 0.01), which leaves a fresh
model's memory at ~1e-5 (train mode); ``from_config`` resets every BatchNorm2d to PyTorch's default
(weight 1, bias 0) as the reference implementation has. Checkpoints loaded later overwrite it.

Padding: RT-DETR ignores ``pixel_mask`` (the backbone computes downsampled masks and drops them;
the decoder's cross-attention has no key padding mask), so ``memory.padding_mask`` is all False.
Batches padded bottom/right are attended in full, as in the HF model. The model cannot tell where
an image ends inside its padded canvas, so boxes normalised to the un-padded image are only
consistent when images are not padded (HF's RT-DETR processor resizes to a fixed size, no padding).

Cross-attention maps: v1 samples bilinearly like Deformable DETR (``offset / n_points * wh * 0.5``);
v2 uses ``offset * (1 / n_points) * wh * decoder_offset_scale`` with per-level point lists, and with
``decoder_method="discrete"`` reads the single token ``clamp(int(loc * (W, H) + 0.5))`` instead of
interpolating (half a token right/down of the bilinear convention, and clamped rather than zero
outside); the rasteriser mirrors each (discrete samples are snapped to that token's centre).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...box_ops import inverse_sigmoid
from ..attention import splat_deformable_attention
from ..base import (DetectorOutput, DetrAdapter, EncoderMemory, Predictions, PresetSize, Queries,
                    _record_inputs, additive_mask, hf_resnet_config)

ANCHOR_GRID_SIZE = 0.05  # generate_anchors' default: anchor w = h = 0.05 * 2**level


def backbone_channels(size: PresetSize, out_indices: tuple[int, ...] = (2, 3, 4)) -> list[int]:
    """Output channels of the HF-ResNet stages ``out_indices`` (stage i has width i - 1)."""
    return [size.backbone_widths[i - 1] for i in out_indices]


def rtdetr_family_config_kwargs(size: PresetSize, num_classes: int) -> dict[str, Any]:
    """Config keys shared by RT-DETR v1/v2 and D-FINE for a preset size (HF-ResNet backbone)."""
    out_indices = (2, 3, 4)
    return dict(
        backbone_config=hf_resnet_config(size, out_indices),
        use_timm_backbone=False, use_pretrained_backbone=False,
        freeze_backbone_batch_norms=False,  # train from scratch: real BatchNorm in the backbone
        num_labels=num_classes,
        # hybrid encoder: one AIFI transformer layer stack on the last level + CNN FPN/PAN
        encoder_in_channels=backbone_channels(size, out_indices), feat_strides=[8, 16, 32],
        encoder_hidden_dim=size.d_model, encoder_layers=size.encoder_layers,
        encoder_attention_heads=size.heads, encoder_ffn_dim=size.ffn,
        # decoder
        d_model=size.d_model, decoder_in_channels=[size.d_model] * 3, num_feature_levels=3,
        decoder_layers=size.decoder_layers, decoder_attention_heads=size.heads,
        decoder_ffn_dim=size.ffn, num_queries=size.queries,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        learn_initial_query=False, anchor_image_size=None,
    )


def finish_config_kwargs(kwargs: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Apply overrides, keeping dependent keys consistent unless they are overridden too."""
    kwargs.update(overrides)
    if "encoder_hidden_dim" not in overrides and "d_model" in overrides:
        kwargs["encoder_hidden_dim"] = kwargs["d_model"]
    if "decoder_in_channels" not in overrides:
        kwargs["decoder_in_channels"] = [kwargs["encoder_hidden_dim"]] * len(kwargs["encoder_in_channels"])
    return kwargs


def reset_batch_norms(model: nn.Module) -> None:
    """PyTorch's default BatchNorm init (weight 1, bias 0, fresh running stats) for every BatchNorm2d.

    HF's RT-DETR / RT-DETRv2 ``_init_weights`` draws BatchNorm weights from N(0, 0.01) in the input
    projections and the hybrid encoder (not the backbone), so a freshly built model's memory is
    ~1e-5 in training mode (1e-14 in eval) and learning starts from a vanishing signal. The reference
    implementation uses PyTorch's default. (D-FINE already does; resetting it changes nothing.)
    Only ``from_config`` calls this: checkpoints loaded afterwards overwrite it.
    """
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_parameters()


def check_supported_config(config: Any) -> None:
    if getattr(config, "learn_initial_query", False):
        raise ValueError("learn_initial_query=True is not supported: HF's model crashes on it in "
                         "transformers 5.x (nn.Embedding has no .tile); use top-k memory queries")


def box_content(core: nn.Module, decoder_kwargs: dict[str, Any], boxes: Tensor) -> Tensor:
    """Default content of a query at ``boxes`` [B, M, 4]: what the model's top-k selection would give.

    ``enc_output`` (the model's own encoder-output projection, Linear + LayerNorm) of the
    valid-masked memory, sampled bilinearly at the box centre on the level whose anchor size is
    closest to sqrt(w * h); detached like the model's own query content. Returns [B, M, D].
    """
    tokens = decoder_kwargs["encoder_hidden_states"]
    shapes = [(int(h), int(w)) for h, w in decoder_kwargs["spatial_shapes_list"]]
    b, n, d = tokens.shape
    if core.training or core.config.anchor_image_size is None:
        _, valid = core.generate_anchors(tuple(shapes), device=tokens.device, dtype=tokens.dtype)
    else:
        valid = core.valid_mask
    memory = tokens * valid.to(tokens.device, tokens.dtype)
    boxes = boxes.to(tokens.dtype)
    scale = (boxes[..., 2] * boxes[..., 3]).clamp(min=1e-12).sqrt()
    level = torch.round(torch.log2(scale / ANCHOR_GRID_SIZE)).clamp(0, len(shapes) - 1)
    grid = (boxes[..., :2] * 2 - 1)[:, :, None, :]  # [B, M, 1, 2], grid_sample (x, y) in [-1, 1]
    sampled = tokens.new_zeros(b, boxes.shape[1], d)
    start = 0
    for lvl, (h, w) in enumerate(shapes):
        fmap = memory[:, start:start + h * w].transpose(1, 2).reshape(b, d, h, w)
        start += h * w
        value = F.grid_sample(fmap, grid, mode="bilinear", padding_mode="border",
                              align_corners=False)[..., 0].transpose(1, 2)  # [B, M, D]
        sampled = torch.where((level == lvl)[..., None], value, sampled)
    return core.enc_output(sampled).detach()


def v2_deformable_samples(module: nn.Module, query: Tensor, reference_points: Tensor,
                          spatial_shapes: Tensor, points_list: list[int], offset_scale: float,
                          method: str) -> tuple[Tensor, Tensor]:
    """Sampling locations/weights of an RT-DETRv2 / D-FINE deformable attention (4-d references).

    query: [B, Q, D] (position already added); reference_points: [B, Q, 1, 4] sigmoid boxes;
    points_list: points per level. Returns locations [B, Q, heads, S, Pmax, 2] in [0, 1] and
    weights [B, Q, heads, S, Pmax] (levels with fewer points are padded with zero weight).
    ``method="discrete"`` locations are snapped to the centre of the token the model reads.
    """
    if reference_points.shape[-1] != 4:
        raise ValueError("only 4-d (box) reference points are supported for RT-DETRv2/D-FINE attention")
    b, q, _ = query.shape
    heads, total = module.n_heads, sum(points_list)
    offsets = module.sampling_offsets(query).view(b, q, heads, total, 2)
    weights = module.attention_weights(query).view(b, q, heads, total).softmax(-1)
    point_scale = torch.tensor([1.0 / n for n in points_list for _ in range(n)],
                               dtype=query.dtype, device=query.device)[:, None]
    locations = (reference_points[:, :, None, :, :2]
                 + offsets * point_scale * reference_points[:, :, None, :, 2:] * offset_scale)
    levels, pmax = len(points_list), max(points_list)
    loc_out = locations.new_zeros(b, q, heads, levels, pmax, 2)
    w_out = weights.new_zeros(b, q, heads, levels, pmax)
    start = 0
    for lvl, n_pts in enumerate(points_list):
        loc = locations[:, :, :, start:start + n_pts]
        if method == "discrete":
            h, w = (int(v) for v in spatial_shapes[lvl])
            size = torch.tensor([w, h], dtype=loc.dtype, device=loc.device)
            index = (loc * size + 0.5).to(torch.int64)  # the model's own rounding (trunc)
            index = torch.stack((index[..., 0].clamp(0, w - 1), index[..., 1].clamp(0, h - 1)), -1)
            loc = (index.to(loc.dtype) + 0.5) / size
        loc_out[:, :, :, lvl, :n_pts] = loc
        w_out[:, :, :, lvl, :n_pts] = weights[:, :, :, start:start + n_pts]
        start += n_pts
    return loc_out, w_out


def v1_deformable_samples(module: nn.Module, query: Tensor,
                          reference_points: Tensor) -> tuple[Tensor, Tensor]:
    """RT-DETR v1 (Deformable-DETR style) sampling; reference_points [B, Q, 1, 4] sigmoid boxes."""
    b, q, _ = query.shape
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    offsets = module.sampling_offsets(query).view(b, q, heads, levels, points, 2)
    weights = module.attention_weights(query).view(b, q, heads, levels * points).softmax(-1)
    locations = (reference_points[:, :, None, :, None, :2]
                 + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
    return locations, weights.view(b, q, heads, levels, points)


class RTDETRAdapter(DetrAdapter):
    hf_classes = ("RTDetrConfig", "RTDetrForObjectDetection")
    family = "rt_detr"
    model_types = ("rt_detr",)
    class_head = "sigmoid"
    attention_kind = "deformable"
    uses_pixel_mask = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        check_supported_config(model.config)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def _extra_config(cls, size: PresetSize) -> dict[str, Any]:
        return dict(hidden_expansion=0.5)  # RT-DETR-R18's CSP width

    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        kwargs = rtdetr_family_config_kwargs(size, num_classes)
        kwargs.update(cls._extra_config(size))
        config = cls._config_class()(**finish_config_kwargs(kwargs, overrides))
        check_supported_config(config)
        return config

    @classmethod
    def from_config(cls, config: Any) -> "RTDETRAdapter":
        check_supported_config(config)
        model = cls._model_class()(config)
        model.model.unfreeze_backbone()  # nothing is frozen by default; make sure
        reset_batch_norms(model)
        return cls(model)

    # ---- forward pieces --------------------------------------------------------------------
    def _num_denoising(self, kw: dict[str, Any]) -> int:
        return int(kw["inputs_embeds"].shape[1]) - self.num_queries

    def _layer_outputs(self, dec_out: Any, kw: dict[str, Any]) -> Predictions:
        """Per-layer predictions [L, B, T, .] of every decoder query (denoising included)."""
        return Predictions(dec_out.intermediate_logits.transpose(0, 1),
                           dec_out.intermediate_reference_points.transpose(0, 1))

    def _predictions(self, rec: dict[str, Any], hf_out: Any) -> tuple[Predictions, Predictions | None]:
        kw = rec["decoder"]
        every = self._layer_outputs(rec["decoder_out"], kw)
        dn = self._num_denoising(kw)
        detection = every.select(slice(dn, None))
        return detection, (every.select(slice(0, dn)) if dn > 0 else None)

    def _memory(self, rec: dict[str, Any]) -> EncoderMemory:
        kw = rec["decoder"]
        tokens = kw["encoder_hidden_states"]
        return EncoderMemory(tokens=tokens, spatial_shapes=kw["spatial_shapes"],
                             level_start=kw["level_start_index"],
                             padding_mask=torch.zeros(tokens.shape[:2], dtype=torch.bool,
                                                      device=tokens.device))

    def _queries(self, rec: dict[str, Any]) -> Queries:
        kw = rec["decoder"]
        dn = self._num_denoising(kw)
        return Queries(content=kw["inputs_embeds"][:, dn:], position=None,
                       reference_boxes=kw["reference_points"][:, dn:].sigmoid())

    def _attention_hooks(self, rec: dict[str, Any]) -> list:
        return [(self.decoder.layers[0].encoder_attn, "pre", _record_inputs(rec, "cross_attn"))]

    def _samples(self, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        module = self.decoder.layers[0].encoder_attn
        query = kw["hidden_states"]
        if kw.get("position_embeddings") is not None:
            query = query + kw["position_embeddings"]
        return v1_deformable_samples(module, query, kw["reference_points"])

    def _attention(self, rec: dict[str, Any], memory: EncoderMemory) -> Tensor:
        dn = self._num_denoising(rec["decoder"])
        locations, weights = self._samples(rec["cross_attn"])
        # no padding mask: the model's cross-attention reads padding tokens too
        return splat_deformable_attention(locations[:, dn:], weights[:, dn:], memory.spatial_shapes,
                                          memory.level_start)

    # ---- decode -----------------------------------------------------------------------------
    def decode(self, out: DetectorOutput, boxes: Tensor, content: Tensor | None = None,
               position: Tensor | None = None, self_attn_mask: Tensor | None = None) -> Predictions:
        """Decode extra queries at ``boxes`` on ``out``'s memory (see the module docstring).

        content None -> ``enc_output`` of the memory at the box centre (detached); ``position`` must
        be None (derived from the boxes by the decoder); ``self_attn_mask`` [M, M] bool, True =
        blocked. Denoising queries of ``out`` are never part of this call.
        """
        if position is not None:
            raise ValueError(f"{type(self).__name__}.decode: the decoder derives positional queries from "
                             "the boxes (query_pos_head); 'position' cannot be given")
        kw = dict(out.decoder_inputs)
        tokens = kw["encoder_hidden_states"]
        if boxes.dim() != 3 or boxes.shape[0] != tokens.shape[0] or boxes.shape[-1] != 4:
            raise ValueError(f"boxes must be [B={tokens.shape[0]}, M, 4], got {tuple(boxes.shape)}")
        if content is None:
            content = box_content(self.model.model, kw, boxes)
        elif content.shape[:2] != boxes.shape[:2] or content.shape[-1] != self.hidden_size:
            raise ValueError(f"content must be [B, M, {self.hidden_size}] matching boxes "
                             f"{tuple(boxes.shape[:2])}, got {tuple(content.shape)}")
        if self_attn_mask is not None and tuple(self_attn_mask.shape) != (boxes.shape[1],) * 2:
            raise ValueError(f"self_attn_mask must be [M, M] with M={boxes.shape[1]}, "
                             f"got {tuple(self_attn_mask.shape)}")
        reference = inverse_sigmoid(boxes.to(tokens.dtype))
        kw.update(inputs_embeds=content.to(tokens.dtype), reference_points=reference,
                  encoder_attention_mask=additive_mask(self_attn_mask, tokens.dtype))
        dec_out = self.decoder(**kw)
        return self._layer_outputs(dec_out, kw)


class RTDETRv2Adapter(RTDETRAdapter):
    """RT-DETRv2: same model and decoder wiring as v1; only the deformable attention differs."""

    hf_classes = ("RTDetrV2Config", "RTDetrV2ForObjectDetection")
    family = "rt_detr_v2"
    model_types = ("rt_detr_v2",)

    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        # the v2 attention has its own level count; keep it equal to the memory's levels
        if "decoder_n_levels" not in overrides:
            overrides["decoder_n_levels"] = overrides.get("num_feature_levels", 3)
        return super().make_config(size, num_classes, **overrides)

    def _samples(self, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        module = self.decoder.layers[0].encoder_attn
        query = kw["hidden_states"]
        if kw.get("position_embeddings") is not None:
            query = query + kw["position_embeddings"]
        return v2_deformable_samples(module, query, kw["reference_points"], kw["spatial_shapes"],
                                     list(module.n_points_list), module.offset_scale, module.method)
