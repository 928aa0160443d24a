"""Deformable DETR (plain, box-refine, and two-stage + box-refine) in the normalised view.

How queries map to boxes (what ``decode`` replaces):
- two-stage (``two_stage=True``): the model itself builds each query from a box: position and
  content = ``pos_trans_norm(pos_trans(sine(logit(box))))``, 4-d reference = the box. ``decode``
  does exactly the same, so any box is a native query. Default preset variant.
- plain / box-refine: queries are learned (position, content) pairs with a 2-d reference point
  ``sigmoid(Linear(position))``. There is no box-to-query map in the model, so ``decode(boxes)``
  uses the box centre as the 2-d reference, a fixed sine embedding of the box as position
  (DAB-DETR style, d_model/4 features per coordinate) and zero content unless given. Passing the
  model's own ``queries.position`` / ``queries.content`` reproduces its predictions exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...box_ops import inverse_sigmoid
from ..attention import splat_deformable_attention
from ..base import (DetectorOutput, DetrAdapter, EncoderMemory, PresetSize, Predictions, Queries,
                    _record_inputs, additive_mask, hf_resnet_config, sine_box_embedding,
                    thaw_batch_norms)


class DeformableDETRAdapter(DetrAdapter):
    hf_classes = ("DeformableDetrConfig", "DeformableDetrForObjectDetection")
    family = "deformable_detr"
    model_types = ("deformable_detr",)
    class_head = "sigmoid"
    attention_kind = "deformable"

    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        levels = overrides.pop("num_feature_levels", 3)
        out_indices = tuple(range(5 - min(levels, 3), 5))  # stages 2..4 feed up to 3 levels
        kwargs = dict(
            backbone_config=hf_resnet_config(size, out_indices),
            use_timm_backbone=False, use_pretrained_backbone=False,
            d_model=size.d_model, encoder_layers=size.encoder_layers, decoder_layers=size.decoder_layers,
            encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
            encoder_ffn_dim=size.ffn, decoder_ffn_dim=size.ffn,
            num_queries=size.queries, two_stage_num_proposals=size.queries,
            num_feature_levels=levels, auxiliary_loss=True,
            two_stage=True, with_box_refine=True, num_labels=num_classes,
        )
        kwargs.update(overrides)
        if kwargs["two_stage"]:
            kwargs["two_stage_num_proposals"] = kwargs["num_queries"]
        return cls._config_class()(**kwargs)

    @classmethod
    def from_config(cls, config: Any) -> "DeformableDETRAdapter":
        model = cls._model_class()(config)
        model.model.unfreeze_backbone()  # HF freezes the HF-ResNet stem/stage1 by default
        thaw_batch_norms(model.model.backbone)  # and its BatchNorm: from scratch, train them
        return cls(model)

    @property
    def num_queries(self) -> int:
        cfg = self.model.config
        return int(cfg.two_stage_num_proposals if cfg.two_stage else cfg.num_queries)

    # ---- forward pieces --------------------------------------------------------------------
    def _heads(self, hidden: Tensor, init_ref: Tensor, inter_refs: Tensor) -> Predictions:
        """Apply the per-layer heads as DeformableDetrForObjectDetection does.

        hidden [B, L, Q, D]; init_ref [B, Q, 2|4]; inter_refs [B, L, Q, 2|4] -> Predictions [L, B, Q, .]
        """
        logits, boxes = [], []
        for lvl in range(hidden.shape[1]):
            reference = inverse_sigmoid(init_ref if lvl == 0 else inter_refs[:, lvl - 1])
            delta = self.model.bbox_embed[lvl](hidden[:, lvl])
            if reference.shape[-1] == 4:
                coord = delta + reference
            else:
                coord = torch.cat((delta[..., :2] + reference, delta[..., 2:]), dim=-1)
            logits.append(self.model.class_embed[lvl](hidden[:, lvl]))
            boxes.append(coord.sigmoid())
        return Predictions(torch.stack(logits), torch.stack(boxes))

    def _predictions(self, rec: dict[str, Any], hf_out: Any) -> tuple[Predictions, None]:
        dec_out = rec["decoder_out"]
        init_ref = rec["decoder"]["reference_points"]
        return self._heads(dec_out.intermediate_hidden_states, init_ref,
                           dec_out.intermediate_reference_points), None

    def _memory(self, rec: dict[str, Any]) -> EncoderMemory:
        kw = rec["decoder"]
        return EncoderMemory(tokens=kw["encoder_hidden_states"], spatial_shapes=kw["spatial_shapes"],
                             level_start=kw["level_start_index"], padding_mask=~kw["encoder_attention_mask"])

    def _queries(self, rec: dict[str, Any]) -> Queries:
        kw = rec["decoder"]
        ref = kw["reference_points"]
        if ref.shape[-1] == 2:
            ref = torch.cat((ref, torch.zeros_like(ref)), dim=-1)
        return Queries(content=kw["inputs_embeds"], position=kw["object_queries_position_embeddings"],
                       reference_boxes=ref)

    def _attention_hooks(self, rec: dict[str, Any]) -> list:
        return [(self.decoder.layers[0].encoder_attn, "pre", _record_inputs(rec, "cross_attn"))]

    def _attention(self, rec: dict[str, Any], memory: EncoderMemory) -> Tensor:
        module, kw = self.decoder.layers[0].encoder_attn, rec["cross_attn"]
        locations, weights = deformable_samples(module, kw["hidden_states"], kw["position_embeddings"],
                                                kw["reference_points"], kw["spatial_shapes"])
        return splat_deformable_attention(locations, weights, memory.spatial_shapes,
                                          memory.level_start, memory.padding_mask)

    # ---- decode -----------------------------------------------------------------------------
    def _box_queries(self, boxes: Tensor, content: Tensor | None,
                     position: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """(content [B,M,D], position [B,M,D], reference points [B,M,2|4]) for boxes [B,M,4]."""
        d = self.hidden_size
        if self.model.config.two_stage:
            m = self.model.model
            pos_trans = m.pos_trans_norm(m.pos_trans(m.get_proposal_pos_embed(inverse_sigmoid(boxes))))
            pos_default, content_default = torch.split(pos_trans, d, dim=2)
            reference = boxes
        else:
            pos_default = sine_box_embedding(boxes, d)
            content_default = boxes.new_zeros(*boxes.shape[:-1], d)
            reference = boxes[..., :2]
        position = pos_default if position is None else position
        content = content_default if content is None else content
        return content, position, reference

    def decode(self, out: DetectorOutput, boxes: Tensor, content: Tensor | None = None,
               position: Tensor | None = None, self_attn_mask: Tensor | None = None) -> Predictions:
        content, position, reference = self._box_queries(boxes, content, position)
        kw = dict(out.decoder_inputs)
        kw.update(inputs_embeds=content, object_queries_position_embeddings=position,
                  reference_points=reference)
        mask = additive_mask(self_attn_mask, content.dtype)
        if mask is not None:
            kw["attention_mask"] = mask
        dec_out = self.decoder(**kw)
        return self._heads(dec_out.intermediate_hidden_states, reference,
                           dec_out.intermediate_reference_points)


def deformable_samples(module: nn.Module, hidden: Tensor, position: Tensor | None,
                       reference_points: Tensor, spatial_shapes: Tensor) -> tuple[Tensor, Tensor]:
    """Recompute a Deformable-DETR-style attention's sampling locations and weights.

    hidden, position: [B, Q, D]; reference_points: [B, Q, S, 2|4] (already scaled by valid ratios)
    returns locations [B, Q, heads, S, P, 2] in [0, 1] and weights [B, Q, heads, S, P]
    """
    query = hidden if position is None else hidden + position
    b, q, _ = query.shape
    heads, levels, points = module.n_heads, module.n_levels, module.n_points
    offsets = module.sampling_offsets(query).view(b, q, heads, levels, points, 2)
    weights = module.attention_weights(query).view(b, q, heads, levels * points).softmax(-1)
    weights = weights.view(b, q, heads, levels, points)
    if reference_points.shape[-1] == 2:
        normaliser = torch.stack((spatial_shapes[..., 1], spatial_shapes[..., 0]), -1)
        locations = reference_points[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    else:
        locations = (reference_points[:, :, None, :, None, :2]
                     + offsets / points * reference_points[:, :, None, :, None, 2:] * 0.5)
    return locations, weights
