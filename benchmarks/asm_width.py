"""How wide must the Active Sampling Module be to sample sharply (Eq. 16) at Qt queries?

The active-sampling overhead at 900 queries is dominated by Q x Q x dim products (the teacher's
self-attention for the sampling loss and the student sampling, forward and backward) and by the ASM
MLP, so a narrower ASM (``hidden`` / ``dim``) is the obvious way to make it cheaper. This measures
what that costs: the paper-setting teacher (``runs/paper_digits_teacher``) is run with ``Qt``
queries on 48 training images; a fresh ASM per size is trained for 400 steps (AdamW, lr 1e-3, the
method's ``asm_lr``, batch 8) on 40 of them with the sampling loss alone, then scored on the other 8:
held-out Eq. 16 NLL (ln Qt = uniform) and the share of points whose own output gets the largest
weight. Output: benchmarks/results/overhead/asm_width.txt.

    OMP_NUM_THREADS=1 python benchmarks/asm_width.py QT '[{}, {"dim": 64}]'
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

from detrkd.bench.overhead import fixed_batch
from detrkd.distill.active_sampling import (
    ActiveSampling,
    diagonal_nll,
    layer_vectors,
    sampling_logits,
)
from detrkd.models import load_detector

TEACHER = "runs/paper_digits_teacher/last.pt"


def teacher_vectors(queries: int, images: int = 48) -> Tensor:
    """[images, queries, 4 + C] final-layer prediction vectors of the paper teacher run with ``queries``."""
    t = load_detector(TEACHER, image_size=256).eval()
    t.model.config.num_queries = queries
    if hasattr(t.model, "model"):
        t.model.model.config.num_queries = queries
    batch = fixed_batch(images, 256, Path("data/digits"), 10, "rt_detr")
    with torch.no_grad():
        ys = []
        for i in range(0, images, 8):
            out = t(batch["pixel_values"][i:i + 8], batch["pixel_mask"][i:i + 8])
            ys.append(layer_vectors(out, out.predictions.num_layers - 1))
    return torch.cat(ys)


def train_and_score(sizes: dict, train: Tensor, held: Tensor) -> tuple[list, float, float]:
    """A fresh ASM of ``sizes`` trained 400 steps on ``train``: (logged losses, held-out NLL, diagonal argmax share)."""
    torch.manual_seed(0)
    m = ActiveSampling(num_classes=10, **sizes)
    opt = torch.optim.AdamW(m.asm.parameters(), lr=1e-3)
    log = []
    for step in range(400):
        idx = torch.randint(0, len(train), (8,))
        q, k = m.asm(train[idx])
        loss = diagonal_nll(sampling_logits(q, k))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in (0, 50, 100, 200, 399):
            log.append((step, round(loss.item(), 3)))
    with torch.no_grad():
        q, k = m.asm(held)
        sc = sampling_logits(q, k)
        acc = (sc[:, 0].argmax(-1) == torch.arange(sc.shape[-1])).float().mean().item()
        return log, diagonal_nll(sc).item(), acc


def main() -> None:
    torch.set_num_threads(1)
    queries = int(sys.argv[1])
    ys = teacher_vectors(queries)
    print("vectors", ys.shape, flush=True)
    train, held = ys[:40], ys[40:]
    for sizes in (json.loads(sys.argv[2]) if len(sys.argv) > 2 else [{}]):
        log, nll, acc = train_and_score(sizes, train, held)
        print(sizes, "train", log, "held-out NLL", round(nll, 3), "diag argmax acc", round(acc, 3),
              "ln Q", round(math.log(queries), 3), flush=True)


if __name__ == "__main__":
    main()
