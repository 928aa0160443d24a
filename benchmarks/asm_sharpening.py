"""How fast does the Active Sampling Module learn to sample sharply (Eq. 16), under the optimiser
settings of the digits runs (AdamW, peak lr, 300 warmup steps, cosine over 3000 steps)?

Offline and cheap: the digits teacher's final-layer prediction vectors of 8 val batches are cached,
then a fresh ASM (the default sizes) is trained on them with the sampling loss alone. Reports the
loss and the mean diagonal weight W_ii (how much of point i's sample is output i) at T = 1 and at
the distillation temperature T = 4. While W is uniform (W_ii = 1 / Qt) every sample is the set mean,
whatever T: the temperature sweep can only differ once the ASM has sharpened.

    OMP_NUM_THREADS=1 python benchmarks/asm_sharpening.py [--teacher CKPT] [PEAK_LR[:nowarmup] ...]
    # default 2e-4 1e-3; "1e-3:nowarmup" = the ASM's own optimiser (active sampling's asm_lr 1e-3,
    # asm_warmup false: the cosine decay from step 1)

Needs a teacher checkpoint (default runs/digits_teacher/last.pt) and data/digits. Outputs of the runs
behind the README: benchmarks/results/active_sampling/asm_sharpening*.txt.
"""
from __future__ import annotations

import math
import sys

import torch
from as_points import teacher_and_val_batches  # benchmarks/ (the script's folder is on sys.path)

from detrkd.distill.active_sampling import ActiveSampling, diagonal_nll, layer_vectors, sampling_logits

STEPS, WARMUP, REPORT = 3000, 300, (1, 100, 300, 600, 1000, 2000, 3000)


def teacher_vectors(checkpoint: str, batches: int = 8) -> list[torch.Tensor]:
    """Final-layer prediction vectors [8, Qt, 4 + C] of the first ``batches`` val batches."""
    model, val = teacher_and_val_batches(batches, checkpoint)
    with torch.no_grad():
        return [layer_vectors(model(b["pixel_values"], b["pixel_mask"]), -1) for b in val]


def lr_at(step: int, peak: float, warmup: bool = True) -> float:
    """Linear warmup (unless ``warmup`` is False) then cosine decay, as ``optim.schedule: cosine``
    in the digits configs (``engine.lr_factor``)."""
    if warmup and step <= WARMUP:
        return peak * step / WARMUP
    return peak * 0.5 * (1 + math.cos(math.pi * max(0, step - WARMUP) / (STEPS - WARMUP)))


def diagonal_weight(scores: torch.Tensor, temperature: float) -> float:
    """Mean W_ii of self-attention scores [B, 1, Q, Q] at a temperature."""
    return (scores / temperature).softmax(-1).diagonal(dim1=-2, dim2=-1).mean().item()


def train(ys: list[torch.Tensor], peak: float, warmup: bool = True) -> None:
    method = ActiveSampling(num_classes=ys[0].shape[-1] - 4)
    opt = torch.optim.AdamW(method.parameters(), lr=peak, weight_decay=1e-4)
    print(f"peak lr {peak:g}{'' if warmup else ', no warmup'}:  step  loss   W_ii(T=1)  W_ii(T=4)")
    for step in range(1, STEPS + 1):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, peak, warmup)
        q, k = method.asm(ys[step % len(ys)])
        scores = sampling_logits(q, k)
        loss = diagonal_nll(scores)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in REPORT:
            print(f"{step:>19}  {loss.item():.3f}  {diagonal_weight(scores.detach(), 1):.3f}"
                  f"      {diagonal_weight(scores.detach(), 4):.3f}")


def main(argv: list[str]) -> None:
    checkpoint = "runs/digits_teacher/last.pt"
    if argv[:1] == ["--teacher"]:
        checkpoint, argv = argv[1], argv[2:]
    torch.set_num_threads(1)
    ys = teacher_vectors(checkpoint)
    print(f"teacher {checkpoint}, vectors {list(ys[0].shape)}; uniform sampling: loss ln(Qt) = "
          f"{math.log(ys[0].shape[1]):.3f}, W_ii = {1 / ys[0].shape[1]:.3f}")
    for spec in argv or ("2e-4", "1e-3"):
        peak, _, mode = spec.partition(":")
        torch.manual_seed(0)
        train(ys, float(peak), warmup=mode != "nowarmup")


if __name__ == "__main__":
    main(sys.argv[1:])
