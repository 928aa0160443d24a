"""Feature-level building blocks shared by the feature-distillation methods (AGFD, FitNet): the
masked, batch-normalised token MSE, the memory width of a model, the connector between two widths
and the same-grid check.

Shapes: encoder memory tokens [B, N, D] (``models.base.EncoderMemory``), token weights [B, N],
valid (non-padding) tokens [B, N] bool.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import DetectorOutput, DetrAdapter


def token_batch_norm(x: Tensor, eps: float = 1e-5) -> Tensor:
    """Affine-free batch norm of tokens [P, D]: per channel, biased batch statistics over P
    (what ``F.batch_norm(training=True)`` without running stats computes, also for P = 1)."""
    mean = x.mean(0, keepdim=True)
    var = x.var(0, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def masked_feature_mse(student: Tensor, teacher: Tensor, weight: Tensor, valid: Tensor,
                       batch_norm: bool = True, eps: float = 1e-5) -> Tensor:
    """MSE(BN(w * F_s), BN(w * F_t)) over the valid tokens.

    student, teacher: [B, N, D]; weight: [B, N]; valid: [B, N] bool (False = padding, excluded from
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


def connector(student_width: int, teacher_width: int, always: bool = False) -> nn.Linear | None:
    """The learned Linear student width -> teacher width that brings the student's memory tokens
    [B, N, D_s] to the teacher's [B, N, D_t]: None when the widths agree (unless ``always``)."""
    return nn.Linear(student_width, teacher_width) if always or student_width != teacher_width else None


def check_same_grid(student_out: DetectorOutput, teacher_out: DetectorOutput, method: str = "AGFD") -> None:
    """Raise ValueError unless teacher and student memories lie on the same token grid."""
    t_shapes, s_shapes = teacher_out.memory.spatial_shapes, student_out.memory.spatial_shapes
    if t_shapes.shape != s_shapes.shape or not torch.equal(t_shapes.cpu(), s_shapes.cpu()):
        raise ValueError(
            f"{method} needs teacher and student encoder memories on the same token grid, but the teacher's "
            f"spatial_shapes (H, W per level) are {t_shapes.tolist()} and the student's are "
            f"{s_shapes.tolist()} (use the same feature levels/strides; interpolation is not supported yet)")
