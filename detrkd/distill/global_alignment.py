"""Global alignment: DETRDistill-style Hungarian-matching prediction distillation (a baseline).

Per image and per (student layer, teacher layer) pair, ALL teacher predictions are Hungarian-matched
to ALL student predictions (cost: soft class 1, L1 5, GIoU 2, the teacher-vs-student cost of
``pairing.prediction_cost``), and the student mimics its matched teacher prediction: class KD (BCE on
the teacher's probabilities, or KL) + L1 + GIoU, weights 1 / 5 / 2. With Qt != Qs queries every
problem yields min(Qt, Qs) pairs (the surplus queries of the larger side get no distillation).
This is the matching QSKD Table 7 and the active-sampling paper's Table 2 call slow.

Speed (the baseline must not be a strawman; measured on the 2-core CPU, one torch thread, 900 x 900):
- Costs: one [P, Qt, Qs] float32 CPU tensor for all P = (layer pairs) x B problems, filled in
  chunks of about ``chunk_elements`` entries (one 900 x 900 problem, or ~11 of 300 x 300): one
  [8, 900, 900] call is ~3x slower than 8 single calls (its intermediates fall out of cache).
  On a GPU the whole tensor is one call and one device-to-host copy.
- Solver: ``matching.linear_assignment`` picks per shape: lapjv for (near-)square problems
  (900 x 900: ~7-16 ms vs scipy ~50 ms), scipy for tall/wide ones (e.g. 100 student x 300 teacher).
- Costs are computed in place (``pairwise_cost(out=...)``): fresh [Qt, Qs] allocations were most
  of the cost (900 x 900: 20 vs 60 ms).
- Overlap: both solvers release the GIL (their extension modules call PyEval_SaveThread), so with
  ``workers`` > 0 each chunk's problems are solved on a thread pool while the main thread computes
  the next chunk's costs. See ``DEFAULT_WORKERS`` for the measurement behind the default (2).
``reference_alignment`` is the naive version of the same matching for benchmarks: per layer pair,
one [B, Qt, Qs] cost, then scipy per image, serially (what a DETR-style matcher loop does).
``GlobalAlignment.last_timing`` holds the seconds of the last call's phases.

Deviations from DETRDistill (documented in docs/DESIGN.md): no teacher-query prior ("query-prior
assignment") and no feature part (use ``agfd`` with ``mask: none`` or ``fitnet`` beside it);
``weighting="teacher_score"`` (per-pair weight = the teacher's max class probability, KD-DETR's
foreground weight) is an option, off by default.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from ..matching import CostWeights, Solver, linear_assignment
from ..models.base import ClassHead, Predictions
from .base import DistillContext, DistillMethod
from .losses import ClassKD, foreground_weight, pair_losses
from .pairing import Alignment, empty_alignment, gather_flat, layer_pairs, prediction_cost

# entries of one cost chunk on the CPU (4 MiB of float32): one 900 x 900 problem per chunk
CHUNK_ELEMENTS = 1 << 20
# Solver threads; 0 = solve in the calling thread. Both solvers release the GIL, so a pool solves
# while the main thread computes the next chunk's costs. Measured alone on the 2-core CPU
# (``benchmarks/ga_workers.py``: 16 problems of 900 x 900, 2 torch threads): 773 ms serial,
# 721 ms with 1 worker, 530 ms with 2; the naive per-layer scipy reference 2443 ms.
DEFAULT_WORKERS = 2


@functools.lru_cache(maxsize=None)
def _executor(workers: int) -> ThreadPoolExecutor:
    """One shared pool per size (threads live for the process; the solvers release the GIL)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="detrkd-lap")


def stack_layer_pairs(student: Predictions, teacher: Predictions,
                      pairs: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The layer pairs as one batch of P = len(pairs) * B problems, problem p = pair j * B + image b.

    Returns student logits [P, Qs, Ks], boxes [P, Qs, 4] (with gradients) and teacher logits
    [P, Qt, Kt], boxes [P, Qt, 4] (detached).
    """
    s_idx = torch.tensor([s for s, _ in pairs], device=student.logits.device)
    t_idx = torch.tensor([t for _, t in pairs], device=teacher.logits.device)
    return (student.logits[s_idx].flatten(0, 1), student.boxes[s_idx].flatten(0, 1),
            teacher.logits[t_idx].detach().flatten(0, 1), teacher.boxes[t_idx].detach().flatten(0, 1))


def solve_costs(cost: np.ndarray, solver: Solver = "auto", workers: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ``linear_assignment`` per problem of cost [P, N, M] -> P (rows, cols); workers > 0:
    solved on a thread pool (the results are the same)."""
    if workers > 0:
        return [f.result() for f in [_executor(workers).submit(linear_assignment, c, solver) for c in cost]]
    return [linear_assignment(c, solver) for c in cost]


def global_alignment(student_logits: Tensor, student_boxes: Tensor, teacher_logits: Tensor,
                     teacher_boxes: Tensor, heads: tuple[ClassHead, ClassHead],
                     cost_weights: CostWeights | tuple[float, float, float] = CostWeights(),
                     solver: Solver = "auto", workers: int = DEFAULT_WORKERS,
                     chunk_elements: int = CHUNK_ELEMENTS) -> tuple[Alignment, dict[str, float]]:
    """Optimal teacher-vs-student assignment of each of P independent problems.

    student_logits [P, Qs, Ks], student_boxes [P, Qs, 4], teacher_logits [P, Qt, Kt], teacher_boxes
    [P, Qt, 4]; heads = (student head, teacher head). Returns the pairs as flat indices
    (``student`` [P * k] = p * Qs + q_s, ``teacher`` = p * Qt + q_t, k = min(Qt, Qs), ordered by
    problem; each problem is posed teacher rows x student columns) and the seconds spent: {"cost": computing costs, "solve": the rest of the matching
    (solving not hidden behind cost computation), "match": both}.
    """
    (p, qt), qs = teacher_logits.shape[:2], student_logits.shape[1]
    start = time.perf_counter()
    cost = torch.empty(p, qt, qs)  # float32 CPU, shared with cost_np
    cost_np = cost.numpy()
    on_cpu = teacher_logits.device.type == "cpu"
    step = max(1, chunk_elements // max(qt * qs, 1)) if on_cpu else max(p, 1)
    pool = _executor(workers) if workers > 0 else None
    results: list = []
    cost_seconds = 0.0
    for lo in range(0, p, step):
        chunk = slice(lo, min(p, lo + step))
        t0 = time.perf_counter()
        buffer = cost[chunk] if on_cpu else teacher_logits.new_empty(cost[chunk].shape, dtype=torch.float32)
        buffer = prediction_cost(student_logits[chunk], student_boxes[chunk], teacher_logits[chunk],
                                 teacher_boxes[chunk], heads, cost_weights, out=buffer)
        if not on_cpu:
            cost[chunk] = buffer  # one device-to-host copy (the only chunk on a GPU)
        cost_seconds += time.perf_counter() - t0
        for c in cost_np[chunk]:
            results.append(pool.submit(linear_assignment, c, solver) if pool else linear_assignment(c, solver))
    solved = [r.result() if isinstance(r, Future) else r for r in results]
    match_seconds = time.perf_counter() - start
    align = _flat_pairs(solved, qt, qs, teacher_logits.device)
    return align, {"cost": cost_seconds, "solve": match_seconds - cost_seconds, "match": match_seconds}


@torch.no_grad()
def reference_alignment(student_logits: Tensor, student_boxes: Tensor, teacher_logits: Tensor,
                        teacher_boxes: Tensor, heads: tuple[ClassHead, ClassHead], batch: int,
                        cost_weights: CostWeights | tuple[float, float, float] = CostWeights()) -> Alignment:
    """The same matching done naively (for benchmarks): per layer pair one [B, Qt, Qs] cost (the
    P problems in groups of ``batch``), copied to the CPU, then scipy per image, serially.
    Inputs and output as ``global_alignment``."""
    (p, qt), qs = teacher_logits.shape[:2], student_logits.shape[1]
    solved = []
    for lo in range(0, p, batch):
        layer = slice(lo, min(p, lo + batch))
        cost = prediction_cost(student_logits[layer], student_boxes[layer], teacher_logits[layer],
                               teacher_boxes[layer], heads, cost_weights).cpu().numpy()
        solved += [linear_sum_assignment(c) for c in cost]
    return _flat_pairs(solved, qt, qs, teacher_logits.device)


def _flat_pairs(solved: list[tuple[np.ndarray, np.ndarray]], qt: int, qs: int, device: torch.device) -> Alignment:
    """Per-problem (teacher rows, student cols) -> flat Alignment (p * Q + q), problem order."""
    if not solved or not len(solved[0][0]):
        return empty_alignment(device)
    problem = np.arange(len(solved), dtype=np.int64)[:, None]
    rows = np.stack([r for r, _ in solved]).astype(np.int64)  # [P, k]: every problem has k = min(Qt, Qs)
    cols = np.stack([c for _, c in solved]).astype(np.int64)
    return Alignment(torch.from_numpy((problem * qs + cols).ravel()).to(device),
                     torch.from_numpy((problem * qt + rows).ravel()).to(device))


class GlobalAlignment(DistillMethod):
    """DETRDistill-style global alignment; ``forward(ctx) -> {"cls", "l1", "giou"}``.

    layers: "all" (default, every decoder layer as DETRDistill) | "last"; pairing: "index" |
    "last" (``pairing.layer_pairs``: student layer i vs the teacher layer at the same relative depth,
    or every student layer vs the teacher's last); cost_weights:
    matching cost (class, L1, GIoU); class_kd: "bce" | "kl"; temperature (for "kl"); weighting:
    "none" | "teacher_score" (per-pair weight = the teacher's max class probability);
    layer_reduction: "sum" (default; like DETR's auxiliary losses) | "mean" of the per-layer terms.
    Each layer pair's terms are a (weighted) mean over its B * min(Qt, Qs) pairs.
    solver: "auto" | "scipy" | "lapjv" (``matching.linear_assignment``); workers: solver threads
    (0 = none); reference: match with ``reference_alignment`` instead (naive per-layer scipy,
    for benchmarks; ``solver`` / ``workers`` are then unused).
    ``last_timing``: seconds of the last call: cost, solve, match (= cost + solve), loss, total.
    The terms are unweighted (class / L1 / GIoU 1 / 5 / 2 are ``terms``, applied by the ``Distiller``).
    ``student`` / ``teacher`` are accepted (and unused) for ``build_methods``.
    """

    terms = {"cls": 1.0, "l1": 5.0, "giou": 2.0}

    def __init__(self, student: object = None, teacher: object = None, *,
                 layers: Literal["all", "last"] = "all", pairing: Literal["index", "last"] = "index",
                 cost_weights: Sequence[float] = (1.0, 5.0, 2.0),
                 class_kd: ClassKD = "bce", temperature: float = 1.0,
                 weighting: Literal["none", "teacher_score"] = "none",
                 layer_reduction: Literal["sum", "mean"] = "sum", solver: Solver = "auto",
                 workers: int = DEFAULT_WORKERS, reference: bool = False):
        super().__init__()
        if len(cost_weights) != 3:
            raise ValueError("global_alignment cost_weights is a (class, L1, GIoU) triple")
        if int(workers) < 0:
            raise ValueError(f"global_alignment workers must be >= 0, got {workers}")
        self.layers, self.pairing = layers, pairing
        self.cost_weights = CostWeights(*(float(w) for w in cost_weights))
        self.class_kd, self.temperature, self.weighting = class_kd, float(temperature), weighting
        self.layer_reduction, self.solver, self.workers = layer_reduction, solver, int(workers)
        self.reference = bool(reference)
        self.last_timing: dict[str, float] = {}

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        start = time.perf_counter()
        s_pred, t_pred = ctx.student_out.predictions, ctx.teacher_out.predictions
        pairs = layer_pairs(s_pred.num_layers, t_pred.num_layers, self.layers, self.pairing)
        s_logits, s_boxes, t_logits, t_boxes = stack_layer_pairs(s_pred, t_pred, pairs)  # [P, Q, .]
        heads = (ctx.student_out.class_head, ctx.teacher_out.class_head)
        align, timing = self.match(s_logits, s_boxes, t_logits, t_boxes, heads, batch=s_pred.logits.shape[1])
        t0 = time.perf_counter()
        terms = self.loss(align, s_logits, s_boxes, t_logits, t_boxes, heads, len(pairs))
        timing["loss"] = time.perf_counter() - t0
        timing["total"] = time.perf_counter() - start
        self.last_timing = timing
        return terms

    def match(self, s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor,
              heads: tuple[ClassHead, ClassHead], batch: int) -> tuple[Alignment, dict[str, float]]:
        """(Alignment over the P problems, timing) with the configured implementation."""
        if not self.reference:
            return global_alignment(s_logits.detach(), s_boxes.detach(), t_logits, t_boxes, heads,
                                    self.cost_weights, self.solver, self.workers)
        start = time.perf_counter()
        align = reference_alignment(s_logits.detach(), s_boxes.detach(), t_logits, t_boxes, heads, batch,
                                    self.cost_weights)
        return align, {"match": time.perf_counter() - start}

    def loss(self, align: Alignment, s_logits: Tensor, s_boxes: Tensor, t_logits: Tensor, t_boxes: Tensor,
             heads: tuple[ClassHead, ClassHead], num_pairs: int) -> dict[str, Tensor]:
        """Unweighted {"cls", "l1", "giou"}: per layer pair a (weighted) mean over its pairs, then
        summed (or averaged) over layer pairs; one batched ``pair_losses`` call."""
        t_logits_p = gather_flat(t_logits, align.teacher)  # [n_pairs * B * k, Kt]
        if self.weighting == "teacher_score":
            w = foreground_weight(t_logits_p, heads[1])
        else:
            w = t_logits_p.new_ones(t_logits_p.shape[0])
        if len(w):
            per_layer = w.view(num_pairs, -1)
            w = (per_layer / per_layer.sum(1, keepdim=True).clamp(min=1e-6)).flatten()
        scale = float(num_pairs) if self.layer_reduction == "mean" else 1.0
        return pair_losses(gather_flat(s_logits, align.student), gather_flat(s_boxes, align.student),
                           t_logits_p, gather_flat(t_boxes, align.teacher), *heads,
                           self.class_kd, self.temperature, pair_weight=w, normaliser=scale)

    def extra_repr(self) -> str:
        return (f"layers={self.layers}, pairing={self.pairing}, class_kd={self.class_kd}, "
                f"weighting={self.weighting}, solver={self.solver}, workers={self.workers}, "
                f"reference={self.reference}")
