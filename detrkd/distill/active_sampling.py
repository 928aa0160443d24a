"""Matching-free distillation by active sampling (papers/active-sampling-matching-free.md, Sec. 3).

No Hungarian matching, no cost matrix: teacher and student outputs are two unordered sets that are
*sampled* at the same points by attention, and the samples are aligned.

Prediction vectors (Sec. 3.1): per query y = [box (4, normalised cxcywh), class scores (C)], the
scores being the probabilities of the C real classes (``class_probabilities``: softmax heads drop
the no-object column, sigmoid heads are independent sigmoids), so any pair of heads is comparable.
Y_t [B, Qt, 4 + C], Y_s [B, Qs, 4 + C]; Qt != Qs is fine (the sampled sets have the points' size).

Active Sampling Module (ASM, Eq. 9-14, Fig. 2): an MLP (``mlp_layers`` Linear+ReLU of width
``hidden``) and two linear heads project a vector to a query and a key (``dim``, default
``hidden``). For points P (projected to queries q(P)) and a set Y (keys k(Y), values Y itself):

    W = softmax(q(P) k(Y)^T / (sqrt(d) * T))  [B, M, N],      S = W @ Y  [B, M, 4 + C].

- ``heads`` (Table 3): 1 (default, the paper's choice). With h > 1, q and k are split into h
  slices of d / h; each head gives its own weights W_h (scaled by sqrt(d / h)) and the heads'
  samples are AVERAGED: S = mean_h W_h @ Y = (mean_h W_h) @ Y (values are whole predictions, so
  they cannot be split per head and concatenated as in a standard multi-head attention).
- Sampling points (Sec. 3.3, "prior-guided"): ``points="teacher"`` (default) P = Y_t, M = Qt;
  ``"teacher+student"`` P = [Y_t, Y_s], M = Qt + Qs (also samples where the student predicts);
  ``"random"`` P uniform in [0, 1]^(4 + C), M = Qt, redrawn every step (the non-prior ablation).
  Points are data: always detached.

Losses (Sec. 3.4), returned unweighted as {"sampling", "l1", "cls"} (the ``Distiller`` applies
``terms``: 1 / 5 / 1):

- sampling (Eq. 16): the teacher's self-attention W = softmax(q(Y_t) k(Y_t)^T / sqrt(d)) must
  pick output i for point i: L = -mean_i log W_ii (Eq. 16 sums over i; the mean over points,
  images and heads keeps the weight independent of Qt and B). It uses NO temperature: Eq. 15
  introduces T only "during the distillation process", Eq. 16 is on the plain weights W of Eq. 10.
- distillation (Eq. 15, 17): S_t, S_s sampled at the same points with temperature T (default 4,
  Table 4's best; it softens W so several outputs contribute to each sample);
  l1 = lambda_bbox * mean_points sum_4 |S_s box - S_t box|;
  cls = lambda_cls * mean_points D(S_t cls, S_s cls). The sampled class vectors are mixtures of
  probabilities. ``class_kd="kl"`` (the paper's KL): a vector p over the C real classes becomes a
  distribution over C + 1 outcomes, p / max(1, sum p) plus the remaining mass as "no object" (for
  softmax heads this IS the mixture of the C + 1 softmax distributions, exactly the paper's
  vectors; sigmoid vectors summing over 1 are renormalised), then KL(t || s).
  ``"bernoulli"``: per-class binary KL summed over classes (the KL of independent per-class
  probabilities; BCE minus the teacher's entropy). Both are 0 when the samples are equal.
  ``"auto"`` (default): "kl" for a softmax student, "bernoulli" for a sigmoid student. Why: a
  sigmoid student's sample whose probabilities sum to >= 1 (90% of a fresh RT-DETR tiny student's
  queries) has its no-object mass clamped to 0 in the C + 1 form; the KL then sits at
  t_no-object * log(t_no-object / eps) (about 10) and is scale-invariant in p, so it gives NO
  gradient towards lower class probabilities, which is what a mostly-background teacher asks for.
  The Bernoulli KL is the KL of exactly what a sigmoid head models and has a gradient everywhere.
  The paper gives no lambdas: defaults are DETR's L1 / class weights, 5 and 1; sampling 1 (Eq. 18).
- ``rebalance`` (detrkd's option, off by default = the paper): the per-point means become means
  weighted by the teacher's confidence at the point, w_i = max_c S_t[i, c] (detached; KD-DETR's
  foreground weight, Eq. 5 there), sum_i w_i x_i / sum_i w_i. Why it was tried: on the digits data
  90% of the teacher's 100 predictions are background (confidence < 0.1) and carry over 90% of
  both terms, and the 30-query student moved away from the teacher at its confident points
  (``benchmarks/as_points.py``). Measured there it is WORSE than the plain means (README ->
  Benchmarks -> Accuracy), so it stays off by default.
- ``layers="last"``: final layers only; ``"all"``: student layer i vs teacher layer
  round(i * (Lt - 1) / (Ls - 1)) (LAPD's ``layer_pairs``), distillation terms summed over pairs
  (as DETR sums auxiliary losses), sampling loss averaged over the teacher layers used (one ASM).

Training the ASM (``asm_lr``, ``asm_warmup``): the ASM is a fresh module next to a student that
trains for a whole schedule, so it gets its own optimiser group, peak lr 1e-3 and no warm-up by
default. At the student's own settings (peak 2e-4 after 300 warm-up steps) the sampling loss sat at
ln Qt for about 300 steps: W was uniform, every sample was the set mean, and the distillation terms
pulled every student output towards that mean. Offline, on the digits teacher's outputs
(``benchmarks/asm_sharpening.py``, ``results/active_sampling/asm_sharpening.txt``), W_ii at step
300 is 0.065 at 2e-4 and 0.67 at 1e-3, even with the warm-up.

Precision (``precision``): "float32" (default) computes everything in float32. "bfloat16" runs
the ASM's MLP and the q.k products (with the MLP, the Q x Q x dim matmuls are most of the method's
time at 900 queries) under ``torch.autocast`` in bfloat16; the scores are cast back to float32 before every
softmax, and the samples S = W @ Y, the losses and the ASM's weights stay float32. Measured at
B 8, Q 900, C 10, 1 CPU thread with AMX (``benchmarks/as_speed.py``, ``results/overhead/
as_speed.txt``): the method's forward and backward take 0.51x the float32 time; with an ASM trained
60 steps on Eq. 16 the terms agree to 1e-4 and the gradients to 2.1% (student) and 1.3% (ASM) in
relative norm (8% for the ASM's near-zero gradients while it is fresh). On a CPU without bfloat16
matmul units it can be slower, not faster. Under the engine's ``amp`` (GPU) the ASM
already runs in bfloat16 either way; the scores are float32 before the softmax in both settings.

Gradient routing (the decision; tests check each term separately):
- sampling loss -> the ASM only. Its inputs are the teacher's predictions, detached.
- l1 / cls -> the student only, through its predictions both as values (Y_s) and as keys (k(Y_s)).
  The ASM weights are DETACHED in the distillation loss (keys of Y_s go through a parameter-detached
  copy of the ASM, teacher-side queries and keys are detached). Reason: if the distillation loss
  trained the ASM it could lower itself without the student learning anything: by flattening
  q.k to a constant, W becomes uniform and S_t, S_s collapse to the set means, so only the mean
  prediction is compared (or, more generally, by sampling where the two sets happen to agree). The
  ASM must stay a faithful sampler of the teacher's distribution, which is what Eq. 16 trains.
- the teacher: never (its predictions are detached here even when its forward kept a graph).

Every operation is a batched tensor op: no matching, no solver, no per-image loop.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import ContextManager, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.base import ClassHead, DetectorOutput
from .base import DistillContext, DistillMethod
from .losses import class_probabilities
from .pairing import layer_pairs

PointsKind = Literal["teacher", "teacher+student", "random"]
# (Y_t [B, Qt, 4 + C], q(Y_t) [B, Qt, d], k(Y_t) [B, Qt, d], their scores [B, h, Qt, Qt] at T = 1)
TeacherSide = tuple[Tensor, Tensor, Tensor, Tensor]
ClassDistance = Literal["auto", "kl", "bernoulli"]
Precision = Literal["float32", "bfloat16"]
EPS = 1e-6


def prediction_vectors(logits: Tensor, boxes: Tensor, head: ClassHead) -> Tensor:
    """logits [..., Q, K], boxes [..., Q, 4] -> y [..., Q, 4 + C] = [box, real-class probabilities]."""
    return torch.cat([boxes, class_probabilities(logits, head).to(boxes.dtype)], -1)


class SamplingModule(nn.Module):
    """The ASM projection: y [..., 4 + C] -> (query [..., dim], key [..., dim]).

    An MLP of ``layers`` Linear+ReLU blocks of width ``hidden`` shared by both, then one linear
    head each. ``frozen_keys(y)`` is the key projection with the parameters detached (gradients
    reach ``y`` only).
    """

    def __init__(self, in_dim: int, hidden: int = 256, dim: int | None = None, layers: int = 2):
        super().__init__()
        if layers < 1:
            raise ValueError(f"the ASM MLP needs at least one layer, got {layers}")
        widths = [in_dim] + [hidden] * layers
        self.mlp = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())])
        self.query = nn.Linear(hidden, dim or hidden)
        self.key = nn.Linear(hidden, dim or hidden)

    @property
    def dim(self) -> int:
        return self.query.out_features

    def forward(self, y: Tensor) -> tuple[Tensor, Tensor]:
        h = self.mlp(y.to(self.query.weight.dtype))
        return self.query(h), self.key(h)

    def frozen_keys(self, y: Tensor) -> Tensor:
        """The keys only, with detached parameters: [..., 4 + C] -> [..., dim] (gradients reach
        ``y`` only; the query head is not run)."""
        h = y.to(self.key.weight.dtype)
        for layer in self.mlp:
            h = F.linear(h, layer.weight.detach(), layer.bias.detach()) if isinstance(layer, nn.Linear) else layer(h)
        return F.linear(h, self.key.weight.detach(), self.key.bias.detach())


def sampling_logits(queries: Tensor, keys: Tensor, heads: int = 1, temperature: float = 1.0) -> Tensor:
    """queries [B, M, d], keys [B, N, d] -> scores [B, h, M, N] / (sqrt(d / h) * T) (the scale is
    applied to the queries, M x d numbers, not to the M x N scores). Scores of a half-precision
    product (under autocast) are returned in float32, for the softmax."""
    b, m, d = queries.shape
    if d % heads:
        raise ValueError(f"ASM dim {d} is not divisible by heads={heads}")
    q = (queries / (math.sqrt(d // heads) * temperature)).view(b, m, heads, d // heads).transpose(1, 2)
    k = keys.view(b, keys.shape[1], heads, d // heads).transpose(1, 2)
    scores = q @ k.transpose(-1, -2)
    return scores.float() if scores.dtype in (torch.bfloat16, torch.float16) else scores


def head_mean(weights: Tensor) -> Tensor:
    """[B, h, M, N] -> [B, M, N], the mean over heads (a view for one head)."""
    return weights.squeeze(1) if weights.shape[1] == 1 else weights.mean(1)


def sampling_weights(queries: Tensor, keys: Tensor, heads: int = 1, temperature: float = 1.0) -> Tensor:
    """Head-averaged sampling weights [B, M, N] (rows sum to 1) of queries [B, M, d] over keys [B, N, d]."""
    return head_mean(sampling_logits(queries, keys, heads, temperature).softmax(-1))


def sample(queries: Tensor, keys: Tensor, values: Tensor, heads: int = 1,
           temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Soft sampling (Eq. 14/15): queries [B, M, d], keys [B, N, d], values [B, N, V] ->
    (samples [B, M, V], weights [B, M, N])."""
    weights = sampling_weights(queries, keys, heads, temperature)
    return weights @ values.to(weights.dtype), weights


def sampling_loss(queries: Tensor, keys: Tensor, heads: int = 1) -> Tensor:
    """Eq. 16 on a self-attention (queries, keys [B, Q, d] of the same set), T = 1:
    -mean over images, heads and points of log W_ii."""
    return diagonal_nll(sampling_logits(queries, keys, heads))


def diagonal_nll(scores: Tensor) -> Tensor:
    """Eq. 16 from self-attention scores [B, h, Q, Q] (``sampling_logits`` at T = 1):
    -mean of log softmax(scores)_ii = mean of (logsumexp_j scores_ij - scores_ii)."""
    return (scores.logsumexp(-1) - scores.diagonal(dim1=-2, dim2=-1)).mean()


def class_distance(student: Tensor, teacher: Tensor, mode: ClassDistance = "kl") -> Tensor:
    """Per-sample distance [...] of sampled class vectors [..., C] (module docstring: the modes)."""
    if mode == "kl":
        t, s = _with_no_object(teacher), _with_no_object(student)
        return (t * (t.log() - s.log())).sum(-1)
    if mode == "bernoulli":
        t, s = teacher.clamp(EPS, 1 - EPS), student.clamp(EPS, 1 - EPS)
        return (t * (t.log() - s.log()) + (1 - t) * ((1 - t).log() - (1 - s).log())).sum(-1)
    raise ValueError(f"unknown class_kd {mode!r}; use 'kl' or 'bernoulli'")


def _with_no_object(p: Tensor) -> Tensor:
    """[..., C] real-class scores -> [..., C + 1] distribution (last = remaining "no object" mass)."""
    p = p / p.sum(-1, keepdim=True).clamp(min=1.0)
    rest = (1 - p.sum(-1, keepdim=True)).clamp(min=0.0)
    return torch.cat([p, rest], -1).clamp(min=EPS)


class ActiveSampling(DistillMethod):
    """Matching-free active-sampling distillation; ``forward(ctx) -> {"sampling", "l1", "cls"}``.

    hidden / dim / mlp_layers: ASM sizes (``dim`` defaults to ``hidden``); heads: attention heads
    (samples averaged over heads); points: "teacher" | "teacher+student" | "random";
    temperature: T of the distillation sampling weights (Eq. 15; the sampling loss uses 1);
    class_kd: "auto" (by the student's head) | "kl" | "bernoulli";
    rebalance: weight points by the teacher's confidence (module docstring); layers: "last" | "all";
    asm_lr / asm_warmup: the ASM's peak learning rate (None: the student's) and warm-up;
    precision: "float32" | "bfloat16" for the ASM's MLP and q.k products (module docstring).
    ``num_classes`` is taken from ``teacher`` when not given. The terms are unweighted: sampling 1,
    L1 5, class 1 are ``terms``, applied by the ``Distiller``.
    """

    terms = {"sampling": 1.0, "l1": 5.0, "cls": 1.0}

    def __init__(self, student: object = None, teacher: object = None, *, num_classes: int | None = None,
                 hidden: int = 256, dim: int | None = None, mlp_layers: int = 2, heads: int = 1,
                 points: PointsKind = "teacher", temperature: float = 4.0, class_kd: ClassDistance = "auto",
                 rebalance: bool = False, layers: Literal["last", "all"] = "last", asm_lr: float | None = 1e-3,
                 asm_warmup: bool = False, precision: Precision = "float32"):
        super().__init__()
        num_classes = num_classes if num_classes is not None else getattr(teacher, "num_classes", None)
        if num_classes is None:
            raise ValueError("ActiveSampling needs the teacher or num_classes to size its sampling module")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.asm = SamplingModule(4 + int(num_classes), hidden, dim, mlp_layers)
        if heads < 1 or self.asm.dim % heads:
            raise ValueError(f"heads={heads} must be >= 1 and divide the ASM dim {self.asm.dim}")
        self.num_classes, self.heads, self.points = int(num_classes), int(heads), points
        self.temperature, self.class_kd, self.layers = float(temperature), class_kd, layers
        self.rebalance = bool(rebalance)
        if asm_lr is not None and asm_lr <= 0:
            raise ValueError(f"asm_lr must be > 0 (or null: the student's lr), got {asm_lr}")
        self.asm_lr, self.asm_warmup = (None if asm_lr is None else float(asm_lr)), bool(asm_warmup)
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
        self.precision = precision

    def optim_options(self) -> dict[str, object]:
        """The ASM's optimiser: ``asm_lr`` (None: the student's) and no warm-up unless ``asm_warmup``
        (module docstring, "Training the ASM")."""
        return {**({"lr": self.asm_lr} if self.asm_lr is not None else {}), "warmup": self.asm_warmup}

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        pairs = layer_pairs(ctx.student_out.predictions.num_layers, ctx.teacher_out.predictions.num_layers,
                            self.layers)
        teacher = {t: self.teacher_side(ctx.teacher_out, t) for t in sorted({t for _, t in pairs})}
        sampling = torch.stack([diagonal_nll(side[3]) for side in teacher.values()]).mean()
        mode = self.class_mode(ctx.student_out.class_head)
        per_layer = [self.distill(teacher[t], layer_vectors(ctx.student_out, s), mode) for s, t in pairs]
        return {"sampling": sampling,
                "l1": torch.stack([l1 for l1, _ in per_layer]).sum(),
                "cls": torch.stack([cls for _, cls in per_layer]).sum()}

    def teacher_side(self, out: DetectorOutput, layer: int) -> TeacherSide:
        """(Y_t [B, Qt, 4 + C] detached, q(Y_t), k(Y_t) [B, Qt, d] and their self-attention scores
        [B, h, Qt, Qt] at T = 1, with ASM gradients)."""
        y_t = layer_vectors(out, layer).detach()
        with self.products(y_t):
            q_t, k_t = self.asm(y_t)
            return y_t, q_t, k_t, sampling_logits(q_t, k_t, self.heads)

    def products(self, like: Tensor) -> ContextManager[object]:
        """The context of the ASM's MLP and q.k products: bfloat16 autocast on ``like``'s device
        for ``precision="bfloat16"``, else no change (an outer autocast, e.g. ``amp``, applies)."""
        if self.precision == "bfloat16":
            return torch.autocast(like.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def class_mode(self, student_head: ClassHead) -> str:
        """The class distance used for a student head ("auto": "kl" for softmax, "bernoulli" for sigmoid)."""
        if self.class_kd != "auto":
            return self.class_kd
        return "kl" if student_head == "softmax" else "bernoulli"

    def distill(self, teacher: TeacherSide, y_s: Tensor, mode: str = "kl") -> tuple[Tensor, Tensor]:
        """Unweighted (l1, cls) of one layer pair; teacher = ``teacher_side`` output, y_s [B, Qs, 4 + C];
        mode: the class distance ("kl" | "bernoulli")."""
        s_t, s_s = self.samples(teacher, y_s)
        l1, cls = self.point_losses(s_s, s_t, mode)
        if not self.rebalance:
            return l1.mean(), cls.mean()
        w = s_t[..., 4:].max(-1).values  # [B, M], a constant (S_t is)
        norm = w.sum().clamp(min=EPS)
        return (w * l1).sum() / norm, (w * cls).sum() / norm

    def point_losses(self, s_s: Tensor, s_t: Tensor, mode: str = "kl") -> tuple[Tensor, Tensor]:
        """Unweighted per-point (L1 summed over the 4 box coordinates, class distance ``mode``),
        each [B, M], of samples S_s, S_t [B, M, 4 + C]."""
        l1 = (s_s[..., :4] - s_t[..., :4]).abs().sum(-1)
        return l1, class_distance(s_s[..., 4:], s_t[..., 4:], mode)

    def samples(self, teacher: TeacherSide, y_s: Tensor) -> tuple[Tensor, Tensor]:
        """(S_t, S_s) [B, M, 4 + C] at the same points, temperature T; S_t is a constant."""
        y_t, q_t, k_t, scores_t = teacher
        with self.products(y_s):
            q_p = self.point_queries(y_t, q_t, y_s)
            k_s = self.asm.frozen_keys(y_s)
            if self.points == "teacher":  # points = Y_t: q(Y_t) k(Y_t)^T is the sampling loss's, reuse it
                w_t = head_mean((scores_t.detach() / self.temperature).softmax(-1))
            else:
                w_t = sampling_weights(q_p, k_t.detach(), self.heads, self.temperature)
            w_s = sampling_weights(q_p, k_s, self.heads, self.temperature)
        return w_t @ y_t.to(w_t.dtype), w_s @ y_s.to(w_s.dtype)  # S = W @ Y outside the autocast: float32

    @torch.no_grad()
    def point_queries(self, y_t: Tensor, q_t: Tensor, y_s: Tensor) -> Tensor:
        """Detached queries of the sampling points [B, M, d] (M = Qt, or Qt + Qs for "teacher+student")."""
        if self.points == "teacher":
            return q_t.detach()
        if self.points == "teacher+student":
            return torch.cat([q_t.detach(), self.asm(y_s.detach())[0]], 1)
        return self.asm(torch.rand_like(y_t))[0]

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, heads={self.heads}, points={self.points}, "
                f"temperature={self.temperature}, class_kd={self.class_kd}, rebalance={self.rebalance}, "
                f"layers={self.layers}, precision={self.precision}")


def layer_vectors(out: DetectorOutput, layer: int) -> Tensor:
    """[B, Q, 4 + C] prediction vectors of one decoder layer."""
    logits, boxes = out.predictions.layer(layer)
    return prediction_vectors(logits, boxes, out.class_head)

