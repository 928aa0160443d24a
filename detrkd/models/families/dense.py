"""The machinery shared by the single-scale, dense-attention families (DETR, Conditional, DAB):
``DenseDetrAdapter``, their config keys and decoder hooks.

Per-layer predictions follow the HF loss: layer i < L-1 is ``decoder.layernorm(output of layer i)``
(the ``intermediate_hidden_states`` HF builds when ``auxiliary_loss=True``), the last layer is the
decoder's ``last_hidden_state`` (what ``logits``/``pred_boxes`` come from). They are read with hooks on
the decoder layers, so models with ``auxiliary_loss=False`` (e.g. converted checkpoints) work too and
are never switched: HF feeds the layer-normed state into the next layer when ``auxiliary_loss=True``
(and norms the last state twice), so flipping it changes a trained model's outputs.

Self-attention masks: the HF DETR decoder takes a 4-d additive ``attention_mask`` for its query
self-attention; Conditional and DAB decoders drop theirs (they call their layers with ``None``), so those
adapters put the mask into each layer's self-attention call with a pre-hook that lives only for the
``decode`` call.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..attention import dense_attention_map
from ..base import (DetectorOutput, DetrAdapter, EncoderMemory, PresetSize, _record_output, additive_mask,
                    forward_hooks, hf_resnet_config, thaw_batch_norms)

Hook = tuple[nn.Module, str, Callable[..., Any]]


def dense_config_kwargs(size: PresetSize, num_classes: int, hidden_key: str = "d_model") -> dict[str, Any]:
    """HF config keys shared by DETR, Conditional DETR and DAB-DETR for a preset size (offline)."""
    return {
        "backbone_config": hf_resnet_config(size, out_indices=(4,)),  # single scale: the last stage
        "use_timm_backbone": False,
        "use_pretrained_backbone": False,
        hidden_key: size.d_model,
        "encoder_layers": size.encoder_layers,
        "decoder_layers": size.decoder_layers,
        "encoder_attention_heads": size.heads,
        "decoder_attention_heads": size.heads,
        "encoder_ffn_dim": size.ffn,
        "decoder_ffn_dim": size.ffn,
        "num_queries": size.queries,
        "auxiliary_loss": True,
        "num_labels": num_classes,
        "attn_implementation": "eager",  # cross-attention maps are only returned by eager attention
    }


def _append_output(store: list) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        store.append(output[0] if isinstance(output, tuple) else output)

    return hook


def _set_kwarg(name: str, value: Any) -> Callable[..., tuple]:
    """Pre-hook that overrides one keyword argument of a module call."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple:
        return args, {**kwargs, name: value}

    return hook


def _check_self_attn_mask(mask: Tensor | None, m: int) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or mask.shape != (m, m):
        raise ValueError(f"self_attn_mask must be a bool tensor of shape [{m}, {m}] (True = blocked), "
                         f"got {mask.dtype} {tuple(mask.shape)}")


class DenseDetrAdapter(DetrAdapter):
    """Shared pieces of the single-scale, dense-attention families (DETR, Conditional, DAB).

    ``forward`` wraps the generic one with two more hooks (removed with the others): the input
    projection's output (for the feature-map shape) and, where the decoder does not keep per-layer
    states itself, every decoder layer's output.
    """

    attention_kind = "dense"
    _layers_from_hooks = True  # DETR/Conditional: per-layer states come from layer hooks
    _cross_attention_module_name = "encoder_attn"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._capture: dict[str, Any] | None = None

    @classmethod
    def from_config(cls, config: Any) -> "DenseDetrAdapter":
        """Build the HF model (backbone trainable). A config without an attention implementation
        (e.g. rebuilt from a saved dict: HF does not save it) gets eager attention, which the
        cross-attention maps need; an explicit choice is kept."""
        if getattr(config, "_attn_implementation", None) is None:
            config = copy.deepcopy(config)
            config._attn_implementation = "eager"
        model = cls._model_class()(config)
        model.model.unfreeze_backbone()  # HF freezes the whole HF-ResNet backbone by default
        thaw_batch_norms(model.model.backbone)  # and its BatchNorm: from scratch, train them
        return cls(model)

    # ---- forward ---------------------------------------------------------------------------
    def forward(self, pixel_values: Tensor, pixel_mask: Tensor | None = None,
                labels: list[dict[str, Tensor]] | None = None, with_attention: bool = False) -> DetectorOutput:
        capture: dict[str, Any] = {"layers": []}
        hooks: list[Hook] = [(self.model.model.input_projection, "post", _record_output(capture, "projection"))]
        if self._layers_from_hooks:
            hooks += [(layer, "post", _append_output(capture["layers"])) for layer in self.decoder.layers]
        self._capture = capture
        try:
            with forward_hooks(hooks):
                return super().forward(pixel_values, pixel_mask, labels=labels, with_attention=with_attention)
        finally:
            self._capture = None

    def _layer_states(self, layer_outputs: list[Tensor], last: Tensor) -> Tensor:
        """[L, B, Q, D]: layernorm of each layer's output, the decoder's own last state last."""
        if len(layer_outputs) != self.num_decoder_layers:
            raise RuntimeError(f"expected {self.num_decoder_layers} decoder layer outputs, got "
                               f"{len(layer_outputs)} (decoder layerdrop is not supported)")
        norm = self.decoder.layernorm
        return torch.stack([norm(h) for h in layer_outputs[:-1]] + [last])

    def _memory(self, rec: dict[str, Any]) -> EncoderMemory:
        tokens = self._memory_tokens(rec["decoder"])
        valid = self._memory_valid(rec["decoder"])
        h, w = self._capture["projection_out"].shape[-2:]
        if h * w != tokens.shape[1]:
            raise RuntimeError(f"feature map {h}x{w} does not match {tokens.shape[1]} memory tokens")
        return EncoderMemory(
            tokens=tokens,
            spatial_shapes=torch.tensor([[h, w]], dtype=torch.long, device=tokens.device),
            level_start=torch.zeros(1, dtype=torch.long, device=tokens.device),
            padding_mask=~valid.bool(),
        )

    def _memory_tokens(self, kw: dict[str, Any]) -> Tensor:
        return kw["encoder_hidden_states"]

    def _memory_valid(self, kw: dict[str, Any]) -> Tensor:
        return kw["encoder_attention_mask"]  # True / 1 = real pixel

    def _cross_attention_module(self) -> nn.Module:
        return getattr(self.decoder.layers[0], self._cross_attention_module_name)

    def _attention_hooks(self, rec: dict[str, Any]) -> list[Hook]:
        return [(self._cross_attention_module(), "post", _record_output(rec, "cross_attn"))]

    def _attention(self, rec: dict[str, Any], memory: EncoderMemory) -> Tensor:
        weights = rec["cross_attn_out"][1]
        if weights is None:
            raise RuntimeError(
                f"{type(self.model).__name__} returned no cross-attention weights: attention maps need the "
                f"eager attention implementation (config._attn_implementation is "
                f"{self.model.config._attn_implementation!r}; build with attn_implementation='eager')")
        return dense_attention_map(weights, memory.padding_mask)

    # ---- decode helpers --------------------------------------------------------------------
    def _decode_inputs(self, out: DetectorOutput, boxes: Tensor | None, content: Tensor | None,
                       position: Tensor | None) -> tuple[int, int]:
        ref = boxes if boxes is not None else position if position is not None else content
        if ref is None:
            raise ValueError(f"{type(self).__name__}.decode needs boxes or position embeddings")
        if ref.dim() != 3:
            raise ValueError(f"decode expects [B, M, .] queries, got shape {tuple(ref.shape)}")
        b, m = ref.shape[:2]
        mem_b = out.memory.tokens.shape[0]
        if b != mem_b:
            raise ValueError(f"decode got queries for {b} images but the memory holds {mem_b}")
        for name, t, last in (("boxes", boxes, 4), ("content", content, self.hidden_size),
                              ("position", position, self.hidden_size)):
            if t is not None and tuple(t.shape) != (b, m, last):
                raise ValueError(f"{name} must have shape {(b, m, last)}, got {tuple(t.shape)}")
        return b, m

    def _self_attn_mask_hooks(self, self_attn_mask: Tensor | None, dtype: torch.dtype) -> list[Hook]:
        """Put an additive [1, 1, M, M] mask into every decoder layer's self-attention call."""
        mask = additive_mask(self_attn_mask, dtype)
        if mask is None:
            return []
        return [(layer.self_attn, "pre", _set_kwarg("attention_mask", mask)) for layer in self.decoder.layers]
