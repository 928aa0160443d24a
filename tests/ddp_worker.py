"""Run by ``tests/test_distributed.py`` under ``torchrun``: train, then distil, as configured in a
JSON file, and save each rank's trained weights (``{run}_rank{r}.pt``) next to it.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/ddp_worker.py JOB.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from detrkd.config import DistillConfig, load_config
from detrkd.recipe import build_distill_trainer
from detrkd.distributed import world
from detrkd.recipe import build_trainer


def trained_state(trainer) -> dict[str, torch.Tensor]:
    """The model's and the extra modules' tensors, by name."""
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    for name, module in trainer.extra_modules.items():
        state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    return state


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    out = Path(job_file).parent
    for run, raw in job.items():
        if run == "train":
            trainer = build_trainer(load_config(raw), progress=False)
        else:
            trainer = build_distill_trainer(load_config(raw, schema=DistillConfig), progress=False)
        trainer.fit()
        info = {"ignored_by_ddp": sorted({n.split(".")[0] for n in trainer.compute_loss.parameters_to_ignore})}
        if run == "distill":
            teacher = trainer.compute_loss.module.teacher
            info["teacher_grads"] = any(p.grad is not None for p in teacher.parameters())
            info["teacher_wrapped"] = any("DistributedDataParallel" in type(m).__name__ for m in teacher.modules())
        torch.save({"state": trained_state(trainer), "info": info, "last_eval": trainer.last_eval},
                   out / f"{run}_rank{world().rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
