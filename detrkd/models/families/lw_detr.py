"""LW-DETR and RF-DETR in the normalised view (one adapter: RF-DETR reuses LW-DETR's design).

Both have no transformer encoder: a ViT (LW-DETR: ``LwDetrViTBackbone``; RF-DETR: a windowed
DINOv2, ``RfDetrDinov2Backbone``) feeds a C2f projector whose flattened output is the decoder's
memory (LW-DETR: one level per ``projector_scale_factors`` entry; RF-DETR: always one level, at the
patch stride). ``memory`` is therefore the projector's output, and the feature methods (AGFD,
FitNet) distil it; its padding mask is the downsampled ``pixel_mask`` the decoder uses.

Queries (``LwDetrModel.forward``): two-stage top-k per Group-DETR group over the memory tokens,
reference = the top-k proposal refined by a learned per-slot delta (``refine_bboxes``, boxes, not
logits), content = a learned per-slot embedding (``query_feat``, the same for every image). In
training the decoder runs ``group_detr`` groups of ``num_queries`` (group g at ``[g Q, (g+1) Q)``),
kept apart inside each self-attention by moving the groups into the batch dimension; in eval mode
one group. Every layer uses the same reference (no refinement across layers); layer l's box is
``refine_bboxes(reference, bbox_embed(h_l))`` and its logits ``class_embed(h_l)`` (shared heads).
Boxes are not squashed: cx, cy may leave [0, 1] slightly, w, h > 0 (as HF's ``pred_boxes``).

The view: ``predictions`` = group 0 (the inference group) in both modes, so a training student has
``num_queries`` predictions like an eval-mode teacher; ``denoising`` = the other ``group_detr - 1``
train-mode groups ("extra training queries"; None in eval mode). ``queries``, ``cross_attention``
are group 0's. There is no denoising.

``decode(boxes, content)``: the decoder on the recorded memory with ``reference_points = boxes``
(normalised cxcywh as is) and ``inputs_embeds = content`` (default: zeros, as for DETR / DAB: the
family has no per-box content). ``position`` cannot be given (the decoder derives it from the
boxes). Two transformers 5.23 limits shape it:
- the decoder takes no self-attention mask (``LwDetrAttention`` passes ``attention_mask=None``), so a
  ``self_attn_mask`` must be block-diagonal over contiguous groups and each block is decoded by
  its own decoder call (the same result as a masked call);
- in training mode each self-attention splits its sequence into ``group_detr`` chunks, which would
  mix or break the extra queries; ``decode`` switches that off for its call by setting the decoder
  layers' ``self_attn.training`` to False (restored in ``finally``, also on error). This is the
  one place an adapter changes model state; its only other effect is attention dropout
  (``attention_dropout``, 0 in every preset). Extra queries are therefore always decoded as their
  own groups, never mixed with the detection groups.

Loss: HF's (``LwDetrForObjectDetectionLoss``, also RF-DETR's): IoU-aware BCE + L1 + GIoU with a
per-group Hungarian match, normalised by ``num_boxes * group_detr``. Two HF quirks are handled:
- in eval mode HF's criterion still uses ``config.group_detr`` groups (it is a fresh module in
  training mode), matching Q // G-query chunks; a forward with labels in eval mode here computes
  the same loss function with a one-group copy of the config;
- it all-reduces ``num_boxes`` itself when ``torch.distributed`` is initialised, so
  ``box_normalised_loss`` is 0 (``detrkd.distributed`` must not normalise it a second time).

Input sizes: image sides must be multiples of ``patch_size`` x the windows per side (LW-DETR:
sqrt(``num_windows``), RF-DETR: ``num_windows``), and the memory must hold at least
``num_queries`` tokens (top-k); other inputs raise a one-line ``ValueError`` before the model runs.
detrkd's presets use 2 windows per side and patch 8 (tiny) or 16: multiples of 16 or 32, which
``collate`` pads to.

Presets: detrkd's ``PresetSize`` names a ResNet; its backbone widths select a ViT size
(``VIT_SIZES``). The decoder follows the preset (d_model, layers, heads for both attentions, FFN,
queries), with the papers' ``group_detr=13``. LW-DETR's projector is single-scale P4 (the paper's
tiny / small / medium) for the tiny and small presets and P3 + P5 (its large / xlarge) for base.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..attention import splat_deformable_attention
from ..base import (DetectorOutput, DetrAdapter, EncoderMemory, Predictions, PresetSize, Queries,
                    _record_inputs)
from .deformable_detr import deformable_samples

GROUP_DETR = 13  # the LW-DETR / RF-DETR papers' number of training query groups


@dataclass(frozen=True)
class ViTSize:
    """A ViT backbone size: width, depth, heads, the layers fed to the projector (1-based stage
    indices) and LW-DETR's windowed layers (0-based layer indices)."""

    hidden: int
    layers: int
    heads: int
    out_indices: tuple[int, ...]
    window_blocks: tuple[int, ...]
    c2f_blocks: int
    patch: int = 16


# keyed by ``PresetSize.backbone_widths`` (tiny, small, base), so ``model.backbone`` works as for
# the ResNet families; base is LW-DETR-small's ViT (transformers' default). tiny has patch 8 (the
# papers' is 16; RF-DETR-base's 14) so that its memory holds its 30 queries' top-k at 64 x 64 px
VIT_SIZES: dict[tuple[int, ...], ViTSize] = {
    (16, 32, 64, 128): ViTSize(64, 4, 2, (2, 4), (0, 2), c2f_blocks=1, patch=8),
    (32, 64, 128, 256): ViTSize(128, 6, 4, (2, 4, 6), (0, 2, 4), c2f_blocks=1),
    (64, 128, 256, 512): ViTSize(192, 10, 6, (2, 4, 5, 9), (0, 1, 3, 6, 7, 9), c2f_blocks=3),
}
WINDOWS_PER_SIDE = 2


def vit_size(size: PresetSize) -> ViTSize:
    """The ViT that stands for a preset's ResNet backbone (``VIT_SIZES``)."""
    if size.backbone_widths not in VIT_SIZES:
        raise ValueError(f"no ViT backbone is defined for backbone widths {size.backbone_widths}; "
                         f"the presets' are {sorted(VIT_SIZES)}")
    return VIT_SIZES[size.backbone_widths]


def refine(reference: Tensor, deltas: Tensor) -> Tensor:
    """HF's ``refine_bboxes``: cxcy = d_xy * ref_wh + ref_xy, wh = exp(d_wh) * ref_wh.

    reference: [..., T, 4] boxes; deltas: [..., T, 4] (broadcast over leading dims) -> [..., T, 4]
    """
    return torch.cat((deltas[..., :2] * reference[..., 2:] + reference[..., :2],
                      deltas[..., 2:].exp() * reference[..., 2:]), dim=-1)


def mask_blocks(blocked: Tensor | None, m: int) -> list[tuple[int, int]]:
    """The contiguous groups of a block-diagonal ``self_attn_mask`` [M, M] (True = blocked) as
    (start, end) ranges; the whole range for None. Any other mask is a ``ValueError``: the decoder
    has no mask argument, so groups are decoded by separate calls."""
    if blocked is None:
        return [(0, m)]
    if blocked.dtype != torch.bool or tuple(blocked.shape) != (m, m):
        raise ValueError(f"self_attn_mask must be a bool tensor of shape [{m}, {m}] (True = blocked), "
                         f"got {blocked.dtype} {tuple(blocked.shape)}")
    index = torch.arange(1, m, device=blocked.device)
    starts = torch.ones(m, dtype=torch.bool, device=blocked.device)
    starts[1:] = blocked[index, index - 1]  # a new group where a query may not see the one before
    ids = starts.cumsum(0)
    if not torch.equal(ids[:, None] != ids[None, :], blocked):
        raise ValueError("LW-DETR / RF-DETR decode supports only block-diagonal self_attn_masks over "
                         "contiguous groups (each query sees exactly its own group): their decoder "
                         "takes no attention mask")
    bounds = torch.nonzero(starts).flatten().tolist() + [m]
    return list(zip(bounds[:-1], bounds[1:]))


@contextlib.contextmanager
def group_split_off(decoder: nn.Module) -> Iterator[None]:
    """Switch off the train-mode Group-DETR split of every decoder self-attention for a ``with``
    block (``self_attn.training = False``), restoring each layer's flag afterwards, also on error."""
    modules = [layer.self_attn for layer in decoder.layers]
    modes = [module.training for module in modules]
    try:
        for module in modules:
            module.training = False
        yield
    finally:
        for module, mode in zip(modules, modes):
            module.training = mode


class LwDETRAdapter(DetrAdapter):
    hf_classes = ("LwDetrConfig", "LwDetrForObjectDetection")
    family = "lw_detr"
    model_types = ("lw_detr",)
    class_head = "sigmoid"
    attention_kind = "deformable"
    uses_pixel_mask = True

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.check_config(model.config)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def _backbone_config(cls, vit: ViTSize) -> Any:
        from transformers import LwDetrViTConfig

        return LwDetrViTConfig(hidden_size=vit.hidden, num_hidden_layers=vit.layers, num_attention_heads=vit.heads,
                               mlp_ratio=4, patch_size=vit.patch, image_size=256, pretrain_image_size=256,
                               window_block_indices=list(vit.window_blocks), out_indices=list(vit.out_indices),
                               num_windows=WINDOWS_PER_SIDE ** 2)

    @classmethod
    def _extra_config(cls, size: PresetSize) -> dict[str, Any]:
        return dict(projector_scale_factors=[1.0] if size.d_model < 256 else [2.0, 0.5])

    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        vit = vit_size(size)
        kwargs = dict(
            backbone_config=cls._backbone_config(vit), c2f_num_blocks=vit.c2f_blocks, hidden_expansion=0.5,
            d_model=size.d_model, decoder_layers=size.decoder_layers, decoder_self_attention_heads=size.heads,
            decoder_cross_attention_heads=size.heads, decoder_ffn_dim=size.ffn, num_queries=size.queries,
            group_detr=GROUP_DETR, num_labels=num_classes,
            dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        )
        kwargs.update(cls._extra_config(size))
        kwargs.update(overrides)
        config = cls._config_class()(**kwargs)
        cls.check_config(config)
        return config

    @classmethod
    def check_config(cls, config: Any) -> None:
        if not config.projector_scale_factors:
            raise ValueError("LW-DETR needs at least one projector_scale_factors entry (memory level)")

    @classmethod
    def from_config(cls, config: Any) -> "LwDETRAdapter":
        cls.check_config(config)
        return cls(cls._model_class()(config))  # nothing is frozen, no frozen BatchNorm

    # ---- facts ---------------------------------------------------------------------------
    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The ViT's parameters (the projector trains at the main learning rate)."""
        return self.model.model.backbone.backbone.parameters()

    def _windows_per_side(self) -> int:
        return int(math.isqrt(int(self.config.backbone_config.num_windows)))

    def _scales(self) -> list[float]:
        return [float(s) for s in self.config.projector_scale_factors]

    def check_input_size(self, height: int, width: int) -> None:
        """``ValueError`` unless [H, W] images fit the ViT's windows and give >= num_queries tokens."""
        patch = int(self.config.backbone_config.patch_size)
        multiple = patch * self._windows_per_side()
        if height % multiple or width % multiple:
            raise ValueError(f"{self.family}: image sides must be multiples of {multiple} (patch {patch} x "
                             f"{self._windows_per_side()} windows per side), got {height}x{width}")
        tokens = sum(math.ceil(height // patch * s) * math.ceil(width // patch * s) for s in self._scales())
        if tokens < self.num_queries:
            raise ValueError(f"{self.family}: {height}x{width} images give {tokens} memory tokens, fewer than "
                             f"num_queries={self.num_queries} (top-k query selection): use larger images")

    # ---- forward pieces --------------------------------------------------------------------
    def _hf_forward(self, pixel_values: Tensor, pixel_mask: Tensor | None,
                    labels: list[dict[str, Tensor]] | None) -> Any:
        """HF's forward; in eval mode with labels, HF's loss function with one query group."""
        self.check_input_size(*pixel_values.shape[-2:])
        if labels is None or self.model.training:
            return super()._hf_forward(pixel_values, pixel_mask, labels)
        hf_out = super()._hf_forward(pixel_values, pixel_mask, None)
        hf_out.loss, hf_out.loss_dict = self._one_group_loss(hf_out, labels)
        return hf_out

    def _one_group_loss(self, hf_out: Any, labels: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, Tensor]]:
        """HF's own loss function on an eval-mode output, with ``group_detr = 1`` (what it should
        use in eval mode: HF's criterion ignores the model's mode)."""
        config = copy.deepcopy(self.config)
        config.group_detr = 1
        aux_class = aux_boxes = None
        if config.auxiliary_loss:
            hidden = hf_out.intermediate_hidden_states  # [L, B, Q, D]
            aux_class = self.model.class_embed(hidden)
            aux_boxes = refine(hf_out.intermediate_reference_points, self.model.bbox_embed(hidden))
        loss, loss_dict, _ = self.model.loss_function(
            hf_out.logits, labels, hf_out.logits.device, hf_out.pred_boxes, config, aux_class, aux_boxes,
            hf_out.enc_outputs_class, hf_out.enc_outputs_coord_logits)
        return loss, loss_dict

    def _heads(self, hidden: Tensor, reference: Tensor) -> Predictions:
        """hidden [L, B, T, D] (every layer), reference [B, T, 4] boxes -> Predictions [L, B, T, .]."""
        return Predictions(self.model.class_embed(hidden), refine(reference, self.model.bbox_embed(hidden)))

    def _predictions(self, rec: dict[str, Any], hf_out: Any) -> tuple[Predictions, Predictions | None]:
        every = self._heads(rec["decoder_out"].intermediate_hidden_states, rec["decoder"]["reference_points"])
        q = self.num_queries
        extra = every.logits.shape[2] > q
        return every.select(slice(0, q)), (every.select(slice(q, None)) if extra else None)

    def _memory(self, rec: dict[str, Any]) -> EncoderMemory:
        kw = rec["decoder"]
        return EncoderMemory(tokens=kw["encoder_hidden_states"], spatial_shapes=kw["spatial_shapes"],
                             level_start=kw["level_start_index"], padding_mask=~kw["encoder_attention_mask"])

    def _queries(self, rec: dict[str, Any]) -> Queries:
        kw, q = rec["decoder"], self.num_queries
        return Queries(content=kw["inputs_embeds"][:, :q], position=None,
                       reference_boxes=kw["reference_points"][:, :q])

    def _attention_hooks(self, rec: dict[str, Any]) -> list:
        return [(self.decoder.layers[0].cross_attn, "pre", _record_inputs(rec, "cross_attn"))]

    def _attention(self, rec: dict[str, Any], memory: EncoderMemory) -> Tensor:
        kw, q = rec["cross_attn"], self.num_queries
        locations, weights = deformable_samples(self.decoder.layers[0].cross_attn, kw["hidden_states"][:, :q],
                                                kw["position_embeddings"][:, :q], kw["reference_points"][:, :q],
                                                kw["spatial_shapes"])
        return splat_deformable_attention(locations, weights, memory.spatial_shapes, memory.level_start,
                                          memory.padding_mask)

    def box_normalised_loss(self, out: DetectorOutput) -> Tensor:
        """0: HF's LW-DETR loss already divides by the box count averaged over processes (it
        all-reduces ``num_boxes`` itself), so nothing is left for ``detrkd.distributed`` to rescale."""
        return super().box_normalised_loss(out) * 0

    # ---- decode -----------------------------------------------------------------------------
    def decode(self, out: DetectorOutput, boxes: Tensor, content: Tensor | None = None,
               position: Tensor | None = None, self_attn_mask: Tensor | None = None) -> Predictions:
        """Decode extra queries at ``boxes`` [B, M, 4] on ``out``'s memory (see the module docstring).

        content [B, M, D] (None: zeros); ``position`` must be None; ``self_attn_mask`` [M, M] bool,
        True = blocked, block-diagonal over contiguous groups. Returns Predictions [L, B, M, .].
        """
        if position is not None:
            raise ValueError(f"{type(self).__name__}.decode: the decoder derives positional queries from "
                             "the boxes (ref_point_head); 'position' cannot be given")
        kw = dict(out.decoder_inputs)
        tokens = kw["encoder_hidden_states"]
        if boxes.dim() != 3 or boxes.shape[0] != tokens.shape[0] or boxes.shape[-1] != 4 or boxes.shape[1] < 1:
            raise ValueError(f"boxes must be [B={tokens.shape[0]}, M >= 1, 4], got {tuple(boxes.shape)}")
        boxes = boxes.to(tokens.dtype)
        if content is None:
            content = tokens.new_zeros(*boxes.shape[:2], self.hidden_size)
        elif tuple(content.shape) != (*boxes.shape[:2], self.hidden_size):
            raise ValueError(f"content must be [B, M, {self.hidden_size}] matching boxes "
                             f"{tuple(boxes.shape[:2])}, got {tuple(content.shape)}")
        blocks = mask_blocks(self_attn_mask, boxes.shape[1])
        with group_split_off(self.decoder):
            hidden = [self.decoder(**{**kw, "inputs_embeds": content[:, s:e].to(tokens.dtype),
                                      "reference_points": boxes[:, s:e]}).intermediate_hidden_states
                      for s, e in blocks]
        return self._heads(torch.cat(hidden, dim=2), boxes)


class RFDETRAdapter(LwDETRAdapter):
    """RF-DETR: LW-DETR's decoder, queries and loss on a windowed DINOv2 with a one-level projector."""

    hf_classes = ("RfDetrConfig", "RfDetrForObjectDetection")
    family = "rf_detr"
    model_types = ("rf_detr",)

    @classmethod
    def _backbone_config(cls, vit: ViTSize) -> Any:
        from transformers import RfDetrDinov2Config

        return RfDetrDinov2Config(hidden_size=vit.hidden, num_hidden_layers=vit.layers,
                                  num_attention_heads=vit.heads, mlp_ratio=4, patch_size=vit.patch, image_size=256,
                                  out_indices=list(vit.out_indices), num_windows=WINDOWS_PER_SIDE)

    @classmethod
    def _extra_config(cls, size: PresetSize) -> dict[str, Any]:
        return dict(num_feature_levels=1)

    @classmethod
    def check_config(cls, config: Any) -> None:
        if int(config.num_feature_levels) != 1:
            raise ValueError(f"RF-DETR's memory has one level: num_feature_levels must be 1, got "
                             f"{config.num_feature_levels} (transformers' model crashes otherwise)")

    def _windows_per_side(self) -> int:
        return int(self.config.backbone_config.num_windows)

    def _scales(self) -> list[float]:
        return [1.0]
