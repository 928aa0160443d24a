"""How fast does the Active Sampling Module learn to sample sharply (Eq. 16), under the optimiser
settings of the digits runs (AdamW, peak lr, 300 warmup steps, cosine over 3000 steps)?

Offline and cheap: the digits teacher's final-layer prediction vectors of 8 val batches are cached,
then a fresh ASM (the default sizes) is trained on them with the sampling loss alone. Reports the
loss and the mean diagonal weight W_ii (how much of point i's sample is output i) at T = 1 and at
the distillation temperature T = 4. While W is uniform (W_ii = 1 / Qt) every sample is the set mean,
whatever T: the temperature sweep can only differ once the ASM has sharpened.

    OMP_NUM_THREADS=1 python benchmarks/asm_sharpening.py [PEAK_LR ...]   # default 2e-4 1e-3

Needs runs/digits_teacher/last.pt and data/digits (``make baseline``). Output of the run behind the
README: benchmarks/results/active_sampling/asm_sharpening.txt.
"""
from __future__ import annotations

import math
import sys

import torch
from as_points import teacher_and_val_batches  # benchmarks/ (the script's folder is on sys.path)

from detrkd.distill.active_sampling import ActiveSampling, _vectors, diagonal_nll, sampling_logits

STEPS, WARMUP, REPORT = 3000, 300, (1, 100, 300, 600, 1000, 2000, 3000)


def teacher_vectors(batches: int = 8) -> list[torch.Tensor]:
    """Final-layer prediction vectors [8, Qt, 4 + C] of the first ``batches`` val batches."""
    model, val = teacher_and_val_batches(batches)
    with torch.no_grad():
        return [_vectors(model(b["pixel_values"], b["pixel_mask"]), -1) for b in val]


def lr_at(step: int, peak: float) -> float:
    """Linear warmup then cosine decay, as ``optim.schedule: cosine`` in the digits configs."""
    if step <= WARMUP:
        return peak * step / WARMUP
    return peak * 0.5 * (1 + math.cos(math.pi * step / STEPS))


def diagonal_weight(scores: torch.Tensor, temperature: float) -> float:
    """Mean W_ii of self-attention scores [B, 1, Q, Q] at a temperature."""
    return (scores / temperature).softmax(-1).diagonal(dim1=-2, dim2=-1).mean().item()


def train(ys: list[torch.Tensor], peak: float) -> None:
    method = ActiveSampling(num_classes=ys[0].shape[-1] - 4)
    opt = torch.optim.AdamW(method.parameters(), lr=peak, weight_decay=1e-4)
    print(f"peak lr {peak:g}:  step  loss   W_ii(T=1)  W_ii(T=4)")
    for step in range(1, STEPS + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak)
        q, k = method.asm(ys[step % len(ys)])
        scores = sampling_logits(q, k)
        loss = diagonal_nll(scores)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in REPORT:
            print(f"{step:>19}  {loss.item():.3f}  {diagonal_weight(scores.detach(), 1):.3f}"
                  f"      {diagonal_weight(scores.detach(), 4):.3f}")


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    ys = teacher_vectors()
    print(f"teacher vectors {list(ys[0].shape)}; uniform sampling: loss ln(Qt) = {math.log(ys[0].shape[1]):.3f}, "
          f"W_ii = {1 / ys[0].shape[1]:.3f}")
    for peak in map(float, sys.argv[1:] or ("2e-4", "1e-3")):
        train(ys, peak)


if __name__ == "__main__":
    main()
