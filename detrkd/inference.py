"""Running a detector on one image and drawing or writing what it found (``detrkd predict``).

    detections = predict_image(model, image, image_size=None, device="cpu", threshold=0.3)
    draw_detections(image, detections, class_names(model)).save("out.png")

A detection is ``{"label": int, "score": float, "box": [x0, y0, x1, y1]}`` in pixels of the image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

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
