"""torchvision CNN detectors as detrkd students (heterogeneous distillation: a DETR teacher into a
CNN student, KD-DETR Sec. 4.2).

Families (``model.family``): ``faster_rcnn`` (two-stage, FPN P2..P6, softmax over C + 1 with
background) and ``retinanet`` (dense one-stage, FPN P3..P7, sigmoid focal). Presets
(``model.preset``), all random init and offline (``weights=None``, no backbone weights):

========  ==================================================================================
tiny      unit tests / smoke runs: body 16..128 (1 BasicBlock a stage), FPN 32, RoI MLP 64
small     the CPU digits student: body 32..256 (1 BasicBlock a stage, the DETR ``small``
          preset's backbone), FPN 48, RoI MLP 128, 200 proposals and 64 sampled RoIs per image,
          RetinaNet tower 2 convs; about 1.3 s per step at batch 8, 256 px, one thread on the
          loaded 2-core machine (``benchmarks/cnn_step_time.py``): 3000 steps in about an hour
resnet50  torchvision's own: ResNet-50 + FPN 256, heads, anchors (32..512) and sampling as
          ``fasterrcnn_resnet50_fpn`` / ``retinanet_resnet50_fpn`` build them (same state-dict
          keys and shapes): a GPU student
========  ==================================================================================

``model.overrides`` sets any ``CnnOptions`` field (e.g. ``{fpn_channels: 48, anchor_sizes: [8, 16,
32, 64, 128]}``). ``model.backbone`` and ``model.num_queries`` are DETR settings and are refused.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .options import (CNN_FAMILIES, PRESETS, CnnConfig, CnnOptions, check_cnn_model_config, check_options,
                      cnn_options)

if TYPE_CHECKING:
    from .base import CnnDetector

EXPORT_FILE = "torchvision.json"  # what ``detrkd export`` writes for a CNN student (``cnn.export``)
WEIGHTS_FILE = "model.pt"

__all__ = ["CNN_FAMILIES", "EXPORT_FILE", "PRESETS", "WEIGHTS_FILE", "CnnConfig", "CnnOptions", "build_cnn_detector",
           "check_cnn_model_config", "cnn_class", "cnn_from_state", "cnn_options", "is_cnn_detector", "is_cnn_family",
           "is_torchvision_export"]


def is_cnn_family(family: str | None) -> bool:
    """True for the torchvision CNN families (``CNN_FAMILIES``)."""
    return family in CNN_FAMILIES


def is_cnn_detector(model: Any) -> bool:
    """True for a CNN student (a ``CnnDetector``: its ``family`` is a CNN family)."""
    return is_cnn_family(getattr(model, "family", None))


def is_torchvision_export(path: str | Path) -> bool:
    """True for a directory ``detrkd export`` wrote for a CNN student (``cnn.export``)."""
    return (Path(path) / EXPORT_FILE).is_file()


def cnn_class(family: str) -> "type[CnnDetector]":
    """The detector class of a CNN family (imports torchvision)."""
    if family not in CNN_FAMILIES:
        raise ValueError(f"unknown CNN family {family!r}; choose one of {sorted(CNN_FAMILIES)}")
    module, cls = CNN_FAMILIES[family].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def build_cnn_detector(family: str, preset: str, num_classes: int, class_names: Sequence[str] | None = None,
                       **overrides: Any) -> CnnDetector:
    """A randomly initialised CNN student of a named preset (offline, no pretrained weights)."""
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    options = cnn_options(family, preset, overrides)
    names = dict(enumerate(class_names)) if class_names is not None else {}
    return cnn_class(family)(CnnConfig(family, preset, num_classes, options, names))


def cnn_from_state(config: dict[str, Any]) -> CnnDetector:
    """Rebuild an (untrained) CNN student from its stored ``CnnConfig.to_dict()``."""
    cfg = CnnConfig.from_dict(config)
    check_options(cfg.options)
    return cnn_class(cfg.family)(cfg)


