"""Seconds per training step (forward + backward + AdamW) and per no-grad detection pass of the
torchvision CNN students (``detrkd.models.cnn``), batch 8, random 256 px images with 5 boxes each
(digit-sized: 10-40 % of the side), on ``threads`` threads; the RT-DETR tiny DETR student for scale;
and a distillation step of each ``small`` student with ``kd_detr_hetero`` from the shipped digits
teacher (RT-DETR small, ``detrkd/assets/digits_teacher``).

    OMP_NUM_THREADS=1 python benchmarks/cnn_step_time.py 1 256 > benchmarks/results/cnn_step_time.txt

Say in the output's header whether the machine was quiet: with other jobs on the cores every
number grows (the header line takes a note as the third argument).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from detrkd.distill.base import Distiller
from detrkd.distill.methods import build_methods
from detrkd.models import build_detector, load_detector
from detrkd.models.cnn import build_cnn_detector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import train_step_seconds  # noqa: E402 (the script beside this one)

SHIPPED_TEACHER = Path(__file__).resolve().parents[1] / "detrkd" / "assets" / "digits_teacher"
CASES = [("faster_rcnn", "tiny"), ("faster_rcnn", "small"), ("retinanet", "tiny"), ("retinanet", "small"),
         ("rt_detr", "tiny")]


def batch(size: int, count: int) -> tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]:
    wh = torch.rand(count, 5, 2) * 0.3 + 0.1
    centre = torch.rand(count, 5, 2) * (1 - wh) + wh / 2
    labels = [dict(class_labels=torch.randint(0, 10, (5,)), boxes=torch.cat((c, s), -1)) for c, s in zip(centre, wh)]
    return torch.randn(count, 3, size, size), torch.ones(count, size, size, dtype=torch.long), labels


def step_seconds(model: torch.nn.Module, size: int, count: int, eval_pass: bool = True) -> tuple[float, float]:
    """(fastest train step after one warm-up, one no-grad eval pass or nan) in seconds."""
    x, mask, labels = batch(size, count)
    model.train()
    train = train_step_seconds(model, torch.optim.AdamW(model.parameters(), 1e-4), x, mask, labels)
    if not eval_pass:
        return train, float("nan")
    model.eval()
    with torch.no_grad():
        start = time.perf_counter()
        model(x, mask)
        return train, time.perf_counter() - start


class _Loss(torch.nn.Module):
    """A Distiller behind the detector call ``step_seconds`` makes (``out.loss``)."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.distiller = distiller

    def forward(self, x, mask=None, labels=None):
        loss, _ = self.distiller({"pixel_values": x, "pixel_mask": mask, "labels": labels})
        return type("Out", (), {"loss": loss})()


def distill_seconds(family: str, size: int, count: int) -> float:
    teacher = load_detector(SHIPPED_TEACHER)
    student = build_cnn_detector(family, "small", 10)
    methods, weights = build_methods({"kd_detr_hetero": {}}, student, teacher)
    return step_seconds(_Loss(Distiller(student, teacher, methods, weights)), size, count, eval_pass=False)[0]


def main(threads: int, size: int, note: str = "", count: int = 8) -> None:
    torch.set_num_threads(threads)
    print(f"# torch {torch.__version__}, {threads} thread(s), batch {count}, {size}x{size} px. {note}")
    for family, preset in CASES:
        torch.manual_seed(0)
        model = (build_detector(family, preset, 10) if family == "rt_detr"
                 else build_cnn_detector(family, preset, 10))
        train, infer = step_seconds(model, size, count)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{family:12s} {preset:6s} params {params:5.2f}M train s/step {train:.2f} "
              f"(3000 steps: {train * 3000 / 60:.0f} min) eval {infer:.2f}", flush=True)
    for family in ("faster_rcnn", "retinanet"):
        torch.manual_seed(0)
        train = distill_seconds(family, size, count)
        print(f"{family:12s} small  + kd_detr_hetero from the digits teacher: train s/step {train:.2f} "
              f"(3000 steps: {train * 3000 / 60:.0f} min)", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "")
