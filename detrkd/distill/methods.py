"""The distillation methods by name, and their construction from a config's ``methods`` mapping.

``METHODS`` maps each name ``detrkd distill`` accepts to its class; a class is built as
``Class(student, teacher, **options)``. A method's config section holds its options plus two keys
the ``Distiller`` applies (``distill.base``: one place for every weight):

    methods:
      kd_detr: {weight: 1.0, terms: {cls: 1, l1: 5, giou: 2}, points: both, ...}

``weight`` is the method's lambda; ``terms`` the per-term weights (defaults: the class's ``terms``).
Options are validated once, here, from the class's ``__init__`` type hints through the config's own
coercion (``config.coerce``): a bad value is a ``ConfigError`` naming ``methods.NAME.KEY``.
"""

from __future__ import annotations

import inspect
import typing
from typing import Any

from ..config import RENAMED_WEIGHTS, ConfigError, coerce
from ..models import DetrAdapter
from ..models.cnn import is_cnn_family
from .active_sampling import ActiveSampling
from .agfd import AGFD
from .base import DistillMethod, Weights
from .fitnet import FitNet
from .fpn_fitnet import FPNFitNet
from .global_alignment import GlobalAlignment
from .heterogeneous import HeterogeneousKDDETR
from .kd_detr import KDDETR
from .lapd import LAPD

METHODS: dict[str, type[DistillMethod]] = {
    "active_sampling": ActiveSampling,
    "agfd": AGFD,
    "fitnet": FitNet,
    "fpn_fitnet": FPNFitNet,
    "global_alignment": GlobalAlignment,
    "kd_detr": KDDETR,
    "kd_detr_hetero": HeterogeneousKDDETR,
    "lapd": LAPD,
}
# keys of a method's section that are not constructor options: applied by the Distiller
WEIGHT_KEYS = ("weight", "terms")
MODELS = ("student", "teacher")  # the constructor's two positional arguments


def method_class(name: str) -> type[DistillMethod]:
    """The class of method ``name``; ``ConfigError`` naming the choices otherwise."""
    if name not in METHODS:
        raise ConfigError(f"unknown distillation method {name!r}; choose from {sorted(METHODS)}")
    return METHODS[name]


def option_hints(cls: type[DistillMethod]) -> dict[str, inspect.Parameter]:
    """The options of ``cls.__init__`` (everything but the two models), by name."""
    params = inspect.signature(cls).parameters
    return {n: p for n, p in params.items() if n not in MODELS and p.kind is not p.VAR_KEYWORD}


def method_options(name: str, options: dict[str, Any] | None) -> tuple[dict[str, Any], Weights]:
    """(constructor options, weights) of one method's config section, validated: unknown keys and
    values outside an option's type hint (e.g. a ``Literal``) are ``ConfigError``s."""
    cls = method_class(name)
    options = dict(options or {})
    weights = method_weights(name, cls, options.pop("weight", 1.0), options.pop("terms", None))
    params = option_hints(cls)
    hints = typing.get_type_hints(cls.__init__)
    for key in options:
        if key in RENAMED_WEIGHTS and key not in params:
            raise ConfigError(f"methods.{name}.{key}: per-term weights are methods.{name}.terms now, a mapping "
                              f"of {', '.join(cls.terms)} (e.g. terms: {{{next(iter(cls.terms))}: 1.0}})")
        if key not in params:
            raise ConfigError(f"methods.{name}: unknown option {key!r}; valid options: "
                              f"{', '.join([*WEIGHT_KEYS, *params])}")
    return {k: coerce(v, hints.get(k, Any), f"methods.{name}.{k}") for k, v in options.items()}, weights


def method_weights(name: str, cls: type[DistillMethod], weight: Any, terms: Any) -> Weights:
    """lambda and per-term weights: the class's ``terms`` updated by the config's ``terms``."""
    weight = coerce(weight, float, f"methods.{name}.weight")
    given = coerce(terms, dict[str, float] | None, f"methods.{name}.terms") or {}
    unknown = sorted(set(given) - set(cls.terms))
    if unknown:
        raise ConfigError(f"methods.{name}.terms: unknown term(s) {unknown}; {name}'s terms: {', '.join(cls.terms)}")
    values = {t: coerce(w, float, f"methods.{name}.terms.{t}") for t, w in given.items()}
    return Weights(weight, {**cls.terms, **values})


def student_kind(family: str | None) -> str:
    """"cnn" for a torchvision CNN family (``models.cnn``), else "detr"."""
    return "cnn" if is_cnn_family(family) else "detr"


def check_student_fits(names: Any, family: str | None) -> None:
    """``ConfigError`` naming the methods that do not distil into a student of ``family`` (their
    ``student_kinds``: "detr" / "cnn"), and the ones that do."""
    kind = student_kind(family)
    unfit = sorted(name for name in names if kind not in method_class(name).student_kinds)
    if not unfit:
        return
    fit = sorted(name for name, cls in METHODS.items() if kind in cls.student_kinds)
    if kind == "cnn":
        raise ConfigError(f"methods {unfit} need a DETR student (they read its decoder queries, predictions per "
                          f"query or encoder memory); the {family} student distils with {fit}")
    raise ConfigError(f"methods {unfit} need a torchvision CNN student (model.family faster_rcnn or retinanet); "
                      f"a DETR student distils with {fit}")


def build_methods(specs: dict[str, dict[str, Any]], student: DetrAdapter,
                  teacher: DetrAdapter) -> tuple[dict[str, DistillMethod], dict[str, Weights]]:
    """(methods, weights) from the config's ``methods`` mapping (``method_options``); methods that
    do not distil into this kind of student (DETR / torchvision CNN) are one ``ConfigError``."""
    check_student_fits(specs, getattr(student, "family", None))
    methods, weights = {}, {}
    for name, section in specs.items():
        options, weights[name] = method_options(name, section)
        methods[name] = method_class(name)(student, teacher, **options)
    return methods, weights
