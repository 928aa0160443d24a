"""Every distillation method runs one training step with LW-DETR, RF-DETR and DEIMv2 as the student
and as the teacher (tiny sizes): within the family and across families (an RT-DETR partner).

LW-DETR / RF-DETR have no encoder: their ``memory`` is the projector's output, which AGFD and FitNet
distil (AGFD's mask is the teacher's first-layer attention over those tokens). A memory on another
token grid than the partner's (LW / RF vs RT-DETR: one level vs three) is refused with a one-line
error naming both grids; DEIMv2 shares RT-DETR's grid.
"""

from __future__ import annotations

import pytest
import torch

from detrkd.distill.base import Distiller
from detrkd.distill.methods import METHODS, build_methods
from detrkd.models import build_detector

NEW = ["lw_detr", "rf_detr", "deimv2"]
NUM_CLASSES = 4
# (teacher, student): each new family with itself (a smaller student), then with RT-DETR both ways
PAIRS = [(f, f) for f in NEW] + [("rt_detr", f) for f in NEW] + [(f, "rt_detr") for f in NEW]
GRIDS = {"lw_detr": "one level", "rf_detr": "one level", "deimv2": "three levels", "rt_detr": "three levels"}


def batch() -> dict:
    g = torch.Generator().manual_seed(1)
    return {"pixel_values": torch.randn(2, 3, 64, 96, generator=g),
            "pixel_mask": torch.ones(2, 64, 96, dtype=torch.long),
            "labels": [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
                       {"class_labels": torch.tensor([2, 3]),
                        "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.2, 0.3]])}]}


def pair(teacher_family: str, student_family: str):
    torch.manual_seed(0)
    teacher = build_detector(teacher_family, "tiny", NUM_CLASSES)
    small = {"num_queries": 20, **({"group_detr": 3} if student_family in ("lw_detr", "rf_detr") else {})}
    return teacher, build_detector(student_family, "tiny", NUM_CLASSES, **small)


@pytest.mark.parametrize("method", sorted(n for n, cls in METHODS.items() if "detr" in cls.student_kinds))
@pytest.mark.parametrize("teacher_family,student_family", PAIRS)
def test_one_training_step(method, teacher_family, student_family):
    teacher, student = pair(teacher_family, student_family)
    methods, weights = build_methods({method: {}}, student, teacher)
    distiller = Distiller(student, teacher, methods, weights).train()
    if METHODS[method].compares_memory and GRIDS[teacher_family] != GRIDS[student_family]:
        with pytest.raises(ValueError, match=r"same token grid, but the teacher's spatial_shapes .* student's"):
            distiller(batch())
        return
    loss, terms = distiller(batch())
    assert {"det/loss"} < set(terms) and all(torch.isfinite(v) for v in terms.values())
    own = [v for k, v in terms.items() if k.startswith(method + "/")]
    assert own and any(v.requires_grad for v in own)
    loss.backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    optimiser = torch.optim.SGD([p for p in distiller.parameters() if p.requires_grad], lr=1e-3)
    optimiser.step()
