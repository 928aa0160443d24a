"""Attention-Guided Feature Distillation (AGFD), QSKD Sec. 3.3, Eq. 4-6.

Per image, a foreground mask over the encoder tokens is built from the teacher's first-decoder-layer
cross-attention of the queries that Group Query Selection picks on the teacher's final predictions:

    W = (1 / |I~|) * sum_{i in I~} (1 + G_i) * A_i                                      (Eq. 4)
    L = MSE( BN(W * F_teacher), BN(W * E_a(connector(F_student))) )                   (Eq. 5, 6)

F are the encoder memory tokens [B, N, D]; BN is an affine-free batch norm with the statistics of
the batch's valid (non-padding) tokens per channel; E_a is one transformer encoder layer (the
"adapter", Table 8) and the connector a Linear created when the widths differ.

Table 5 switches: ``mask`` = "gqs" (positives + hard negatives with G > ``threshold``), "all" (every
query), "positives", "easy_negatives", or "none" (W = 1: plain feature MSE, the paper's baseline);
``giou_weight`` toggles the (1 + G_i) factor.

The adapter is off by default: the paper's main results distil students whose encoder is as deep
as the teacher's, and add E_a only for shallower students (Sec. 4.4, Table 8: 0 or 3 layers vs 6).
It is a dense attention layer over all N memory tokens, so on multi-scale memory (RT-DETR at
256 px: N = 1344) it costs about as much as the tiny student's own forward pass (measured on 2
CPU cores); turn it on (``adapter: true``) for a student with fewer encoder layers.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import DetrAdapter, sine_box_embedding
from .base import DistillContext, DistillMethod
from .features import check_same_grid, connector, masked_feature_mse, width_and_layer
from .query_selection import QuerySelection

MaskKind = Literal["gqs", "all", "positives", "easy_negatives", "none"]
MASK_KINDS: tuple[str, ...] = ("gqs", "all", "positives", "easy_negatives", "none")


# ---- the mask (Eq. 4) ---------------------------------------------------------------------------


def chosen_queries(selection: QuerySelection, mask: MaskKind) -> Tensor:
    """[B, Q] bool: the queries I~ that build the mask of one Table 5 row.

    gqs: positives + hard negatives; all: every query, also in images without GT (where G = -1, so
    with the (1 + G) weight they add nothing); positives / easy_negatives: that subset.
    ("none" chooses no queries: see ``AGFD.token_mask``.)
    """
    if mask == "gqs":
        return selection.selected
    if mask == "all":
        return torch.ones_like(selection.positive)
    if mask == "positives":
        return selection.positive
    if mask == "easy_negatives":
        return selection.easy_negative
    raise ValueError(f"mask {mask!r} selects no queries; choose one of {MASK_KINDS}")


def foreground_mask(attention: Tensor, chosen: Tensor, giou: Tensor | None = None,
                    padding_mask: Tensor | None = None) -> Tensor:
    """Eq. 4 for a batch: W [B, N] = sum_i c_i (1 + G_i) A_i / sum_i c_i per image.

    attention: [B, Q, N] (rows sum to 1); chosen: [B, Q] bool (c_i); giou: [B, Q] G_i, or None for
    weight 1 instead of 1 + G_i; padding_mask: [B, N] bool, True = padding (W forced to 0 there).
    An image with no chosen query gets W = 0 (it contributes nothing but zeros to the loss).
    """
    weight = chosen.to(attention.dtype)
    if giou is not None:
        weight = weight * (1 + giou.to(attention.dtype))
    w = torch.einsum("bq,bqn->bn", weight, attention) / chosen.sum(1).clamp(min=1)[:, None]
    return w if padding_mask is None else w.masked_fill(padding_mask, 0.0)


# ---- the loss (Eq. 5) ---------------------------------------------------------------------------


# ---- learned parts: connector and adapter (Eq. 6) ---------------------------------------------------


def token_positions(spatial_shapes: Tensor, dim: int) -> Tensor:
    """Fixed sine embedding [N, dim] of each token's cell as a box (cx, cy, 1/W, 1/H) on its level's
    grid: the box size tells the levels apart, so no learned level embedding is needed."""
    boxes = []
    for h, w in spatial_shapes.tolist():
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        cell = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h,
                            torch.full_like(xs, 1, dtype=torch.float) / w,
                            torch.full_like(ys, 1, dtype=torch.float) / h], -1)
        boxes.append(cell.reshape(-1, 4).float())
    emb = sine_box_embedding(torch.cat(boxes).to(spatial_shapes.device), dim)
    return F.pad(emb, (0, dim - emb.shape[-1]))  # dims not divisible by 8: zero-pad the tail


class EncoderLayerAdapter(nn.Module):
    """E_a: one post-norm transformer encoder layer (DETR's), dense self-attention over all tokens
    with fixed sine token positions added to queries and keys, padding keys masked.

    x: [B, N, D], spatial_shapes: [S, 2], padding_mask: [B, N] bool -> [B, N, D].
    Dense attention costs O(N^2) per image: fine for single-scale memories (DETR-like, ~1k tokens);
    multi-scale memories (RT-DETR at 640 px: 8400 tokens) are expensive (a deformable E_a is future work).
    """

    def __init__(self, width: int, heads: int, ffn: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.ffn = nn.Sequential(nn.Linear(width, ffn), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn, width))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, spatial_shapes: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        q = x + token_positions(spatial_shapes, x.shape[-1]).to(x.dtype)
        h = self.attn(q, q, x, key_padding_mask=padding_mask, need_weights=False)[0]
        x = self.norm1(x + self.dropout(h))
        return self.norm2(x + self.dropout(self.ffn(x)))


# ---- the method -----------------------------------------------------------------------------------


class AGFD(DistillMethod):
    """Attention-Guided Feature Distillation: ``forward(ctx) -> {"feature": loss}`` (before lambda;
    the paper's lambda_AGFD = 50 is the ``Distiller`` weight).

    student, teacher: the adapters, or their memory widths (ints).
    mask: Table 5 row (module docstring); threshold: GQS hard-negative threshold (G > threshold);
    giou_weight: the (1 + G_i) factor; batch_norm: affine-free BN of the masked features (eps).
    adapter: one encoder layer E_a on the (connected) student feature, at the teacher width, with the
      teacher's encoder head count and FFN width (E_a imitates one teacher encoder layer;
      ``adapter_heads`` / ``adapter_ffn`` override; defaults 8 and 4 * width when widths are ints;
      heads are reduced to gcd(width, heads) if they do not divide the width).
    A connector (Linear student width -> teacher width) is created when the widths differ.

    Mask scale: Eq. 4 gives W ~ 1/N per token, so W * F has a tiny variance that BN's eps would
    dominate. The loss uses N * W (N = memory length, one constant for the batch): BN removes a
    global scale exactly up to eps, and without BN the masked features keep a token-mean weight
    O(1) (mask="none" uses W = 1). ``foreground_mask`` returns Eq. 4 unscaled.

    Teacher and student must share the token grid (``spatial_shapes``); a mismatch raises
    ValueError (interpolating one grid onto the other is future work). Padding tokens (of either
    model) are excluded from the mask, the BN statistics and the mean.
    """

    compares_memory = True
    needs_teacher_attention = True
    terms = {"feature": 1.0}

    def __init__(self, student: DetrAdapter | int, teacher: DetrAdapter | int, mask: MaskKind = "gqs",
                 threshold: float = 0.0, giou_weight: bool = True, adapter: bool = False,
                 batch_norm: bool = True, adapter_heads: int | None = None,
                 adapter_ffn: int | None = None, eps: float = 1e-5):
        super().__init__()
        t_width, t_heads, t_ffn = width_and_layer(teacher)
        s_width, _, _ = width_and_layer(student)
        self.mask, self.threshold, self.giou_weight = mask, float(threshold), giou_weight
        self.batch_norm, self.eps = batch_norm, eps
        self.teacher_width, self.student_width = t_width, s_width
        self.connector = connector(s_width, t_width)
        self.adapter: EncoderLayerAdapter | None = None
        if adapter:
            heads = math.gcd(t_width, adapter_heads or t_heads or 8)
            self.adapter = EncoderLayerAdapter(t_width, heads, adapter_ffn or t_ffn or 4 * t_width)

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        t_mem, s_mem = ctx.teacher_out.memory, ctx.student_out.memory
        check_same_grid(ctx.student_out, ctx.teacher_out)
        if t_mem.tokens.shape[-1] != self.teacher_width:
            connector = (f"a connector {self.student_width} -> {self.teacher_width}" if self.connector is not None
                         else "no connector")
            raise ValueError(f"AGFD was built for a teacher width {self.teacher_width} ({connector}), but the "
                             f"teacher memory has width {t_mem.tokens.shape[-1]}: build AGFD from the teacher "
                             f"and student it distils (a connector is created when their widths differ)")
        valid = ~(t_mem.padding_mask | s_mem.padding_mask.to(t_mem.padding_mask.device))
        weight = self.token_mask(ctx)
        if self.mask != "none":
            weight = weight * t_mem.tokens.shape[1]  # N * W: see the class docstring
        student = self.student_features(s_mem.tokens, s_mem.spatial_shapes, ~valid)
        loss = masked_feature_mse(student, t_mem.tokens.detach().to(student.dtype), weight.to(student.dtype),
                                  valid, self.batch_norm, self.eps)
        return {"feature": loss}

    def token_mask(self, ctx: DistillContext) -> Tensor:
        """W [B, N] of Eq. 4 (unscaled) for the configured Table 5 row; 0 on padding;
        mask="none": 1 on every valid token."""
        memory = ctx.teacher_out.memory
        if self.mask == "none":
            return (~memory.padding_mask).to(memory.tokens.dtype)
        attention = ctx.teacher_out.cross_attention
        if attention is None:
            raise ValueError("AGFD needs the teacher's cross-attention: run the teacher with "
                             "with_attention=True (the Distiller does, as AGFD.needs_teacher_attention)")
        selection = ctx.selection("teacher", -1, self.threshold)
        chosen = chosen_queries(selection, self.mask).to(attention.device)
        giou = selection.giou.to(attention.device) if self.giou_weight else None
        return foreground_mask(attention.detach().float(), chosen, giou, memory.padding_mask)

    def student_features(self, tokens: Tensor, spatial_shapes: Tensor, padding_mask: Tensor) -> Tensor:
        """[B, N, D_s] student memory -> [B, N, D_t]: connector (if widths differ), then E_a."""
        if tokens.shape[-1] != self.student_width:
            raise ValueError(f"AGFD was built for a student width {self.student_width}, "
                             f"but the student memory has width {tokens.shape[-1]}")
        x = tokens if self.connector is None else self.connector(tokens)
        return x if self.adapter is None else self.adapter(x, spatial_shapes, padding_mask)
