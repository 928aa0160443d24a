"""FitNet-style feature distillation into a torchvision CNN student: its FPN maps regress the DETR
teacher's encoder memory through a learned connector (FitNet's regressor), at the same places of
the image.

    L = MSE( norm(F_teacher), norm(connector(F_student sampled at the teacher's tokens)) )

For every chosen level of the teacher's memory (``EncoderMemory``: tokens on an H x W grid per
level) the student's FPN level of the nearest resolution over the image is used: the one whose
count of tokens across the un-padded image is closest (in log scale) to the teacher level's (for
the batch's first image), i.e. the same stride when both models see the same image size. The student's map is sampled
bilinearly (``grid_sample``) at the centre of each teacher token, in normalised image coordinates
((j + 0.5) / w_valid, (i + 0.5) / h_valid of the teacher level's un-padded tokens), mapped into the
student's own image and padded map: teacher and student may see different input sizes or
padding (a square-resized RT-DETR teacher and a multi-scale-trained CNN student) and still compare
the same image locations. When both grids coincide the sampling reads the student's values
exactly. Token centres are exact when an image side is a multiple of the level's stride (else off
by less than one token). Padding tokens of the teacher are excluded.

The connector is a Linear from the FPN width to the teacher's memory width (a 1 x 1 convolution on
the sampled maps), shared by all levels (the FPN levels share their width); ``connector: auto``
creates it only when the widths differ. ``normalise`` = "none" (FitNet) or "batch_norm" (AGFD's
affine-free BN of the tokens, per channel over the valid tokens). Shared with ``fitnet``:
``features.masked_feature_mse``. Unweighted: one term, ``feature``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.base import EncoderMemory
from .base import DistillContext, DistillMethod
from .features import connector as make_connector
from .features import masked_feature_mse, width_and_layer


def teacher_levels(memory: EncoderMemory) -> list[tuple[Tensor, Tensor, int, int]]:
    """Per level: (tokens [B, H*W, D], valid [B, H*W] bool, H, W)."""
    out = []
    for (h, w), start in zip(memory.spatial_shapes.tolist(), memory.level_start.tolist()):
        span = slice(start, start + h * w)
        out.append((memory.tokens[:, span], ~memory.padding_mask[:, span], h, w))
    return out


def valid_extent(valid: Tensor, h: int, w: int) -> Tensor:
    """[B, H*W] bool -> [B, 2] (rows, columns) of un-padded tokens (padding is bottom / right)."""
    grid = valid.view(-1, h, w)
    return torch.stack((grid.any(2).sum(1), grid.any(1).sum(1)), dim=1).clamp(min=1)


def nearest_level(features: dict[str, Tensor], padded: tuple[int, int], image: tuple[int, int],
                  columns: float) -> str:
    """The FPN level whose token count across the un-padded ``image`` width is closest (log2) to
    ``columns`` (the teacher level's)."""
    def across(f: Tensor) -> float:
        return image[1] / (padded[1] / f.shape[-1])

    return min(features, key=lambda name: abs(math.log2(across(features[name]) / columns)))


def sample_at_tokens(feature: Tensor, padded: tuple[int, int], sizes: Tensor, extent: Tensor, h: int, w: int) -> Tensor:
    """The student map sampled at the teacher tokens' image positions: feature [B, D, Hs, Ws] over a
    padded ``padded`` (H, W) pixel canvas, sizes [B, 2] the student's un-padded (h, w), extent
    [B, 2] the teacher level's un-padded token rows / columns -> [B, H*W, D]."""
    device, dtype = feature.device, feature.dtype
    rows = (torch.arange(h, device=device, dtype=dtype) + 0.5)[None] / extent[:, :1].to(dtype)  # [B, H]
    cols = (torch.arange(w, device=device, dtype=dtype) + 0.5)[None] / extent[:, 1:].to(dtype)  # [B, W]
    sizes = sizes.to(device=device, dtype=dtype)
    # image fraction -> student pixels -> grid_sample's [-1, 1] over the padded map (align_corners=False)
    gy = 2 * rows * sizes[:, :1] / padded[0] - 1
    gx = 2 * cols * sizes[:, 1:] / padded[1] - 1
    grid = torch.stack((gx[:, None, :].expand(-1, h, -1), gy[:, :, None].expand(-1, -1, w)), dim=-1)
    sampled = F.grid_sample(feature, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return sampled.flatten(2).transpose(1, 2)


class FPNFitNet(DistillMethod):
    """FitNet from a DETR teacher's memory into a CNN student's FPN; ``forward(ctx) -> {"feature"}``.

    student, teacher: the models, or their widths (ints). levels: "all" | teacher level indices;
    connector: "auto" | "always" | "none"; normalise: "none" | "batch_norm"; eps: for batch_norm.
    """

    student_kinds: ClassVar[tuple[str, ...]] = ("cnn",)
    terms = {"feature": 1.0}

    def __init__(self, student: Any, teacher: Any, *, levels: Literal["all"] | Sequence[int] = "all",
                 connector: Literal["auto", "always", "none"] = "auto",
                 normalise: Literal["none", "batch_norm"] = "none", eps: float = 1e-5):
        super().__init__()
        self.levels = levels if levels == "all" else tuple(int(x) for x in levels)
        t_width, s_width = width_and_layer(teacher)[0], width_and_layer(student)[0]  # (a CNN's: its FPN width)
        if connector == "none" and t_width != s_width:
            raise ValueError(f"fpn_fitnet: the student FPN width {s_width} differs from the teacher's {t_width} and "
                             f"connector is 'none'; use connector: auto (a learned Linear {s_width} -> {t_width})")
        self.connector = make_connector(s_width, t_width, always=connector == "always") if connector != "none" else None
        self.normalise, self.eps = normalise, float(eps)

    def chosen(self, count: int) -> list[int]:
        if self.levels == "all":
            return list(range(count))
        bad = [lvl for lvl in self.levels if not -count <= lvl < count]
        if bad:
            raise ValueError(f"fpn_fitnet levels {bad} out of range: the teacher memory has {count} level(s)")
        return [lvl % count for lvl in self.levels]

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        out = ctx.student_out
        levels = teacher_levels(ctx.teacher_out.memory)
        sizes = torch.tensor(out.image_sizes)
        teacher, student, valid = [], [], []
        for index in self.chosen(len(levels)):
            tokens, keep, h, w = levels[index]
            extent = valid_extent(keep, h, w)
            name = nearest_level(out.features, out.padded_size, out.image_sizes[0], float(extent[0, 1]))
            student.append(sample_at_tokens(out.features[name], out.padded_size, sizes, extent, h, w))
            teacher.append(tokens.detach())
            valid.append(keep)
        s = torch.cat(student, 1)
        s = s if self.connector is None else self.connector(s)
        t = torch.cat(teacher, 1).to(s.dtype)
        keep = torch.cat(valid, 1).to(s.device)
        weight = torch.ones(keep.shape, dtype=s.dtype, device=s.device)
        return {"feature": masked_feature_mse(s, t, weight, keep, self.normalise == "batch_norm", self.eps)}

    def extra_repr(self) -> str:
        return f"levels={self.levels}, normalise={self.normalise}"
