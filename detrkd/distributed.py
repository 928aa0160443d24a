"""Data-parallel runtime on PyTorch's own distributed stack (``torch.distributed`` + DDP).

A run becomes data-parallel when it is launched by ``torchrun`` (or ``accelerate launch``, which
sets the same variables): ``WORLD_SIZE`` > 1 in the environment. ``init_distributed`` then joins the
process group (``nccl`` on CUDA, ``gloo`` on CPU) from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` /
``MASTER_ADDR`` / ``MASTER_PORT``. Without those variables every helper here is a no-op for one
process, so the single-process code path is unchanged.

Conventions (see ``docs/DESIGN.md``, "Distributed"):
- ``data.batch_size`` is the GLOBAL batch; rank r trains on the r-th contiguous part of every
  global batch (``shard``), so the images of a step are the same for any number of processes and
  no image is seen twice.
- the detection losses divide by the number of GT boxes averaged over processes, as DETR does
  (``global_box_scale``): each rank's loss is then 1 / world of the single-process loss's
  box-normalised part, and DDP's gradient average restores the single-process gradient.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class World:
    """This process's place in the job: ``rank`` of ``size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """The current process group's view (one process when none is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def launched_world_size() -> int:
    """``WORLD_SIZE`` set by the launcher (1 when started as a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_device(device: str) -> torch.device:
    """This process's device: the configured one, except that a CUDA device becomes
    ``cuda:LOCAL_RANK`` under a launcher with ``WORLD_SIZE`` > 1 (one GPU per process)."""
    wanted = torch.device(device)
    if wanted.type == "cuda" and launched_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return wanted


def init_distributed(device: str) -> torch.device:
    """Join the launcher's process group when ``WORLD_SIZE`` > 1; returns ``local_device(device)``.

    Backend: nccl for CUDA, gloo for CPU. Safe to call twice (the group is kept).
    """
    wanted = local_device(device)
    if launched_world_size() <= 1:
        return wanted
    if wanted.type == "cuda":
        torch.cuda.set_device(wanted)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if wanted.type == "cuda" else "gloo")
    return wanted


def shutdown_distributed() -> None:
    """Leave the process group (if this process joined one)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op for one)."""
    if world().distributed:
        dist.barrier()


# ---- data --------------------------------------------------------------------------------
def shard(items: Sequence[int], rank: int, size: int) -> list[int]:
    """The ``rank``-th of ``size`` contiguous, near-equal parts of one global batch.

    Part lengths differ by at most one (``torch.tensor_split``); concatenating the parts in rank
    order gives ``items`` back, so no item is dropped or duplicated.
    """
    n, r = divmod(len(items), size)
    start = rank * n + min(rank, r)
    return list(items[start:start + n + (rank < r)])


# ---- collectives -------------------------------------------------------------------------
def _device() -> torch.device:
    """Where collective tensors live: the current GPU for nccl, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_flags(*flags: bool) -> tuple[bool, ...]:
    """Element-wise OR of boolean flags over all processes (one collective)."""
    if not world().distributed:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in t.tolist())


def mean_values(values: dict[str, float]) -> dict[str, float]:
    """Mean over processes of a dict of floats with the same keys everywhere."""
    if not world().distributed or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return {k: v / world().size for k, v in zip(keys, t.tolist())}


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every process's ``obj`` (picklable) as a list on rank 0, None on the others."""
    w = world()
    if not w.distributed:
        return [obj]
    out: list[Any] | None = [None] * w.size if w.is_main else None
    dist.gather_object(obj, out, dst=0)
    return out


def all_gather(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), on every process."""
    w = world()
    if not w.distributed:
        return [obj]
    out: list[Any] = [None] * w.size
    dist.all_gather_object(out, obj)
    return out


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if not world().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---- loss normalisers ----------------------------------------------------------------------
def global_box_scale(targets: Sequence[dict[str, Tensor]], device: torch.device) -> Tensor:
    """max(n_local, 1) / max(n_global / world, 1): turns a loss divided by this process's box count
    into one divided by the box count averaged over processes (DETR's ``num_boxes``). 1 for one
    process. n = number of GT boxes (``class_labels``) in the targets. Scalar tensor."""
    local = float(sum(len(t["class_labels"]) for t in targets))
    if not world().distributed:
        return torch.ones((), device=device)
    total = torch.tensor([local], dtype=torch.float64, device=_device())
    dist.all_reduce(total)
    mean = float(total) / world().size
    return torch.tensor(max(local, 1.0) / max(mean, 1.0), device=device)


def globally_normalised_loss(loss: Tensor, box_part: Tensor, scale: Tensor) -> Tensor:
    """``loss`` with its box-normalised part rescaled: loss + (scale - 1) * box_part.

    loss, box_part: scalars (``box_part`` is the part of ``loss`` divided by the local box count);
    scale: ``global_box_scale``. Exactly ``loss`` when scale == 1 (one process).
    """
    if float(scale) == 1.0:
        return loss
    return loss + (scale.to(box_part.dtype) - 1) * box_part


def check_no_accelerate_state() -> None:
    """Refuse a data-parallel run in which accelerate's ``PartialState`` exists: HF's DETR-style
    losses then all-reduce ``num_boxes`` themselves and ``detection_loss`` would do it twice.
    (``accelerate launch`` only sets the launcher variables; detrkd never creates the state.)"""
    accelerate = sys.modules.get("accelerate")
    state = getattr(accelerate, "PartialState", None)
    if getattr(state, "_shared_state", None):
        raise RuntimeError("accelerate's PartialState is initialised in this process (an Accelerator was "
                           "created): HF's DETR losses would then average num_boxes on top of detrkd's "
                           "own averaging; run detrkd without creating an Accelerator")


def detection_loss(model: Any, out: Any, targets: Sequence[dict[str, Tensor]]) -> Tensor:
    """A detector's own loss with its box normaliser averaged over processes (DETR's convention).

    model: a ``DetrAdapter``; out: its ``DetectorOutput`` for ``targets`` (forward with labels).
    One process: exactly ``out.loss``.
    """
    if not world().distributed:
        return out.loss
    scale = global_box_scale(targets, out.loss.device)
    return globally_normalised_loss(out.loss, model.box_normalised_loss(out), scale)
