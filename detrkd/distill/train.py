"""``detrkd distill``: train a student from a teacher with the configured methods.

The loop is the plain training engine (``detrkd.engine.Trainer``) with ``Distiller`` as the loss;
progress, metrics log, evaluation of the student, atomic checkpoints and exact resume are shared.
Learned parts of the methods (connectors, adapters) are checkpointed as extra modules.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from typing import Any, Sequence

from torch import nn

from ..config import ConfigError, DistillConfig
from ..models import DetrAdapter, load_detector
from ..models.cnn import is_cnn_detector
from .base import DistillMethod, Distiller

log = logging.getLogger(__name__)

# method name -> "module:Class" in detrkd.distill; each class is built as Class(teacher, student, **options)
METHODS: dict[str, str] = {
    "active_sampling": "active_sampling:ActiveSampling",
    "agfd": "agfd:AGFD",
    "fitnet": "fitnet:FitNet",
    "fpn_fitnet": "fpn_fitnet:FPNFitNet",
    "global_alignment": "global_alignment:GlobalAlignment",
    "kd_detr": "kd_detr:KDDETR",
    "kd_detr_hetero": "heterogeneous:HeterogeneousKDDETR",
    "lapd": "lapd:LAPD",
}


def method_class(name: str) -> type[DistillMethod]:
    if name not in METHODS:
        raise ConfigError(f"unknown distillation method {name!r}; choose from {sorted(METHODS)}")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def build_methods(specs: dict[str, dict[str, Any]], teacher: DetrAdapter,
                  student: DetrAdapter) -> tuple[dict[str, DistillMethod], dict[str, float]]:
    """(methods, weights) from the config's ``methods`` mapping; bad options name the key; methods
    that do not distil into this kind of student (DETR / torchvision CNN) are one ConfigError."""
    from .student_kinds import check_student_fits

    check_student_fits({name: method_class(name) for name in specs}, getattr(student, "family", None))
    methods, weights = {}, {}
    for name, options in specs.items():
        options = dict(options or {})
        weights[name] = float(options.pop("weight", 1.0))
        cls = method_class(name)
        try:
            inspect.signature(cls).bind(teacher, student, **options)
        except TypeError as exc:
            valid = [p for p in inspect.signature(cls).parameters if p not in ("teacher", "student")]
            raise ConfigError(f"methods.{name}: {exc}; valid options: weight, {', '.join(valid)}") from None
        methods[name] = cls(teacher, student, **options)
    return methods, weights


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy every teacher tensor whose name and shape match the student's; returns the count."""
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    copied = {k: v for k, v in teacher_state.items()
              if k in student_state and student_state[k].shape == v.shape}
    student.load_state_dict(copied, strict=False)
    return len(copied)


def load_teacher(config: DistillConfig, num_classes: int, class_names: Sequence[str] | None = None) -> DetrAdapter:
    """The frozen teacher of ``config.teacher``; errors name the path and what is wrong with it.
    A teacher that names the data's categories in another order has its classes reordered by name
    (``models.relabel.align_classes``); one with other categories is an error."""
    from ..models.relabel import align_classes

    try:
        teacher = load_detector(config.teacher, image_size=config.data.image_size)
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"teacher {config.teacher} is not a detector detrkd can load: {exc}") from exc
    if is_cnn_detector(teacher):
        raise ConfigError(f"teacher {config.teacher} is a torchvision {teacher.family} detector: detrkd distils "
                          f"from DETR-family teachers")
    if teacher.num_classes != num_classes:
        raise ConfigError(f"teacher {config.teacher} predicts {teacher.num_classes} classes, "
                          f"the data has {num_classes}")
    if class_names is not None and _named(teacher):
        try:
            if align_classes(teacher.model, class_names):
                log.info("teacher %s names the data's categories in another order: its classes were "
                         "reordered by name", config.teacher)
        except ValueError as exc:
            raise ConfigError(f"teacher {config.teacher}: {exc}") from None
    return teacher


def feed_teacher(config: DistillConfig, train_set: Any, teacher: DetrAdapter, student: DetrAdapter) -> None:
    """Where the teacher's preprocessing differs from the student's, its own view of every training
    image (``transforms.Views``; same flip, boxes and content; its resize and normalisation) goes
    with the batch; a method that compares the two encoder memories token by token then needs
    the same input grid: ``ConfigError`` up front otherwise."""
    from ..engine import transforms_for

    if teacher.pixels == student.pixels:
        return
    t, s = teacher.pixels, student.pixels
    if (t.size, t.square, t.max_size) != (s.size, s.square, s.max_size):
        grid = sorted(name for name in config.methods if name in METHODS and method_class(name).compares_memory)
        if grid:
            raise ConfigError(f"methods {grid} compare the teacher's and the student's encoder memories token "
                              f"by token, but the teacher {config.teacher} is fed {_geometry(t)} (its image "
                              f"processor) and the student {_geometry(s)}: give them the same size "
                              f"(data.image_size, or the teacher's preprocessor_config.json) or use "
                              f"prediction-level methods")
    log.info("the teacher is fed its own preprocessing (%s) and the student its own (%s)", t, s)
    train_set.transforms = transforms_for(s, "train", config.data, {"teacher": t})


def _geometry(p: Any) -> str:
    return f"{p.size}x{p.size} px" if p.square else f"a shorter side of {p.size} px (longer <= {p.max_size})"


def _named(model: DetrAdapter) -> bool:
    """The model's ``id2label`` holds real names (not transformers' LABEL_i defaults)."""
    labels = getattr(model.config, "id2label", None) or {}
    return bool(labels) and any(str(v) != f"LABEL_{k}" for k, v in labels.items())


def build_distill_trainer(config: DistillConfig, resume: bool = False, progress: bool = True) -> Any:
    """The ``Trainer`` of a distillation run as configured (process group joined)."""
    from pathlib import Path

    from ..data.collate import collate
    from ..engine import (Trainer, check_run_config, check_run_dir, detector_param_groups, make_datasets,
                          make_detector, make_eval_fn, named_param_groups, setup_runtime)

    from .student_kinds import check_student_fits

    check_run_config(config)
    check_student_fits({name: method_class(name) for name in config.methods}, config.model.family)
    check_run_dir(Path(config.output_dir), resume)
    device = setup_runtime(config)
    data = make_datasets(config)
    num_classes = data["train"].num_classes
    student = make_detector(config, num_classes, data["train"].class_names)
    teacher = load_teacher(config, num_classes, data["train"].class_names)
    feed_teacher(config, data["train"], teacher, student)
    if config.init_from_teacher and not resume:
        log.info("init_from_teacher: copied %d tensors", init_from_teacher(student, teacher))
    methods, weights = build_methods(config.methods, teacher, student)
    distiller = Distiller(teacher, student, methods, weights).to(device)
    extra = distiller.trainable_modules()
    groups = detector_param_groups(student, config.optim)
    for name, module in extra.items():
        options = module.optim_options() if isinstance(module, DistillMethod) else {}
        for group in named_param_groups(f"distill/{name}", module.named_parameters(),
                                        options.get("lr", config.optim.lr), config.optim.weight_decay):
            groups.append({**group, "warmup": bool(options.get("warmup", True))})
    evaluate_fn = make_eval_fn(config, data["val"], progress)
    return Trainer(student, distiller, groups, data["train"], collate, config,
                   evaluate_fn=evaluate_fn, extra_modules=extra, progress=progress)


def distill_detector(config: DistillConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Distil the configured student from ``config.teacher``; returns ``Trainer.summary()``."""
    return build_distill_trainer(config, resume, progress).fit(resume=resume)
