"""The training loop, reusable by distillation.

``Trainer`` is driven by a ``compute_loss(batch) -> (loss, terms)`` callable and an optimizer over
*named* parameter groups; it owns the schedule, clipping, non-finite handling, logging, periodic
evaluation, atomic checkpoints and exact resume. ``train_detector`` wires it up for plain detector
training (``detrkd train``); a distillation command builds its own ``compute_loss`` (student +
teacher + methods) and extra parameter groups / modules and reuses ``Trainer`` unchanged::

    groups = detector_param_groups(student, cfg.optim) + named_param_groups(
        "heads", heads.named_parameters(), cfg.optim.lr, cfg.optim.weight_decay)
    Trainer(student, distill_loss, groups, train_set, collate, cfg,
            evaluate_fn=make_eval_fn(cfg, val_set), extra_modules={"heads": heads}).fit(resume)

(the teacher stays outside: frozen, in eval mode, not checkpointed).

Reproducibility: the data order of epoch ``e`` is a pure function of ``(seed, e)`` (a
``torch.Generator`` seeded with ``seed + e`` drives the permutation and the DataLoader's own seed);
resuming skips the batches of the interrupted epoch that were already consumed and restores the
Python / NumPy / torch RNG states, so with ``num_workers=0`` a resumed run ends with the same
weights as an uninterrupted one. Evaluation runs with the RNG states saved and restored, so it does
not perturb training. (With workers the data order is still exact, augmentation draws are not.)

Data-parallel runs (``torchrun``; see ``detrkd.distributed``): ``compute_loss`` must then be an
``nn.Module`` holding every trained parameter (``DetectorLoss``, ``Distiller``); it is wrapped in
``DistributedDataParallel`` (frozen children such as the teacher are ignored by DDP: no gradient
sync, no buffer broadcast). ``data.batch_size`` stays the global batch: rank r trains on the r-th
part of every global batch of the same ``(seed, epoch)`` order. Skipping a non-finite step and
stopping on SIGTERM are agreed by all ranks (one small all-reduce per step); only rank 0 writes
``config.yaml``, ``metrics.jsonl`` and checkpoints (which hold every rank's RNG state).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import math
import os
import random
import signal
import threading
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from detrkd.checkpoint import (BEST, LAST, load_checkpoint, load_model_entries, model_entries,
                               rng_state, save_checkpoint, set_rng_state)
from detrkd.config import OptimConfig, TrainConfig, config_to_dict, dump_config, with_predated
from detrkd.distributed import (all_gather, any_flags, barrier, broadcast_from_main, check_no_accelerate_state,
                                init_distributed, local_device, mean_values, shard, world)
from detrkd.errors import NonFiniteLossError, TrainingError, TrainingInterrupted  # noqa: F401 (re-exported)
from detrkd.models.base import NonFinitePredictions
from detrkd.provenance import PROVENANCE_FILE, append_run_record, resume_command
from detrkd.runlock import RunLock, RunLocked

log = logging.getLogger("detrkd")

Batch = dict[str, Any]
LossFn = Callable[[Batch], tuple[Tensor, dict[str, Tensor]]]
EvalFn = Callable[[nn.Module], dict[str, float]]
ParamGroup = dict[str, Any]

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


# ---- runtime ------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup_runtime(config: TrainConfig) -> torch.device:
    """Apply ``threads`` and ``deterministic``, join the launcher's process group (if any) and seed
    all generators with ``config.seed`` (the same on every rank: identical initial weights).
    Returns this process's device."""
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    if config.deterministic:
        use_deterministic_algorithms()
    device = init_distributed(config.device)
    seed_everything(config.seed)
    return device


def use_deterministic_algorithms() -> None:
    """PyTorch's deterministic mode (what ``deterministic: true`` turns on). CPU runs repeat
    bit-for-bit without it; on GPU it removes most run-to-run noise but kernels without a
    deterministic version (e.g. ``grid_sample`` backward in deformable attention) only warn."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Run a block (e.g. evaluation) without changing any global RNG state afterwards."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


# ---- parameter groups and optimizer -------------------------------------------------------
def _no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases and norm weights (all 0-/1-d parameters) get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias")


METHOD_GROUP_PREFIX = "distill/"  # names of a distillation method's own groups: "distill/<method>"


def named_param_groups(
    name: str, named_params: Iterable[tuple[str, nn.Parameter]], lr: float, weight_decay: float
) -> list[ParamGroup]:
    """``name`` and ``name/no_decay`` groups of the trainable parameters (empty groups dropped)."""
    decay, no_decay = [], []
    for pname, param in named_params:
        if param.requires_grad:
            (no_decay if _no_decay(pname, param) else decay).append(param)
    groups = [
        {"name": name, "params": decay, "lr": lr, "weight_decay": weight_decay},
        {"name": f"{name}/no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def detector_param_groups(model: nn.Module, optim: OptimConfig, prefix: str = "") -> list[ParamGroup]:
    """Groups for a detector adapter: ``main`` at ``optim.lr``, ``backbone`` at ``optim.backbone_lr``.

    Uses ``model.backbone_parameters()`` when the model has it; otherwise everything is ``main``.
    ``prefix`` namespaces the group names (e.g. ``"student/"``).
    """
    backbone_fn = getattr(model, "backbone_parameters", None)
    backbone_ids = {id(p) for p in backbone_fn()} if callable(backbone_fn) else set()
    named = list(model.named_parameters())
    main = [(n, p) for n, p in named if id(p) not in backbone_ids]
    backbone = [(n, p) for n, p in named if id(p) in backbone_ids]
    return (named_param_groups(f"{prefix}main", main, optim.lr, optim.weight_decay)
            + named_param_groups(f"{prefix}backbone", backbone, optim.backbone_lr, optim.weight_decay))


def build_optimizer(groups: Sequence[ParamGroup], optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over named groups; a parameter may appear in one group only."""
    seen: set[int] = set()
    for group in groups:
        for param in group["params"]:
            if id(param) in seen:
                raise TrainingError(f"a parameter appears in more than one group (again in {group['name']!r})")
            seen.add(id(param))
    if not seen:
        raise TrainingError("no trainable parameters (all groups are empty)")
    return torch.optim.AdamW(list(groups), lr=optim.lr, weight_decay=optim.weight_decay)


# ---- learning-rate schedule ---------------------------------------------------------------
def lr_factor(step: int, optim: OptimConfig, steps_per_epoch: int, warmup: bool = True) -> float:
    """LR multiplier at ``step`` (0-based): linear warm-up to 1 (``warmup=False``: none, the decay
    alone), then cosine or step decay."""
    warm = min(1.0, (step + 1) / optim.warmup_steps) if optim.warmup_steps > 0 and warmup else 1.0
    total = optim.epochs * steps_per_epoch
    if optim.schedule == "step":
        drops = sum(step >= e * steps_per_epoch for e in optim.step_epochs)
        return warm * optim.gamma**drops
    span = max(1, total - optim.warmup_steps)
    progress = min(1.0, max(0.0, (step - optim.warmup_steps) / span))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return warm * (optim.min_lr_ratio + (1.0 - optim.min_lr_ratio) * cosine)


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                    steps_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step ``LambdaLR`` applying ``lr_factor`` to every group's peak LR; a group with
    ``"warmup": False`` (e.g. a method's sampling module, ``DistillMethod.optim_options``) skips the
    warm-up."""
    def factor(step: int) -> float:
        return lr_factor(step, optim, steps_per_epoch)

    def no_warmup(step: int) -> float:
        return lr_factor(step, optim, steps_per_epoch, warmup=False)

    lambdas = [factor if group.get("warmup", True) else no_warmup for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


# ---- data order ---------------------------------------------------------------------------
def epoch_batches(num_items: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The shuffled index batches of ``epoch``: a pure function of ``(seed, epoch)``."""
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_items, generator=generator).tolist()
    return [order[i:i + batch_size] for i in range(0, num_items, batch_size)]


def steps_per_epoch(num_items: int, batch_size: int, world_size: int = 1) -> int:
    """Optimizer steps per epoch: global batches, less a last one too small to give every process
    an image (only possible when ``num_items % batch_size < world_size``)."""
    full, rest = divmod(num_items, batch_size)
    return full + (rest >= world_size and rest > 0)


def epoch_loader(dataset: Dataset, collate_fn: Callable, batch_size: int, num_workers: int,
                 seed: int, epoch: int, skip: int = 0, rank: int = 0, world_size: int = 1) -> DataLoader:
    """A DataLoader over ``epoch``'s batches, starting after the first ``skip`` of them.

    batch_size is global: with ``world_size`` processes, rank ``rank`` loads its ``shard`` of each
    global batch (every image of the epoch on exactly one rank)."""
    batches = epoch_batches(len(dataset), batch_size, seed, epoch)  # type: ignore[arg-type]
    batches = batches[:steps_per_epoch(len(dataset), batch_size, world_size)][skip:]  # type: ignore[arg-type]
    if world_size > 1:
        batches = [shard(b, rank, world_size) for b in batches]
    generator = torch.Generator().manual_seed(seed + epoch)  # the loader's base seed, not global RNG
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn,
                      num_workers=num_workers, generator=generator)


def to_device(obj: Any, device: torch.device) -> Any:
    """Move the tensors of a nested dict / list / tuple to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


# ---- metrics log --------------------------------------------------------------------------
def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Append one JSON line to the metrics log."""
    with path.open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` (by an interrupted run that is being resumed)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


# config keys (or sections) a resumed run cannot change: the run would silently mix two
# experiments (data order and RNG follow the seed, the weights the model and teacher)
FIXED_ON_RESUME = ("seed", "teacher", "model.family", "model.preset", "model.backbone", "model.num_queries",
                   "model.pixels", "data.batch_size")
def config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> dict[str, list[Any]]:
    """Flattened ``{"section.key": [old, new]}`` of the values that differ between two config dicts
    (a method's options count as one value per option)."""
    changes: dict[str, list[Any]] = {}
    for key in sorted(set(old) | set(new), key=str):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            changes.update(config_changes(a, b, name + "."))
        elif a != b:
            changes[name] = [a, b]
    return changes


def check_run_dir(run_dir: Path, resume: bool) -> None:
    """Raise ``TrainingError`` if ``run_dir`` holds a run and ``resume`` is False, or vice versa."""
    last = Path(run_dir) / LAST
    if resume and not last.is_file():
        raise TrainingError(f"cannot resume: no {LAST} in {run_dir}")
    if not resume and last.exists():
        raise TrainingError(f"{run_dir} already holds a run ({LAST}); "
                            "resume it (--resume) or choose another output directory")


@dataclass
class Position:
    """Where training is; saved in every checkpoint."""

    epoch: int = 0
    batch_in_epoch: int = 0
    global_step: int = 0
    best_metric: float | None = None
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0


class _Window:
    """Running sums of the losses (finite steps) and step times (all steps) between log lines."""

    def __init__(self, sums: dict[str, float] | None = None, steps: int = 0) -> None:
        self.sums: dict[str, float] = dict(sums or {})
        self.steps = steps

    def add(self, loss: float, terms: dict[str, float]) -> None:
        for key, value in {"loss": loss, **terms}.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1

    def add_time(self, step_seconds: float, data_seconds: float) -> None:
        self.sums["_seconds"] = self.sums.get("_seconds", 0.0) + step_seconds
        self.sums["_data_seconds"] = self.sums.get("_data_seconds", 0.0) + data_seconds

    def record(self, num_steps: int) -> dict[str, float]:
        """Mean loss / terms over the finite steps and seconds per step over ``num_steps``."""
        means = {k: v / max(1, self.steps) for k, v in self.sums.items() if not k.startswith("_")}
        return {**means, "sec_per_step": self.sums.get("_seconds", 0.0) / num_steps,
                "data_sec_per_step": self.sums.get("_data_seconds", 0.0) / num_steps}


# ---- the trainer --------------------------------------------------------------------------
class Trainer:
    """Trains ``model`` (plus ``extra_modules``) by minimising ``compute_loss`` over a dataset.

    model:          the module that is checkpointed as ``model`` (and evaluated)
    compute_loss:   ``batch (on device) -> (loss, {term name: tensor})``; an ``nn.Module`` holding
                    every trained parameter when the run is data-parallel (it is wrapped in DDP)
    param_groups:   named optimizer groups (see ``detector_param_groups``/``named_param_groups``);
                    each group's ``lr`` is its peak LR
    train_dataset, collate_fn: the training data; batches come from ``epoch_loader``
    config:         the run config (``optim``, ``data.batch_size``/``num_workers``, output, ...)
    evaluate_fn:    ``model -> {"ap": ..., ...}``; called in eval mode under ``no_grad`` on every
                    rank (it gathers the ranks' results itself, see ``make_eval_fn``)
    extra_modules:  other trained modules to checkpoint and switch to train mode (heads, ...)
    """

    def __init__(self, model: nn.Module, compute_loss: LossFn, param_groups: Sequence[ParamGroup],
                 train_dataset: Dataset, collate_fn: Callable, config: TrainConfig, *,
                 evaluate_fn: EvalFn | None = None, extra_modules: dict[str, nn.Module] | None = None,
                 progress: bool = True):
        self.world = world()
        if len(train_dataset) < max(1, self.world.size):  # type: ignore[arg-type]
            raise TrainingError(f"the training set has {len(train_dataset)} images, "  # type: ignore[arg-type]
                                f"fewer than the {self.world.size} processes" if self.world.distributed
                                else "the training set is empty")
        if config.data.batch_size < self.world.size:
            raise TrainingError(f"data.batch_size is the global batch: {config.data.batch_size} cannot be "
                                f"split over {self.world.size} processes (each needs an image)")
        self.model, self.config = model, config
        self.dataset, self.collate_fn, self.evaluate_fn = train_dataset, collate_fn, evaluate_fn
        self.extra_modules = dict(extra_modules or {})
        self.progress = progress and self.world.is_main
        self.device = local_device(config.device)
        self.compute_loss = self._wrap_loss(compute_loss)
        self.steps_per_epoch = steps_per_epoch(len(train_dataset), config.data.batch_size,  # type: ignore[arg-type]
                                               self.world.size)
        self.optimizer = build_optimizer(param_groups, config.optim)
        self.scheduler = build_scheduler(self.optimizer, config.optim, self.steps_per_epoch)
        self.run_dir = Path(config.output_dir)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.pos = Position()
        self.last_eval: dict[str, float] | None = None
        self._window = _Window()
        self._signal: int | None = None  # set by the SIGTERM handler
        self._stop = False  # all ranks agreed to stop after this step
        self._pending: dict[str, Any] | None = None  # a periodic checkpoint written after the next step
        if self.world.distributed:  # same weights everywhere, different augmentation / dropout draws
            seed_everything(config.seed + 1000 * self.world.rank)

    def _wrap_loss(self, compute_loss: LossFn) -> LossFn:
        """SyncBatchNorm (``batch_norm: sync``) and the DDP wrapper of a data-parallel run."""
        if self.config.batch_norm == "sync":
            if not (self.world.distributed and self.device.type == "cuda"):
                raise TrainingError("batch_norm: sync needs a multi-process run on CUDA "
                                    "(torch's SyncBatchNorm has no CPU implementation)")
            compute_loss = nn.SyncBatchNorm.convert_sync_batchnorm(compute_loss)  # type: ignore[arg-type]
        if not self.world.distributed:
            return compute_loss
        if not isinstance(compute_loss, nn.Module):
            raise TrainingError("a data-parallel run needs compute_loss to be an nn.Module holding every "
                                "trained parameter (DetectorLoss, Distiller), so that DDP can wrap it")
        check_no_accelerate_state()
        ignored = ddp_ignored_names(compute_loss)
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(compute_loss, ignored)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(compute_loss, device_ids=ids,
                                       find_unused_parameters=self.config.find_unused_parameters)

    # ---- public ------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the end of ``optim.epochs`` (or ``optim.max_steps``); returns a summary.

        Writes ``config.yaml``, ``metrics.jsonl``, ``last.pt`` and ``best.pt`` into the run dir.
        ``resume=True`` continues from ``last.pt`` exactly where it stopped. SIGTERM (e.g. from a
        cluster scheduler) ends the current step, writes ``last.pt`` and raises ``TrainingInterrupted``.
        """
        check_run_dir(self.run_dir, resume)
        with self._run_lock():
            changes = self.resume_from(self.run_dir / LAST) if resume else {}
            self.prepare_run_dir(resume, changes)  # only once the resume is known to be valid
            if not resume:  # resumable from the first moment, and a state from before any divergence
                self.save(LAST)
            self.train_mode()
            with self._signals_stop():
                return self._fit()

    @contextlib.contextmanager
    def _run_lock(self) -> Iterator[None]:
        """Hold the run directory's lock (rank 0) for the whole run; every rank raises the same
        ``TrainingError`` when another process holds it."""
        lock, refusal = RunLock(self.run_dir), ""
        if self.world.is_main:
            try:
                lock.acquire()
            except RunLocked as exc:
                refusal = str(exc)
        if self.world.distributed:
            refusal = broadcast_from_main(refusal)
        if refusal:
            raise TrainingError(refusal)
        try:
            yield
        finally:
            lock.release()

    def _fit(self) -> dict[str, Any]:
        while self.pos.epoch < self.config.optim.epochs:
            if self._reached_max_steps():
                self.save(LAST)
                return self.summary(stopped=True)
            self._run_epoch()
            if self.pos.batch_in_epoch < self.steps_per_epoch:  # stopped by max_steps
                self.save(LAST)
                return self.summary(stopped=True)
            self._end_epoch()
        return self.summary()

    def summary(self, stopped: bool = False) -> dict[str, Any]:
        """Position, best metric and the last evaluation; ``last_epoch``: the 1-based epoch of the
        last step (``metrics.jsonl``'s numbering)."""
        last_epoch = self.pos.epoch + (1 if self.pos.batch_in_epoch else 0)
        return {**asdict(self.pos), "last_epoch": last_epoch, "stopped_early": stopped,
                "last_eval": self.last_eval, "run_dir": str(self.run_dir),
                "family": getattr(self.model, "family", None)}

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint holds (see ``detrkd.checkpoint``); a collective in a
        data-parallel run (every rank's RNG state is gathered)."""
        rng = rng_state()
        ranks_rng = all_gather(rng) if self.world.distributed else None
        return {
            **model_entries(self.model),
            "extra_modules": {k: m.state_dict() for k, m in self.extra_modules.items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            **asdict(self.pos),
            "rng": rng,
            "rank_rng": ranks_rng,
            "world_size": self.world.size,
            "config": config_to_dict(self.config),
            "data_size": len(self.dataset),  # type: ignore[arg-type]
            "batch_size": self.config.data.batch_size,
            "log_window": {"sums": dict(self._window.sums), "steps": self._window.steps},
        }

    def save(self, name: str) -> Path:
        """Atomically write the current state to ``run_dir/name`` (rank 0; the others wait); a
        pending periodic checkpoint (``_maybe_checkpoint``) is superseded."""
        self._pending = None
        state = self.state_dict()
        path = self.run_dir / name
        if self.world.is_main:
            save_checkpoint(path, state)
        barrier()
        return path

    def resume_from(self, path: Path) -> dict[str, list[Any]]:
        """Restore model, extra modules, optimizer, scheduler, position and RNG from ``path``;
        writes nothing. Returns the config keys changed since the checkpoint ({key: [old, new]}),
        every one of them applied: keys a resumed run cannot change (``FIXED_ON_RESUME``) are
        refused, and the learning rates / weight decay, which the restored optimizer would
        otherwise keep, are set from the config (``_apply_optim_config``)."""
        state = load_checkpoint(path, map_location=self.device)
        self._check_resumable(state, path)
        changes = config_changes(with_predated(state.get("config") or {}), config_to_dict(self.config))
        fixed = {k: v for k, v in changes.items() if k.split(".")[0] in FIXED_ON_RESUME or k in FIXED_ON_RESUME}
        if fixed:
            said = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in fixed.items())
            raise TrainingError(f"cannot resume from {path} with a changed {said}: a resumed run keeps "
                                f"these; start a new run in another output directory to change them")
        fresh = [(group["initial_lr"], group["weight_decay"]) for group in self.optimizer.param_groups]
        try:
            load_model_entries(self.model, state)
            for name, module in self.extra_modules.items():
                module.load_state_dict(state["extra_modules"][name])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(f"cannot resume from {path}: its state does not fit the configured "
                                f"model / optimizer (did the model config change?): {first}") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_optim_config(fresh)
        fields = Position.__dataclass_fields__
        self.pos = Position(**{k: state[k] for k in fields if k in state})
        self._window = _Window(**state.get("log_window", {}))
        self._restore_rng(state, path)
        if self.world.is_main:
            log.info("resumed from %s at epoch %d, batch %d (step %d)%s", path, self.pos.epoch + 1,
                     self.pos.batch_in_epoch, self.pos.global_step,
                     "; changed: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
                     if changes else "")
        return changes

    def _apply_optim_config(self, fresh: list[tuple[float, float]]) -> None:
        """After a restore: each group's peak lr and weight decay from the config (the restored
        optimizer and scheduler hold the old ones), the current lr at the restored schedule step."""
        sched = self.scheduler
        for i, (group, (peak, decay)) in enumerate(zip(self.optimizer.param_groups, fresh)):
            group["initial_lr"], group["weight_decay"] = peak, decay
            sched.base_lrs[i] = peak
            group["lr"] = peak * sched.lr_lambdas[i](sched.last_epoch)

    def _restore_rng(self, state: dict[str, Any], path: Path) -> None:
        """This rank's RNG state; after a change in the number of processes the data order is
        still exact (global batches), only augmentation / dropout draws continue differently."""
        ranks = state.get("rank_rng") or [state["rng"]]
        if len(ranks) == self.world.size:
            set_rng_state(ranks[self.world.rank])
            return
        if self.world.is_main:
            log.warning("%s was written by %d processes, this run has %d: data order and weights are "
                        "restored exactly, random augmentation continues with new draws",
                        path, len(ranks), self.world.size)
        set_rng_state(ranks[0])
        if self.world.distributed:
            seed_everything(self.config.seed + 1000 * self.world.rank + self.pos.global_step)

    # ---- setup -------------------------------------------------------------------------
    def _trained_modules(self) -> list[nn.Module]:
        return [self.model, *self.extra_modules.values()]

    def train_mode(self) -> None:
        """Trained modules to train mode; BatchNorm layers stay in eval mode with ``batch_norm: frozen``."""
        for module in self._trained_modules():
            module.train()
            if self.config.batch_norm == "frozen":
                for child in module.modules():
                    if isinstance(child, nn.modules.batchnorm._BatchNorm):
                        child.eval()

    def prepare_run_dir(self, resume: bool, changes: dict[str, list[Any]] | None = None) -> None:
        """Create the run dir, write ``config.yaml``, append to ``provenance.jsonl`` (with the
        config keys a resume changed) and, on resume, drop ``metrics.jsonl`` lines past the
        restored step (rank 0); refuse to start over an existing run or to resume a missing one."""
        check_run_dir(self.run_dir, resume)
        barrier()  # every rank has checked before rank 0 writes anything
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not resume:
                for stale in (self.metrics_path, self.run_dir / PROVENANCE_FILE):
                    stale.unlink(missing_ok=True)
            else:
                truncate_metrics(self.metrics_path, self.pos.global_step)
            dump_config(self.config, self.run_dir / CONFIG_FILE)
            append_run_record(self.run_dir, resume, self.world.size, changes)
        barrier()

    def _check_resumable(self, state: dict[str, Any], path: Path) -> None:
        now = (len(self.dataset), self.config.data.batch_size)  # type: ignore[arg-type]
        then = (state.get("data_size"), state.get("batch_size"))
        if then != now:
            raise TrainingError(
                f"cannot resume from {path}: it was written with {then[0]} training images in "
                f"batches of {then[1]}, the config now gives {now[0]} in batches of {now[1]}")
        missing = sorted(set(self.extra_modules) - set(state.get("extra_modules", {})))
        if missing:
            raise TrainingError(f"cannot resume from {path}: it has no weights for {missing}")

    @contextlib.contextmanager
    def _signals_stop(self) -> Iterator[None]:
        """While training, SIGTERM and SIGINT (Ctrl-C) ask for a clean stop after the current step:
        ``last.pt`` is written and ``TrainingInterrupted`` raised (main thread only). A second
        Ctrl-C while that step finishes stops at once, as Python's default does."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if signum == signal.SIGINT and self._signal == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signum

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # ---- one epoch ---------------------------------------------------------------------
    def _run_epoch(self) -> None:
        """Train over the rest of the current epoch, or until ``max_steps``."""
        cfg, pos = self.config, self.pos
        loader = epoch_loader(self.dataset, self.collate_fn, cfg.data.batch_size, cfg.data.num_workers,
                              cfg.seed, pos.epoch, skip=pos.batch_in_epoch, rank=self.world.rank,
                              world_size=self.world.size)
        bar = tqdm(total=self.steps_per_epoch, initial=pos.batch_in_epoch, disable=not self.progress,
                   desc=f"epoch {pos.epoch + 1}/{cfg.optim.epochs}", dynamic_ncols=True, leave=False)
        with bar:
            fetch_start = time.perf_counter()
            for batch in loader:
                self._step(batch, bar, data_seconds=time.perf_counter() - fetch_start)
                if self._stop or (self._signal is not None and not self.world.distributed):
                    self._interrupt()  # (ranks agree on stopping inside the step)
                if self._reached_max_steps():  # before the next batch is loaded (RNG untouched)
                    return
                fetch_start = time.perf_counter()

    def _interrupt(self) -> None:
        self.save(LAST)
        name = signal.Signals(self._signal).name if self._signal else "a signal on another process"
        raise TrainingInterrupted(
            f"stopped by {name} at step {self.pos.global_step} (epoch {self.pos.epoch + 1}, batch "
            f"{self.pos.batch_in_epoch}); {self.run_dir / LAST} is written; continue with: {resume_command()}",
            signum=self._signal)

    def _reached_max_steps(self) -> bool:
        max_steps = self.config.optim.max_steps
        return max_steps is not None and self.pos.global_step >= max_steps

    def _step(self, batch: Batch, bar: tqdm, data_seconds: float) -> None:
        lrs = self._learning_rates()  # of this step, before the scheduler moves them
        start = time.perf_counter()
        result = self._train_step(to_device(batch, self.device))
        self._settle_pending(finite=result is not None)
        self._window.add_time(time.perf_counter() - start + data_seconds, data_seconds)
        with warnings.catch_warnings():  # a skipped first step makes torch warn about the order
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.pos.global_step += 1
        self.pos.batch_in_epoch += 1
        if result is not None:
            self._window.add(*result)
            bar.set_postfix(loss=f"{result[0]:.4f}", lr=f"{lrs['lr']:.2e}", refresh=False)
        bar.update(1)
        self._maybe_log(lrs)
        self._maybe_checkpoint()

    def _learning_rates(self) -> dict[str, float]:
        """{"lr": the model's learning rate, the largest of its own groups (``main`` / ``backbone``),
        "lr/distill/<method>": that of each method's own group (e.g. the ASM's ``asm_lr``)}."""
        groups = self.optimizer.param_groups
        own = [g["lr"] for g in groups if not g.get("name", "").startswith(METHOD_GROUP_PREFIX)]
        methods = {f"lr/{g['name']}": g["lr"] for g in groups
                   if g.get("name", "").startswith(METHOD_GROUP_PREFIX) and not g["name"].endswith("/no_decay")}
        return {"lr": max(own or [g["lr"] for g in groups]), **methods}

    def _train_step(self, batch: Batch) -> tuple[float, dict[str, float]] | None:
        """Forward, backward, clip, step. None if the step was skipped (non-finite on any rank)."""
        self.optimizer.zero_grad(set_to_none=True)
        try:
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.amp):
                loss, terms = self.compute_loss(batch)
        except NonFinitePredictions:  # NaN predictions: the detector's loss would raise on them
            loss, terms = torch.tensor(math.nan), {"predictions": torch.tensor(math.nan)}
        bad_loss, self._stop = any_flags(not bool(torch.isfinite(loss.detach()).all()), self._signal is not None)
        if bad_loss:
            self._skip("loss", float(loss.detach()), terms)
            return None
        loss.backward()  # DDP: gradients are averaged over ranks here
        norm = self._clip_gradients()
        if not math.isfinite(norm):
            self._skip("gradient norm", norm, terms)
            self.optimizer.zero_grad(set_to_none=True)
            return None
        self.optimizer.step()
        self.pos.nonfinite_in_row = 0
        return float(loss.detach()), {k: float(v.detach()) for k, v in terms.items()}

    def _clip_gradients(self) -> float:
        """Clip to ``optim.clip_grad``; returns the total norm (the same on every rank: the
        gradients are already averaged)."""
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return 0.0
        max_norm = self.config.optim.clip_grad or float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def _skip(self, what: str, value: float, terms: dict[str, Tensor]) -> None:
        """Count a non-finite step; abort after ``max_nonfinite_in_row`` in a row."""
        self.pos.nonfinite_in_row += 1
        self.pos.nonfinite_total += 1
        limit = self.config.optim.max_nonfinite_in_row
        bad = [k for k, v in terms.items() if not torch.isfinite(v.detach()).all()]
        if bad:
            detail = f"non-finite terms: {', '.join(bad)}"
        else:
            detail = "non-finite on another process" if math.isfinite(value) else "all terms finite"
        log.warning("step %d: non-finite %s (%s; %s), step skipped (%d in a row, %d in total)",
                    self.pos.global_step + 1, what, value, detail, self.pos.nonfinite_in_row,
                    self.pos.nonfinite_total)
        if self.pos.nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"the {what} was non-finite for {limit} steps in a row (last at step "
                f"{self.pos.global_step + 1}; {detail}); lower optim.lr, check the data, or raise "
                f"optim.max_nonfinite_in_row")

    # ---- logging and checkpoints -------------------------------------------------------
    def _maybe_log(self, lrs: dict[str, float]) -> None:
        if self.pos.global_step % self.config.log_every_steps:
            return
        window, self._window = self._window, _Window()
        record = mean_values(window.record(self.config.log_every_steps))  # averaged over ranks
        if self.world.is_main:
            append_metrics(self.metrics_path, {
                "type": "train", "step": self.pos.global_step, "epoch": self.pos.epoch + 1, **lrs,
                **record, "skipped_steps": self.pos.nonfinite_total})
            if not self.progress:  # no bar (stderr is not a terminal, or --no-progress): one line instead
                log.info("%s", self._progress_line(lrs["lr"], record))

    def _progress_line(self, lr: float, record: dict[str, float]) -> str:
        """'step 250/3000 (epoch 1/12): loss 12.3456, lr 2.00e-04, 5.3 img/s, ETA 1:02:03'."""
        total = self.config.optim.epochs * self.steps_per_epoch
        if self.config.optim.max_steps is not None:
            total = min(total, self.config.optim.max_steps)
        sec = record.get("sec_per_step", math.nan)
        eta = (total - self.pos.global_step) * sec
        eta_text = "n/a" if not math.isfinite(eta) else str(datetime.timedelta(seconds=round(eta)))
        if eta_text.startswith("0:"):
            eta_text = eta_text[2:]
        loss = record.get("loss", math.nan)
        return (f"step {self.pos.global_step}/{total} (epoch {self.pos.epoch + 1}/{self.config.optim.epochs}): "
                f"loss {loss:.4f}, lr {lr:.2e}, {self.config.data.batch_size / sec:.1f} img/s, ETA {eta_text}")

    def _maybe_checkpoint(self) -> None:
        """The periodic ``last.pt``, written one step late: the state of step s is kept in memory
        and written once step s + 1 is finite, so a diverging update (finite weights, NaN at the
        next forward) never replaces the last good checkpoint."""
        every = self.config.checkpoint_every_steps
        if every and self.pos.global_step % every == 0:
            self._pending = copy.deepcopy(self.state_dict())

    def _settle_pending(self, finite: bool) -> None:
        """After a step: write the pending checkpoint if the step was finite, else drop it."""
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        if finite:
            if self.world.is_main:
                save_checkpoint(self.run_dir / LAST, state)
            barrier()
        elif self.world.is_main:
            log.warning("the state of step %d gave non-finite values at the next step: not saved, %s "
                        "stays as it was", state["global_step"], self.run_dir / LAST)

    def _end_epoch(self) -> None:
        """Evaluate if due, move to the next epoch, write ``last.pt`` (and ``best.pt``)."""
        improved = self._maybe_evaluate()
        self.pos.epoch += 1
        self.pos.batch_in_epoch = 0
        self.save(LAST)
        if improved:
            self.save(BEST)

    def _evaluation_due(self) -> bool:
        every, epoch = self.config.eval_every_epochs, self.pos.epoch + 1
        if self.evaluate_fn is None or every == 0:
            return False
        return epoch % every == 0 or epoch == self.config.optim.epochs

    def _maybe_evaluate(self) -> bool:
        """Run ``evaluate_fn`` if due; True if it improved the best AP."""
        if not self._evaluation_due():
            return False
        stats = self.evaluate()
        ap = stats.get("ap")
        if ap is None or not math.isfinite(ap):
            return False
        if self.pos.best_metric is None or ap > self.pos.best_metric:
            self.pos.best_metric = float(ap)
            return True
        return False

    def evaluate(self) -> dict[str, float]:
        """Run ``evaluate_fn`` now (eval mode, no grad, RNG untouched) and log the result (rank 0)."""
        assert self.evaluate_fn is not None
        modules = self._trained_modules()
        with preserved_rng(), torch.no_grad():
            for module in modules:
                module.eval()
            try:
                stats = self.evaluate_fn(self.model)
            finally:
                self.train_mode()
        self.last_eval = {k: float(v) for k, v in stats.items() if isinstance(v, (int, float))}
        if self.world.is_main:
            append_metrics(self.metrics_path, {"type": "eval", "step": self.pos.global_step,
                                               "epoch": self.pos.epoch + 1, **self.last_eval})
            log.info("epoch %d eval: %s", self.pos.epoch + 1, stats_line(self.last_eval))
        return self.last_eval


def stats_line(stats: dict[str, float]) -> str:
    """'ap=0.4912, ..., apl=n/a, images_per_sec=12.3, num_images=200': COCO's -1 (no GT of that
    size) as n/a, counts as integers."""
    def shown(key: str, value: float) -> str:
        if key.startswith("num_"):
            return str(int(value))
        if key.endswith("_per_sec"):
            return f"{value:.1f}"
        return "n/a" if value < 0 else f"{value:.4f}"

    return ", ".join(f"{k}={shown(k, v)}" for k, v in stats.items())


def ddp_ignored_names(module: nn.Module) -> list[str]:
    """Parameters and buffers DDP must neither synchronise nor broadcast: every frozen parameter
    and all of a direct child without trainable parameters (the teacher: inference only)."""
    names = [n for n, p in module.named_parameters() if not p.requires_grad]
    for child_name, child in module.named_children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            names += [f"{child_name}.{n}" for n, _ in child.named_buffers()]
    return names


