"""Tests for the bundled digits dataset generator (detrkd.data.digits)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkd.data import digits as D
from detrkd.data.digits import make_digits_dataset

SMALL = dict(train_images=12, val_images=6, image_size=128, seed=0)


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits") / "ds"
    summary = make_digits_dataset(out, **SMALL)
    return out, summary


def _load(out: Path, split: str) -> dict:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def _pixels(out: Path, split: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(p)) for p in sorted((out / split).glob("*.png"))]


def _xyxy(bbox):
    x, y, w, h = bbox
    return np.array([x, y, x + w, y + h], dtype=np.float64)


# --------------------------------------------------------------------------- COCO format


def test_layout_and_summary(small_ds):
    out, summary = small_ds
    for split, n in (("train", 12), ("val", 6)):
        assert len(list((out / split).glob("*.png"))) == n
        assert (out / "annotations" / f"instances_{split}.json").is_file()
        s = summary[split]
        coco = _load(out, split)
        assert s["images"] == n and s["objects"] == len(coco["annotations"])
        assert s["small"] + s["medium"] + s["large"] == s["objects"]
        assert Path(s["annotation_file"]).is_file() and Path(s["image_dir"]).is_dir()


def test_coco_structure(small_ds):
    out, _ = small_ds
    for split in ("train", "val"):
        coco = _load(out, split)
        assert [c["id"] for c in coco["categories"]] == list(range(1, 11))
        assert [c["name"] for c in coco["categories"]] == [str(i) for i in range(10)]
        info = coco["info"]
        assert info["seed"] == 0 and info["split"] == split
        assert info["generator_version"] == D.GENERATOR_VERSION
        assert info["parameters"]["image_size"] == 128
        img_ids = [im["id"] for im in coco["images"]]
        assert len(set(img_ids)) == len(img_ids)
        for im in coco["images"]:
            with Image.open(out / split / im["file_name"]) as pil:
                assert pil.size == (im["width"], im["height"]) == (128, 128)
                assert pil.mode == "RGB"
            assert im["background"] in D.BACKGROUNDS
        ann_ids = [a["id"] for a in coco["annotations"]]
        assert len(set(ann_ids)) == len(ann_ids)
        for a in coco["annotations"]:
            assert a["image_id"] in img_ids
            assert 1 <= a["category_id"] <= 10
            assert a["iscrowd"] == 0
            assert all(isinstance(v, float) for v in a["bbox"])
            assert a["area"] == pytest.approx(a["bbox"][2] * a["bbox"][3])


def test_loads_with_pycocotools(small_ds):
    coco_mod = pytest.importorskip("pycocotools.coco")
    out, _ = small_ds
    for split in ("train", "val"):
        c = coco_mod.COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert len(c.getImgIds()) == (12 if split == "train" else 6)
        assert sorted(c.getCatIds()) == list(range(1, 11))
        assert len(c.getAnnIds()) == len(_load(out, split)["annotations"])


def test_boxes_inside_and_nondegenerate(small_ds):
    out, _ = small_ds
    for split in ("train", "val"):
        coco = _load(out, split)
        per_image = {im["id"]: 0 for im in coco["images"]}
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert w >= 1 and h >= 1
            assert x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
            assert x == int(x) and y == int(y) and w == int(w) and h == int(h)
            per_image[a["image_id"]] += 1
        assert all(2 <= n <= 8 for n in per_image.values())


def test_overlap_limits(small_ds):
    out, _ = small_ds
    for split in ("train", "val"):
        coco = _load(out, split)
        by_img: dict[int, list] = {}
        for a in coco["annotations"]:
            by_img.setdefault(a["image_id"], []).append(_xyxy(a["bbox"]))
        for boxes in by_img.values():
            for b1, b2 in itertools.combinations(boxes, 2):
                iou, cover = D._iou_cover(b1, b2[None])
                assert iou[0] <= 0.2 + 1e-9
                assert cover[0] <= 0.3 + 1e-9


# --------------------------------------------------------------------------- box accuracy


@pytest.mark.parametrize(
    "index,height,width,angle",
    [(0, 10, 7, 0.0), (5, 40, 25, 8.0), (100, 90, 120, -10.0), (1796, 14, 4, 3.0)],
)
def test_render_glyph_box_is_tight(index, height, width, angle):
    glyph = D._digits()[0][index]
    a = D.render_glyph(glyph, height, width, angle)
    assert a.dtype == np.float32 and a.ndim == 2
    # Cropped to the ink: every border row/column has ink, so the array shape is the tight box.
    assert a[0].any() and a[-1].any() and a[:, 0].any() and a[:, -1].any()
    assert D.ink_box(a) == (0, 0, a.shape[1], a.shape[0])
    nz = a[a > 0]
    assert nz.min() >= 0.1 - 1e-6 and nz.max() <= 1.0
    # Sized roughly as asked (rotation grows the box a little).
    assert 0.5 * height <= a.shape[0] <= 1.6 * height + 3
    assert 0.5 * width <= a.shape[1] <= 1.6 * width + 3


def test_ink_box():
    a = np.zeros((10, 12), np.float32)
    a[2:5, 3] = 0.5
    a[7, 9] = 1.0
    assert D.ink_box(a) == (3, 2, 10, 8)
    with pytest.raises(ValueError):
        D.ink_box(np.zeros((3, 3)))


def _render(seed: int, split: str, i: int, size: int = 128, **kw) -> dict:
    params = dict(
        image_size=size,
        min_objects=2,
        max_objects=8,
        object_size=(12 * size / 256, 160 * size / 256),
        max_iou=0.2,
        max_covered=0.3,
        max_rotation=10.0,
        aspect_jitter=1.3,
        min_contrast=0.3,
    )
    params.update(kw)
    rng = np.random.default_rng([seed, D._SPLIT_CODES[split], i])
    return D._render_image(rng, split=split, **params)


def test_files_match_renderer_and_ink_only_inside_boxes(small_ds):
    out, _ = small_ds
    for split in ("train", "val"):
        coco = _load(out, split)
        pixels = _pixels(out, split)
        for k, im in enumerate(coco["images"]):
            r = _render(0, split, k)
            np.testing.assert_array_equal(r["image"], pixels[k])
            anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
            assert [list(_xyxy(a["bbox"])) for a in anns] == [list(o["box"]) for o in r["objects"]]
            assert [a["source_index"] for a in anns] == [o["source_index"] for o in r["objects"]]
            changed = np.any(r["image"] != r["background"], axis=-1)
            inside = np.zeros_like(changed)
            for o in r["objects"]:
                x0, y0, x1, y1 = o["box"]
                assert o["alpha"].shape == (y1 - y0, x1 - x0)
                inside[y0:y1, x0:x1] = True
                # Tight: the ink reaches every edge of the box and is visible there.
                c = changed[y0:y1, x0:x1]
                assert c[0].any() and c[-1].any() and c[:, 0].any() and c[:, -1].any()
            # No ink outside the boxes.
            assert not changed[~inside].any()


def test_ink_has_min_contrast():
    rng = np.random.default_rng(1)
    for _ in range(2000):
        bg = rng.uniform(0, 1, 3).astype(np.float32)
        ink = D._ink_colour(rng, bg, 0.3)
        assert ink.min() >= 0 and ink.max() <= 1
        assert abs(float((ink - bg) @ D._LUMA)) >= 0.3 - 1e-5


# --------------------------------------------------------------------------- splits


def test_digit_split_disjoint_and_stratified():
    split = D.digit_split()
    train, val = set(split["train"].tolist()), set(split["val"].tolist())
    assert not train & val
    assert train | val == set(range(1797))
    labels = D._digits()[1]
    for c in range(10):
        n_val = int(np.sum(labels[split["val"]] == c))
        n_all = int(np.sum(labels == c))
        assert abs(n_val - 0.2 * n_all) <= 1


def test_dataset_uses_disjoint_digits(small_ds):
    out, _ = small_ds
    split = D.digit_split()
    labels = D._digits()[1]
    used = {}
    for s in ("train", "val"):
        anns = _load(out, s)["annotations"]
        used[s] = {a["source_index"] for a in anns}
        assert used[s] <= set(split[s].tolist())
        for a in anns:
            assert a["category_id"] == int(labels[a["source_index"]]) + 1
    assert not used["train"] & used["val"]


def test_background_regions_disjoint():
    for _, img, _ in D._backgrounds():
        h, w = img.shape[:2]
        masks = {}
        for s in ("train", "val"):
            y0, y1, x0, x1 = D._region((h, w), s)
            assert 0 <= y0 < y1 <= h and 0 <= x0 < x1 <= w
            assert min(y1 - y0, x1 - x0) >= D._max_crop((h, w))
            m = np.zeros((h, w), bool)
            m[y0:y1, x0:x1] = True
            masks[s] = m
        assert not (masks["train"] & masks["val"]).any()


# --------------------------------------------------------------------------- sizes


def test_default_size_distribution_covers_small_medium_large():
    counts = {"small": 0, "medium": 0, "large": 0}
    for i in range(40):
        for o in _render(3, "train", i, size=256)["objects"]:
            x0, y0, x1, y1 = o["box"]
            counts[D._area_bucket((x1 - x0) * (y1 - y0))] += 1
    total = sum(counts.values())
    assert total >= 100
    for k, n in counts.items():
        assert n >= 0.08 * total, (k, counts)


def test_custom_sizes_respected(tmp_path):
    s = make_digits_dataset(
        tmp_path / "d",
        train_images=4,
        val_images=0,
        image_size=96,
        min_objects=1,
        max_objects=3,
        object_size=(10, 20),
        max_rotation=0.0,
    )
    assert s["val"]["images"] == 0 and s["val"]["objects"] == 0
    coco = _load(tmp_path / "d", "train")
    assert coco["images"][0]["width"] == 96
    for a in coco["annotations"]:
        side = np.sqrt(a["area"])
        assert 6 <= side <= 30
    assert _load(tmp_path / "d", "val")["images"] == []


# --------------------------------------------------------------------------- determinism


def test_deterministic_for_seed(small_ds, tmp_path):
    out, _ = small_ds
    again = tmp_path / "again"
    make_digits_dataset(again, workers=1, **SMALL)  # thread count must not matter
    for split in ("train", "val"):
        a = (out / "annotations" / f"instances_{split}.json").read_bytes()
        b = (again / "annotations" / f"instances_{split}.json").read_bytes()
        assert a == b
        for p, q in zip(_pixels(out, split), _pixels(again, split), strict=True):
            np.testing.assert_array_equal(p, q)


def test_different_seed_differs(small_ds, tmp_path):
    out, _ = small_ds
    other = tmp_path / "other"
    make_digits_dataset(other, **{**SMALL, "seed": 1})
    for split in ("train", "val"):
        a, b = _load(out, split), _load(other, split)
        assert a["annotations"] != b["annotations"]
        pa, pb = _pixels(out, split), _pixels(other, split)
        assert all(not np.array_equal(p, q) for p, q in zip(pa, pb, strict=True))


# --------------------------------------------------------------------------- safety / validation


def test_overwrite_protection(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()  # an existing empty directory is fine
    kw = dict(train_images=2, val_images=1, image_size=64)
    make_digits_dataset(out, **kw)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_digits_dataset(out, **kw)
    (out / "train" / "stale.png").write_bytes(b"x")
    (out / "README.txt").write_text("keep me")
    make_digits_dataset(out, overwrite=True, **{**kw, "train_images": 1})
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000001.png"]
    assert (out / "README.txt").read_text() == "keep me"
    assert len(_load(out, "train")["images"]) == 1
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(ValueError, match="not a directory"):
        make_digits_dataset(f, **kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"train_images": 0}, "train_images"),
        ({"val_images": -1}, "val_images"),
        ({"train_images": 2.5}, "train_images must be an integer"),
        ({"image_size": 16}, "image_size"),
        ({"image_size": True}, "image_size"),
        ({"min_objects": 0}, "min_objects"),
        ({"min_objects": 5, "max_objects": 3}, "max_objects"),
        ({"object_size": (2, 10)}, "object_size"),
        ({"object_size": (50, 20)}, "object_size"),
        ({"object_size": (10, 250)}, "object_size"),
        ({"object_size": 12}, "object_size"),
        ({"max_iou": 1.5}, "max_iou"),
        ({"max_covered": -0.1}, "max_covered"),
        ({"aspect_jitter": 0.5}, "aspect_jitter"),
        ({"min_contrast": 0.9}, "min_contrast"),
        ({"seed": -1}, "seed"),
        ({"workers": 0}, "workers"),
    ],
)
def test_argument_validation(tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        make_digits_dataset(tmp_path / "x", **{"train_images": 1, "val_images": 1, **kw})
    assert not (tmp_path / "x").exists()  # nothing written on bad arguments
