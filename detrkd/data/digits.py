"""The bundled default dataset: handwritten digits pasted onto real photographs and textures.

``make_digits_dataset`` writes a small COCO-format detection dataset (``detrkd data digits``)::

    out_dir/train/000001.png ...            out_dir/annotations/instances_train.json
    out_dir/val/000001.png ...              out_dir/annotations/instances_val.json

Every image is a random crop of a real photograph or texture (random zoom, flip/rot90, brightness,
contrast, tint and sensor noise) with ``min_objects..max_objects`` handwritten digits composited on
top. The digits are the real handwritten glyphs of scikit-learn's ``load_digits`` (1797 images,
8x8, 17 grey levels, classes 0-9), upsampled smoothly (bicubic), with aspect-ratio jitter, a small
random rotation, random ink colour with a guaranteed minimum luminance contrast against the
background under the glyph, and crisp anti-aliased stroke edges. Object sizes are log-uniform in
``sqrt(box area)`` so that, at the default settings, COCO's small (< 32^2 px), medium and large
(> 96^2 px) ranges are all well populated. Overlap is limited: a placement whose box has IoU >
``max_iou`` with an earlier box, or where more than ``max_covered`` of either box lies inside
the other, is rejected and re-drawn (bounded retries; an object that cannot be placed is dropped,
but every image gets at least ``min_objects``, shrinking a stubborn object if needed).

Boxes are exact: a glyph's alpha mask is zero outside its ink, and the COCO box ``[x, y, w, h]``
is the tight pixel-edge box of the non-zero alpha (``x, y`` = first ink column/row, ``w, h`` =
ink extent in pixels). ``area`` is ``w * h``, so COCO's area ranges follow the boxes.

Generalisation split: train and val draw their digits from disjoint subsets of the 1797 sklearn
glyphs (a fixed, class-stratified 80/20 split that does not depend on ``seed``) and their
backgrounds from disjoint regions of every background image (val: the last 40% along the longer
side, train: the rest). Each annotation records the sklearn index of its glyph in an extra
``"source_index"`` key and each image its background in ``"background"`` (COCO tools ignore
extra keys).

Determinism: the same arguments give byte-identical JSON and identical pixels (each image has its
own random stream derived from ``(seed, split, index)``); different seeds give different data.

Licences of the source data (nothing is downloaded; both ship inside the installed packages):

* Digits: "Optical Recognition of Handwritten Digits" (E. Alpaydin, C. Kaynak, 1998), UCI Machine
  Learning Repository, CC BY 4.0, as bundled with scikit-learn (its 1797-image copy of the UCI
  test set; https://archive.ics.uci.edu/ml/datasets/Optical+Recognition+of+Handwritten+Digits).
* Backgrounds (``skimage.data``; licence statements from their docstrings, only images stated to
  be CC0 or public domain are used): ``brick``, ``grass``, ``gravel`` (CC0 textures), ``camera``
  (CC0, Lav Varshney), ``chelsea``, ``coffee`` (CC0, Stefan van der Walt / Rachel Michetti),
  ``cell`` (CC0), ``retina`` (CC0, Mikael Haggstrom), ``clock`` (public domain, Stefan van der
  Walt), ``astronaut``, ``hubble_deep_field`` (NASA, public domain), ``rocket`` (SpaceX, public
  domain), ``text`` (public domain). Images with only "no known copyright restrictions" or no
  statement (``coins``, ``moon``, ``page``, ``immunohistochemistry``, ...) are not used.

The generated dataset is a derivative of the digits and therefore CC BY 4.0 (attribution above).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detrkd import __version__

__all__ = ["make_digits_dataset", "BACKGROUNDS", "GENERATOR_VERSION"]

#: Bumped whenever the output for a given set of arguments changes.
GENERATOR_VERSION = "1"

#: ``skimage.data`` images used as backgrounds (all CC0 or public domain, see module docstring).
BACKGROUNDS: tuple[str, ...] = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "grass",
    "gravel",
    "hubble_deep_field",
    "retina",
    "rocket",
    "text",
)

_SPLIT_SEED = 20240611  # fixed digit split, independent of ``seed``
_VAL_DIGIT_FRACTION = 0.2
_VAL_REGION_FRACTION = 0.4  # val crops come from the last 40% of each background (longer axis)
_MAX_BG_SIDE = 512  # larger background images are downscaled to this short side on load
_CROP_FRACTION = (0.55, 1.0)  # crop side, as a fraction of the largest crop both regions allow
_REF_SIZE = 256  # default object sizes are given for this image size and scale with it
_DEFAULT_OBJECT_SIZE = (12.0, 160.0)  # sqrt(box area) range at _REF_SIZE
_INK_T, _INK_RAMP_MAX = 0.5, 0.4  # stroke threshold and widest alpha ramp (glyph value units)
_MIN_ALPHA = 0.1  # alpha below this is zeroed, so every ink pixel is visible
_PLACE_TRIES = 30
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_SPLIT_CODES = {"train": 0, "val": 1}

CATEGORIES = [{"id": i + 1, "name": str(i), "supercategory": "digit"} for i in range(10)]
LICENSES = [
    {
        "id": 1,
        "name": "CC BY 4.0 (digits: UCI Optical Recognition of Handwritten Digits, E. Alpaydin "
        "and C. Kaynak); backgrounds CC0 / public domain (scikit-image sample data)",
        "url": "https://creativecommons.org/licenses/by/4.0/",
    }
]


# --------------------------------------------------------------------------- sources


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn digits as (images float32 [1797, 8, 8] in 0..1, labels int64 [1797])."""
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target.astype(np.int64)


@lru_cache(maxsize=1)
def digit_split() -> dict[str, np.ndarray]:
    """Fixed class-stratified split of the sklearn digit indices: ``{"train": idx, "val": idx}``.

    Disjoint, sorted, ~80/20 per class; independent of the dataset seed.
    """
    _, labels = _digits()
    rng = np.random.default_rng(_SPLIT_SEED)
    train, val = [], []
    for c in range(10):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_val = int(round(len(idx) * _VAL_DIGIT_FRACTION))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return {"train": np.sort(np.concatenate(train)), "val": np.sort(np.concatenate(val))}


@lru_cache(maxsize=1)
def _backgrounds() -> tuple[tuple[str, np.ndarray, bool], ...]:
    """(name, uint8 [H, W] or [H, W, 3], is_grey) for every background, short side <= 512."""
    import skimage.data

    out = []
    for name in BACKGROUNDS:
        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 3:
            img = img[..., :3]
        grey = img.ndim == 2
        h, w = img.shape[:2]
        if min(h, w) > _MAX_BG_SIDE:
            s = _MAX_BG_SIDE / min(h, w)
            pil = Image.fromarray(img).resize(
                (round(w * s), round(h * s)), Image.Resampling.LANCZOS
            )
            img = np.asarray(pil)
        out.append((name, np.ascontiguousarray(img), grey))
    return tuple(out)


@lru_cache(maxsize=1)
def _pil_backgrounds() -> dict[str, Image.Image]:
    return {name: Image.fromarray(img) for name, img, _ in _backgrounds()}


_NOISE_BANK = 1 << 21


@lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """A fixed bank of standard-normal float32 samples (cheaper than drawing per pixel)."""
    return np.random.default_rng(12345).standard_normal(_NOISE_BANK, dtype=np.float32)


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard-normal noise of ``shape``: a random window of the bank (or fresh, if large)."""
    n = int(np.prod(shape))
    if 2 * n > _NOISE_BANK:
        return rng.standard_normal(shape, dtype=np.float32)
    start = int(rng.integers(_NOISE_BANK - n + 1))
    return _noise_bank()[start : start + n].reshape(shape)


def _region(shape: tuple[int, int], split: str) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1) of the part of a background a split may crop from (disjoint per split)."""
    h, w = shape
    if w >= h:
        cut = int(round(w * (1 - _VAL_REGION_FRACTION)))
        return (0, h, 0, cut) if split == "train" else (0, h, cut, w)
    cut = int(round(h * (1 - _VAL_REGION_FRACTION)))
    return (0, cut, 0, w) if split == "train" else (cut, h, 0, w)


def _max_crop(shape: tuple[int, int]) -> int:
    """Largest square crop side that fits in both the train and the val region."""
    sides = []
    for split in ("train", "val"):
        y0, y1, x0, x1 = _region(shape, split)
        sides.append(min(y1 - y0, x1 - x0))
    return min(sides)


# --------------------------------------------------------------------------- rendering


def render_glyph(
    glyph: np.ndarray, height: float, width: float, angle: float = 0.0
) -> np.ndarray:
    """Alpha mask (float32, values 0 or in [0.1, 1]) of one 8x8 digit, cropped to its ink.

    ``glyph`` is an 8x8 array in 0..1 (sklearn value / 16). The glyph's ink cells are scaled so
    that the ink extent is about ``height`` x ``width`` pixels (bicubic), rotated by ``angle``
    degrees (bilinear, counter-clockwise), ramped to crisp anti-aliased strokes, and cropped to
    the tight box of its non-zero pixels, so the returned array's shape *is* the object's box.
    """
    glyph = np.asarray(glyph, dtype=np.float32)
    ink = glyph >= _INK_T
    if not ink.any():  # no sklearn digit is this faint; guard anyway
        ink = glyph > 0
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    g = glyph[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    gh, gw = g.shape
    g = np.pad(g, 1)
    sy, sx = max(height, 1.0) / gh, max(width, 1.0) / gw
    out_w, out_h = max(3, int(round((gw + 2) * sx))), max(3, int(round((gh + 2) * sy)))
    pil = Image.fromarray(g, mode="F").resize((out_w, out_h), Image.Resampling.BICUBIC)
    if angle:
        pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR, expand=True, fillcolor=0.0)
    v = np.asarray(pil, dtype=np.float32)
    # Stroke edge: threshold the smooth glyph at _INK_T with a ramp about 1.5 px wide whatever
    # the zoom (glyph values change by ~0.5 per 8x8 cell), so big digits stay crisp.
    half = 0.5 * min(_INK_RAMP_MAX, 0.75 / max(1.0, min(sy, sx)))
    a = np.clip((v - (_INK_T - half)) / (2 * half), 0.0, 1.0)
    a[a < _MIN_ALPHA] = 0.0
    if not a.any():  # a faint glyph at a tiny size: keep its darkest pixels rather than nothing
        a = np.where(v >= 0.5 * v.max(), 1.0, 0.0).astype(np.float32)
    x0, y0, x1, y1 = ink_box(a)
    return np.ascontiguousarray(a[y0:y1, x0:x1])


def ink_box(alpha: np.ndarray) -> tuple[int, int, int, int]:
    """Tight pixel-edge box ``(x0, y0, x1, y1)`` (exclusive ends) of the non-zero pixels."""
    nz = alpha > 0
    rows, cols = np.flatnonzero(nz.any(1)), np.flatnonzero(nz.any(0))
    if len(rows) == 0:
        raise ValueError("glyph has no ink")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _iou_cover(box: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU of ``box`` [4] xyxy with ``boxes`` [n, 4], and intersection / smaller box area (the
    larger of the fractions of either box that lies inside the other)."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    a = (box[2] - box[0]) * (box[3] - box[1])
    b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (a + b - inter), inter / np.minimum(a, b)


def _background(rng: np.random.Generator, size: int, split: str) -> tuple[np.ndarray, str]:
    """Random crop of a random background region of ``split``, uint8 [size, size, 3]."""
    bgs = _backgrounds()
    name, img, grey = bgs[int(rng.integers(len(bgs)))]
    y0, y1, x0, x1 = _region(img.shape[:2], split)
    side = int(round(_max_crop(img.shape[:2]) * rng.uniform(*_CROP_FRACTION)))
    cy = int(rng.integers(y0, y1 - side + 1))
    cx = int(rng.integers(x0, x1 - side + 1))
    pil = _pil_backgrounds()[name].resize(
        (size, size), Image.Resampling.BILINEAR, box=(cx, cy, cx + side, cy + side)
    )
    k = int(rng.integers(4))
    if k:
        T = Image.Transpose
        pil = pil.transpose((T.ROTATE_90, T.ROTATE_180, T.ROTATE_270)[k - 1])
    if rng.random() < 0.5:
        pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    x = np.asarray(pil)
    # Photometric jitter as one per-channel affine map of the uint8 pixels: tint (grey images)
    # or colour balance, optional inversion, contrast around the mean, brightness.
    if grey:
        tint = 1.0 + rng.uniform(-0.25, 0.25, 3)
        tint /= tint.mean()
        mu = np.full(3, x[::4, ::4].mean() / 255.0)
    else:
        tint = 1.0 + rng.uniform(-0.1, 0.1, 3)
        mu = x[::4, ::4].mean((0, 1)) / 255.0
    invert = rng.random() < 0.2
    contrast, brightness = rng.uniform(0.6, 1.2), rng.uniform(0.65, 1.3)
    sign = -1.0 if invert else 1.0
    base = 1.0 if invert else 0.0
    m = float(np.mean(base + sign * tint * mu))
    # In 0..255 units, +0.5 so that the final truncation to uint8 rounds.
    gain = (sign * tint * contrast * brightness).astype(np.float32)
    offset = (255.0 * (base * contrast + m * (1.0 - contrast)) * brightness + 0.5) * np.ones(3)
    x = (x[..., None] if grey else x) * gain + offset.astype(np.float32)
    if rng.random() < 0.5:  # sensor noise
        sigma = np.float32(255.0 * rng.uniform(0.004, 0.02))
        x += _noise(rng, x.shape) * sigma
    np.clip(x, 0.0, 255.0, out=x)
    return x.astype(np.uint8), name


def _ink_colour(rng: np.random.Generator, bg_rgb: np.ndarray, min_contrast: float) -> np.ndarray:
    """Random RGB ink whose luminance differs from ``bg_rgb``'s by at least ``min_contrast``
    (<= 0.5, always achievable)."""
    c = rng.uniform(0.0, 1.0, 3).astype(np.float32)
    lb, lc = float(bg_rgb @ _LUMA), float(c @ _LUMA)
    if abs(lc - lb) >= min_contrast:
        return c
    # Move to whichever side (darker / lighter) has room; prefer the side the colour is on.
    side = 1.0 if lc >= lb else -1.0
    room = {1.0: 1.0 - lb, -1.0: lb}
    if room[side] < min_contrast:
        side = -side
    target = lb + side * min(room[side], min_contrast + rng.uniform(0.0, 0.15))
    c = np.clip(c + np.float32(target - lc), 0.0, 1.0)
    if abs(float(c @ _LUMA) - lb) < min_contrast:  # channels saturated: use grey at the target
        c = np.full(3, target, dtype=np.float32)
    return c


def _render_image(
    rng: np.random.Generator,
    *,
    split: str,
    image_size: int,
    min_objects: int,
    max_objects: int,
    object_size: tuple[float, float],
    max_iou: float,
    max_covered: float,
    max_rotation: float,
    aspect_jitter: float,
    min_contrast: float,
) -> dict[str, Any]:
    """One image: ``{"image": uint8 [S, S, 3], "background": uint8 [S, S, 3],
    "background_name": str, "objects": [{"label", "source_index", "box" (x0, y0, x1, y1),
    "alpha" (the glyph's alpha, shape = box)}]}``. Ink exists only inside the boxes."""
    images, labels = _digits()
    pool = digit_split()[split]
    S = image_size
    bg, bg_name = _background(rng, S, split)
    canvas = bg.copy()
    n_target = int(rng.integers(min_objects, max_objects + 1))
    lo, hi = math.log(object_size[0]), math.log(object_size[1])
    boxes = np.zeros((0, 4), dtype=np.float64)
    objects: list[dict[str, Any]] = []
    n_drawn = 0
    # Draw n_target objects; one that cannot be placed is dropped, except that the first
    # min_objects are shrunk until they fit (and re-drawn, boundedly, in the unlikely worst case).
    while len(objects) < n_target and (
        n_drawn < n_target or (len(objects) < min_objects and n_drawn < n_target + 20)
    ):
        n_drawn += 1
        src = int(pool[rng.integers(len(pool))])
        glyph = images[src]
        ink = glyph >= _INK_T
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        gh, gw = int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1
        aspect = (gw / gh) * math.exp(rng.uniform(-1.0, 1.0) * math.log(aspect_jitter))
        s = math.exp(rng.uniform(lo, hi))  # sqrt(box area)
        h, w = s / math.sqrt(aspect), s * math.sqrt(aspect)
        scale = min(1.0, 0.95 * S / max(h, w))
        angle = float(rng.uniform(-max_rotation, max_rotation)) if max_rotation > 0 else 0.0
        must = len(objects) < min_objects
        placed = False
        for attempt in range(_PLACE_TRIES * (4 if must else 1)):
            if attempt == 0 or attempt % _PLACE_TRIES == 0:
                if attempt:
                    scale *= 0.7  # a required object that does not fit: shrink it
                a = render_glyph(glyph, h * scale, w * scale, angle)
                if max(a.shape) > S:  # rotation / rounding overshoot
                    scale *= 0.9 * S / max(a.shape)
                    a = render_glyph(glyph, h * scale, w * scale, angle)
                bh, bw = a.shape
            y = int(rng.integers(0, S - bh + 1))
            x = int(rng.integers(0, S - bw + 1))
            box = np.array([x, y, x + bw, y + bh], dtype=np.float64)
            if len(boxes):
                iou, cover = _iou_cover(box, boxes)
                if iou.max() > max_iou or cover.max() > max_covered:
                    continue
            placed = True
            break
        if not placed:
            continue
        # Composite in 0..255 floats on the patch only; where alpha is 0 the pixel is unchanged.
        patch = canvas[y : y + bh, x : x + bw].astype(np.float32)
        a3 = a[..., None]
        local = (patch * a3).sum((0, 1)) / (255.0 * max(float(a.sum()), 1e-6))
        ink_rgb = 255.0 * _ink_colour(rng, local.astype(np.float32), min_contrast)
        patch += a3 * (ink_rgb - patch)
        canvas[y : y + bh, x : x + bw] = (patch + 0.5).astype(np.uint8)
        boxes = np.concatenate([boxes, box[None]], axis=0)
        objects.append(
            {
                "label": int(labels[src]),
                "source_index": src,
                "box": (x, y, x + bw, y + bh),
                "alpha": a,
            }
        )
    return {"image": canvas, "background": bg, "background_name": bg_name, "objects": objects}


# --------------------------------------------------------------------------- public API


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


def _check_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not (lo <= value <= hi):
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _ordered_map(fn, n: int, workers: int):
    """``fn(0), ..., fn(n - 1)`` in order, computed by ``workers`` threads (bounded in flight).

    Rendering and PNG encoding release the GIL for their heavy parts; every image has its own
    random stream, so the output does not depend on ``workers``.
    """
    if workers <= 1 or n <= 1:
        for i in range(n):
            yield fn(i)
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for i in range(n):
            pending.append(pool.submit(fn, i))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _area_bucket(area: float) -> str:
    return "small" if area < 32**2 else ("medium" if area <= 96**2 else "large")


def make_digits_dataset(
    out_dir: str | Path,
    *,
    train_images: int = 2000,
    val_images: int = 500,
    image_size: int = 256,
    seed: int = 0,
    min_objects: int = 2,
    max_objects: int = 8,
    object_size: tuple[float, float] | None = None,
    max_iou: float = 0.2,
    max_covered: float = 0.3,
    max_rotation: float = 10.0,
    aspect_jitter: float = 1.3,
    min_contrast: float = 0.3,
    overwrite: bool = False,
    png_compress_level: int = 1,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the digits detection dataset (COCO format) to ``out_dir`` and return a summary.

    Args:
        out_dir: output directory; created if missing. It must be empty or absent unless
            ``overwrite=True`` (then its ``train/``, ``val/`` and ``annotations/`` are replaced;
            other files are left alone).
        train_images, val_images: number of images per split (``val_images`` may be 0).
        image_size: side of the square images in pixels (>= 32).
        seed: random seed; the same arguments give byte-identical JSON and identical pixels.
        min_objects, max_objects: digits per image, drawn uniformly in this range.
        object_size: ``(min, max)`` of ``sqrt(box area)`` in pixels, sampled log-uniformly.
            Default ``(12, 160) * image_size / 256`` (min at least 4): about 39% small, 45%
            medium and 16% large boxes (COCO ranges) at 256 px.
        max_iou: a placement with IoU above this with an earlier box is rejected and re-drawn.
        max_covered: ... or where more than this fraction of either box lies inside the other.
        max_rotation: glyph rotation drawn uniformly in +-this many degrees (0 disables).
        aspect_jitter: the glyph's width/height is multiplied by a factor log-uniform in
            ``[1/aspect_jitter, aspect_jitter]`` (>= 1; 1 disables).
        min_contrast: minimum luminance difference (0..0.5) between the ink and the mean
            background under the glyph.
        overwrite: allow writing into a non-empty ``out_dir``.
        png_compress_level: zlib level for the PNGs (0-9; 1 is fast, 6+ is smaller and slower).
        workers: threads rendering and encoding images (default ``min(4, cpu count)``); the
            output is identical for any value.

    Returns:
        ``{"out_dir", "seconds", "categories", "train": {...}, "val": {...}}`` where each split
        has ``image_dir``, ``annotation_file``, ``images``, ``objects``, ``small``, ``medium``,
        ``large`` (COCO area ranges on ``area = w * h``).
    """
    train_images = _check_int("train_images", train_images, 1)
    val_images = _check_int("val_images", val_images, 0)
    image_size = _check_int("image_size", image_size, 32, 4096)
    seed = _check_int("seed", seed, 0, 2**63 - 1)
    min_objects = _check_int("min_objects", min_objects, 1, 100)
    max_objects = _check_int("max_objects", max_objects, 1, 100)
    if max_objects < min_objects:
        raise ValueError(
            f"max_objects ({max_objects}) must be >= min_objects ({min_objects})"
        )
    if object_size is None:
        f = image_size / _REF_SIZE
        object_size = (max(4.0, _DEFAULT_OBJECT_SIZE[0] * f), _DEFAULT_OBJECT_SIZE[1] * f)
    try:
        smin, smax = (float(v) for v in object_size)
    except (TypeError, ValueError):
        raise ValueError(
            f"object_size must be a (min, max) pair of numbers, got {object_size!r}"
        ) from None
    if not (4.0 <= smin <= smax <= 0.75 * image_size):
        raise ValueError(
            f"object_size must satisfy 4 <= min <= max <= 0.75 * image_size "
            f"({0.75 * image_size:g}), got ({smin:g}, {smax:g})"
        )
    max_iou = _check_float("max_iou", max_iou, 0.0, 1.0)
    max_covered = _check_float("max_covered", max_covered, 0.0, 1.0)
    max_rotation = _check_float("max_rotation", max_rotation, 0.0, 45.0)
    aspect_jitter = _check_float("aspect_jitter", aspect_jitter, 1.0, 3.0)
    min_contrast = _check_float("min_contrast", min_contrast, 0.0, 0.5)
    png_compress_level = _check_int("png_compress_level", png_compress_level, 0, 9)
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    workers = _check_int("workers", workers, 1, 64)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(
                f"out_dir {str(out)!r} is not empty; pass overwrite=True (CLI: --overwrite) "
                "to replace its train/, val/ and annotations/"
            )
        for sub in ("train", "val", "annotations"):
            p = out / sub
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()

    params = {
        "train_images": train_images,
        "val_images": val_images,
        "image_size": image_size,
        "min_objects": min_objects,
        "max_objects": max_objects,
        "object_size": [smin, smax],
        "max_iou": max_iou,
        "max_covered": max_covered,
        "max_rotation": max_rotation,
        "aspect_jitter": aspect_jitter,
        "min_contrast": min_contrast,
    }
    render_kw = dict(
        image_size=image_size,
        min_objects=min_objects,
        max_objects=max_objects,
        object_size=(smin, smax),
        max_iou=max_iou,
        max_covered=max_covered,
        max_rotation=max_rotation,
        aspect_jitter=aspect_jitter,
        min_contrast=min_contrast,
    )
    t0 = time.perf_counter()
    _digits(), _pil_backgrounds(), _noise_bank()  # load once, before worker threads need them
    (out / "annotations").mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"out_dir": str(out), "categories": len(CATEGORIES)}
    split_digits = digit_split()
    for split, n_images in (("train", train_images), ("val", val_images)):
        img_dir = out / split
        img_dir.mkdir(parents=True, exist_ok=True)
        width = max(6, len(str(n_images)))
        images, annotations = [], []
        counts = {"small": 0, "medium": 0, "large": 0}

        def make_one(i: int, split: str = split, img_dir: Path = img_dir, width: int = width):
            rng = np.random.default_rng([seed, _SPLIT_CODES[split], i])
            r = _render_image(rng, split=split, **render_kw)
            file_name = f"{i + 1:0{width}d}.png"
            Image.fromarray(r["image"]).save(
                img_dir / file_name, format="PNG", compress_level=png_compress_level
            )
            return file_name, r["background_name"], [
                (o["label"], o["source_index"], o["box"]) for o in r["objects"]
            ]

        for i, (file_name, bg_name, objs) in enumerate(_ordered_map(make_one, n_images, workers)):
            images.append(
                {
                    "id": i + 1,
                    "file_name": file_name,
                    "width": image_size,
                    "height": image_size,
                    "license": 1,
                    "background": bg_name,
                }
            )
            for label, src, (x0, y0, x1, y1) in objs:
                w, h = x1 - x0, y1 - y0
                area = float(w * h)
                counts[_area_bucket(area)] += 1
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": i + 1,
                        "category_id": label + 1,
                        "bbox": [float(x0), float(y0), float(w), float(h)],
                        "area": area,
                        "iscrowd": 0,
                        "source_index": src,
                    }
                )
        coco = {
            "info": {
                "description": f"detrkd digits ({split}): sklearn handwritten digits on "
                "scikit-image CC0/public-domain backgrounds",
                "version": GENERATOR_VERSION,
                "year": 2024,
                "contributor": "detrkd",
                "url": "",
                "date_created": "",
                "generator": "detrkd.data.digits.make_digits_dataset",
                "generator_version": GENERATOR_VERSION,
                "detrkd_version": __version__,
                "seed": seed,
                "split": split,
                "parameters": params,
                "digit_split_seed": _SPLIT_SEED,
                "num_source_digits": int(len(split_digits[split])),
                "backgrounds": list(BACKGROUNDS),
                "background_region": "val: last 40% along the longer side; train: the rest",
            },
            "licenses": LICENSES,
            "images": images,
            "annotations": annotations,
            "categories": CATEGORIES,
        }
        ann_file = out / "annotations" / f"instances_{split}.json"
        tmp = ann_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(coco, separators=(",", ":")) + "\n", encoding="utf-8")
        tmp.replace(ann_file)
        summary[split] = {
            "image_dir": str(img_dir),
            "annotation_file": str(ann_file),
            "images": n_images,
            "objects": len(annotations),
            **counts,
        }
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
