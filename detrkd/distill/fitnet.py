"""FitNet-style feature distillation (a baseline): plain MSE between the student's and the teacher's
encoder memory tokens, through a learned connector when the widths differ.

    L = MSE( norm(F_teacher), norm(connector(F_student)) )   over the valid tokens of the chosen levels

F are the encoder memory tokens [B, N, D] (``EncoderMemory``); the connector is a Linear from the
student width to the teacher width (a 1x1 convolution on each level's map; FitNet's "regressor").
``connector="auto"`` creates it only when the widths differ, ``"always"`` also for equal widths,
``"none"`` never (and then differing widths are an error at construction). ``normalise`` =
"none" (FitNet: raw features) or "batch_norm" (AGFD's affine-free BN of the tokens, per channel
over the batch's valid tokens). ``levels`` = "all" or a list of level indices (negative counts
from the last) into the memory's ``spatial_shapes``.

Teacher and student must share the token grid (same input and the same feature strides): a
mismatch raises ValueError naming both grids. Resampling one grid onto the other is not done on
purpose: families differ in the NUMBER of levels too (DETR: 1, Deformable: 4, RT-DETR: 3), so any
resampling rule would be a silent design choice; pick matching families/strides instead (or
``levels`` where both share those levels). Padding tokens of either model are excluded. This is
``agfd`` with ``mask: none`` minus its defaults (BN on, adapter option): both reuse
``features.masked_feature_mse``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

from ..models.base import DetrAdapter, EncoderMemory
from .base import DistillContext, DistillMethod
from .features import (check_fitnet_options, check_same_grid, fitnet_connector, masked_feature_mse,
                       width_and_layer)


def level_token_mask(memory: EncoderMemory, levels: Sequence[int]) -> Tensor:
    """[N] bool: True on the tokens of the given levels (indices into ``spatial_shapes``)."""
    shapes = memory.spatial_shapes
    count = shapes.shape[0]
    bad = [lvl for lvl in levels if not -count <= lvl < count]
    if bad:
        raise ValueError(f"FitNet levels {bad} out of range: the memory has {count} level(s) "
                         f"(spatial_shapes {shapes.tolist()})")
    chosen = torch.zeros(count, dtype=torch.bool, device=shapes.device)
    chosen[[lvl % count for lvl in levels]] = True
    return chosen.repeat_interleave(shapes[:, 0] * shapes[:, 1])


class FitNet(DistillMethod):
    """FitNet feature MSE; ``forward(ctx) -> {"feature": loss}`` (module docstring: the rules).

    teacher, student: the adapters, or their memory widths (ints). levels: "all" | list of ints;
    connector: "auto" | "always" | "none"; normalise: "none" | "batch_norm"; eps: for batch_norm.
    """

    compares_memory = True

    def __init__(self, teacher: DetrAdapter | int, student: DetrAdapter | int, *,
                 levels: Literal["all"] | Sequence[int] = "all",
                 connector: Literal["auto", "always", "none"] = "auto",
                 normalise: Literal["none", "batch_norm"] = "none", eps: float = 1e-5):
        super().__init__()
        self.levels = check_fitnet_options("fitnet", levels, connector, normalise)
        t_width, s_width = width_and_layer(teacher)[0], width_and_layer(student)[0]
        self.connector = fitnet_connector("fitnet", connector, s_width, t_width)
        self.teacher_width, self.student_width = t_width, s_width
        self.normalise, self.eps = normalise, float(eps)

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        t_mem, s_mem = ctx.teacher_out.memory, ctx.student_out.memory
        check_same_grid(ctx.teacher_out, ctx.student_out, "FitNet")
        valid = ~(t_mem.padding_mask | s_mem.padding_mask.to(t_mem.padding_mask.device))  # [B, N]
        if self.levels != "all":
            valid = valid & level_token_mask(t_mem, self.levels)[None]
        student = self.student_features(s_mem.tokens)
        teacher = t_mem.tokens.detach().to(student.dtype)
        weight = torch.ones(valid.shape, dtype=student.dtype, device=student.device)
        return {"feature": masked_feature_mse(teacher, student, weight, valid, self.normalise == "batch_norm",
                                              self.eps)}

    def student_features(self, tokens: Tensor) -> Tensor:
        """[B, N, D_s] -> [B, N, D_t] through the connector (if any)."""
        if tokens.shape[-1] != self.student_width:
            raise ValueError(f"FitNet was built for a student width {self.student_width}, "
                             f"but the student memory has width {tokens.shape[-1]}")
        return tokens if self.connector is None else self.connector(tokens)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, normalise={self.normalise}"
