"""DEIMv2 in the normalised view.

DEIMv2's model is D-FINE's wiring (backbone, hybrid encoder, top-k memory queries with detached
``enc_output`` content and box-logit references, contrastive denoising queries prepended in
training with labels, ``pixel_mask`` ignored) and its decoder is D-FINE's FDR decoder (with a
gateway instead of the cross-attention norm and a SwiGLU FFN inside the layers; the heads are the
same), so ``DFineAdapter`` and ``rt_detr.py`` apply as they are: per-layer predictions from
``fdr_heads``, ``decode(boxes, content)`` with ``reference_points = logit(boxes)`` and default content
``enc_output`` of the memory at the box centre (detached), ``position`` rejected, denoising queries
in ``denoising`` and never decoded, first-layer cross-attention from ``layers[0].encoder_attn``
(D-FINE's deformable attention). See those modules.

What differs (transformers 5.23):
- the backbone is ``model.model.conv_encoder`` (``load_backbone``: HF-ResNet in detrkd's presets,
  HGNetV2 / ResNet in transformers' configs; a DINOv3 ViT with a spatial-tuning adapter when
  ``backbone_config.model_type == "dinov3_vit"``). HF's ``freeze_backbone`` / ``unfreeze_backbone``
  read a ``backbone`` attribute the model does not have (AttributeError), so ``from_config`` does not
  call them (nothing is frozen by default) and ``backbone_parameters`` names the backbone itself;
- the loss (``Deimv2ForObjectDetectionLoss``): matching-aware loss (MAL) + L1 / GIoU + FGL / DDF,
  already weighted. With ``use_dense_one_to_one`` (default) L1, GIoU and FGL use the union of the
  matches of every layer and the encoder top-k and divide by the size of that union, not by the
  number of GT boxes; ``box_normalised_loss`` is therefore MAL (divided by the GT count) plus the
  denoising terms except DDF (divided by GT count x denoising groups), as D-FINE's rule;
- ``freeze_backbone_batch_norms`` defaults to True in HF; the presets set it to False (trained from
  scratch), as for RT-DETR / D-FINE.

Presets: ``rtdetr_family_config_kwargs`` (HF-ResNet backbone, hybrid encoder, decoder sizes) with
D-FINE's neck widths, so DEIMv2, D-FINE and RT-DETR students differ only in their transformer.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..base import DetectorOutput
from .d_fine import DFineAdapter, check_eval_idx
from .rt_detr import check_supported_config, reset_batch_norms


class Deimv2Adapter(DFineAdapter):
    hf_classes = ("Deimv2Config", "Deimv2ForObjectDetection")
    family = "deimv2"
    model_types = ("deimv2",)

    @classmethod
    def from_config(cls, config: Any) -> "Deimv2Adapter":
        check_supported_config(config)
        check_eval_idx(config)
        model = cls._model_class()(config)  # nothing frozen; HF's unfreeze_backbone would crash
        reset_batch_norms(model)
        return cls(model)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """The backbone's parameters (CNN: ``conv_encoder.model``; DINOv3: ``conv_encoder.backbone``),
        without the input projections / spatial-tuning adapter (main learning rate)."""
        encoder = self.model.model.conv_encoder
        return (encoder.backbone if hasattr(encoder, "backbone") else encoder.model).parameters()

    def box_normalised_loss(self, out: DetectorOutput) -> Tensor:
        """MAL and the denoising terms except DDF (see the module docstring); with dense one-to-one
        matching off, D-FINE's rule (everything but DDF)."""
        if not self.config.use_dense_one_to_one:
            return super().box_normalised_loss(out)
        if out.loss is None:
            raise ValueError("box_normalised_loss needs a forward with labels (out.loss is None)")
        parts = [v for k, v in (out.loss_dict or {}).items()
                 if not k.startswith("loss_ddf") and (k.startswith("loss_mal") or "_dn_" in k)]
        return torch.stack(parts).sum() if parts else out.loss * 0
