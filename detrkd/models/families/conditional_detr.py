"""Conditional DETR in the normalised view.

Conditional DETR's queries are learned position embeddings ``p`` with zero content. The decoder
derives a 2-d reference point from them, ``s = sigmoid(ref_point_head(p))``; ``s`` sets the spatial
(sine) part of every layer's cross-attention query, and the box head predicts offsets from ``s``:
``box = sigmoid(bbox_predictor(h) + [logit(s), 0, 0])``. ``queries.reference_boxes`` is
``[s_x, s_y, 0, 0]`` (2-d reference points, w = h = 0).

What ``decode`` replaces: the query position embeddings (``object_queries_position_embeddings``) and,
when boxes are given, the reference point.
- ``position`` given, no boxes: the model's own path, ``s = sigmoid(ref_point_head(position))``;
  ``decode(out, position=out.queries.position)`` reproduces the model's predictions exactly.
- boxes given: ``ref_point_head(p)`` cannot be inverted, so the reference point is set to the box
  centre directly (a forward hook on ``ref_point_head`` replaces its output by ``logit(centre)`` for
  the duration of the call); the position embedding is ``position`` if given, else the fixed sine
  embedding of the box (``sine_box_embedding``, d_model/4 features per coordinate, as for DETR and
  plain Deformable DETR). The box width/height only enter through that embedding: Conditional DETR's
  reference is a point.
- content: zeros unless given (the model's own content is zero).
- ``self_attn_mask``: the HF decoder calls its layers with ``attention_mask=None``; the mask is put into
  each layer's self-attention call with a pre-hook instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...box_ops import inverse_sigmoid
from ..base import DetectorOutput, PresetSize, Predictions, Queries, forward_hooks, sine_box_embedding
from .dense import DenseDetrAdapter, _append_output, _check_self_attn_mask, dense_config_kwargs


def _replace_output(value: Tensor):
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Tensor) -> Tensor:
        return value

    return hook


class ConditionalDETRAdapter(DenseDetrAdapter):
    """``ConditionalDetrForObjectDetection`` (sigmoid / focal head over C classes)."""

    hf_classes = ("ConditionalDetrConfig", "ConditionalDetrForObjectDetection")
    family = "conditional_detr"
    model_types = ("conditional_detr",)
    class_head = "sigmoid"

    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        return cls._config_class()(**{**dense_config_kwargs(size, num_classes), **overrides})

    def _heads(self, hidden: Tensor, reference: Tensor) -> Predictions:
        """hidden [L, B, Q, D], reference [B, Q, 2] -> Predictions, as the HF detection head does."""
        delta = self.model.bbox_predictor(hidden)
        centre = delta[..., :2] + inverse_sigmoid(reference)
        boxes = torch.cat((centre, delta[..., 2:]), dim=-1).sigmoid()
        return Predictions(self.model.class_labels_classifier(hidden), boxes)

    @staticmethod
    def _reference(dec_out: Any) -> Tensor:
        return dec_out.reference_points.transpose(0, 1)  # HF returns it as [Q, B, 2]

    def _predictions(self, rec: dict[str, Any], hf_out: Any) -> tuple[Predictions, None]:
        dec_out = rec["decoder_out"]
        hidden = self._layer_states(self._capture["layers"], dec_out.last_hidden_state)
        return self._heads(hidden, self._reference(dec_out)), None

    def _queries(self, rec: dict[str, Any]) -> Queries:
        kw = rec["decoder"]
        ref = self._reference(rec["decoder_out"])
        return Queries(content=kw["inputs_embeds"], position=kw["object_queries_position_embeddings"],
                       reference_boxes=torch.cat((ref, torch.zeros_like(ref)), dim=-1))

    def decode(self, out: DetectorOutput, boxes: Tensor | None = None, content: Tensor | None = None,
               position: Tensor | None = None, self_attn_mask: Tensor | None = None) -> Predictions:
        """Decode extra queries on ``out``'s memory (see the module docstring for the mapping).

        boxes:    [B, M, 4] cxcywh; the centre becomes the reference point (None -> model's own
                  ``ref_point_head(position)``)
        position: [B, M, D]; None -> ``sine_box_embedding(boxes)``
        content:  [B, M, D]; None -> zeros
        self_attn_mask: [M, M] bool, True = blocked
        """
        b, m = self._decode_inputs(out, boxes, content, position)
        if position is None:
            if boxes is None:
                raise ValueError("Conditional DETR decode needs boxes or position embeddings")
            position = sine_box_embedding(boxes, self.hidden_size)
        if content is None:
            content = position.new_zeros(b, m, self.hidden_size)
        _check_self_attn_mask(self_attn_mask, m)
        kw = dict(out.decoder_inputs)
        kw.update(inputs_embeds=content, object_queries_position_embeddings=position)
        layers: list[Tensor] = []
        hooks = [(layer, "post", _append_output(layers)) for layer in self.decoder.layers]
        hooks += self._self_attn_mask_hooks(self_attn_mask, content.dtype)
        if boxes is not None:
            hooks.append((self.decoder.ref_point_head, "post", _replace_output(inverse_sigmoid(boxes[..., :2]))))
        with forward_hooks(hooks):
            dec_out = self.decoder(**kw)
        hidden = self._layer_states(layers, dec_out.last_hidden_state)
        return self._heads(hidden, self._reference(dec_out))
