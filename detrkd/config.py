"""Dataclass configs, strict YAML loading and ``key=value`` overrides.

The loader is generic over a tree of dataclasses (``load_config(source, overrides, schema=...)``),
so a later ``DistillConfig`` (teacher + methods) only needs new dataclasses, not a new loader.

Rules:
- unknown keys are rejected, naming the full dotted key, the valid keys at that level and the
  closest valid key ("did you mean");
- every value is checked against its field's type (``optim.lr: expected float, got 'abc'``);
- overrides are ``dotted.key=value`` strings whose value is parsed with ``yaml.safe_load``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and why."""


# ---- the schema ---------------------------------------------------------------------------
@dataclass
class ModelConfig:
    """Which detector to build."""

    # detector family, a key of ``detrkd.models.ADAPTERS`` (e.g. "deformable_detr", "detr")
    family: str
    # named size preset: "tiny" (smoke tests), "small" (student), "base" (teacher); may be left out
    # (null) with ``pretrained``, whose own config gives the size
    preset: str | None = None
    # a preset name whose backbone replaces ``preset``'s (transformer unchanged); None keeps it.
    # The papers' students: the teacher's transformer on a smaller backbone
    backbone: str | None = None
    # number of detection queries; None keeps the preset's value
    num_queries: int | None = None
    # initial weights: a HF ``from_pretrained`` dir or a detrkd checkpoint (.pt); None = random init
    pretrained: str | None = None
    # extra HF config keys passed to the family's config (e.g. {dropout: 0.0})
    overrides: dict[str, Any] = field(default_factory=dict)
    # the model's input pixels (``models.processors``): "auto" = what its own image processor makes
    # (a pretrained directory's preprocessor_config.json, a checkpoint's recorded pixels, else the
    # family's transformers default rescale / normalisation at data.image_size); "imagenet" =
    # ImageNet mean / std at data.image_size for every family (detrkd's rule before per-model
    # preprocessing; the digits benchmark configs keep it)
    pixels: Literal["auto", "imagenet"] = "auto"

    def __post_init__(self) -> None:
        _check(self.preset is not None or bool(self.pretrained),
               "model.preset is required (tiny, small, base) unless model.pretrained gives the model")


@dataclass
class DataConfig:
    """Where the COCO-format data lives. Relative paths are relative to ``root``."""

    # dataset root; the defaults below follow the ``detrkd data digits`` layout
    root: str
    # training images directory
    train_images: str = "train"
    # training annotations (COCO json)
    train_ann: str = "annotations/instances_train.json"
    # validation images directory
    val_images: str = "val"
    # validation annotations (COCO json)
    val_ann: str = "annotations/instances_val.json"
    # shorter image side after resizing, in pixels (train: multi-scale around it)
    image_size: int = 256
    # random horizontal flips in training (off for digits and text: a mirrored "2" is no digit)
    hflip: bool = True
    # images per batch
    batch_size: int = 4
    # DataLoader worker processes (0 = load in the main process; needed for bit-exact resume)
    num_workers: int = 0
    # drop training images without any annotation
    skip_empty: bool = False
    # image files that cannot be decoded (found when the dataset is built): "error" or "skip" them
    on_bad_image: str = "error"
    # boxes with no area inside their image: "drop" them (one warning) or "error"
    invalid_boxes: str = "drop"

    def __post_init__(self) -> None:
        _check(self.on_bad_image in ("error", "skip"),
               f"data.on_bad_image must be 'error' or 'skip', got {self.on_bad_image!r}")
        _check(self.invalid_boxes in ("drop", "error"),
               f"data.invalid_boxes must be 'drop' or 'error', got {self.invalid_boxes!r}")
        _check(self.image_size >= 32, "data.image_size must be >= 32")
        _check(self.batch_size >= 1, "data.batch_size must be >= 1")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")

    def split_paths(self, split: str) -> tuple[str, str]:
        """(images_dir, annotation_file) of ``split`` ("train" or "val"), joined with ``root``."""
        if split not in ("train", "val"):
            raise ConfigError(f"unknown data split {split!r}; expected 'train' or 'val'")
        images, ann = getattr(self, f"{split}_images"), getattr(self, f"{split}_ann")
        return os.path.join(self.root, images), os.path.join(self.root, ann)


@dataclass
class OptimConfig:
    """Optimizer (AdamW), learning-rate schedule and step control."""

    # peak learning rate of all non-backbone parameters
    lr: float = 1e-4
    # peak learning rate of the CNN backbone
    backbone_lr: float = 1e-5
    # AdamW weight decay (not applied to norms and biases)
    weight_decay: float = 1e-4
    # number of passes over the training set; the LR schedule spans all of them
    epochs: int = 12
    # linear warm-up from 0 to the peak LR over this many steps
    warmup_steps: int = 100
    # decay after warm-up: "cosine" (to min_lr_ratio) or "step" (x gamma at each of step_epochs)
    schedule: Literal["cosine", "step"] = "cosine"
    # epochs at which the "step" schedule multiplies the LR by gamma
    step_epochs: list[int] = field(default_factory=lambda: [8])
    # multiplicative factor of the "step" schedule
    gamma: float = 0.1
    # final LR of the "cosine" schedule, as a fraction of the peak
    min_lr_ratio: float = 0.01
    # max gradient norm (clipping); 0 disables clipping
    clip_grad: float = 0.1
    # stop after this many steps in total (smoke runs); the schedule still spans ``epochs``
    max_steps: int | None = None
    # abort after this many consecutive steps with a non-finite loss or gradient
    max_nonfinite_in_row: int = 5

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "optim.epochs must be >= 1")
        _check(self.warmup_steps >= 0, "optim.warmup_steps must be >= 0")
        _check(self.lr >= 0 and self.backbone_lr >= 0, "optim.lr and optim.backbone_lr must be >= 0")
        _check(self.clip_grad >= 0, "optim.clip_grad must be >= 0")
        _check(self.max_steps is None or self.max_steps >= 1, "optim.max_steps must be >= 1")
        _check(self.max_nonfinite_in_row >= 1, "optim.max_nonfinite_in_row must be >= 1")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run of a detector on a COCO-format dataset.

    Keyword-only, so that a subclass (e.g. a ``DistillConfig`` adding ``teacher`` and ``methods``)
    may add required fields; ``engine.Trainer`` only reads the fields defined here.
    """

    # the detector
    model: ModelConfig
    # the data
    data: DataConfig
    # optimizer and schedule
    optim: OptimConfig = field(default_factory=OptimConfig)
    # run directory: config.yaml, metrics.jsonl, last.pt, best.pt
    output_dir: str = "runs/train"
    # seed of weights init, data order (seed + epoch) and augmentation
    seed: int = 0
    # evaluate on val every this many epochs (and after the last); 0 disables evaluation
    eval_every_epochs: int = 1
    # cap on the number of val images per evaluation; None = all
    eval_max_images: int | None = None
    # write last.pt every this many steps (and at every epoch end); 0 = epoch ends only
    checkpoint_every_steps: int = 500
    # write a metrics.jsonl line every this many steps
    log_every_steps: int = 10
    # torch intra-op threads; None leaves torch's default
    threads: int | None = None
    # torch device, e.g. "cpu" or "cuda"
    device: str = "cpu"
    # bfloat16 autocast for forward + loss (GPU; on CPU it is slower and less precise)
    amp: bool = False
    # PyTorch's deterministic algorithms (GPU; CPU runs repeat bit-for-bit without it)
    deterministic: bool = False
    # BatchNorm in training: "train" (per-process batch statistics), "frozen" (eval mode: running
    # statistics, affine still trained), "sync" (SyncBatchNorm across processes; CUDA only)
    batch_norm: Literal["train", "frozen", "sync"] = "train"
    # data-parallel runs: let DDP find parameters a step did not use (safe for every method;
    # false is a little faster when every trained parameter gets a gradient at every step)
    find_unused_parameters: bool = True

    def __post_init__(self) -> None:
        _check(self.eval_every_epochs >= 0, "eval_every_epochs must be >= 0")
        _check(self.checkpoint_every_steps >= 0, "checkpoint_every_steps must be >= 0")
        _check(self.log_every_steps >= 1, "log_every_steps must be >= 1")
        _check(self.threads is None or self.threads >= 1, "threads must be >= 1")


@dataclass(kw_only=True)
class DistillConfig(TrainConfig):
    """Distillation of the ``model`` (the student) from a trained ``teacher``.

    ``methods`` maps a method name of ``detrkd.distill.METHODS`` to its options; the option
    ``weight`` is the method's lambda (the others go to the method's constructor), e.g.
    ``{agfd: {weight: 50}, lapd: {weight: 1, layers: all}}``. An empty dict is the no-KD student
    trained on the same schedule (and with the same data order) as any distilled one.
    """

    # the teacher: a detrkd checkpoint (.pt) or a HF from_pretrained directory
    teacher: str
    # method name -> options ("weight" = lambda); see detrkd.distill.METHODS
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # copy the teacher's weights into the student wherever names and shapes match (QSKD Table 4)
    init_from_teacher: bool = False


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


# ---- loading ------------------------------------------------------------------------------
def load_config(
    source: str | os.PathLike | Mapping[str, Any] | None,
    overrides: Sequence[str | tuple[str, Any]] = (),
    schema: type[T] = TrainConfig,  # type: ignore[assignment]
) -> T:
    """Build a ``schema`` dataclass tree from a YAML file (or a dict, or None) plus overrides.

    overrides: applied in order, each ``"optim.lr=3e-4"`` (value parsed by ``yaml.safe_load``)
    or an already-typed ``("data.root", "data/digits")`` pair.
    Raises ``ConfigError`` for unreadable files, unknown keys, wrong types and missing keys.
    """
    raw = _read_source(source)
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        set_dotted(raw, key, value)
    return from_dict(schema, raw)


def _read_source(source: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    if source is None:
        return {}
    if isinstance(source, Mapping):
        return _deep_copy_dict(source)
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}".replace("\n", " ")) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _deep_copy_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy_dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}


def parse_override(item: str) -> tuple[str, Any]:
    """``"optim.lr=3e-4"`` -> ``("optim.lr", "3e-4" parsed by yaml.safe_load)``."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=3e-4)")
    try:
        return key, yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {item!r}: cannot parse value: {exc}".replace("\n", " ")) from exc


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw["a"]["b"] = value`` for ``key = "a.b"``, creating sections as needed."""
    parts = key.split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            section = ".".join(parts[: depth + 1])
            raise ConfigError(f"cannot set {key!r}: {section!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(schema: type[T], data: Any, prefix: str = "") -> T:
    """Convert a nested dict into the dataclass ``schema``, strictly (see module docstring)."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}  # type: ignore[arg-type]
    hints = typing.get_type_hints(schema)
    _reject_unknown(data, list(fields), prefix, dotted_keys(schema) if not prefix else None)
    kwargs = {}
    for name, fld in fields.items():
        key = prefix + name
        if name in data:
            kwargs[name] = coerce(data[name], hints[name], key)
        elif fld.default is dataclasses.MISSING and fld.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = from_dict(hints[name], {}, key + ".")
            else:
                raise ConfigError(f"missing required config key {key!r}")
    return schema(**kwargs)


def _reject_misplaced(data: Mapping[str, Any], everywhere: list[str], prefix: str) -> None:
    """Walk the sections of ``data``: a key that exists only in another section is an error that
    names the right place (``warmup_steps`` -> ``optim.warmup_steps``)."""
    here = {k[len(prefix):] for k in everywhere if k.startswith(prefix)}
    sections = {k.split(".")[0] for k in here if "." in k}
    for key, value in data.items():
        if str(key) in sections and isinstance(value, Mapping):
            _reject_misplaced(value, everywhere, f"{prefix}{key}.")
        elif str(key) not in here and str(key) not in sections:
            places = [k for k in everywhere if k.rsplit(".", 1)[-1] == str(key)]
            if places:
                where = f"in {prefix.rstrip('.')!r}" if prefix else "at the top level"
                raise ConfigError(f"unknown config key {prefix}{key!s} {where}; did you mean {places[0]!r}?")


def dotted_keys(schema: type, prefix: str = "") -> list[str]:
    """Every key of a config schema, dotted (``optim.warmup_steps``), sections recursed into."""
    hints = typing.get_type_hints(schema)
    keys = []
    for fld in dataclasses.fields(schema):  # type: ignore[arg-type]
        if dataclasses.is_dataclass(hints[fld.name]):
            keys += dotted_keys(hints[fld.name], f"{prefix}{fld.name}.")
        else:
            keys.append(prefix + fld.name)
    return keys


def _reject_unknown(data: Mapping[str, Any], valid: list[str], prefix: str,
                    everywhere: list[str] | None = None) -> None:
    """``ConfigError`` for the first key of ``data`` not in ``valid``, with a "did you mean": a key of
    that name in another section (``everywhere``: all dotted keys, given at the top level, where a
    section's keys are checked before the section is read), else the closest key at this level."""
    if everywhere is not None:
        _reject_misplaced(data, everywhere, "")
    for key in data:
        if key in valid:
            continue
        full = f"{prefix}{key}"
        suggestion = [prefix + c for c in difflib.get_close_matches(str(key), valid, n=1)]
        hint = f"; did you mean {suggestion[0]!r}?" if suggestion else ""
        level = f"in {prefix.rstrip('.')!r}" if prefix else "at the top level"
        raise ConfigError(f"unknown config key {full!r}{hint} (valid keys {level}: {', '.join(valid)})")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and minimally convert) ``value`` against the type annotation ``tp``."""
    if tp is Any or tp is object:
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _coerce_union(value, args, tp, key)
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: expected one of {', '.join(map(repr, args))}, got {_show(value)}")
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
        item = args[0] if args else Any  # list[T], Sequence[T], tuple[T, ...] (or a tuple of one type)
        items = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {_show(value)}")
        return dict(value)
    return _coerce_scalar(value, tp, key)


def _coerce_union(value: Any, args: tuple[Any, ...], tp: Any, key: str) -> Any:
    if value is None and type(None) in args:
        return None
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce(value, arg, key)
        except ConfigError:
            continue
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _coerce_scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is bool and isinstance(value, bool):
        return value
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    return "null" if value is None else repr(value)


# ---- stored configs of older runs ----------------------------------------------------------
# keys a run's stored config may predate, with the value that was in force before they existed
PREDATED = {"model.pixels": "imagenet"}
# method options that became per-term weights (``methods.NAME.terms``): old option -> term name(s)
RENAMED_WEIGHTS: dict[str, str | tuple[str, ...]] = {
    "weights": ("cls", "l1", "giou"),  # kd_detr, lapd, global_alignment: a (class, L1, GIoU) triple
    "sampling_weight": "sampling", "bbox_weight": "l1", "cls_weight": "cls",  # active_sampling
}


def with_predated(config: dict[str, Any]) -> dict[str, Any]:
    """A stored run config in today's shape, meaning what it ran with: the ``PREDATED`` keys it
    lacks filled in, and old per-term weight options moved into ``methods.NAME.terms``."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
    for key, value in PREDATED.items():
        section, name = key.split(".")
        if isinstance(out.get(section), dict):
            out[section].setdefault(name, value)
    if isinstance(out.get("methods"), dict):
        out["methods"] = {name: _with_terms(options) for name, options in out["methods"].items()}
    return out


def _with_terms(options: Any) -> Any:
    if not isinstance(options, dict) or not set(options) & set(RENAMED_WEIGHTS):
        return options
    options, terms = dict(options), dict(options.get("terms") or {})
    for old, names in RENAMED_WEIGHTS.items():
        if old in options:
            value = options.pop(old)
            terms.update(zip(names, map(float, value)) if isinstance(names, tuple) else {names: float(value)})
    return {**options, "terms": terms}


# ---- writing ------------------------------------------------------------------------------
def config_to_dict(config: Any) -> dict[str, Any]:
    """The plain nested dict of a config (what ``dump_config`` writes)."""
    return dataclasses.asdict(config)


def dump_config(config: Any, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (the run directory's ``config.yaml``); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
    return path
