"""Drawing and writing predictions: labels readable at any image size, a header, the --out format."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from detrkd.inference import draw_detections, label_text, output_format

DETS = [{"label": 8, "score": 0.75, "box": [10.0, 20.0, 60.0, 90.0]}]


def names(label: int) -> str:
    return str(label)  # the digits data: category names are digits


def test_a_label_reads_as_name_and_score_even_when_the_name_is_a_number():
    assert label_text(8, 0.75, names) == "8 (0.75)"


@pytest.mark.parametrize("size", [(64, 64), (256, 192), (1600, 1200)])
def test_label_height_and_line_width_scale_with_the_image(size):
    image = Image.new("RGB", size, (255, 255, 255))
    scale = size[0] / 64
    dets = [{**DETS[0], "box": [v * scale for v in DETS[0]["box"]]}]
    drawn = np.asarray(draw_detections(image, dets, names))
    ink_rows = np.nonzero((drawn != 255).any(-1).any(-1))[0]
    assert len(ink_rows) > 0
    # the filled label band above the box: its height grows with the image (>= 1.5% of it, >= 10 px)
    x0, y0 = int(dets[0]["box"][0]), int(dets[0]["box"][1])
    column = (drawn[:y0, x0 + 2] != 255).any(-1)
    band = int(column.sum())
    assert band >= max(10, 0.015 * size[1]), (size, band)
    width = int((drawn[y0 + 5: y0 + 10, x0 - 1: x0 + 40] != 255).any(-1).sum(1).min())  # the box's left edge
    assert width >= max(1, round(min(size) / 250)), (size, width)


@pytest.mark.parametrize("name,expected", [("a.png", "PNG"), ("a.JPG", "JPEG"), ("b.jpeg", "JPEG"),
                                           ("c.webp", "WEBP"), ("d.json", "json")])
def test_the_out_suffix_names_the_format(tmp_path, name, expected):
    assert output_format(tmp_path / name) == expected


@pytest.mark.parametrize("name", ["a.txt", "noext", "b.pdfx"])
def test_an_unknown_out_suffix_is_refused(tmp_path, name):
    with pytest.raises(ValueError, match="--out"):
        output_format(tmp_path / name)


def test_predict_cli_header_and_json(tmp_path, capsys):
    from detrkd.cli import main
    from detrkd.models import build_detector, save_detector

    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "model")
    Image.new("RGB", (80, 60), (120, 60, 30)).save(tmp_path / "img.png")
    args = ["predict", "--checkpoint", str(tmp_path / "model"), "--image", str(tmp_path / "img.png"),
            "--threshold", "0", "--image-size", "64"]
    assert main([*args, "--out", str(tmp_path / "out.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split("\t") == ["label", "score", "x0", "y0", "x1", "y1"]
    written = json.loads((tmp_path / "out.json").read_text())
    assert written["image"] == str(tmp_path / "img.png") and len(written["detections"]) == len(out) - 2
    assert main([*args, "--out", str(tmp_path / "out.jpg")]) == 0
    with Image.open(tmp_path / "out.jpg") as im:
        assert im.format == "JPEG" and im.size == (80, 60)
    assert main([*args, "--out", str(tmp_path / "out.txt")]) == 2
    assert "--out" in capsys.readouterr().err and not (tmp_path / "out.txt").exists()
