"""Seconds per training step (forward + backward + AdamW, batch 8, random 256 px images, 5 boxes
per image) and per no-grad forward, for the CPU-sized presets. Run alone on a quiet machine:

    OMP_NUM_THREADS=2 python benchmarks/step_time.py 2 256 > benchmarks/results/step_time.txt
"""

import sys
import time

import torch

from detrkd.models import build_detector

CASES = [("rt_detr", "small"), ("rt_detr", "base"), ("d_fine", "small"), ("d_fine", "base"),
         ("deformable_detr", "small")]


def train_step_seconds(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, mask: torch.Tensor,
                       labels: list, steps: int = 4) -> float:
    """The fastest of ``steps`` training steps (forward with labels, backward, optimiser step) after
    the first (warm-up), in seconds; ``model(x, mask, labels=labels).loss`` is the loss."""
    times = []
    for _ in range(steps):
        start = time.time()
        out = model(x, mask, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        times.append(time.time() - start)
    return min(times[1:])


def main(threads: int, size: int, batch: int = 8) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {threads} threads, batch {batch}, {size}x{size} px")
    for family, preset in CASES:
        model = build_detector(family, preset, 10).train()
        opt = torch.optim.AdamW(model.parameters(), 1e-4)
        x, mask = torch.randn(batch, 3, size, size), torch.ones(batch, size, size, dtype=torch.long)
        labels = [dict(class_labels=torch.randint(0, 10, (5,)), boxes=torch.rand(5, 4) * 0.3 + 0.2)
                  for _ in range(batch)]
        train = train_step_seconds(model, opt, x, mask, labels)
        with torch.no_grad():
            model.eval()
            start = time.time()
            model(x, mask)
            infer = time.time() - start
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{family:16s} {preset:6s} params {params:5.1f}M train s/step(B={batch}) "
              f"{train:.2f} infer {infer:.2f}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
