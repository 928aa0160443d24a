"""How much of each training step does the student's own detection loss still drive once the
distillation terms are added to it?

Every config here clips the total gradient norm at ``optim.clip_grad`` = 0.1 (RT-DETR's recipe)
and every step is clipped, so the step has a fixed length and the terms compete for its direction.
For a few training batches of a distillation run (the config as committed, a fresh student or a
run's checkpoint), per term: the norm of its gradient over the trained parameters, its cosine
with the detection loss's gradient, and ``det share`` = the component of the summed gradient
along the detection gradient over the summed gradient's norm: 1.0 without distillation, < 1 when
the step also goes elsewhere (0.3: the detection loss learns at about a third of its step).

    OMP_NUM_THREADS=1 python benchmarks/grad_share.py configs/digits_kd_detr.yaml \\
        --set teacher=detrkd/assets/digits_teacher [--checkpoint runs/digits_kd_detr/last.pt] [--batches 4]

Outputs behind the README: benchmarks/results/grad_share.txt (commands in it).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from detrkd.config import DistillConfig, load_config
from detrkd.data.collate import collate
from detrkd.recipe import build_distill_trainer


def flat_grad(term: Tensor, params: list[torch.nn.Parameter]) -> Tensor:
    """The gradient of ``term`` over ``params``, flattened (zeros where it does not reach)."""
    grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def batch_shares(loss_terms: dict[str, Tensor], params: list[torch.nn.Parameter]) -> dict[str, tuple[float, float]]:
    """{term: (gradient norm, cosine with the detection gradient)} plus ``det share`` (as the
    module docstring defines it; a 1-tuple) for one batch's scaled terms."""
    grads = {k: flat_grad(v, params) for k, v in loss_terms.items()}
    det, total = grads["det/loss"], torch.stack(list(grads.values())).sum(0)
    unit = det / det.norm()
    out = {k: (float(g.norm()), float(g @ unit / g.norm().clamp_min(1e-12))) for k, g in grads.items()}
    out["total"] = (float(total.norm()), float(total @ unit / total.norm()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--checkpoint", help="a run's last.pt (default: the fresh student)")
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(args.config, [*args.set, "threads=1", f"output_dir={tmp}/run"], DistillConfig)
        trainer = build_distill_trainer(config, progress=False)
        step = 0
        if args.checkpoint:
            trainer.resume_from(Path(args.checkpoint))
            step = trainer.pos.global_step
        trainer.train_mode()  # as a training step sees them (frozen BatchNorm stays frozen)
        params = [p for g in trainer.optimizer.param_groups for p in g["params"] if p.requires_grad]
        loader = DataLoader(trainer.dataset, batch_size=config.data.batch_size, shuffle=True, collate_fn=collate,
                            generator=torch.Generator().manual_seed(0))
        rows: list[dict[str, tuple[float, float]]] = []
        for _, batch in zip(range(args.batches), loader):
            _, terms = trainer.compute_loss(batch)
            rows.append(batch_shares({k: v for k, v in terms.items() if ":" not in k}, params))
    names = list(rows[0])
    mean = {k: tuple(sum(r[k][i] for r in rows) / len(rows) for i in range(2)) for k in names}
    print(f"{args.config} {' '.join(args.set)}; step {step} ({args.checkpoint or 'fresh student'}); "
          f"{len(rows)} train batches of {config.data.batch_size}; clip_grad {config.optim.clip_grad}")
    print(f"{'term':28s} {'grad norm':>10s} {'cos with det':>13s}")
    for k in names[:-1]:
        print(f"{k:28s} {mean[k][0]:10.4f} {mean[k][1]:13.3f}")
    print(f"{'sum (the step, before clip)':28s} {mean['total'][0]:10.4f} {mean['total'][1]:13.3f}   "
          f"<- det share")


if __name__ == "__main__":
    main()
