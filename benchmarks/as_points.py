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
from types import SimpleNamespace

import torch
from torch.utils.data import DataLoader

from detrkd.checkpoint import load_checkpoint
from detrkd.cli import detector_on_split, load_for_inference
from detrkd.data.collate import collate
from detrkd.distill.active_sampling import ActiveSampling, _vectors, class_distance

BUCKETS = ((0.0, 0.1), (0.1, 0.5), (0.5, 1.01))


def main(student_ckpt: str, as_ckpt: str = "runs/digits_active_sampling/last.pt") -> None:
    torch.set_num_threads(1)
    args = SimpleNamespace(checkpoint=Path("runs/digits_teacher/last.pt"), device="cpu", data="data/digits",
                           image_size=None, batch_size=8, split="val")
    teacher, dataset, _, _ = detector_on_split(args)
    student, _ = load_for_inference(Path(student_ckpt), "cpu")
    state = load_checkpoint(as_ckpt)
    options = dict(state["config"]["methods"]["active_sampling"])
    options.pop("weight", None)
    method = ActiveSampling(num_classes=teacher.num_classes, **options).eval()
    method.load_state_dict(state["extra_modules"]["active_sampling"])
    loader = DataLoader(dataset, batch_size=8, shuffle=False, collate_fn=collate)
    l1s, clss, conf = [], [], []
    with torch.no_grad():
        for _, b in zip(range(8), loader):
            y_t = _vectors(teacher(b["pixel_values"], b["pixel_mask"]), -1)
            y_s = _vectors(student(b["pixel_values"], b["pixel_mask"]), -1)
            side = method.teacher_side(teacher(b["pixel_values"], b["pixel_mask"]), -1)
            s_t, s_s = method.samples(side, y_s)
            l1s.append((s_s[..., :4] - s_t[..., :4]).abs().sum(-1).flatten())
            clss.append(class_distance(s_t[..., 4:], s_s[..., 4:], method.class_kd).flatten())
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
