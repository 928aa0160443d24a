"""DETR in the normalised view (the dense-attention base, ``DenseDetrAdapter``, is in ``dense.py``).

DETR's object queries are learned position embeddings (``query_position_embeddings``) with zero
content; there are no reference boxes and the box head predicts absolute boxes. The model has no
layer that turns a box into a query, so ``decode`` maps a box to a query with a fixed,
parameter-free sine embedding of (cx, cy, w, h) as the position (``sine_box_embedding``, d_model/4
features per coordinate, the convention the Deformable adapter uses for its plain variant) and zero
content. Neither model was trained on such queries: the predictions for them are not anchored at the
boxes; the mapping only makes "the same box" mean "the same query" for every DETR of a given
d_model (consistent points for teacher and student). Passing ``position=`` uses any position
embeddings instead (e.g. the teacher's own ``queries.position``, which reproduces its predictions
exactly when the widths match).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..base import DetectorOutput, PresetSize, Predictions, Queries, additive_mask, forward_hooks, sine_box_embedding
from .dense import DenseDetrAdapter, _append_output, _check_self_attn_mask, dense_config_kwargs


class DETRAdapter(DenseDetrAdapter):
    """``DetrForObjectDetection`` (softmax head over C + 1, last = no-object)."""

    hf_classes = ("DetrConfig", "DetrForObjectDetection")
    family = "detr"
    model_types = ("detr",)
    class_head = "softmax"

    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        return cls._config_class()(**{**dense_config_kwargs(size, num_classes), **overrides})

    def _heads(self, hidden: Tensor) -> Predictions:
        return Predictions(self.model.class_labels_classifier(hidden), self.model.bbox_predictor(hidden).sigmoid())

    def box_normalised_loss(self, out: DetectorOutput) -> Tensor:
        """The weighted L1 and GIoU terms (all layers): DETR's cross-entropy is a (weighted) mean
        over the queries, not a sum over ``num_boxes``."""
        terms = out.loss_dict or {}
        cfg = self.config
        weights = {"loss_bbox": cfg.bbox_loss_coefficient, "loss_giou": cfg.giou_loss_coefficient}
        parts = [weight * value for key, value in terms.items() for prefix, weight in weights.items()
                 if key == prefix or key.startswith(prefix + "_")]
        return torch.stack(parts).sum() if parts else super().box_normalised_loss(out) * 0

    def _predictions(self, rec: dict[str, Any], hf_out: Any) -> tuple[Predictions, None]:
        hidden = self._layer_states(self._capture["layers"], rec["decoder_out"].last_hidden_state)
        return self._heads(hidden), None

    def _queries(self, rec: dict[str, Any]) -> Queries:
        kw = rec["decoder"]
        return Queries(content=kw["inputs_embeds"], position=kw["object_queries_position_embeddings"])

    def decode(self, out: DetectorOutput, boxes: Tensor | None = None, content: Tensor | None = None,
               position: Tensor | None = None, self_attn_mask: Tensor | None = None) -> Predictions:
        """Decode extra DETR queries on ``out``'s memory.

        position: [B, M, D] query position embeddings; None -> ``sine_box_embedding(boxes)``
                  (a fixed mapping, see the module docstring: DETR has no box-to-query layer)
        boxes:    [B, M, 4] cxcywh, only used when ``position`` is None
        content:  [B, M, D]; None -> zeros (DETR's own queries start from zero content)
        self_attn_mask: [M, M] bool, True = blocked (passed to the decoder's own attention_mask)
        """
        b, m = self._decode_inputs(out, boxes, content, position)
        if position is None:
            if boxes is None:
                raise ValueError("DETR decode needs position embeddings or boxes")
            position = sine_box_embedding(boxes, self.hidden_size)
        if content is None:
            content = position.new_zeros(b, m, self.hidden_size)
        _check_self_attn_mask(self_attn_mask, m)
        kw = dict(out.decoder_inputs)
        kw.update(inputs_embeds=content, object_queries_position_embeddings=position,
                  attention_mask=additive_mask(self_attn_mask, content.dtype))
        layers: list[Tensor] = []
        with forward_hooks([(layer, "post", _append_output(layers)) for layer in self.decoder.layers]):
            dec_out = self.decoder(**kw)
        return self._heads(self._layer_states(layers, dec_out.last_hidden_state))
