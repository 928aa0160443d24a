"""A CNN student as a torchvision state dict (``detrkd export``) and back.

The directory holds ``model.pt``: the torchvision model's ``state_dict()`` (plain tensors,
``torch.load(weights_only=True)``), and ``torchvision.json``: the detrkd build config, the pixels
it was trained on, and for torchvision: the model class, its ``num_classes`` (Faster R-CNN counts
the background), the label of each class in torchvision's numbering, the transform that
reproduces detrkd's preprocessing, and for the ``resnet50`` preset the torchvision builder call
whose model loads the weights as they are. ``load_torchvision(directory)`` rebuilds the model with
that standard transform (``model([image in [0, 1]])`` -> torchvision's detections); detrkd loads the
directory too (``load_detector``: teacher-free eval / predict, ``--checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...data.transforms import Pixels
from . import EXPORT_FILE, WEIGHTS_FILE, cnn_class
from .base import CnnDetector
from .options import PRESETS, CnnConfig

BUILDERS = {"faster_rcnn": "fasterrcnn_resnet50_fpn", "retinanet": "retinanet_resnet50_fpn"}


def transform_kwargs(pixels: Pixels) -> dict[str, Any]:
    """``GeneralizedRCNNTransform`` arguments that make detrkd's preprocessing of ``pixels``."""
    return {"min_size": pixels.size, "max_size": pixels.max_size or pixels.size,
            "image_mean": list(pixels.mean or (0.0, 0.0, 0.0)), "image_std": list(pixels.std or (1.0, 1.0, 1.0))}


def builder_call(detector: CnnDetector, pixels: Pixels) -> str | None:
    """The torchvision builder call of a ``resnet50`` student (None for detrkd's own bodies)."""
    if detector.config.preset != "resnet50" or detector.config.options != PRESETS["resnet50"]:
        return None
    kwargs = {"weights": None, "weights_backbone": None,
              "num_classes": detector.num_classes + detector.label_offset, **transform_kwargs(pixels),
              ("box_detections_per_img" if detector.family == "faster_rcnn" else "detections_per_img"):
                  detector.config.options.detections}
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"torchvision.models.detection.{BUILDERS[detector.family]}({args})"


def save_torchvision(detector: CnnDetector, directory: str | Path) -> None:
    """Write ``model.pt`` and ``torchvision.json`` (module docstring) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if detector.pixels is None:
        raise ValueError("a CNN student is exported with the pixels it was trained on (detector.pixels is None)")
    offset = detector.label_offset
    record = {
        "family": detector.family, "config": detector.config.to_dict(), "pixels": detector.pixels.as_dict(),
        "torchvision": {"class": type(detector.model).__name__, "num_classes": detector.num_classes + offset,
                        "label_offset": offset, "background": 0 if offset else None,
                        "labels": {str(k + offset): v for k, v in detector.config.id2label.items()},
                        "transform": transform_kwargs(detector.pixels),
                        "builder": builder_call(detector, detector.pixels)},
        "load": f"from detrkd.models.cnn.export import load_torchvision; model = load_torchvision({str(directory)!r})",
    }
    torch.save(detector.model.state_dict(), directory / WEIGHTS_FILE)
    (directory / EXPORT_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _read(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    record = json.loads((directory / EXPORT_FILE).read_text())
    weights = torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return record, {k: v.float() if v.is_floating_point() else v for k, v in weights.items()}


def load_torchvision(directory: str | Path) -> nn.Module:
    """The exported torchvision model alone, with the standard transform set to detrkd's preprocessing
    (``model.eval(); model([image])`` with images in [0, 1] as torchvision expects)."""
    record, weights = _read(Path(directory))
    config = CnnConfig.from_dict(record["config"])
    model = cnn_class(config.family).torchvision_model(config, Pixels.from_dict(record["pixels"]), standalone=True)
    model.load_state_dict(weights)
    return model


def load_exported_detector(directory: str | Path) -> CnnDetector:
    """The exported directory as a detrkd CNN student (float32, with its pixels)."""
    record, weights = _read(Path(directory))
    config = CnnConfig.from_dict(record["config"])
    detector = cnn_class(config.family)(config)
    detector.model.load_state_dict(weights)
    detector.pixels = Pixels.from_dict(record["pixels"])
    return detector
