"""DAB-DETR in the normalised view.

DAB-DETR's queries ARE boxes: learned 4-d anchors ``query_refpoint_embeddings`` (inverse-sigmoid
cxcywh) with zero content (or ``num_patterns`` learned pattern contents). Every decoder layer derives
its positional query from the current anchor (``ref_point_head(sine(anchor))``, width/height-modulated
attention) and refines the anchor with the (tied) box head; ``queries.reference_boxes`` is the
sigmoid of the anchors, ``queries.position`` is None (positions are a function of the anchors).

What ``decode`` replaces: the anchors (``query_position_embeddings = logit(boxes)``, HF's clamped
logit with eps 1e-5) and the content (zeros unless given, which is the model's own content when
``num_patterns == 0``; with patterns, pass the pattern contents explicitly). ``position`` embeddings
cannot be given (the model has none to replace). Boxes must have w, h > 0: each layer divides by the
anchor's width and height (HF's clamped logit keeps degenerate boxes finite but huge).
``self_attn_mask``: the HF decoder calls its layers with ``attention_mask=None``; the mask is put into
each layer's self-attention call with a pre-hook instead.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...box_ops import inverse_sigmoid
from ..base import DetectorOutput, PresetSize, Predictions, Queries, _record_output, forward_hooks
from .dense import DenseDetrAdapter, Hook, _check_self_attn_mask, _set_kwarg, dense_config_kwargs


class DABDETRAdapter(DenseDetrAdapter):
    """``DabDetrForObjectDetection`` (sigmoid / focal head over C classes)."""

    hf_classes = ("DabDetrConfig", "DabDetrForObjectDetection")
    family = "dab_detr"
    model_types = ("dab-detr",)
    class_head = "sigmoid"
    _layers_from_hooks = False  # the decoder always returns every layer's (normed) state
    _cross_attention_module_name = "cross_attn"

    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        kwargs = dense_config_kwargs(size, num_classes, hidden_key="hidden_size")
        kwargs.pop("attn_implementation")  # DAB's attention is hand-written and always eager
        return cls._config_class()(**{**kwargs, **overrides})

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def num_queries(self) -> int:
        """Anchors x patterns: with ``num_patterns > 0`` every anchor is used once per pattern."""
        cfg = self.model.config
        return int(cfg.num_queries) * max(1, int(cfg.num_patterns))

    def backbone_parameters(self):
        return self.model.model.backbone.conv_encoder.parameters()

    def _heads(self, hidden: Tensor, anchors: Tensor) -> Predictions:
        """hidden [L, B, Q, D], anchors [L, B, Q, 4] (each layer's input anchor) -> Predictions."""
        boxes = (self.model.bbox_predictor(hidden) + inverse_sigmoid(anchors)).sigmoid()
        return Predictions(self.model.class_embed(hidden), boxes)

    def _predictions(self, rec: dict[str, Any], hf_out: Any) -> tuple[Predictions, None]:
        dec_out = rec["decoder_out"]
        return self._heads(dec_out.intermediate_hidden_states, dec_out.reference_points), None

    def _memory_valid(self, kw: dict[str, Any]) -> Tensor:
        return kw["memory_key_padding_mask"]  # despite the name: True = real pixel

    def _queries(self, rec: dict[str, Any]) -> Queries:
        kw = rec["decoder"]
        return Queries(content=kw["inputs_embeds"], position=None,
                       reference_boxes=kw["query_position_embeddings"].sigmoid())

    def _attention_hooks(self, rec: dict[str, Any]) -> list[Hook]:
        attn = self.decoder.layers[0].cross_attn.cross_attn  # returns weights only if asked to
        return [(attn, "pre", _set_kwarg("output_attentions", True)),
                (attn, "post", _record_output(rec, "cross_attn"))]

    def decode(self, out: DetectorOutput, boxes: Tensor | None = None, content: Tensor | None = None,
               position: Tensor | None = None, self_attn_mask: Tensor | None = None) -> Predictions:
        """Decode extra anchor-box queries on ``out``'s memory.

        boxes:   [B, M, 4] cxcywh anchors (w, h > 0), required
        content: [B, M, D]; None -> zeros
        position: not supported (DAB-DETR's positional queries are a function of the anchors)
        self_attn_mask: [M, M] bool, True = blocked
        """
        if position is not None:
            raise ValueError("DAB-DETR has no free position embeddings: its positional queries are "
                             "computed from the anchor boxes; pass boxes (and content) instead")
        if boxes is None:
            raise ValueError("DAB-DETR decode needs anchor boxes")
        b, m = self._decode_inputs(out, boxes, content, None)
        if content is None:
            content = boxes.new_zeros(b, m, self.hidden_size)
        _check_self_attn_mask(self_attn_mask, m)
        kw = dict(out.decoder_inputs)
        kw.update(inputs_embeds=content, query_position_embeddings=inverse_sigmoid(boxes), return_dict=True)
        with forward_hooks(self._self_attn_mask_hooks(self_attn_mask, content.dtype)):
            dec_out = self.decoder(**kw)
        return self._heads(dec_out.intermediate_hidden_states, dec_out.reference_points)
