"""Where does the active-sampling distillation loss come from? Per sampling point (= per teacher
prediction), bucketed by the teacher's confidence (max real-class probability) at that point.

Uses the digits teacher, a student checkpoint and the ASM of an active-sampling run, on 8 val
batches; T = the run's temperature. A student that detects well but still has a large loss at the
teacher's background points is being pulled away from detection by those points:

    OMP_NUM_THREADS=1 python benchmarks/as_points.py STUDENT_CKPT [AS_RUN_CKPT]

Output of the run behind the README: benchmarks/results/active_sampling/as_points.txt.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from detrkd.bench import detector_on_split, load_for_inference
from detrkd.checkpoint import load_checkpoint
from detrkd.config import with_predated
from detrkd.data.collate import collate
from detrkd.distill.active_sampling import ActiveSampling, layer_vectors
from detrkd.distill.methods import method_options

BUCKETS = ((0.0, 0.1), (0.1, 0.5), (0.5, 1.01))


def teacher_and_val_batches(batches: int = 8, checkpoint: str = "runs/digits_teacher/last.pt"
                            ) -> tuple[Any, list[dict[str, Any]]]:
    """(the digits teacher, its first ``batches`` val batches of 8 images, teacher transforms)."""
    teacher, dataset, _, _ = detector_on_split(Path(checkpoint), "val", data="data/digits", batch_size=8)
    loader = DataLoader(dataset, batch_size=8, shuffle=False, collate_fn=collate)
    return teacher, [b for _, b in zip(range(batches), loader)]


def main(student_ckpt: str, as_ckpt: str = "runs/digits_active_sampling/last.pt") -> None:
    torch.set_num_threads(1)
    teacher, batches = teacher_and_val_batches()
    student, _ = load_for_inference(Path(student_ckpt), "cpu")
    state = load_checkpoint(as_ckpt)
    options, _ = method_options("active_sampling", with_predated(state["config"])["methods"]["active_sampling"])
    method = ActiveSampling(num_classes=teacher.num_classes, **options).eval()
    method.load_state_dict(state["extra_modules"]["active_sampling"])
    l1s, clss, conf = [], [], []
    with torch.no_grad():
        for b in batches:
            side = method.teacher_side(teacher(b["pixel_values"], b["pixel_mask"]), -1)
            s_out = student(b["pixel_values"], b["pixel_mask"])
            y_t, y_s = side[0], layer_vectors(s_out, -1)
            s_t, s_s = method.samples(side, y_s)
            l1, cls = method.point_losses(s_s, s_t, method.class_mode(s_out.class_head))
            l1s.append(l1.flatten())
            clss.append(cls.flatten())
            conf.append(y_t[..., 4:].max(-1).values.flatten())
    l1, cls, conf = torch.cat(l1s), torch.cat(clss), torch.cat(conf)
    print(f"student {student_ckpt}; ASM of {as_ckpt} (step {state['global_step']}, T = {method.temperature}); "
          f"teacher Qt = {y_t.shape[1]}, student Qs = {y_s.shape[1]}, {len(conf)} points")
    print("teacher confidence  share of points  mean L1 (sum of 4)  share of L1  mean KL  share of KL")
    for lo, hi in BUCKETS:
        m = (conf >= lo) & (conf < hi)
        print(f"[{lo:.1f}, {min(hi, 1):.1f})          {m.float().mean():.3f}            {l1[m].mean():.4f}"
              f"              {l1[m].sum() / l1.sum():.3f}        {cls[m].mean():.4f}   {cls[m].sum() / cls.sum():.3f}")
    print(f"all                 1.000            {l1.mean():.4f}              1.000        {cls.mean():.4f}   1.000")


if __name__ == "__main__":
    main(*sys.argv[1:])
