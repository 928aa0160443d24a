"""Which distillation methods fit which student: a DETR (``DetrAdapter``) or a torchvision CNN
(``models.cnn``). A method declares ``DistillMethod.student_kinds``; a config naming a method that
cannot distil into its student is refused up front, in one line naming the methods and what fits.
"""

from __future__ import annotations

from typing import Mapping

from ..config import ConfigError
from ..models.cnn import is_cnn_family


def student_kind(family: str | None) -> str:
    """"cnn" for a torchvision CNN family (``models.cnn``), else "detr"."""
    return "cnn" if is_cnn_family(family) else "detr"


def check_student_fits(methods: Mapping[str, type], family: str | None) -> None:
    """``ConfigError`` naming the methods (name -> class with ``student_kinds``) that do not distil
    into a student of ``family``, and the ones that do."""
    kind = student_kind(family)
    unfit = sorted(name for name, cls in methods.items() if kind not in cls.student_kinds)
    if not unfit:
        return
    from .train import METHODS, method_class

    fit = sorted(name for name in METHODS if kind in method_class(name).student_kinds)
    if kind == "cnn":
        raise ConfigError(f"methods {unfit} need a DETR student (they read its decoder queries, predictions per "
                          f"query or encoder memory); the {family} student distils with {fit}")
    raise ConfigError(f"methods {unfit} need a torchvision CNN student (model.family faster_rcnn or retinanet); "
                      f"a DETR student distils with {fit}")
