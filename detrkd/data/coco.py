"""COCO-format detection datasets: validation at construction, category remap, DETR targets.

Policies (all checked when the dataset is built, so that an epoch never dies half-way):

- The annotation file must exist and hold valid JSON with ``images``, ``annotations`` and
  ``categories`` lists. Required keys: images ``id``, ``file_name``; annotations ``id``,
  ``image_id``, ``category_id``, ``bbox``; categories ``id``. Ids are ints and unique per list.
  Images without ``width``/``height`` have them read from the file header (cheap, no decode).
- Every image file must exist (``FileNotFoundError`` with the count and the first paths) and
  pass PIL's ``verify`` (a cheap check, about 0.2 ms per PNG, that finds truncated and non-image
  files): an error listing the first bad ones (``on_bad_image="error"``), or they are left out,
  annotations and evaluation ground truth included, with one warning (``on_bad_image="skip"``).
- Pixels: every mode and bit depth PIL opens becomes 8-bit RGB with its content (``to_rgb8``:
  16- and 32-bit integer and float images are rescaled, not clipped to 255).
- Boxes are clipped to their image. A box left with w <= 0 or h <= 0 (degenerate, or entirely
  outside) is dropped with one summary warning (``invalid_boxes="drop"``) or is an error
  (``invalid_boxes="error"``).
- ``iscrowd=1`` annotations are not training targets but stay in ``coco_gt`` (COCO evaluation
  ignores detections matched to them).
- Images without objects are kept (valid negatives; the HF DETR losses accept empty targets)
  unless ``skip_empty=True``.
- Category ids are remapped to contiguous labels 0..C-1 in sorted id order.
- The JSON width/height of an image is checked against the file when the item is loaded.

Content errors raise :class:`DatasetError` (a ``ValueError``); missing files ``FileNotFoundError``.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, overload

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from detrkd.data.transforms import ToTensorNormalize

__all__ = ["CocoDetection", "DatasetError", "load_coco_json"]

_EXAMPLES = 5  # how many offending entries an error/warning message lists


class DatasetError(ValueError):
    """The dataset's content is invalid (bad JSON, missing keys, dangling ids, bad boxes...)."""


# ---- reading and structural validation ---------------------------------------------------


def load_coco_json(annotation_file: str | os.PathLike) -> dict[str, Any]:
    """Read and parse a COCO annotation file; errors name the file (and line/column for JSON)."""
    path = Path(annotation_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found (or not a file): {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"annotation file {path} is not UTF-8 text: {e}") from e
    except OSError as e:
        raise OSError(f"cannot read annotation file {path}: {e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(
            f"annotation file {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
        ) from e
    if not isinstance(data, dict):
        raise DatasetError(f"annotation file {path}: top level must be a JSON object, got {type(data).__name__}")
    return data


def _where(section: str, index: int, entry: Any) -> str:
    ident = entry.get("id", "<missing>") if isinstance(entry, dict) else "<not an object>"
    return f"{section}[{index}] (id={ident!r})"


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_section(data: dict[str, Any], path: Path, section: str, required: Sequence[str]) -> list[dict]:
    """The list ``data[section]``; every entry an object with ``required`` keys and int ``id``."""
    if section not in data:
        raise DatasetError(f"annotation file {path}: missing top-level key {section!r}")
    entries = data[section]
    if not isinstance(entries, list):
        raise DatasetError(f"annotation file {path}: {section!r} must be a list, got {type(entries).__name__}")
    seen: dict[Any, int] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DatasetError(f"annotation file {path}: {section}[{i}] must be an object, got {type(entry).__name__}")
        for key in required:
            if key not in entry:
                raise DatasetError(f"annotation file {path}: {_where(section, i, entry)} is missing key {key!r}")
        if not _is_int(entry["id"]):
            raise DatasetError(f"annotation file {path}: {_where(section, i, entry)} has a non-integer 'id'")
        if entry["id"] in seen:
            raise DatasetError(
                f"annotation file {path}: duplicate {section} id {entry['id']!r} "
                f"({section}[{seen[entry['id']]}] and {section}[{i}])"
            )
        seen[entry["id"]] = i
    return entries


def _check_annotation_fields(anns: list[dict], path: Path, image_ids: set[int], cat_ids: set[int]) -> None:
    """Types of image_id/category_id/bbox/iscrowd and references to known images/categories."""
    dangling: dict[str, list[str]] = {"image_id": [], "category_id": []}
    for i, ann in enumerate(anns):
        where = f"annotation file {path}: {_where('annotations', i, ann)}"
        for key, known in (("image_id", image_ids), ("category_id", cat_ids)):
            if not _is_int(ann[key]):
                raise DatasetError(f"{where} has a non-integer {key!r}: {ann[key]!r}")
            if ann[key] not in known:
                dangling[key].append(f"annotations[{i}] (id={ann['id']}) -> {key} {ann[key]}")
        bbox = ann["bbox"]
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
            raise DatasetError(f"{where} has an invalid 'bbox' {bbox!r}: expected 4 numbers [x, y, w, h]")
        if not all(math.isfinite(v) for v in bbox):
            raise DatasetError(f"{where} has a non-finite 'bbox' {bbox!r}")
        if ann.get("iscrowd", 0) not in (0, 1):
            raise DatasetError(f"{where} has 'iscrowd' {ann['iscrowd']!r}: expected 0 or 1")
    for key, hits in dangling.items():
        if hits:
            section = "images" if key == "image_id" else "categories"
            raise DatasetError(
                f"annotation file {path}: {len(hits)} annotation(s) reference a {key} not in {section!r}, "
                f"e.g. " + "; ".join(hits[:_EXAMPLES])
            )


def _check_image_files(images: list[dict], images_dir: Path) -> list[Path]:
    """Paths of all image files; ``FileNotFoundError`` listing the first missing ones."""
    paths = [images_dir / str(img["file_name"]) for img in images]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        first = ", ".join(str(p) for p in missing[:_EXAMPLES])
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} image files are missing under {images_dir}, first: {first}"
        )
    return paths


def to_rgb8(image: Image.Image) -> Image.Image:
    """``image`` as 8-bit RGB with its content, whatever its mode.

    PIL's own ``convert("RGB")`` is right for every 8-bit mode (1, L, P, RGBA, LA, CMYK, YCbCr, ...:
    alpha is dropped, as transformers' image processors do), but it CLIPS integer and float
    images at 255, so a 16-bit image becomes almost white. Those are rescaled first: ``I;16*``
    by 1 / 257 (the full 16-bit range), ``I`` by its range (values <= 255 kept, <= 65535 as 16-bit,
    else min-max), ``F`` as [0, 1] when it lies there, kept when <= 255, else min-max.
    """
    if image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) / 257.0
    elif image.mode in ("I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
        if image.mode == "F" and low >= 0.0 and high <= 1.0:
            array = array * 255.0
        elif low < 0.0 or high > 255.0:
            array = array / 257.0 if image.mode == "I" and low >= 0.0 and high <= 65535.0 else \
                (array - low) * (255.0 / max(high - low, 1e-12))
    else:
        return image.convert("RGB")
    gray = Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8), mode="L")
    return gray.convert("RGB")


def _undecodable(paths: list[Path]) -> list[tuple[int, str]]:
    """(index, reason) of the image files PIL cannot open or ``verify`` (truncated, not an image)."""
    bad = []
    for i, file in enumerate(paths):
        try:
            with Image.open(file) as im:
                im.verify()
        except Exception as exc:  # PIL raises OSError, SyntaxError, struct.error, ... on bad files
            bad.append((i, f"{type(exc).__name__}: {exc}"))
    return bad


def _drop_bad_images(images: list[dict], paths: list[Path], anns: list[dict], images_dir: Path,
                     policy: str) -> tuple[list[dict], list[Path], list[dict]]:
    """Apply ``on_bad_image``: an error naming the first undecodable files, or those images and
    their annotations left out with one warning."""
    bad = _undecodable(paths)
    if not bad:
        return images, paths, anns
    first = "; ".join(f"{paths[i]} (image id {images[i]['id']}): {why}" for i, why in bad[:_EXAMPLES])
    summary = f"{len(bad)} of {len(paths)} image files cannot be decoded under {images_dir}, first: {first}"
    if policy == "error":
        raise DatasetError(summary + " (data.on_bad_image='error'; 'skip' trains without them)")
    warnings.warn(summary + "; they were skipped (on_bad_image='skip')", UserWarning, stacklevel=3)
    dropped = {images[i]["id"] for i, _ in bad}
    keep = [i for i in range(len(images)) if images[i]["id"] not in dropped]
    return ([images[i] for i in keep], [paths[i] for i in keep],
            [a for a in anns if a["image_id"] not in dropped])


def _image_sizes(images: list[dict], paths: list[Path], path: Path) -> list[tuple[int, int]]:
    """(h, w) per image from the JSON; read from the file header where width/height are absent."""
    sizes = []
    for i, (img, file) in enumerate(zip(images, paths)):
        w, h = img.get("width"), img.get("height")
        if w is None or h is None:
            try:
                with Image.open(file) as im:  # header only, pixels are not decoded
                    w, h = im.size
            except (OSError, SyntaxError) as e:
                raise DatasetError(f"cannot read image {file} (image id {img['id']}) for its size: {e}") from e
            img["width"], img["height"] = w, h
        if not (_is_int(w) and _is_int(h) and w > 0 and h > 0):
            raise DatasetError(
                f"annotation file {path}: {_where('images', i, img)} has invalid width/height {w!r}x{h!r}"
            )
        sizes.append((h, w))
    return sizes


# ---- boxes -----------------------------------------------------------------------------------


@dataclass
class _Objects:
    """Training targets of one image: absolute xyxy boxes float32 [n, 4], labels int64 [n]."""

    boxes: np.ndarray
    labels: np.ndarray


def _clip_xywh(bbox: Sequence[float], h: int, w: int) -> list[float] | None:
    """COCO [x, y, w, h] clipped to the image, or None when nothing with positive area is left."""
    x, y, bw, bh = (float(v) for v in bbox)
    if bw > 0 and bh > 0 and x >= 0 and y >= 0 and x + bw <= w and y + bh <= h:
        return [x, y, bw, bh]  # inside: keep the values exactly
    x0, y0 = max(0.0, float(bbox[0])), max(0.0, float(bbox[1]))
    x1, y1 = min(float(w), float(bbox[0]) + float(bbox[2])), min(float(h), float(bbox[1]) + float(bbox[3]))
    if x1 <= x0 or y1 <= y0:
        return None
    return [x0, y0, x1 - x0, y1 - y0]


def _apply_box_policy(
    anns: list[dict], sizes: dict[int, tuple[int, int]], policy: str, path: Path
) -> list[dict]:
    """Clipped copies of the annotations with usable boxes; degenerate ones dropped or an error."""
    kept, bad = [], []
    for ann in anns:
        h, w = sizes[ann["image_id"]]
        clipped = _clip_xywh(ann["bbox"], h, w)
        if clipped is None:
            bad.append(ann)
            continue
        out = dict(ann, bbox=clipped, iscrowd=int(ann.get("iscrowd", 0)))
        out.setdefault("area", clipped[2] * clipped[3])
        kept.append(out)
    if bad:
        examples = ", ".join(f"id={a['id']} bbox={a['bbox']}" for a in bad[:_EXAMPLES])
        summary = (
            f"{len(bad)} of {len(anns)} annotations in {path} have no area inside their image "
            f"(w <= 0 or h <= 0 after clipping, or entirely outside), e.g. {examples}"
        )
        if policy == "error":
            raise DatasetError(summary + " (invalid_boxes='error')")
        warnings.warn(summary + "; they were dropped (invalid_boxes='drop')", UserWarning, stacklevel=3)
    return kept


# ---- the dataset ------------------------------------------------------------------------------

Transforms = Callable[[Any, dict[str, Any]], tuple[Any, dict[str, Any]]]


class CocoDetection(Dataset):
    """A COCO-format detection dataset yielding DETR-style (image, target) pairs.

    Args:
        images_dir: folder the images' ``file_name`` entries are relative to.
        annotation_file: COCO JSON (``images``, ``annotations``, ``categories``).
        transforms: ``(PIL image, target) -> (tensor, target)``, ending with
            :class:`~detrkd.data.transforms.ToTensorNormalize`; None -> ToTensorNormalize only
            (no resize). See :func:`~detrkd.data.transforms.make_transforms`.
        invalid_boxes: "drop" (default) drops boxes with no area inside their image with one
            summary warning; "error" raises :class:`DatasetError` instead. Boxes partly outside
            are clipped to the image under both policies.
        skip_empty: leave out images without (non-crowd) objects; for training. Default False.

    ``dataset[i]`` -> (image float [3, H, W] normalised, target) with target keys
    ``class_labels`` long [n] (0..C-1), ``boxes`` float [n, 4] normalised cxcywh of the resized
    image, ``image_id`` int, ``orig_size`` long [2] (h, w) of the file, ``size`` long [2] (h, w)
    after transforms.
    """

    def __init__(
        self,
        images_dir: str | os.PathLike,
        annotation_file: str | os.PathLike,
        transforms: Transforms | None = None,
        invalid_boxes: Literal["drop", "error"] = "drop",
        skip_empty: bool = False,
        on_bad_image: Literal["error", "skip"] = "error",
    ):
        if invalid_boxes not in ("drop", "error"):
            raise ValueError(f"invalid_boxes must be 'drop' or 'error', got {invalid_boxes!r}")
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image must be 'error' or 'skip', got {on_bad_image!r}")
        self.images_dir = Path(images_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms if transforms is not None else ToTensorNormalize()
        self.invalid_boxes = invalid_boxes
        self.skip_empty = skip_empty
        if not self.images_dir.is_dir():
            raise FileNotFoundError(f"images directory not found: {self.images_dir}")

        data = load_coco_json(self.annotation_file)
        path = self.annotation_file
        images = _check_section(data, path, "images", ("id", "file_name"))
        anns = _check_section(data, path, "annotations", ("id", "image_id", "category_id", "bbox"))
        cats = _check_section(data, path, "categories", ("id",))
        _check_annotation_fields(anns, path, {img["id"] for img in images}, {c["id"] for c in cats})
        paths = _check_image_files(images, self.images_dir)
        images, paths, anns = _drop_bad_images(images, paths, anns, self.images_dir, on_bad_image)
        images = copy.deepcopy(images)  # width/height may be filled in below
        sizes = _image_sizes(images, paths, path)
        anns = _apply_box_policy(anns, {img["id"]: s for img, s in zip(images, sizes)}, invalid_boxes, path)

        cats = sorted(cats, key=lambda c: c["id"])
        self.cat_ids: list[int] = [c["id"] for c in cats]
        self.cat_id_to_label: dict[int, int] = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.class_names: list[str] = [str(c.get("name", c["id"])) for c in cats]
        self._coco_gt = {
            "info": data.get("info", {}),
            "images": images,
            "annotations": anns,
            "categories": copy.deepcopy(cats),
        }
        self._build_index(images, paths, sizes, anns)

    def _build_index(self, images: list[dict], paths: list[Path], sizes: list[tuple[int, int]], anns: list[dict]) -> None:
        per_image: dict[int, list[dict]] = {img["id"]: [] for img in images}
        for ann in anns:
            if not ann["iscrowd"]:
                per_image[ann["image_id"]].append(ann)
        self._records: list[tuple[int, Path, tuple[int, int], _Objects]] = []
        for img, file, size in zip(images, paths, sizes):
            objs = per_image[img["id"]]
            if self.skip_empty and not objs:
                continue
            xywh = np.array([a["bbox"] for a in objs], dtype=np.float32).reshape(-1, 4)
            boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
            labels = np.array([self.cat_id_to_label[a["category_id"]] for a in objs], dtype=np.int64)
            self._records.append((img["id"], file, size, _Objects(boxes, labels)))

    # ---- facts ----------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        """C, the number of categories (including ones without annotations)."""
        return len(self.cat_ids)

    @property
    def coco_gt(self) -> dict[str, Any]:
        """The validated ground truth as a COCO dict, for evaluation: all images (also those left
        out by ``skip_empty``), categories, and annotations after the box policy (clipped, crowd
        kept, ``iscrowd`` and ``area`` filled in). Treat it as read-only."""
        return self._coco_gt

    @property
    def image_ids(self) -> list[int]:
        """COCO image id of each item, in item order."""
        return [r[0] for r in self._records]

    @overload
    def label_to_cat_id(self, labels: int) -> int: ...
    @overload
    def label_to_cat_id(self, labels: Tensor) -> Tensor: ...
    @overload
    def label_to_cat_id(self, labels: Sequence[int]) -> list[int]: ...

    def label_to_cat_id(self, labels):
        """Contiguous labels (int, sequence or long tensor [n]) -> COCO category ids (same kind)."""
        if isinstance(labels, Tensor):
            table = torch.tensor(self.cat_ids, dtype=torch.long, device=labels.device)
            return table[labels.long()]
        if isinstance(labels, (int, np.integer)):
            return self.cat_ids[int(labels)]
        return [self.cat_ids[int(label)] for label in labels]

    # ---- items ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._records)

    def load_image(self, index: int) -> Image.Image:
        """The RGB PIL image of item ``index``; checks its size against the JSON."""
        image_id, file, (h, w), _ = self._records[index]
        try:
            with Image.open(file) as im:
                if im.size != (w, h):
                    raise DatasetError(
                        f"image {file} (image id {image_id}) is {im.size[0]}x{im.size[1]} (w x h) "
                        f"but {self.annotation_file} says {w}x{h}"
                    )
                return to_rgb8(im)
        except (OSError, SyntaxError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise DatasetError(f"cannot read image {file} (image id {image_id}): {e}") from e

    def raw_target(self, index: int) -> dict[str, Any]:
        """Target before transforms: ``boxes`` absolute xyxy float [n, 4], ``class_labels``,
        ``image_id``, ``orig_size`` and ``size`` (both the file's (h, w))."""
        image_id, _, (h, w), objs = self._records[index]
        hw = torch.tensor([h, w], dtype=torch.long)
        return {
            "class_labels": torch.from_numpy(objs.labels.copy()),
            "boxes": torch.from_numpy(objs.boxes.copy()),
            "image_id": int(image_id),
            "orig_size": hw,
            "size": hw.clone(),
        }

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image, target = self.transforms(self.load_image(index), self.raw_target(index))
        if not (isinstance(image, Tensor) and image.ndim == 3 and image.is_floating_point()):
            raise TypeError(
                "CocoDetection transforms must end with ToTensorNormalize (a float [3, H, W] tensor "
                f"and normalised cxcywh boxes), got {type(image).__name__}"
            )
        return image, target

    def __repr__(self) -> str:
        return (
            f"CocoDetection({self.annotation_file}, images={len(self)}, classes={self.num_classes}, "
            f"invalid_boxes={self.invalid_boxes!r}, skip_empty={self.skip_empty})"
        )
