"""The normalised view of a DETR-family detector that every distillation method consumes.

Notation: B images, Q detection queries, M extra queries ("points"), L decoder layers, K class
logits per query (C for sigmoid heads, C + 1 for softmax heads whose last logit is "no object"),
N encoder tokens over S feature levels, D hidden size. Boxes are normalised cxcywh relative to the
un-padded image, as in the HF models and their losses.

An adapter wraps one HF ``...ForObjectDetection`` model. It never edits the model: it reads
internals with forward hooks that are removed when the call returns (``captured_call``).
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator, Literal

import torch
from torch import Tensor, nn

ClassHead = Literal["softmax", "sigmoid"]


@dataclass
class Predictions:
    """Per-decoder-layer predictions; index -1 is the final layer.

    logits: [L, B, Q, K] raw class logits (softmax head: K = C + 1, last = no-object; sigmoid: K = C)
    boxes:  [L, B, Q, 4] normalised cxcywh in [0, 1]
    """

    logits: Tensor
    boxes: Tensor

    @property
    def num_layers(self) -> int:
        return self.logits.shape[0]

    def layer(self, index: int) -> tuple[Tensor, Tensor]:
        """(logits [B, Q, K], boxes [B, Q, 4]) of one decoder layer."""
        return self.logits[index], self.boxes[index]

    def select(self, queries: slice | Tensor) -> "Predictions":
        """A subset of queries, on dim 2."""
        return Predictions(self.logits[:, :, queries], self.boxes[:, :, queries])


@dataclass
class EncoderMemory:
    """The encoder output the decoder cross-attends to, flattened over levels.

    tokens:         [B, N, D]
    spatial_shapes: [S, 2] long, (H, W) of each level; N = sum(H * W)
    level_start:    [S] long, index of each level's first token
    padding_mask:   [B, N] bool, True where the token lies in image padding
    """

    tokens: Tensor
    spatial_shapes: Tensor
    level_start: Tensor
    padding_mask: Tensor


@dataclass
class Queries:
    """The detection queries the decoder was run on (after any top-k / two-stage selection).

    content:         [B, Q, D] or None (families whose decoder starts from zeros / learned targets)
    position:        [B, Q, D] or None (learned positional query embeddings, DETR/Conditional)
    reference_boxes: [B, Q, 4] normalised cxcywh or None; for 2-d reference points w = h = 0
    """

    content: Tensor | None = None
    position: Tensor | None = None
    reference_boxes: Tensor | None = None


@dataclass
class DetectorOutput:
    """One forward pass of a detector, in the normalised view.

    predictions:     detection queries only, all layers
    denoising:       predictions of denoising / extra training queries (RT-DETR, D-FINE), else None
    cross_attention: [B, Q, N] first decoder layer's cross-attention of every detection query over
                     the memory tokens, averaged over heads, rows sum to 1 (only if requested)
    loss, loss_dict: the detector's own loss (only when labels were passed)
    decoder_inputs:  what the decoder was called with; ``decode`` reuses it (treat as opaque)
    """

    predictions: Predictions
    class_head: ClassHead
    memory: EncoderMemory
    queries: Queries
    denoising: Predictions | None = None
    cross_attention: Tensor | None = None
    loss: Tensor | None = None
    loss_dict: dict[str, Tensor] | None = None
    decoder_inputs: dict[str, Any] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class PresetSize:
    """A named size: HF-ResNet backbone widths/depths and transformer sizes."""

    backbone_widths: tuple[int, ...]
    backbone_depths: tuple[int, ...]
    d_model: int
    encoder_layers: int
    decoder_layers: int
    heads: int
    ffn: int
    queries: int
    layer_type: str = "basic"


PRESETS: dict[str, PresetSize] = {
    # seconds per step on 2 CPU cores; for unit tests and smoke runs
    "tiny": PresetSize((16, 32, 64, 128), (1, 1, 1, 1), d_model=64, encoder_layers=1,
                       decoder_layers=2, heads=4, ffn=128, queries=30),
    # a student: narrow ResNet-10-like backbone, d=128, 3 decoder layers
    "small": PresetSize((32, 64, 128, 256), (1, 1, 1, 1), d_model=128, encoder_layers=1,
                        decoder_layers=3, heads=4, ffn=512, queries=100),
    # a teacher: ResNet-18-like backbone, d=256, 6 decoder layers
    "base": PresetSize((64, 128, 256, 512), (2, 2, 2, 2), d_model=256, encoder_layers=3,
                       decoder_layers=6, heads=8, ffn=1024, queries=300),
}


def hf_resnet_config(size: PresetSize, out_indices: tuple[int, ...] = (2, 3, 4)) -> Any:
    """An offline, randomly initialised HF ResNet backbone config (no timm, no download)."""
    from transformers import ResNetConfig

    return ResNetConfig(
        embedding_size=size.backbone_widths[0],
        hidden_sizes=list(size.backbone_widths),
        depths=list(size.backbone_depths),
        layer_type=size.layer_type,
        out_features=[f"stage{i}" for i in out_indices],
    )


class DetrAdapter(nn.Module):
    """Base class: wraps an HF DETR-family model and exposes the normalised view.

    Subclasses (one per family, see ``detrkd/models/families/``) set the class attributes and
    implement ``make_config``, ``_memory``, ``_queries``, ``_predict`` and ``_decoder_kwargs``.
    """

    family: ClassVar[str]
    hf_classes: ClassVar[tuple[str, str]]  # names in ``transformers``: (config, ...ForObjectDetection)
    model_types: ClassVar[tuple[str, ...]]  # HF config.model_type values this adapter accepts
    class_head: ClassVar[ClassHead]
    attention_kind: ClassVar[Literal["dense", "deformable"]]
    # False for families whose HF model ignores ``pixel_mask`` (RT-DETR, D-FINE): feed them
    # unpadded, equally sized images (``make_transforms(square=True)``)
    uses_pixel_mask: ClassVar[bool] = True

    def __init__(self, model: nn.Module):
        super().__init__()
        model_type = getattr(model.config, "model_type", None)
        if model_type not in self.model_types:
            raise ValueError(
                f"{type(self).__name__} expects a model of type {self.model_types}, "
                f"got {model_type!r} ({type(model).__name__})"
            )
        self.model = model
        # how its inputs are made (``data.transforms.Pixels``): set by ``load_detector`` (from the
        # checkpoint or the directory's image processor) and ``engine.make_detector``; None: unknown
        self.pixels: Any = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def make_config(cls, size: PresetSize, num_classes: int, **overrides: Any) -> Any:
        """HF config for a named preset size; ``overrides`` are HF config keys."""
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: Any) -> "DetrAdapter":
        raise NotImplementedError

    @classmethod
    def _config_class(cls) -> type:
        return getattr(importlib.import_module("transformers"), cls.hf_classes[0])

    @classmethod
    def _model_class(cls) -> type:
        return getattr(importlib.import_module("transformers"), cls.hf_classes[1])

    # ---- facts ---------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_classes(self) -> int:
        return int(self.model.config.num_labels)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.d_model)

    @property
    def num_queries(self) -> int:
        return int(self.model.config.num_queries)

    @property
    def num_decoder_layers(self) -> int:
        return int(self.model.config.decoder_layers)

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the CNN backbone (for a separate learning rate)."""
        return self.model.model.backbone.parameters()

    # ---- the view ------------------------------------------------------------------------
    @property
    def decoder(self) -> nn.Module:
        """The HF decoder module whose calls are recorded and replayed."""
        return self.model.model.decoder

    def forward(
        self,
        pixel_values: Tensor,
        pixel_mask: Tensor | None = None,
        labels: list[dict[str, Tensor]] | None = None,
        with_attention: bool = False,
    ) -> DetectorOutput:
        """Run the detector once, reading its internals through hooks removed afterwards.

        pixel_values: [B, 3, H, W]; pixel_mask: [B, H, W] (1 = real pixel, 0 = padding);
        labels: per image dict(class_labels [n] long, boxes [n, 4] normalised cxcywh) -> loss.
        with_attention: also compute ``cross_attention`` [B, Q, N].
        """
        rec: dict[str, Any] = {}
        hooks = [(self.decoder, "pre", _record_inputs(rec, "decoder")),
                 (self.decoder, "post", _record_output(rec, "decoder", check_finite=labels is not None))]
        if with_attention:
            hooks += self._attention_hooks(rec)
        with forward_hooks(hooks):
            hf_out = self._hf_forward(pixel_values, pixel_mask, labels)
        predictions, denoising = self._predictions(rec, hf_out)
        memory = self._memory(rec)
        return DetectorOutput(
            predictions=predictions,
            class_head=self.class_head,
            memory=memory,
            queries=self._queries(rec),
            denoising=denoising,
            cross_attention=self._attention(rec, memory) if with_attention else None,
            loss=getattr(hf_out, "loss", None),
            loss_dict=getattr(hf_out, "loss_dict", None),
            decoder_inputs=rec["decoder"],
        )

    def _hf_forward(self, pixel_values: Tensor, pixel_mask: Tensor | None,
                    labels: list[dict[str, Tensor]] | None) -> Any:
        """The HF model's forward (with its loss when ``labels`` are given); a family whose HF
        loss needs help in some mode overrides it (LW-DETR / RF-DETR in eval mode)."""
        return self.model(pixel_values=pixel_values, pixel_mask=pixel_mask, labels=labels)

    def box_normalised_loss(self, out: DetectorOutput) -> Tensor:
        """The part of ``out.loss`` that the HF loss divides by the number of GT boxes (scalar).

        All of it for every family whose classification loss is a focal / varifocal loss over
        ``num_boxes`` (Conditional, DAB, Deformable, RT-DETR v1/v2); DETR and D-FINE override it.
        ``detrkd.distributed`` rescales this part so that it is normalised by the box count
        averaged over processes (DETR's convention), not by this process's own.
        """
        if out.loss is None:
            raise ValueError("box_normalised_loss needs a forward with labels (out.loss is None)")
        return out.loss

    def decode(
        self,
        out: DetectorOutput,
        boxes: Tensor,
        content: Tensor | None = None,
        position: Tensor | None = None,
        self_attn_mask: Tensor | None = None,
    ) -> Predictions:
        """Run the decoder again on ``out``'s encoder memory for extra queries, with gradients.

        boxes:    [B, M, 4] normalised cxcywh reference boxes of the extra queries
        content:  [B, M, D] content embeddings; None -> the family's documented default
        position: [B, M, D] positional query embeddings; None -> derived from ``boxes``
        self_attn_mask: [M, M] bool, True = may NOT attend (keeps groups of points apart)
        returns   Predictions with logits [L, B, M, K], boxes [L, B, M, 4]
        """
        raise NotImplementedError

    # ---- per-family pieces (called by forward) --------------------------------------------
    def _predictions(self, rec: dict[str, Any], hf_out: Any) -> tuple[Predictions, Predictions | None]:
        """(detection-query predictions, denoising predictions or None) from recorded calls."""
        raise NotImplementedError

    def _memory(self, rec: dict[str, Any]) -> EncoderMemory:
        raise NotImplementedError

    def _queries(self, rec: dict[str, Any]) -> Queries:
        raise NotImplementedError

    def _attention_hooks(self, rec: dict[str, Any]) -> list[tuple[nn.Module, str, Callable[..., Any]]]:
        """Hooks that record what ``_attention`` needs from the first decoder layer."""
        raise NotImplementedError

    def _attention(self, rec: dict[str, Any], memory: EncoderMemory) -> Tensor:
        """[B, Q, N] head-averaged first-layer cross-attention of the detection queries."""
        raise NotImplementedError


def _record_inputs(rec: dict[str, Any], name: str) -> Callable[..., None]:
    """Pre-hook that stores a module's keyword arguments in ``rec[name]``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if args:
            raise RuntimeError(f"{type(module).__name__} was called with positional arguments; "
                               "detrkd expects keyword calls (transformers 5.x)")
        rec[name] = dict(kwargs)

    return hook


class NonFinitePredictions(ValueError):
    """The decoder's output is NaN / inf (a diverged model): raised before the detector's loss,
    whose matcher and box checks would fail on it with a tensor dump."""


def _record_output(rec: dict[str, Any], name: str, check_finite: bool = False) -> Callable[..., None]:
    """Forward hook that stores a module's output in ``rec[name + '_out']``; ``check_finite``:
    raise ``NonFinitePredictions`` if any floating tensor of the output is not finite."""

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        rec[name + "_out"] = output
        if check_finite and not _all_finite(output):
            raise NonFinitePredictions(f"the {name} output is not finite (NaN / inf): the model has diverged")

    return hook


def _all_finite(output: Any) -> bool:
    """True if every floating tensor in a (HF ModelOutput / tuple / tensor) output is finite."""
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (tuple, list)) else [output]
    return all(bool(torch.isfinite(v).all()) for v in values if isinstance(v, Tensor) and v.is_floating_point())


def additive_mask(blocked: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """[M, M] bool (True = blocked) -> [1, 1, M, M] additive float mask for HF eager/SDPA attention."""
    if blocked is None:
        return None
    mask = torch.zeros(blocked.shape, dtype=dtype, device=blocked.device)
    return mask.masked_fill(blocked, torch.finfo(dtype).min)[None, None]


def sine_box_embedding(boxes: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """Fixed sine embedding of normalised boxes: [..., 4] -> [..., dim] (dim/4 per coordinate)."""
    per_coord = dim // 4
    dim_t = torch.arange(per_coord, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / per_coord)
    pos = boxes.float()[..., None] * (2 * math.pi) / dim_t  # [..., 4, per_coord]
    pos = torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(-3)
    return pos.to(boxes.dtype)


def thaw_batch_norms(module: nn.Module) -> int:
    """Replace HF's ``*FrozenBatchNorm2d`` (affine and statistics as fixed buffers) by trainable
    ``nn.BatchNorm2d`` with the same values, in place; returns how many were replaced.

    HF freezes backbone BatchNorm because it expects an ImageNet-pretrained backbone; a preset
    trained from scratch would otherwise have no working normalisation at all. The state-dict keys
    are unchanged (HF's frozen layers drop ``num_batches_tracked`` on load), so a model saved with
    ``save_pretrained`` still loads into the plain HF class, with frozen statistics.
    """
    replaced = 0
    for name, child in module.named_children():
        if type(child).__name__.endswith("FrozenBatchNorm2d"):
            bn = nn.BatchNorm2d(child.weight.shape[0], eps=1e-5).to(child.weight.device)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(bn, key).copy_(getattr(child, key))
            bn.thawed_from_frozen = True  # its num_batches_tracked is not HF's: left out on save
            setattr(module, name, bn)
            replaced += 1
        else:
            replaced += thaw_batch_norms(child)
    return replaced


@contextlib.contextmanager
def forward_hooks(hooks: list[tuple[nn.Module, str, Callable[..., Any]]]) -> Iterator[None]:
    """Register hooks for the duration of a ``with`` block and always remove them.

    hooks: (module, kind, fn) with kind "pre" (forward pre-hook with kwargs) or "post"
    (forward hook with kwargs); fn follows torch's ``with_kwargs=True`` signatures.
    """
    handles = []
    try:
        for module, kind, fn in hooks:
            register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
            handles.append(register(fn, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hf_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` as the HF class expects it: without the ``num_batches_tracked`` of
    BatchNorm layers detrkd thawed (``thaw_batch_norms``), which HF's frozen BatchNorm does not
    have (transformers would report them as unexpected keys on load)."""
    dropped = {f"{name}.num_batches_tracked" for name, m in model.named_modules()
               if getattr(m, "thawed_from_frozen", False)}
    return {k: v for k, v in model.state_dict().items() if k not in dropped}


def count_hooks(module: nn.Module) -> int:
    """Total forward (pre-)hooks on a module tree; used by tests to prove hooks are removed."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())
