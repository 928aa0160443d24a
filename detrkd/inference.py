"""Running a trained detector: loading it for inference, over a dataset split (``detrkd eval`` /
``analyze``), on one image, and drawing or writing what it found (``detrkd predict``).

    model, _ = load_for_inference(Path("runs/x/best.pt"), "cpu")
    detections = predict_image(model, image, image_size=None, device="cpu", threshold=0.3)
    draw_detections(image, detections, class_names(model)).save("out.png")
    model, dataset, data, ann = detector_on_split(Path("runs/x/best.pt"), "val", data="data/digits")

A detection is ``{"label": int, "score": float, "box": [x0, y0, x1, y1]}`` in pixels of the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from detrkd.config import ConfigError
from detrkd.errors import CheckpointError

PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
           (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 190))
HEADER = ("label", "score", "x0", "y0", "x1", "y1")


def predict_image(model: Any, image: Any, image_size: int | None, device: str, threshold: float) -> list[dict[str, Any]]:
    """Detections of a PIL ``image`` with score >= ``threshold`` (module docstring: the dicts), fed
    as the model's own pixels (``processors.inference_pixels``; ``image_size``: another size)."""
    import torch

    from detrkd.data.collate import collate
    from detrkd.data.transforms import pixel_transforms
    from detrkd.evaluation import detections
    from detrkd.models.processors import inference_pixels

    transforms = pixel_transforms("val", inference_pixels(model, image_size))
    hw = torch.tensor([image.height, image.width])
    target = {"boxes": torch.zeros(0, 4), "class_labels": torch.zeros(0, dtype=torch.long),
              "image_id": 0, "orig_size": hw, "size": hw.clone()}
    batch = collate([transforms(image, target)])
    result = detections(model, batch["pixel_values"].to(device), batch["pixel_mask"].to(device), hw[None].to(device))[0]
    keep = result["scores"] >= threshold
    return [{"label": int(label), "score": float(score), "box": [float(v) for v in box]}
            for label, score, box in zip(result["labels"][keep], result["scores"][keep], result["boxes"][keep])]


def class_names(model: Any) -> Callable[[int], str]:
    """``label -> name`` from the HF config's ``id2label`` (falls back to the label number)."""
    id2label = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}

    def name(label: int) -> str:
        found = id2label.get(label)
        return str(label) if found is None or found == f"LABEL_{label}" else found

    return name


def label_text(label: int, score: float, names: Callable[[int], str]) -> str:
    """'name (0.75)': the score in parentheses, so a numeric class name never runs into it."""
    return f"{names(label)} ({score:.2f})"


def draw_detections(image: Any, detections: list[dict[str, Any]], names: Callable[[int], str]) -> Any:
    """A copy of the PIL ``image`` with a box and a filled 'name (score)' label per detection; the
    font (about 1/40 of the shorter side, at least 10 px) and line width scale with the image."""
    from PIL import ImageDraw, ImageFont

    canvas = image.convert("RGB")
    draw = ImageDraw.Draw(canvas)
    short = min(canvas.size)
    font = ImageFont.load_default(size=max(10, round(short / 40)))
    width = max(1, round(short / 250))
    pad = max(1, width)
    for det in sorted(detections, key=lambda d: d["score"]):
        colour = PALETTE[det["label"] % len(PALETTE)]
        x0, y0, x1, y1 = det["box"]
        draw.rectangle((x0, y0, x1, y1), outline=colour, width=width)
        text = label_text(det["label"], det["score"], names)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        h = bottom - top + 2 * pad
        ty = y0 - h if y0 - h >= 0 else y0  # above the box, or inside it at the top border
        draw.rectangle((x0, ty, x0 + right - left + 2 * pad, ty + h), fill=colour)
        ink = (0, 0, 0) if 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 128 else (255, 255, 255)
        draw.text((x0 + pad - left, ty + pad - top), text, fill=ink, font=font)
    return canvas


def output_format(path: Path) -> str:
    """What ``--out`` asks for, by its suffix: "json" (the detections) or a PIL image format
    ("PNG", "JPEG", ...); ``ValueError`` for a suffix neither knows."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "json"
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"--out {path}: unknown output format {suffix or '(no suffix)'!r}; use .json or an "
                         f"image suffix such as .png, .jpg, .webp")
    return fmt


def load_for_inference(path: Path, device: str) -> tuple[Any, dict[str, Any] | None]:
    """(detector in eval mode on ``device``, the run config dict of a .pt checkpoint or None)."""
    from detrkd.checkpoint import load_checkpoint, load_model_entries
    from detrkd.models import detector_from_state, load_detector
    from detrkd.models.processors import checkpoint_pixels

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        return load_detector(path).to(device).eval(), None
    state = load_checkpoint(path)
    if state.get("family") is None or state.get("hf_config") is None:
        raise CheckpointError(f"{path} holds no detector (no family / hf_config)")
    model = detector_from_state(state["family"], state["hf_config"])
    load_model_entries(model, state)
    model.pixels = checkpoint_pixels(state)  # what it was trained on (eval / predict feed it the same)
    return model.to(device).eval(), state.get("config")


def eval_data_config(run_config: dict[str, Any] | None, data: str | None = None, image_size: int | None = None,
                     batch_size: int = 8) -> Any:
    """The ``DataConfig`` to evaluate on: the checkpoint's data section (``run_config``) with the
    given data root, image size (default: the run's, else 256) and batch size."""
    from detrkd.config import DataConfig, coerce

    section = dict(((run_config or {}).get("data")) or {})
    if data is not None:
        section["root"] = str(data)
    if "root" not in section:
        raise ConfigError("--data is required (the checkpoint does not name its training data)")
    size = image_size if image_size is not None else int(section.get("image_size", 256))
    section.update(image_size=size, batch_size=batch_size, num_workers=0)
    return coerce(section, DataConfig, "data")


def detector_on_split(checkpoint: Path, split: str = "val", data: str | None = None, image_size: int | None = None,
                      batch_size: int = 8, device: str = "cpu") -> tuple[Any, Any, Any, str]:
    """(detector, dataset of ``split`` with the detector's val transforms, data config, annotation
    file) for the commands that run a checkpoint over a split; ``image_size`` overrides the
    detector's own pixels' size."""
    from detrkd.data.coco import CocoDetection
    from detrkd.models.processors import inference_pixels
    from detrkd.recipe import transforms_for

    model, run_config = load_for_inference(checkpoint, device)
    config = eval_data_config(run_config, data, image_size, batch_size)
    images, ann = config.split_paths(split)
    dataset = CocoDetection(images, ann, transforms_for(inference_pixels(model, image_size), "val", config),
                            invalid_boxes=config.invalid_boxes, on_bad_image=config.on_bad_image)
    if dataset.num_classes != model.num_classes:
        raise ValueError(f"the detector has {model.num_classes} classes but {ann} has {dataset.num_classes}")
    return model, dataset, config, ann
