"""Dense attention maps over encoder tokens.

Dense-attention families (DETR, Conditional, DAB) give cross-attention weights [B, heads, Q, N]
directly. Deformable attention has no dense map: each query samples P points per head and level at
fractional locations with softmax weights. Following Sparse-DETR's attention-map utility, each
sample's weight is splatted bilinearly onto the four nearest tokens of its level; the result is a
distribution over the N memory tokens per query (rows sum to 1 after head averaging, except for the
mass of samples that fall wholly outside the feature map, which is renormalised away).
"""

from __future__ import annotations

import torch
from torch import Tensor


def dense_attention_map(weights: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """Head-averaged dense cross-attention.

    weights: [B, heads, Q, N] softmax weights (rows sum to 1 per head)
    padding_mask: [B, N] bool, True = padding token (forced to 0, rows renormalised)
    returns [B, Q, N], rows sum to 1
    """
    attn = weights.float().mean(dim=1)
    if padding_mask is not None:
        attn = attn.masked_fill(padding_mask[:, None, :], 0.0)
    return attn / attn.sum(-1, keepdim=True).clamp(min=1e-12)


def splat_deformable_attention(
    locations: Tensor,
    weights: Tensor,
    spatial_shapes: Tensor,
    level_start: Tensor,
    padding_mask: Tensor | None = None,
) -> Tensor:
    """Rasterise deformable-attention samples onto the token grid.

    locations: [B, Q, heads, S, P, 2] sampling locations (x, y) normalised to [0, 1] per level
               (pixel-centre convention of ``grid_sample(align_corners=False)``)
    weights:   [B, Q, heads, S, P] attention weights (sum to 1 over S * P per head)
    spatial_shapes: [S, 2] (H, W); level_start: [S]
    padding_mask: [B, N] bool, True = padding token; padding reads zeros in the model, so its share
                  is dropped and rows renormalised
    returns [B, Q, N] head-averaged map, rows sum to 1 (0 if every sample fell outside)
    """
    b, q, heads, levels, points, _ = locations.shape
    num_tokens = int((spatial_shapes[:, 0] * spatial_shapes[:, 1]).sum())
    out = locations.new_zeros(b, q, num_tokens, dtype=torch.float32)
    for lvl in range(levels):
        h, w = (int(v) for v in spatial_shapes[lvl])
        start = int(level_start[lvl])
        # token-grid coordinates: grid_sample(align_corners=False) puts pixel i's centre at (i+0.5)/W
        x = locations[:, :, :, lvl, :, 0].float() * w - 0.5  # [B, Q, heads, P]
        y = locations[:, :, :, lvl, :, 1].float() * h - 0.5
        wt = weights[:, :, :, lvl, :].float()
        x0, y0 = x.floor(), y.floor()
        for dx in (0, 1):
            for dy in (0, 1):
                xi, yi = x0 + dx, y0 + dy
                bilinear = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
                inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
                contrib = (wt * bilinear * inside).flatten(2)  # [B, Q, heads * P]
                index = (start + yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().flatten(2)
                out.scatter_add_(2, index, contrib)
    if padding_mask is not None:
        out = out.masked_fill(padding_mask[:, None, :], 0.0)
    return out / out.sum(-1, keepdim=True).clamp(min=1e-12)
