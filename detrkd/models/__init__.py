"""Detector adapters: build from a named preset, load from disk, save.

``ADAPTERS`` maps a family name to its adapter class (transformers imports each family's modeling
code lazily, on first use of its classes, so importing every adapter costs little).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Sequence

from .base import (PRESETS, DetectorOutput, DetrAdapter, EncoderMemory, Predictions, PresetSize,
                   Queries, count_hooks, hf_state_dict)
from .families.conditional_detr import ConditionalDETRAdapter
from .families.d_fine import DFineAdapter
from .families.dab_detr import DABDETRAdapter
from .families.deformable_detr import DeformableDETRAdapter
from .families.deimv2 import Deimv2Adapter
from .families.detr import DETRAdapter
from .families.lw_detr import LwDETRAdapter, RFDETRAdapter
from .families.rt_detr import RTDETRAdapter, RTDETRv2Adapter

ADAPTERS: dict[str, type[DetrAdapter]] = {
    "detr": DETRAdapter,
    "conditional_detr": ConditionalDETRAdapter,
    "dab_detr": DABDETRAdapter,
    "deformable_detr": DeformableDETRAdapter,
    "rt_detr": RTDETRAdapter,
    "rt_detr_v2": RTDETRv2Adapter,
    "d_fine": DFineAdapter,
    "deimv2": Deimv2Adapter,
    "lw_detr": LwDETRAdapter,
    "rf_detr": RFDETRAdapter,
}

log = logging.getLogger(__name__)

__all__ = ["ADAPTERS", "PRESETS", "DetectorOutput", "DetrAdapter", "EncoderMemory", "Predictions",
           "PresetSize", "Queries", "adapter_class", "build_detector", "count_hooks",
           "detector_from_state", "family_of_model_type", "family_of_pretrained_dir", "hf_state_dict",
           "load_detector", "preset_size", "save_detector"]


def adapter_class(family: str) -> type[DetrAdapter]:
    """The adapter class of a family name (see ``ADAPTERS``)."""
    if family not in ADAPTERS:
        from .cnn import CNN_FAMILIES

        raise ValueError(f"unknown detector family {family!r}; choose one of {sorted(ADAPTERS)} "
                         f"(DETR) or {sorted(CNN_FAMILIES)} (torchvision CNN students)")
    return ADAPTERS[family]


def family_of_model_type(model_type: str) -> str:
    """Family name for an HF ``config.model_type``."""
    for family in ADAPTERS:
        if model_type in adapter_class(family).model_types:
            return family
    raise ValueError(f"HF model type {model_type!r} is not a supported DETR family "
                     f"(supported: {sorted(ADAPTERS)})")


def preset_size(preset: str, backbone: str | None = None) -> PresetSize:
    """The size of a named preset, with the backbone of preset ``backbone`` if given (the
    transformer stays ``preset``'s: the papers' students keep the teacher's transformer)."""
    for name in (preset, backbone):
        if name is not None and name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    size = PRESETS[preset]
    if backbone is None:
        return size
    bb = PRESETS[backbone]
    return dataclasses.replace(size, backbone_widths=bb.backbone_widths, backbone_depths=bb.backbone_depths,
                               layer_type=bb.layer_type)


def build_detector(family: str, preset: str, num_classes: int, backbone: str | None = None,
                   **hf_overrides: Any) -> DetrAdapter:
    """A randomly initialised detector of a named size (``tiny``/``small``/``base``), offline.

    backbone: a preset name whose backbone replaces ``preset``'s (``preset_size``);
    hf_overrides: HF config keys of the family (e.g. ``num_queries=100``, ``decoder_layers=3``).
    """
    size = preset_size(preset, backbone)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    cls = adapter_class(family)
    return cls.from_config(cls.make_config(size, num_classes, **hf_overrides))


def detector_from_state(family: str, hf_config: dict[str, Any]) -> DetrAdapter:
    """Rebuild an (untrained) adapter from a family name and an HF config dict (a torchvision CNN
    student: its ``CnnConfig`` dict, ``models.cnn``)."""
    from transformers import AutoConfig

    from .cnn import cnn_from_state, is_cnn_family

    if is_cnn_family(family):
        return cnn_from_state(hf_config)
    cls = adapter_class(family)
    config_dict = dict(hf_config)
    model_type = config_dict.pop("model_type", None)
    if model_type not in cls.model_types:
        raise ValueError(f"checkpoint says family {family!r} but its HF config is {model_type!r}")
    return cls.from_config(AutoConfig.for_model(model_type, **config_dict))


def load_detector(path: str | Path, class_names: Sequence[str] | None = None, image_size: int = 256) -> DetrAdapter:
    """Load a detector from a HF ``save_pretrained`` directory or a detrkd checkpoint file.

    class_names: the categories the detector must predict (a dataset's, in label order). A
    ``from_pretrained`` directory with another class count gets its class heads re-initialised for
    them (transformers' ``ignore_mismatched_sizes``; everything else is loaded) and their names as
    ``id2label``; the log names the re-initialised tensors. A detrkd checkpoint is loaded as it is.
    Its ``pixels`` are the directory's image processor's (``image_size``: the family default's size
    when it has none) or the checkpoint's (``models.processors``).
    """
    from .processors import checkpoint_pixels, dir_pixels

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no detector at {path}")
    from .cnn import is_torchvision_export

    if is_torchvision_export(path):  # a CNN student ``detrkd export`` wrote (models.cnn.export)
        from .cnn.export import load_exported_detector

        return load_exported_detector(path)
    if path.is_dir():
        adapter = _load_pretrained_dir(path, class_names)
        adapter.pixels = dir_pixels(path, adapter.family, image_size)
        return adapter
    from ..checkpoint import load_checkpoint

    state = load_checkpoint(path)
    if state.get("family") is None or state.get("hf_config") is None:
        raise ValueError(f"{path} is a detrkd checkpoint without a detector (its 'family' / "
                         f"'hf_config' keys are empty: it was written for another kind of module)")
    try:
        adapter = detector_from_state(state["family"], state["hf_config"])
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    adapter.model.load_state_dict(state["model"])
    adapter.pixels = checkpoint_pixels(state)
    return adapter


def family_of_pretrained_dir(path: Path) -> str:
    """The detrkd family of a ``from_pretrained`` directory, from its config.json's ``model_type``."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} is a directory without config.json: not a from_pretrained dir")
    try:
        return family_of_model_type(json.loads(config_file.read_text()).get("model_type"))
    except ValueError as exc:
        raise ValueError(f"{config_file}: {exc}") from exc


def _load_pretrained_dir(path: Path, class_names: Sequence[str] | None = None) -> DetrAdapter:
    cls = adapter_class(family_of_pretrained_dir(path))
    saved = json.loads((path / "config.json").read_text())
    import torch
    import transformers
    from transformers import AutoModelForObjectDetection

    relabel: dict[str, Any] = {}
    saved_count = len(saved.get("id2label") or {}) or saved.get("num_labels")
    if class_names is not None:  # the data's names; other heads only for another class count
        relabel = dict(id2label=dict(enumerate(class_names)), label2id={n: i for i, n in enumerate(class_names)})
        if saved_count != len(class_names):
            relabel["ignore_mismatched_sizes"] = True
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report is summarised below instead
    try:
        # the attention implementation is not saved in config.json; eager is the one that returns maps.
        # float32 whatever the saved dtype: detrkd trains and distils in float32 (amp is autocast)
        model, info = AutoModelForObjectDetection.from_pretrained(
            path, attn_implementation="eager", dtype=torch.float32, output_loading_info=True, **relabel)
    finally:
        transformers.logging.set_verbosity(verbosity)
    if relabel.get("ignore_mismatched_sizes"):
        heads = sorted(k for k, *_ in info.get("mismatched_keys", []))
        log.info("%s predicts %s classes, the data %d: re-initialised its class heads for the data's categories "
                 "(%d tensors: %s)", path, saved_count, len(class_names), len(heads), ", ".join(heads))
    for param in model.parameters():  # HF freezes parts of some backbones; detrkd trains all
        param.requires_grad_(True)
    return cls(model)


def save_detector(adapter: DetrAdapter, directory: str | Path) -> None:
    """Write the detector in HF ``save_pretrained`` layout (loadable by transformers alone, with no
    missing or unexpected keys: ``hf_state_dict``) with the image processor of its ``pixels``
    (``preprocessor_config.json``) where it has them; a torchvision CNN student as its torchvision
    state dict instead (``models.cnn.export``)."""
    from .cnn import is_cnn_detector
    from .processors import image_processor

    if is_cnn_detector(adapter):
        from .cnn.export import save_torchvision

        return save_torchvision(adapter, directory)
    adapter.model.save_pretrained(directory, state_dict=hf_state_dict(adapter.model))
    if adapter.pixels is not None:
        image_processor(adapter.pixels, adapter.family).save_pretrained(directory)
