"""The run recipe: what a configured run is made of, wired for ``detrkd train`` and ``detrkd distill``.

``engine`` owns the loop (``Trainer``: schedule, clipping, logging, checkpoints, resume); this module
turns a config into the objects it drives: the detector (``make_detector``, with its ``pixels``),
the datasets and transforms (``make_datasets``, ``transforms_for``), the evaluation callback
(``make_eval_fn``), the loss module (``DetectorLoss`` for plain training, ``distill.Distiller`` for
distillation), the teacher (``load_teacher``, ``feed_teacher``) and the trainers of both commands
(``build_trainer`` / ``train_detector``, ``build_distill_trainer`` / ``distill_detector``)::

    build_trainer(config).fit()          # detrkd train
    build_distill_trainer(config).fit()  # detrkd distill
"""

from __future__ import annotations

import difflib
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from detrkd.checkpoint import load_checkpoint
from detrkd.config import ConfigError, DistillConfig, TrainConfig
from detrkd.data.coco import CocoDetection
from detrkd.data.collate import collate
from detrkd.data.transforms import pixel_transforms
from detrkd.distill.base import DistillMethod, Distiller
from detrkd.distill.methods import METHODS, build_methods, check_student_fits, method_class, method_options
from detrkd.distributed import detection_loss, local_device, shard, world
from detrkd.engine import (METHOD_GROUP_PREFIX, Batch, EvalFn, Trainer, check_run_dir, detector_param_groups,
                           named_param_groups, setup_runtime)
from detrkd.errors import TrainingError
from detrkd.evaluation import evaluate
from detrkd.models import (DetrAdapter, adapter_class, build_detector, family_of_pretrained_dir, load_detector,
                           preset_size)
from detrkd.models.cnn import build_cnn_detector, check_cnn_model_config, is_cnn_detector, is_cnn_family
from detrkd.models.processors import checkpoint_pixels, dir_pixels, family_pixels, imagenet_pixels
from detrkd.models.relabel import align_classes

log = logging.getLogger("detrkd")


# ---- plain detector training (``detrkd train``) -------------------------------------------
class DetectorLoss(nn.Module):
    """``compute_loss`` of plain training as a module (so that DDP can wrap it): the detector's
    own (HF) loss, its box normaliser averaged over processes, and its terms (this rank's)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: Batch) -> tuple[Tensor, dict[str, Tensor]]:
        out = self.model(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])
        terms = {k: v for k, v in (out.loss_dict or {}).items() if isinstance(v, Tensor) and v.numel() == 1}
        return detection_loss(self.model, out, batch["labels"]), terms


def make_detector(config: TrainConfig, num_classes: int, class_names: Sequence[str] | None = None) -> nn.Module:
    """Build the configured detector (random init or ``model.pretrained``), with its ``pixels``."""
    mcfg = config.model
    if mcfg.pretrained:  # a from_pretrained dir with other classes gets new class heads (load_detector)
        model = load_detector(mcfg.pretrained, class_names, config.data.image_size)
        if model.num_classes != num_classes:
            raise TrainingError(f"model.pretrained {mcfg.pretrained} has {model.num_classes} classes, "
                                f"the data has {num_classes}: a detrkd checkpoint is loaded as it is; "
                                f"`detrkd export` it to a directory to start from it with new class heads")
    elif is_cnn_family(mcfg.family):  # a torchvision CNN student (detrkd.models.cnn)
        model = build_cnn_detector(mcfg.family, mcfg.preset, num_classes, class_names, **mcfg.overrides)
    else:
        overrides = dict(mcfg.overrides)
        if mcfg.num_queries is not None:
            overrides["num_queries"] = mcfg.num_queries
        if class_names is not None:
            overrides.setdefault("id2label", {i: name for i, name in enumerate(class_names)})
            overrides.setdefault("label2id", {name: i for i, name in enumerate(class_names)})
        model = build_detector(mcfg.family, mcfg.preset, num_classes, backbone=mcfg.backbone, **overrides)
    if not (mcfg.pretrained and mcfg.pixels == "auto"):  # a loaded model already carries its own
        model.pixels = config_pixels(config)
    return model


def config_pixels(config: TrainConfig) -> Any:
    """The configured model's ``Pixels`` (``model.pixels``, ``models.processors``), without building it."""
    mcfg, size = config.model, config.data.image_size
    pretrained = Path(mcfg.pretrained) if mcfg.pretrained else None
    family = family_of_pretrained_dir(pretrained) if pretrained and pretrained.is_dir() else mcfg.family
    if mcfg.pixels == "imagenet":
        return imagenet_pixels(family, size)
    if pretrained is None:
        return family_pixels(family, size)
    if pretrained.is_dir():
        return dir_pixels(pretrained, family, size)
    return checkpoint_pixels(load_checkpoint(pretrained))


def transforms_for(pixels: Any, split: str, data: Any, views: dict[str, Any] | None = None) -> Any:
    """The standard transforms of ``split`` for a model fed ``pixels`` (``data.transforms.Pixels``)
    under a ``DataConfig``; ``views``: other models' pixels of the same images (train only)."""
    return pixel_transforms(split, pixels, hflip=data.hflip, views=views if split == "train" else None)


def make_datasets(config: TrainConfig, splits: Sequence[str] = ("train", "val")) -> dict[str, Any]:
    """``CocoDetection`` datasets of ``splits`` with the standard transforms of the configured
    model's pixels (``config_pixels``)."""
    pixels = config_pixels(config)
    out = {}
    for split in splits:
        images, ann = config.data.split_paths(split)
        out[split] = CocoDetection(images, ann, transforms_for(pixels, split, config.data),
                                   skip_empty=config.data.skip_empty and split == "train",
                                   invalid_boxes=config.data.invalid_boxes, on_bad_image=config.data.on_bad_image)
        check_split(out[split], split, ann)
    return out


def check_split(dataset: Any, split: str, annotation_file: str) -> None:
    """A training or evaluation split needs images and at least one annotated object:
    ``TrainingError`` naming the file otherwise (an empty val split would run with no evaluation,
    an unannotated one with AP undefined; an unannotated train split has nothing to learn)."""
    if len(dataset) == 0:
        raise TrainingError(f"the {split} split {annotation_file} has no images (after skip_empty / "
                            f"on_bad_image): nothing to {'train on' if split == 'train' else 'evaluate'}")
    if not any(not a.get("iscrowd", 0) for a in dataset.coco_gt["annotations"]):
        raise TrainingError(f"the {split} split {annotation_file} has no annotated objects: "
                            f"{'nothing to learn' if split == 'train' else 'AP is undefined'}")


def make_eval_fn(config: TrainConfig, dataset: Any, progress: bool = False) -> EvalFn:
    """``model -> COCO stats`` on ``dataset`` (``detrkd.evaluation.evaluate``).

    Data-parallel: each rank evaluates its contiguous shard of the (first ``eval_max_images``)
    images, the detections are gathered on rank 0 once, the stats computed there and broadcast.
    """
    w = world()
    max_images = config.eval_max_images
    part = dataset
    if w.distributed:
        count = len(dataset) if max_images is None else min(len(dataset), max_images)
        part, max_images = Subset(dataset, shard(range(count), w.rank, w.size)), None
    loader = DataLoader(part, batch_size=max(1, config.data.batch_size // w.size), shuffle=False,
                        collate_fn=collate, num_workers=config.data.num_workers)
    device = local_device(config.device)

    def evaluate_fn(model: nn.Module) -> dict[str, float]:
        return evaluate(model, loader, dataset, device, max_images=max_images,
                        progress=progress and w.is_main, gather=w.distributed)

    return evaluate_fn


def check_device(name: str) -> None:
    """``ConfigError`` unless ``name`` is a torch device this machine has (cpu, cuda[:i], mps)."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {name!r} is not a device name (use cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device {name!r}: this machine has no usable CUDA device; use --device cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device {name!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {name!r}: detrkd runs on cpu, cuda or mps")


def check_model_config(model: Any) -> None:
    """``ConfigError`` for a ``model`` section that cannot build: unknown family / preset /
    backbone, a query count < 1, ``overrides`` keys the family's HF config does not have (with a
    "did you mean") or values it rejects, ``overrides`` with ``pretrained`` (they would be ignored).
    Builds the HF config only (no weights)."""
    if is_cnn_family(model.family):
        return check_cnn_model_config(model)
    if model.num_queries is not None and model.num_queries < 1:
        raise ConfigError(f"model.num_queries must be >= 1 (or null: the preset's), got {model.num_queries}")
    try:
        cls = adapter_class(model.family)
        size = preset_size(model.preset, model.backbone) if model.preset is not None else None
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    if model.pretrained:
        if model.overrides:
            raise ConfigError(f"model.overrides {sorted(model.overrides)} would be ignored with model.pretrained "
                              f"(the checkpoint's config is used): remove them")
        return
    known = set(cls._config_class()().to_dict())
    for key in model.overrides:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"model.overrides: {key!r} is not a {cls.hf_classes[0]} key{hint}")
    overrides = dict(model.overrides)
    if model.num_queries is not None:
        if "num_queries" in overrides:
            raise ConfigError("num_queries is given twice (model.num_queries and model.overrides.num_queries): "
                              "keep one")
        overrides["num_queries"] = model.num_queries
    try:
        cls.make_config(size, 1, **overrides)
    except Exception as exc:  # HF configs raise TypeError, ValueError or huggingface_hub's validation errors
        said = " ".join(str(exc).split()) or type(exc).__name__
        raise ConfigError(f"model.overrides {overrides}: {said}") from None
    if overrides.get("num_queries", size.queries) < 1:
        raise ConfigError(f"model.overrides: num_queries must be >= 1, got {overrides['num_queries']}")


def check_run_config(config: TrainConfig) -> None:
    """What can be checked before any data or weights are loaded (``ConfigError``)."""
    check_device(config.device)
    check_model_config(config.model)


def build_trainer(config: TrainConfig, resume: bool = False, progress: bool = True) -> Trainer:
    """The ``Trainer`` of plain training of one detector as configured (process group joined)."""
    check_run_config(config)
    check_run_dir(Path(config.output_dir), resume)
    device = setup_runtime(config)
    data = make_datasets(config)
    model = make_detector(config, data["train"].num_classes, data["train"].class_names).to(device)
    evaluate_fn = make_eval_fn(config, data["val"], progress)
    return Trainer(model, DetectorLoss(model), detector_param_groups(model, config.optim),
                   data["train"], collate, config, evaluate_fn=evaluate_fn, progress=progress)


def train_detector(config: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Plain training of one detector as configured; returns ``Trainer.summary()``."""
    return build_trainer(config, resume, progress).fit(resume=resume)


# ---- distillation (``detrkd distill``) ---------------------------------------------------
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


def feed_teacher(config: DistillConfig, train_set: Any, student: DetrAdapter, teacher: DetrAdapter) -> None:
    """Where the teacher's preprocessing differs from the student's, its own view of every training
    image (``transforms.Views``; same flip, boxes and content; its resize and normalisation) goes
    with the batch; a method that compares the two encoder memories token by token then needs
    the same input grid: ``ConfigError`` up front otherwise."""
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


def check_distill_config(config: DistillConfig) -> None:
    """``check_run_config`` plus every method's section (names, options, weights, the kind of student
    it distils into): ``ConfigError`` before any data, teacher or weights are loaded."""
    check_run_config(config)
    for name, section in config.methods.items():
        method_options(name, section)
    check_student_fits(config.methods, config.model.family)
    if config.init_from_teacher and is_cnn_family(config.model.family):
        raise ConfigError(f"init_from_teacher copies a DETR teacher's tensors into a student of the same "
                          f"layout; a {config.model.family} student has none of them: set init_from_teacher: false")


def build_distill_trainer(config: DistillConfig, resume: bool = False, progress: bool = True) -> Trainer:
    """The ``Trainer`` of a distillation run as configured (process group joined)."""
    check_distill_config(config)
    check_run_dir(Path(config.output_dir), resume)
    device = setup_runtime(config)
    data = make_datasets(config)
    num_classes = data["train"].num_classes
    student = make_detector(config, num_classes, data["train"].class_names)
    teacher = load_teacher(config, num_classes, data["train"].class_names)
    feed_teacher(config, data["train"], student, teacher)
    if config.init_from_teacher and not resume:
        log.info("init_from_teacher: copied %d tensors", init_from_teacher(student, teacher))
    methods, weights = build_methods(config.methods, student, teacher)
    distiller = Distiller(student, teacher, methods, weights).to(device)
    extra = distiller.trainable_modules()
    groups = detector_param_groups(student, config.optim)
    for name, module in extra.items():
        options = module.optim_options() if isinstance(module, DistillMethod) else {}
        for group in named_param_groups(f"{METHOD_GROUP_PREFIX}{name}", module.named_parameters(),
                                        options.get("lr", config.optim.lr), config.optim.weight_decay):
            groups.append({**group, "warmup": bool(options.get("warmup", True))})
    evaluate_fn = make_eval_fn(config, data["val"], progress)
    return Trainer(student, distiller, groups, data["train"], collate, config,
                   evaluate_fn=evaluate_fn, extra_modules=extra, progress=progress)


def distill_detector(config: DistillConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Distil the configured student from ``config.teacher``; returns ``Trainer.summary()``."""
    return build_distill_trainer(config, resume, progress).fit(resume=resume)
