"""``detrkd analyze gqs``: QSKD's Table 1 statistic over a split and its Fig. 1/4 drawing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from detrkd.analysis import (attention_to_image, draw_query_selection, find_image_index, gqs_statistics,
                             image_agfd_mask)
from detrkd.cli import main
from detrkd.data.coco import CocoDetection
from detrkd.data.collate import collate
from detrkd.data.digits import make_digits_dataset
from detrkd.distill.query_selection import TABLE1_THRESHOLDS, group_query_selection
from detrkd.recipe import transforms_for
from detrkd.models.processors import imagenet_pixels
from detrkd.models import build_detector, save_detector

IMAGE_SIZE = 128


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis") / "digits"
    make_digits_dataset(out, train_images=4, val_images=4, image_size=IMAGE_SIZE, workers=1)
    return out


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_detector("rt_detr", "tiny", 10).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("analysis_model") / "tiny"
    save_detector(model, out)
    return out


@pytest.fixture(scope="module")
def dataset(root) -> CocoDetection:
    from detrkd.config import DataConfig

    data = DataConfig(root=str(root), image_size=IMAGE_SIZE)
    images, ann = data.split_paths("val")
    return CocoDetection(images, ann, transforms_for(imagenet_pixels("rt_detr", IMAGE_SIZE), "val", data))


def loader(dataset: CocoDetection, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)


def run_main(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def val_gt_count(root: Path) -> int:
    anns = json.loads((root / "annotations" / "instances_val.json").read_text())["annotations"]
    return sum(1 for a in anns if not a.get("iscrowd", 0))


# ---- Table 1 -----------------------------------------------------------------------------
def test_statistic_is_monotone_in_the_threshold(model, dataset):
    stats = gqs_statistics(model, loader(dataset, 2), threshold=0.0)
    values = [stats["queries_per_gt"][t] for t in TABLE1_THRESHOLDS]  # 0.75 ... -inf: decreasing t
    assert all(a <= b for a, b in zip(values, values[1:])), values
    assert stats["thresholds"] == TABLE1_THRESHOLDS


def test_minus_inf_column_is_every_query(model, dataset, root):
    """Every image of the digits set has GT, so every query is in some GT's group."""
    stats = gqs_statistics(model, loader(dataset, 3), threshold=0.0)
    num_gt = val_gt_count(root)
    assert stats["images"] == stats["images_with_gt"] == 4
    assert stats["num_gt"] == num_gt
    q = model.num_queries
    assert stats["counts"][-math.inf] == q * 4
    assert stats["queries_per_gt"][-math.inf] == pytest.approx(q * 4 / num_gt)
    assert stats["positives_per_gt"] == pytest.approx(1.0)  # Q >= objects: every GT is matched
    assert stats["selected_per_gt"] == pytest.approx(1.0 + stats["hard_negatives_per_gt"])


def test_sums_over_the_split_not_batch_means(model, dataset):
    """Batches of 1 (different GT counts per batch) give the same totals as one batch of 4."""
    one = gqs_statistics(model, loader(dataset, 1), threshold=0.0)
    four = gqs_statistics(model, loader(dataset, 4), threshold=0.0)
    assert one["counts"] == four["counts"]
    assert one["queries_per_gt"] == pytest.approx(four["queries_per_gt"])


def test_max_images_cuts_the_split(model, dataset):
    stats = gqs_statistics(model, loader(dataset, 2), threshold=0.0, max_images=3)
    assert stats["images"] == 3
    assert stats["counts"][-math.inf] == 3 * model.num_queries


def test_cli_prints_the_table_and_writes_json(capsys, checkpoint, root, tmp_path):
    out_json = tmp_path / "stats.json"
    code, out, _ = run_main(capsys, "analyze", "gqs", "--checkpoint", checkpoint, "--data", root,
                            "--image-size", IMAGE_SIZE, "--batch-size", 3, "--out", out_json)
    assert code == 0
    assert "GIoU >=" in out and "queries/GT" in out and "-inf" in out
    record = json.loads(out_json.read_text())
    assert record["checkpoint"] == str(checkpoint) and record["data"] == str(root)
    assert record["images"] == 4 and record["num_gt"] == val_gt_count(root)
    assert record["thresholds"] == ["0.75", "0.5", "0.3", "0.1", "0.0", "-inf"]
    assert record["values"]["-inf"] == pytest.approx(30 * 4 / record["num_gt"])
    assert f"{record['values']['-inf']:.2f}" in out


# ---- Fig. 1 / 4 --------------------------------------------------------------------------
def test_cli_draws_the_figure(capsys, checkpoint, root, dataset, tmp_path):
    png = tmp_path / "fig" / "gqs.png"
    image_id = dataset.image_ids[1]
    code, out, err = run_main(capsys, "analyze", "gqs", "--checkpoint", checkpoint, "--data", root,
                              "--image-size", IMAGE_SIZE, "--image-id", image_id, "--figure", png)
    assert code == 0, err
    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.width >= 600 and im.height >= 400
    assert "positive" in out and f"image {image_id}" in out


def test_figure_by_image_path_and_gt_index(capsys, checkpoint, root, dataset, tmp_path):
    file_name = dataset.coco_gt["images"][2]["file_name"]
    png = tmp_path / "by_path.png"
    code, out, err = run_main(capsys, "analyze", "gqs", "--checkpoint", checkpoint, "--data", root,
                              "--image-size", IMAGE_SIZE, "--image", dataset.images_dir / file_name,
                              "--gt-index", 0, "--figure", png)
    assert code == 0, err
    assert png.is_file() and "GT 0:" in out
    assert find_image_index(dataset, image=file_name) == 2


def test_draw_query_selection_summary(model, dataset, tmp_path):
    image, target = dataset[0]
    summary = draw_query_selection(model, image[None], target, dataset.load_image(0), None, tmp_path / "f.png")
    areas = target["boxes"][:, 2] * target["boxes"][:, 3]
    assert summary["gt_index"] == int(areas.argmax())  # default: the largest GT
    kinds = [q["kind"] for q in summary["queries"]]
    assert kinds[0] == "positive" and kinds.count("positive") == 1
    assert kinds.count("hard negative") <= 3 and 1 <= kinds.count("easy negative") <= 2
    hard = [q["giou"] for q in summary["queries"] if q["kind"] == "hard negative"]
    assert all(g > 0.0 for g in hard) and hard == sorted(hard, reverse=True)
    assert (tmp_path / "f.png").stat().st_size > 10_000


@pytest.mark.parametrize("flags, fragment", [
    (["--image-id", 999, "--figure", "x.png"], "image id 999 is not in"),
    (["--image", "nope.png", "--figure", "x.png"], "image nope.png is not in"),
    (["--image-id", "IMAGE", "--gt-index", 99, "--figure", "x.png"], "gt index 99 is out of range"),
    (["--image-id", "IMAGE"], "--figure"),
    (["--figure", "x.png"], "--image-id"),
])
def test_clear_errors(capsys, checkpoint, root, dataset, tmp_path, flags, fragment):
    flags = [dataset.image_ids[0] if f == "IMAGE" else tmp_path / f if f == "x.png" else f for f in flags]
    code, _, err = run_main(capsys, "analyze", "gqs", "--checkpoint", checkpoint, "--data", root,
                            "--image-size", IMAGE_SIZE, *flags)
    last = [ln for ln in err.splitlines() if ln.strip()][-1]
    assert code == 2 and last.startswith("detrkd: error: ") and fragment in last, err
    assert not (tmp_path / "x.png").exists()


# ---- building blocks ---------------------------------------------------------------------
def test_attention_to_image_sums_levels_and_crops_padding():
    shapes = torch.tensor([[4, 4], [2, 2]])
    starts = torch.tensor([0, 16])
    attn = torch.zeros(20)
    attn[16] = 1.0  # all mass on the coarse level's top-left token
    full = attention_to_image(attn, shapes, starts, (64, 64), (64, 64), (4, 4))
    assert full.sum() == pytest.approx(1.0, abs=0.05)  # mass kept: 1 coarse token = 4 fine cells
    assert full[:2, :2].sum() > full[2:, 2:].sum()
    attn = torch.zeros(20)
    attn[15] = 1.0  # fine level, bottom-right token: inside the padding of a 32 x 32 image
    cropped = attention_to_image(attn, shapes, starts, (64, 64), (32, 32), (8, 8))
    assert cropped.max() < 1e-6


def test_mask_panel_is_eq4_over_the_selected_queries(model, dataset):
    """W = 1/|I~| sum (1 + G_i) A_i, checked against a direct sum over the selected rows."""
    image, target = dataset[0]
    with torch.no_grad():
        out = model(image[None], torch.ones(1, *image.shape[-2:], dtype=torch.long), with_attention=True)
    gt = [{"class_labels": target["class_labels"], "boxes": target["boxes"]}]
    sel = group_query_selection(out.predictions.logits[-1], out.predictions.boxes[-1], gt, out.class_head)
    rows = sel.selected[0].nonzero()[:, 0]
    expected = sum((1 + sel.giou[0, i]) * out.cross_attention[0, i] for i in rows) / len(rows)
    assert torch.allclose(image_agfd_mask(out, sel)[0], expected, atol=1e-6)
