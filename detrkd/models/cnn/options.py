"""The CNN students' configuration: their size knobs (``CnnOptions``), named presets, what a
checkpoint stores to rebuild one (``CnnConfig``) and the checks of a ``model`` section. No torch
import: the config checks run before anything is built."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any

CNN_FAMILIES: dict[str, str] = {
    "faster_rcnn": "faster_rcnn:FasterRCNNStudent",
    "retinanet": "retinanet:RetinaNetStudent",
}


@dataclass(frozen=True)
class CnnOptions:
    """The size and sampling knobs of a CNN student (``model.overrides`` may set any of them).

    widths / depths: the ResNet-style body's stage widths and BasicBlocks per stage (C2..C5);
                     ``widths: null`` = torchvision's ResNet-50 (Bottleneck, 256..2048)
    fpn_channels:    FPN width (every level)
    representation:  Faster R-CNN TwoMLPHead width
    head_convs:      RetinaNet conv tower depth (torchvision: 4)
    head_group_norm: RetinaNet head GroupNorm groups (0: no norm, torchvision's v1 head)
    anchor_sizes:    one base anchor size per FPN level, in pixels (RetinaNet adds the octave
                     scales 2^(1/3), 2^(2/3)); aspect_ratios: h / w of the anchors
    canonical_scale: MultiScaleRoIAlign's box size that maps to P4 (torchvision: 224 at 800 px)
    rpn_* / box_*:   Faster R-CNN proposal counts and sampled RoIs per image (torchvision names)
    topk_candidates: RetinaNet candidates per level before NMS
    detections:      detections kept per image (COCO scores the top 100)
    """

    widths: tuple[int, ...] | None = (16, 32, 64, 128)
    depths: tuple[int, ...] = (1, 1, 1, 1)
    fpn_channels: int = 32
    representation: int = 128
    head_convs: int = 2
    head_group_norm: int = 8
    anchor_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    canonical_scale: int = 72
    rpn_pre_nms_top_n_train: int = 600
    rpn_post_nms_top_n_train: int = 300
    rpn_pre_nms_top_n_test: int = 300
    rpn_post_nms_top_n_test: int = 300
    rpn_batch_size_per_image: int = 128
    box_batch_size_per_image: int = 128
    topk_candidates: int = 300
    detections: int = 100

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CnnOptions":
        """From plain values (lists for tuples, as a checkpoint stores them)."""
        tuples = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        return cls(**tuples)


@dataclass
class CnnConfig:
    """What rebuilds a CNN student (stored as a checkpoint's ``hf_config``, ``to_dict``)."""

    family: str
    preset: str
    num_classes: int
    options: CnnOptions
    id2label: dict[int, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "preset": self.preset, "num_classes": self.num_classes,
                "options": dataclasses.asdict(self.options), "id2label": dict(self.id2label)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "CnnConfig":
        return cls(values["family"], values["preset"], int(values["num_classes"]),
                   CnnOptions.from_dict(values["options"]),
                   {int(k): str(v) for k, v in (values.get("id2label") or {}).items()})


PRESETS: dict[str, CnnOptions] = {
    "tiny": CnnOptions(representation=64, head_convs=1, rpn_pre_nms_top_n_train=300,
                       rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                       rpn_batch_size_per_image=64, box_batch_size_per_image=64, topk_candidates=100),
    "small": CnnOptions(widths=(32, 64, 128, 256), fpn_channels=48, representation=128, rpn_post_nms_top_n_train=200,
                        box_batch_size_per_image=64),
    "resnet50": CnnOptions(widths=None, depths=(3, 4, 6, 3), fpn_channels=256, representation=1024, head_convs=4,
                           head_group_norm=0, anchor_sizes=(32, 64, 128, 256, 512), canonical_scale=224,
                           rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000,
                           rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
                           rpn_batch_size_per_image=256, box_batch_size_per_image=512, topk_candidates=1000),
}
LISTS = ("widths", "depths", "anchor_sizes", "aspect_ratios")
LEVELS = 5  # FPN maps both families have (P2..P5 + pool; P3..P7): one anchor size each


def cnn_options(family: str, preset: str, overrides: dict[str, Any] | None = None) -> CnnOptions:
    """A preset's options with ``overrides`` applied; ``ValueError`` naming a bad key or value."""
    if family not in CNN_FAMILIES:
        raise ValueError(f"unknown CNN family {family!r}; choose one of {sorted(CNN_FAMILIES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown {family} preset {preset!r}; choose one of {sorted(PRESETS)}")
    known = CnnOptions.fields()
    for key in overrides or {}:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"{key!r} is not a {family} option{hint} (options: {', '.join(known)})")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in (overrides or {}).items()}
    options = dataclasses.replace(PRESETS[preset], **values)
    check_options(options)
    return options


def check_options(o: CnnOptions) -> None:
    """``ValueError`` for options that cannot build a model."""
    for name, value in dataclasses.asdict(o).items():
        if name in LISTS and not (isinstance(value, tuple) or (name == "widths" and value is None)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        items = [] if value is None else list(value) if isinstance(value, (tuple, list)) else [value]
        number = (int, float) if name == "aspect_ratios" else int
        floor = 0 if name in ("head_convs", "head_group_norm") else 1e-9 if name == "aspect_ratios" else 1
        if any(isinstance(x, bool) or not isinstance(x, number) or x < floor for x in items):
            raise ValueError(f"{name} must be {'positive numbers' if number != int else 'integers >= ' + str(floor)}, "
                             f"got {value!r}")
    if o.widths is not None and (len(o.widths) != 4 or len(o.depths) != 4):
        raise ValueError(f"widths and depths need 4 entries (C2..C5), got {o.widths} and {o.depths}")
    if o.widths is None and tuple(o.depths) != PRESETS["resnet50"].depths:
        raise ValueError("widths: null is torchvision's ResNet-50 (depths 3, 4, 6, 3): set widths to change depths")
    if len(o.anchor_sizes) != LEVELS:
        raise ValueError(f"anchor_sizes needs one size per FPN level ({LEVELS}), got {list(o.anchor_sizes)}")
    if not 0 <= o.head_convs <= 4:
        raise ValueError(f"head_convs must be in 0..4 (torchvision's tower has 4 convs), got {o.head_convs}")
    if o.head_group_norm and o.fpn_channels % o.head_group_norm:
        raise ValueError(f"fpn_channels {o.fpn_channels} is not divisible by head_group_norm {o.head_group_norm}")


def check_cnn_model_config(model: Any) -> None:
    """``ConfigError`` for a ``model`` section of a CNN family that cannot build (no weights built):
    DETR-only keys (``backbone``, ``num_queries``), a ``pretrained`` that is not a detrkd
    checkpoint file, ``overrides`` with ``pretrained``, an unknown preset or option, a bad value."""
    from pathlib import Path

    from ...config import ConfigError

    family = model.family
    for key in ("backbone", "num_queries"):
        if getattr(model, key) is not None:
            raise ConfigError(f"model.{key} is a DETR setting; a {family} student takes model.preset "
                              f"({', '.join(PRESETS)}) and model.overrides ({', '.join(CnnOptions.fields())})")
    if model.pretrained:
        if Path(model.pretrained).is_dir():
            raise ConfigError(f"model.pretrained {model.pretrained}: a {family} student starts from a detrkd "
                              f"checkpoint (.pt), not a directory")
        if model.overrides:
            raise ConfigError(f"model.overrides {sorted(model.overrides)} would be ignored with model.pretrained "
                              f"(the checkpoint's config is used): remove them")
        return
    try:
        cnn_options(family, model.preset, model.overrides)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model: {exc}") from None
