"""Feature-level building blocks shared by the feature-distillation methods (AGFD, FitNet, FitNet on a
CNN student's FPN): the masked, batch-normalised token MSE, the memory width of a model, the
same-grid check, and FitNet's option checks and connector.

Shapes: encoder memory tokens [B, N, D] (``models.base.EncoderMemory``), token weights [B, N],
valid (non-padding) tokens [B, N] bool.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import DetectorOutput, DetrAdapter
from .base import check_choice


def token_batch_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Affine-free batch norm of tokens [P, D]: per channel, biased batch statistics over P
    (what ``F.batch_norm(training=True)`` without running stats computes, also for P = 1)."""
    mean = x.mean(0, keepdim=True)
    var = x.var(0, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def masked_feature_mse(teacher: Tensor, student: Tensor, weight: Tensor, valid: Tensor,
                       batch_norm: bool = True, eps: float = 1e-5) -> Tensor:
    """MSE(BN(w * F_t), BN(w * F_s)) over the valid tokens.

    teacher, student: [B, N, D]; weight: [B, N]; valid: [B, N] bool (False = padding, excluded from
    the statistics and the mean). Returns a scalar (0 with a graph when no token is valid).
    """
    t = (weight[..., None] * teacher)[valid]  # [P, D]
    s = (weight[..., None] * student)[valid]
    if s.shape[0] == 0:
        return student.sum() * 0.0
    if batch_norm:
        t, s = token_batch_norm(t, eps), token_batch_norm(s, eps)
    return F.mse_loss(s, t)


def width_and_layer(model: DetrAdapter | int) -> tuple[int, int | None, int | None]:
    """(memory width D, encoder heads, encoder FFN width) of an adapter; an int is just a width."""
    if isinstance(model, int):
        return model, None, None
    cfg = model.config
    return model.hidden_size, getattr(cfg, "encoder_attention_heads", None), getattr(cfg, "encoder_ffn_dim", None)


def check_same_grid(teacher_out: DetectorOutput, student_out: DetectorOutput, method: str = "AGFD") -> None:
    """Raise ValueError unless teacher and student memories lie on the same token grid."""
    t_shapes, s_shapes = teacher_out.memory.spatial_shapes, student_out.memory.spatial_shapes
    if t_shapes.shape != s_shapes.shape or not torch.equal(t_shapes.cpu(), s_shapes.cpu()):
        raise ValueError(
            f"{method} needs teacher and student encoder memories on the same token grid, but the teacher's "
            f"spatial_shapes (H, W per level) are {t_shapes.tolist()} and the student's are "
            f"{s_shapes.tolist()} (use the same feature levels/strides; interpolation is not supported yet)")


def check_fitnet_options(method: str, levels: Any, connector: str, normalise: str) -> tuple[int, ...] | str:
    """``ValueError`` naming ``method`` for a FitNet option outside its choices; returns ``levels``
    ("all" or a tuple of level indices)."""
    check_choice(method, "connector", connector, ("auto", "always", "none"))
    check_choice(method, "normalise", normalise, ("none", "batch_norm"))
    if levels == "all":
        return "all"
    if isinstance(levels, str) or not all(isinstance(x, int) for x in levels):
        raise ValueError(f"{method} levels must be 'all' or a list of level indices, got {levels!r}")
    return tuple(int(x) for x in levels)


def fitnet_connector(method: str, connector: str, student_width: int, teacher_width: int,
                     what: str = "memory") -> nn.Linear | None:
    """FitNet's regressor: a Linear student -> teacher width, made always (``"always"``), when the
    widths differ (``"auto"``) or never (``"none"``: differing widths are a ``ValueError``)."""
    if connector == "none" and student_width != teacher_width:
        raise ValueError(f"{method}: the student {what} width {student_width} differs from the teacher's "
                         f"{teacher_width} and connector is 'none'; use connector: auto (a learned Linear "
                         f"{student_width} -> {teacher_width})")
    make = connector == "always" or (connector == "auto" and student_width != teacher_width)
    return nn.Linear(student_width, teacher_width) if make else None
