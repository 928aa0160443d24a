"""D-FINE in the normalised view.

D-FINE shares RT-DETR's model wiring (hybrid encoder, top-k memory queries with detached
``enc_output`` content and box-logit references, contrastive denoising queries prepended in training
with labels, ``pixel_mask`` ignored); see ``rt_detr.py`` for those parts, which are reused here.
What differs is the decoder's box head, FDR (fine-grained distribution refinement):

- after layer 0, ``pre_bbox_head`` refines the input reference into ``ref_initial``
  (``sigmoid(pre_bbox_head(h_0) + logit(ref))``, detached);
- every layer i predicts 4 x (max_num_bins + 1) edge-distance logits,
  ``corners_i = bbox_embed[i](h_i + h_{i-1}.detach()) + corners_{i-1}`` (``h_{-1} = corners_{-1} = 0``);
  its box is ``distance2bbox(ref_initial, integral(corners_i, W), reg_scale)`` with the non-uniform
  weighting function ``W(max_num_bins, up, reg_scale)``; the next layer's reference is that box,
  detached;
- class logits are ``lqe_layers[i](class_embed[i](h_i), corners_i)`` (location-quality estimate
  added to the scores).

HF quirks (transformers 5.23):
- ``intermediate_logits`` / ``intermediate_reference_points`` are (B, L', T, .) but L' = L + 1 in
  training (index 0 = the ``pre_bbox_head`` box with the raw layer-0 class logits, no LQE) and
  L' = 1 in eval (only layer ``eval_idx``); ``intermediate_hidden_states`` is (L, B, T, D) in both.
  So this adapter takes the decoder's per-layer hidden states and applies the heads above itself
  (``fdr_heads``), identically in train and eval, for ``forward`` and ``decode`` alike.
  ``predictions`` has the L decoder layers (the pre-bbox "layer 0.5" initial box is not included);
  its last layer equals HF's ``logits`` / ``pred_boxes``.
- ``eval_idx`` other than -1 (= last layer) crashes HF's decoder (it builds
  ``decoder_layers + decoder_layers - eval_idx - 1`` layers but only ``decoder_layers`` heads), so
  such configs are rejected; ``learn_initial_query=True`` crashes too and is rejected.
- ``class_embed`` / ``bbox_embed`` exist on the detection model and (tied) on its decoder; the
  decoder's copies are used.
- the decoder's ``up`` and ``reg_scale`` (weighting-function constants) are parameters with
  ``requires_grad=False``; the adapter keeps them so (``load_detector`` unfreezes everything).
- D-FINE's deformable attention has no value projection, samples ``decoder_n_points`` per level
  (an int or a per-level list) with ``offset * (1 / n_points) * wh * decoder_offset_scale``, and its
  decoder layers add the positional query before the cross-attention module; the recorded input of
  that module is therefore the full query.

``decode(boxes, content)`` calls the decoder with ``reference_points = logit(boxes)`` and
``inputs_embeds = content`` (default content as for RT-DETR: ``enc_output`` of the memory at the box
centre, detached) and applies ``fdr_heads``: boxes come from the same distributions, integral and
``ref_initial`` the model uses, so re-decoding the model's own queries reproduces its predictions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...box_ops import inverse_sigmoid
from ..base import DetectorOutput, Predictions, PresetSize
from .rt_detr import RTDETRAdapter, v2_deformable_samples


def fdr_heads(decoder: nn.Module, hidden: Tensor, reference_logits: Tensor) -> Predictions:
    """D-FINE's per-layer heads, exactly as ``DFineDecoder.forward`` applies them.

    hidden: [L, B, T, D] every decoder layer's output; reference_logits: [B, T, 4] the decoder's
    ``reference_points`` input (box logits). Returns Predictions [L, B, T, .].
    """
    from transformers.models.d_fine.modeling_d_fine import distance2bbox, weighting_function

    project = weighting_function(decoder.max_num_bins, decoder.up, decoder.reg_scale)
    reference = F.sigmoid(reference_logits)
    ref_initial = F.sigmoid(decoder.pre_bbox_head(hidden[0]) + inverse_sigmoid(reference)).detach()
    logits, boxes = [], []
    previous_hidden: Tensor | int = 0
    corners: Tensor | int = 0
    for i in range(hidden.shape[0]):
        corners = decoder.bbox_embed[i](hidden[i] + previous_hidden) + corners
        boxes.append(distance2bbox(ref_initial, decoder.integral(corners, project), decoder.reg_scale))
        logits.append(decoder.lqe_layers[i](decoder.class_embed[i](hidden[i]), corners))
        previous_hidden = hidden[i].detach()
    return Predictions(torch.stack(logits), torch.stack(boxes))


class DFineAdapter(RTDETRAdapter):
    hf_classes = ("DFineConfig", "DFineForObjectDetection")
    family = "d_fine"
    model_types = ("d_fine",)
    class_head = "sigmoid"
    attention_kind = "deformable"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        check_eval_idx(model.config)
        # FDR's weighting-function constants are parameters with requires_grad=False in D-FINE;
        # keep them constant even if a loader switched every parameter to trainable
        for name in ("up", "reg_scale"):
            getattr(model.model.decoder, name).requires_grad_(False)

    @classmethod
    def _extra_config(cls, size: PresetSize) -> dict[str, Any]:
        # CSP-ELAN neck widths/depths: D-FINE-S for the small presets, D-FINE-M for base
        if size.d_model < 256:
            return dict(hidden_expansion=0.5, depth_mult=0.34)
        return dict(hidden_expansion=1.0, depth_mult=0.67)

    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        config = super().make_config(size, num_classes, **overrides)
        check_eval_idx(config)
        return config

    @classmethod
    def from_config(cls, config: Any) -> "DFineAdapter":
        check_eval_idx(config)
        return super().from_config(config)

    def box_normalised_loss(self, out: DetectorOutput) -> Tensor:
        """All but the DDF terms (``loss_ddf*``, normalised by the batch's positive / negative
        counts, not by ``num_boxes``); the RT-DETR-family terms come already weighted."""
        ddf = [v for k, v in (out.loss_dict or {}).items() if k.startswith("loss_ddf")]
        loss = super().box_normalised_loss(out)
        return loss - torch.stack(ddf).sum() if ddf else loss

    def _layer_outputs(self, dec_out: Any, kw: dict[str, Any]) -> Predictions:
        return fdr_heads(self.decoder, dec_out.intermediate_hidden_states, kw["reference_points"])

    def _samples(self, kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        # the decoder layer already added the positional query to ``hidden_states``
        module = self.decoder.layers[0].encoder_attn
        return v2_deformable_samples(module, kw["hidden_states"], kw["reference_points"],
                                     kw["spatial_shapes"], list(module.num_points_list),
                                     module.offset_scale, module.decoder_method)


def check_eval_idx(config: Any) -> None:
    eval_idx = int(config.eval_idx)
    if eval_idx not in (-1, int(config.decoder_layers) - 1):
        raise ValueError(f"D-FINE eval_idx={eval_idx} is not supported (HF's decoder crashes unless the "
                         f"last layer, -1, is the evaluation layer)")
