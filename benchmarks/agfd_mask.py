"""Where does AGFD's foreground mask put the feature loss, compared with FitNet's whole map?

In the paper setting, the GQS-masked BN feature loss (AGFD, 0.651 AP) is level with no-KD (0.652)
while the same loss without the mask (the fitnet row, BN: ``mask: none``, 0.695) gains 4.3 AP.
This measures the mask the distillation uses (``detrkd.distill.agfd.foreground_mask`` on the
paper teacher, GQS at threshold 0 with the (1 + G) weight, the teacher's own matcher costs) on
the first 48 training images, per image and then averaged:

- support: exp(entropy of W / sum W) as a share of the N tokens (1 = uniform, FitNet's weighting);
- top90: the smallest share of tokens that holds 90% of the mask's mass;
- in_gt: the mask's mass on tokens whose cell centre lies in a GT box, against the share of
  tokens that do (the mask's foreground gain);
- per level: the mask's mass on each encoder level (RT-DETR: strides 8 / 16 / 32), against the
  level's share of the tokens;
- gradient share: the loss is MSE(BN(N W F_t), BN(N W F_s)), so a token's gradient scales with
  N W; the share of tokens with N W above 0.1 (a tenth of FitNet's uniform weight 1).

The same for mask "all" (every query) and "positives". Output: benchmarks/results/paper/agfd_mask.txt.

    OMP_NUM_THREADS=1 python benchmarks/agfd_mask.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from detrkd.bench.overhead import fixed_batch
from detrkd.distill.agfd import chosen_queries, foreground_mask
from detrkd.distill.query_selection import group_query_selection
from detrkd.matching import matcher_costs
from detrkd.models import load_detector

TEACHER = "runs/paper_digits_teacher/last.pt"
IMAGES = 48


def token_centres(spatial_shapes: Tensor) -> Tensor:
    """[N, 2] (x, y) cell centres, normalised to the (square, unpadded) input, level after level."""
    cells = []
    for h, w in spatial_shapes.tolist():
        ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
        cells.append(torch.stack([xs, ys], -1).reshape(-1, 2))
    return torch.cat(cells)


def in_any_box(centres: Tensor, boxes: Tensor) -> Tensor:
    """[N] bool: the centre lies in one of the cxcywh ``boxes`` [G, 4]."""
    if boxes.numel() == 0:
        return torch.zeros(len(centres), dtype=torch.bool)
    lo, hi = boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2
    c = centres[:, None]
    return ((c >= lo) & (c <= hi)).all(-1).any(-1)


def mask_stats(w: Tensor, fg: Tensor, level_of: Tensor, levels: int) -> dict[str, float]:
    """Statistics of one image's mask ``w`` [N] (module docstring); fg [N] bool; level_of [N] long."""
    n = w.numel()
    p = w / w.sum()
    entropy = -(p * p.clamp(min=1e-30).log()).sum()
    top = p.sort(descending=True).values.cumsum(0)
    out = {"support": float(entropy.exp()) / n, "top90": float((top < 0.9).sum() + 1) / n,
           "in_gt": float(p[fg].sum()), "gt_tokens": float(fg.float().mean()),
           "grad_share": float((n * w > 0.1).float().mean())}
    for lvl in range(levels):
        out[f"level{lvl}"] = float(p[level_of == lvl].sum())
    return out


def main() -> None:
    torch.set_num_threads(1)
    teacher = load_detector(TEACHER, image_size=256).eval()
    batch = fixed_batch(IMAGES, 256, Path("data/digits"), 10, "rt_detr")
    rows: dict[str, list[dict[str, float]]] = {"gqs": [], "all": [], "positives": []}
    for i in range(0, IMAGES, 8):
        targets = batch["labels"][i:i + 8]
        with torch.no_grad():
            out = teacher(batch["pixel_values"][i:i + 8], batch["pixel_mask"][i:i + 8], with_attention=True)
        assert not out.memory.padding_mask.any(), "square unpadded inputs expected"
        sel = group_query_selection(out.predictions.logits[-1], out.predictions.boxes[-1],
                                    [{"class_labels": t["class_labels"], "boxes": t["boxes"]} for t in targets],
                                    out.class_head, 0.0, costs=matcher_costs(teacher.config))
        shapes = out.memory.spatial_shapes
        centres = token_centres(shapes)
        level_of = torch.arange(len(shapes)).repeat_interleave(shapes[:, 0] * shapes[:, 1])
        for kind in rows:
            w = foreground_mask(out.cross_attention.float(), chosen_queries(sel, kind), sel.giou)
            for b, t in enumerate(targets):
                if sel.num_gt[b] > 0:
                    rows[kind].append(mask_stats(w[b], in_any_box(centres, t["boxes"]), level_of, len(shapes)))
    token_share = [float(s) for s in (shapes[:, 0] * shapes[:, 1]).float() / centres.shape[0]]
    print(f"paper teacher {TEACHER}, {IMAGES} training images, N = {centres.shape[0]} tokens, levels "
          f"{shapes.tolist()} (token shares {[round(s, 3) for s in token_share]}); means over images with GT")
    for kind, stats in rows.items():
        mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
        print(kind, {k: round(v, 3) for k, v in mean.items()}, flush=True)


if __name__ == "__main__":
    main()
