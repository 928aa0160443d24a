"""Images as users have them: every PIL mode and bit depth becomes 8-bit RGB with its content,
and files that cannot be decoded are found when the dataset is built, not mid-epoch."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detrkd.config import ConfigError, load_config
from detrkd.data import CocoDetection, DatasetError
from detrkd.data.coco import to_rgb8

W, H = 48, 32
RAMP = np.tile(np.linspace(0.0, 1.0, W, dtype=np.float64), (H, 1))  # left dark, right bright


def ramp_image(mode: str) -> Image.Image:
    """A left-to-right ramp in ``mode`` using that mode's full value range."""
    if mode == "I;16":
        return Image.fromarray((RAMP * 65535).astype(np.uint16))  # mode I;16
    if mode == "I":
        return Image.fromarray((RAMP * 65535).astype(np.int32))
    if mode == "F":
        return Image.fromarray(RAMP.astype(np.float32))
    if mode == "F255":
        return Image.fromarray((RAMP * 1000).astype(np.float32))
    gray = Image.fromarray((RAMP * 255).astype(np.uint8), mode="L")
    if mode == "1":
        return gray.point(lambda v: 255 if v > 127 else 0).convert("1")
    return gray.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I", "F", "F255"])
def test_every_mode_becomes_8bit_rgb_with_its_content(mode):
    rgb = np.asarray(to_rgb8(ramp_image(mode)))
    assert rgb.dtype == np.uint8 and rgb.shape == (H, W, 3)
    luminance = rgb.astype(np.float64).mean(-1)
    assert luminance.std() > 30, f"{mode}: the image became (nearly) constant"
    assert np.corrcoef(luminance.ravel(), RAMP.ravel())[0, 1] > 0.85  # brighter where the source is


@pytest.mark.parametrize("mode,suffix", [("I;16", ".png"), ("I", ".tif"), ("F", ".tif")])
def test_high_bit_depth_files_load_through_the_dataset(tmp_path, mode, suffix):
    root = tmp_path / "images"
    root.mkdir()
    ramp_image(mode).save(root / f"a{suffix}")
    coco = {"images": [{"id": 1, "file_name": f"a{suffix}", "width": W, "height": H}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 10, 10]}],
            "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    image = np.asarray(CocoDetection(root, tmp_path / "ann.json").load_image(0))
    assert image.dtype == np.uint8 and image[:, -4:].mean() > image[:, :4].mean() + 150


def bad_set(tmp_path: Path) -> tuple[Path, Path]:
    """4 images: good, truncated PNG, not an image at all, good."""
    root = tmp_path / "images"
    root.mkdir()
    for name in ("a.png", "b.png", "c.png", "d.png"):
        ramp_image("RGB").save(root / name)
    data = (root / "b.png").read_bytes()
    (root / "b.png").write_bytes(data[: len(data) // 2])
    (root / "c.png").write_bytes(b"this is not a png")
    coco = {"images": [{"id": i + 1, "file_name": n, "width": W, "height": H} for i, n in enumerate("abcd")],
            "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [2, 2, 10, 10]} for i in range(4)],
            "categories": [{"id": 1, "name": "x"}]}
    for img in coco["images"]:
        img["file_name"] += ".png"
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    return root, tmp_path / "ann.json"


def test_undecodable_images_are_an_error_when_the_dataset_is_built(tmp_path):
    root, ann = bad_set(tmp_path)
    with pytest.raises(DatasetError, match=r"2 of 4 image files cannot be decoded .*b\.png \(image id 2\).*c\.png"):
        CocoDetection(root, ann)


def test_undecodable_images_can_be_skipped_with_a_count(tmp_path):
    root, ann = bad_set(tmp_path)
    with pytest.warns(UserWarning, match=r"2 of 4 image files cannot be decoded.*skipped \(on_bad_image='skip'\)"):
        ds = CocoDetection(root, ann, on_bad_image="skip")
    assert ds.image_ids == [1, 4] and [img["id"] for img in ds.coco_gt["images"]] == [1, 4]
    assert sorted(a["image_id"] for a in ds.coco_gt["annotations"]) == [1, 4]
    assert int(ds[1][1]["image_id"]) == 4


def test_the_data_policies_are_config_keys(tmp_path):
    base = {"model": {"family": "rt_detr", "preset": "tiny"}, "data": {"root": "x"}}
    config = load_config({**base, "data": {"root": "x", "on_bad_image": "skip", "invalid_boxes": "error"}})
    assert (config.data.on_bad_image, config.data.invalid_boxes) == ("skip", "error")
    for key, bad in (("on_bad_image", "ignore"), ("invalid_boxes", "clip")):
        with pytest.raises(ConfigError, match=f"data.{key}"):
            load_config({**base, "data": {"root": "x", key: bad}})


@pytest.mark.parametrize("split,what,expected", [("val", "no_images", "val split .* has no images"),
                                                 ("val", "no_annotations", "val split .* has no annotated objects"),
                                                 ("train", "no_annotations", "train split .* has no annotated objects")])
def test_an_empty_split_is_an_error_before_anything_is_written(tmp_path, capsys, split, what, expected):
    from detrkd.cli import main
    from detrkd.data.digits import make_digits_dataset

    root = tmp_path / "data"
    make_digits_dataset(root, train_images=4, val_images=2, image_size=64)
    ann = root / "annotations" / f"instances_{split}.json"
    coco = json.loads(ann.read_text())
    coco["annotations"] = []
    if what == "no_images":
        coco["images"] = []
    ann.write_text(json.dumps(coco))
    code = main(["train", "--family", "rt_detr", "--preset", "tiny", "--data", str(root), "--no-progress",
                 "--output-dir", str(tmp_path / "run"), "--set", "data.image_size=64"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(expected, err), err
    assert not (tmp_path / "run").exists()
