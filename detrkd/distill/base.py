"""The distillation API shared by every method.

A ``Distiller`` holds a frozen teacher, a student and named methods. One training step:

    teacher forward (eval mode, ``torch.no_grad``)  ->  teacher ``DetectorOutput``
    student forward with labels                      ->  student ``DetectorOutput`` + detection loss
    each method(context)                             ->  dict of named, UNWEIGHTED loss terms
    the Distiller                                    ->  lambda_m * w_m,t * term, summed with the detection loss

Profiler ranges (``torch.profiler.record_function``; free when no profiler runs) name the parts
of a step: ``detrkd::teacher``, ``detrkd::student``, ``detrkd::method/<name>``.

Weights live in one place, the Distiller: the total loss is ``detection loss + sum_m lambda_m *
sum_t w_m,t * term_m,t``, with lambda the method's ``weight`` and ``w`` its per-term weights (the
class's ``terms`` defaults, overridden by the config's ``methods.NAME.terms``). Every term is logged
twice: ``"<method>/<term>"`` scaled (these and ``det/loss`` add up to the loss) and
``"<method>/<term>:unscaled"`` as the method returned it. Methods are ``nn.Module``s (their learned
parts, e.g. connectors and adapters, are trained with the student) built as ``Class(student, teacher,
**options)``, with ``forward(ctx: DistillContext) -> dict[str, Tensor]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NamedTuple

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from ..distributed import detection_loss
from ..matching import MatcherCosts, matcher_costs
from ..models.base import DetectorOutput, DetrAdapter
from .query_selection import QuerySelection, group_query_selection


@dataclass
class DistillContext:
    """What a method sees in one step.

    student, teacher:   the two adapters (``teacher.decode`` must be called under no_grad)
    student_out:        student forward with labels (gradients flow)
    teacher_out:        teacher forward, no gradients
    targets:            per image dict(class_labels [n], boxes [n, 4] normalised cxcywh)
    cache:              per-step scratch space shared by methods (e.g. a GQS result reused by two)
    """

    student: DetrAdapter
    teacher: DetrAdapter
    student_out: DetectorOutput
    teacher_out: DetectorOutput
    targets: list[dict[str, Tensor]]
    cache: dict[str, Any] = field(default_factory=dict)

    def selection(self, who: Literal["teacher", "student"], layer: int = -1,
                  threshold: float = 0.0) -> QuerySelection:
        """Group Query Selection of one model's decoder layer vs GT (on detached predictions, with
        the model's own matcher costs), computed once per step and shared by every method that asks
        for the same one."""
        out, model = (self.teacher_out, self.teacher) if who == "teacher" else (self.student_out, self.student)
        layer = layer % out.predictions.num_layers
        key = f"gqs/{who}/layer{layer}/threshold{float(threshold)}"
        if key not in self.cache:
            logits, boxes = out.predictions.layer(layer)
            self.cache[key] = group_query_selection(logits.detach(), boxes.detach(), self.targets,
                                                    out.class_head, threshold=threshold,
                                                    costs=model_costs(model))
        return self.cache[key]


def model_costs(model: DetrAdapter | None) -> MatcherCosts:
    """A model's own matcher costs (``matcher_costs``); DETR's defaults for a context built without
    models (unit tests on hand-made predictions)."""
    return MatcherCosts() if model is None else matcher_costs(model.config)


class DistillMethod(nn.Module):
    """Base class of a distillation method: ``forward(ctx) -> {term: unweighted loss}``.

    ``terms``: every term the method returns, with its default weight (the paper's). The other
    class attributes tell the ``Distiller`` what the forward passes must produce.
    """

    terms: ClassVar[dict[str, float]] = {}

    needs_teacher_attention: ClassVar[bool] = False
    needs_student_attention: ClassVar[bool] = False
    # compares the two encoder memories token by token: both models must see the same input grid
    compares_memory: ClassVar[bool] = False
    # the students it distils into: "detr" (a DetrAdapter), "cnn" (a torchvision CNN, models.cnn)
    student_kinds: ClassVar[tuple[str, ...]] = ("detr",)

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def optim_options(self) -> dict[str, Any]:
        """How the method's own parameters are optimised, where it differs from the student's:
        ``lr`` (peak learning rate) and ``warmup`` (False: no warm-up). Default: as the student."""
        return {}


class Distiller(nn.Module):
    """Teacher + student + methods; ``forward(batch) -> (loss, terms)`` drives the training engine.

    methods: name -> method; weights: name -> ``Weights(weight, terms)`` (``distill.methods``: lambda
    and per-term weights; default: lambda 1 and the class's ``terms``).
    The teacher is frozen (``requires_grad=False``) and stays in eval mode whatever ``train()``
    is called with. In a data-parallel run the whole ``Distiller`` is wrapped in DDP, which then
    ignores the teacher (``engine.ddp_ignored_names``): it is replicated for inference only. The
    detection loss is normalised by the box count averaged over processes (``detection_loss``);
    the methods' terms are per-process means (their normalisers are documented per method).
    """

    def __init__(self, student: DetrAdapter, teacher: DetrAdapter, methods: dict[str, DistillMethod],
                 weights: dict[str, Weights] | None = None):
        super().__init__()
        check_compatible(student, teacher)
        unknown = set(weights or {}) - set(methods)
        if unknown:
            raise ValueError(f"weights given for unknown methods {sorted(unknown)}; methods: {sorted(methods)}")
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student
        self.methods = nn.ModuleDict(methods)
        self.weights = {name: (weights or {}).get(name) or Weights(1.0, dict(type(m).terms))
                        for name, m in methods.items()}

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def trainable_modules(self) -> dict[str, nn.Module]:
        """The learned parts besides the student (connectors, adapters, sampling modules)."""
        return {name: m for name, m in self.methods.items() if any(True for _ in m.parameters())}

    def forward(self, batch: dict[str, Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """batch: ``collate`` output (with ``teacher_pixel_values`` / ``_mask`` where the teacher's
        preprocessing differs from the student's) -> (total loss, {term name: term}): ``det/loss``,
        each method's scaled terms (they add up to the loss) and its unscaled ones (logged only)."""
        pixel_values, pixel_mask, targets = batch["pixel_values"], batch["pixel_mask"], batch["labels"]
        teacher_out = None
        if self.methods:  # no methods (no-KD): the teacher's output would go unused, so it is not run
            # the teacher's own preprocessing of the same images where it differs (``transforms.Views``)
            t_pixels, t_mask = batch.get("teacher_pixel_values", pixel_values), batch.get("teacher_pixel_mask", pixel_mask)
            with torch.no_grad(), record_function("detrkd::teacher"):
                teacher_out = self.teacher(t_pixels, t_mask, with_attention=self._needs("teacher"))
        with record_function("detrkd::student"):
            student_out = self.student(pixel_values, pixel_mask, labels=targets,
                                       with_attention=self._needs("student"))
        terms = {"det/loss": detection_loss(self.student, student_out, targets)}
        if teacher_out is None:
            return terms["det/loss"], terms
        ctx = DistillContext(self.student, self.teacher, student_out, teacher_out, targets)
        unscaled = {}
        for name, method in self.methods.items():
            with record_function(f"detrkd::method/{name}"):
                raw = method(ctx)
            terms.update(scaled_terms(name, raw, self.weights[name]))
            unscaled.update({f"{name}/{term}:unscaled": value.detach() for term, value in raw.items()})
        return torch.stack(list(terms.values())).sum(), {**terms, **unscaled}

    def _needs(self, who: str) -> bool:
        return any(getattr(m, f"needs_{who}_attention") for m in self.methods.values())


def scaled_terms(name: str, terms: dict[str, Tensor], weights: Weights) -> dict[str, Tensor]:
    """``{"<name>/<term>": lambda * (w_term * term)}``; a term without a weight is an error (the
    method's ``terms`` must list every term it returns)."""
    missing = sorted(set(terms) - set(weights.terms))
    if missing:
        raise KeyError(f"method {name} returned term(s) {missing} without a weight; its terms: {sorted(weights.terms)}")
    return {f"{name}/{t}": weights.weight * (weights.terms[t] * v) for t, v in terms.items()}


class Weights(NamedTuple):
    """One method's weights: ``weight`` (lambda, on every term) and ``terms`` (term name -> weight)."""

    weight: float
    terms: dict[str, float]


def check_compatible(student: DetrAdapter, teacher: DetrAdapter) -> None:
    """Teacher and student must predict the same classes (names too, when both have them)."""
    if teacher.num_classes != student.num_classes:
        raise ValueError(f"teacher ({teacher.family}) predicts {teacher.num_classes} classes but the student "
                         f"({student.family}) predicts {student.num_classes}: distillation needs the same class set")
    names = [_class_names(m) for m in (teacher, student)]
    if all(names) and names[0] != names[1]:
        raise ValueError(f"teacher and student class names differ: teacher {names[0]}, student {names[1]}")


def _class_names(model: DetrAdapter) -> dict[int, str] | None:
    """``id2label`` of the HF config, or None when it only holds HF's defaults ("LABEL_i")."""
    names = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    if not names or all(v == f"LABEL_{k}" for k, v in names.items()):
        return None
    return names
