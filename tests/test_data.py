"""COCO dataset validation, targets, transforms and collate (tiny synthetic files in tmp_path)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from detrkd.box_ops import cxcywh_to_xyxy
from detrkd.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CocoDetection,
    Compose,
    DatasetError,
    RandomHorizontalFlip,
    RandomResize,
    Resize,
    ToTensorNormalize,
    collate,
    make_transforms,
    resized_hw,
)
from detrkd.data.transforms import hflip

# ---- fixtures --------------------------------------------------------------------------------


def base_coco() -> dict[str, Any]:
    """3 images (40x30 w x h, 50x40, 32x32), categories 3/7/42, image 3 without objects."""
    return {
        "images": [
            {"id": 1, "file_name": "a.png", "width": 40, "height": 30},
            {"id": 2, "file_name": "sub/b.png", "width": 50, "height": 40},
            {"id": 3, "file_name": "c.png", "width": 32, "height": 32},
        ],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 42, "bbox": [4, 3, 10, 6], "area": 60, "iscrowd": 0},
            {"id": 11, "image_id": 1, "category_id": 3, "bbox": [20, 10, 8, 12]},
            {"id": 12, "image_id": 2, "category_id": 7, "bbox": [0, 0, 50, 40], "iscrowd": 0},
        ],
        "categories": [{"id": 42, "name": "forty-two"}, {"id": 3, "name": "three"}, {"id": 7, "name": "seven"}],
    }


def write_images(root: Path, coco: dict[str, Any], mode: str = "RGB", skip: tuple[str, ...] = ()) -> None:
    for img in coco["images"]:
        if img["file_name"] in skip:
            continue
        path = root / img["file_name"]
        path.parent.mkdir(parents=True, exist_ok=True)
        w, h = img.get("width", 20), img.get("height", 20)
        color = {"RGB": (200, 100, 50), "L": 128, "RGBA": (200, 100, 50, 128)}[mode]
        Image.new(mode, (w, h), color).save(path)


def write_coco(tmp_path: Path, coco: dict[str, Any] | None = None, images: bool = True, **kw: Any) -> tuple[Path, Path]:
    coco = base_coco() if coco is None else coco
    root, ann = tmp_path / "images", tmp_path / "ann.json"
    root.mkdir(exist_ok=True)
    if images:
        write_images(root, coco, **kw)
    ann.write_text(json.dumps(coco, indent=1))
    return root, ann


@pytest.fixture
def coco_files(tmp_path: Path) -> tuple[Path, Path]:
    return write_coco(tmp_path)


# ---- file-level errors ---------------------------------------------------------------------------


def test_missing_annotation_file(tmp_path):
    root, _ = write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDetection(root, tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="annotation file"):
        CocoDetection(root, root)  # a directory is not a readable file


def test_missing_images_dir(tmp_path):
    _, ann = write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="images directory not found"):
        CocoDetection(tmp_path / "missing_dir", ann)


def test_malformed_json_reports_line_and_column(tmp_path):
    root, ann = write_coco(tmp_path)
    ann.write_text('{\n  "images": [],\n  "annotations": [,]\n}')
    with pytest.raises(DatasetError, match=r"ann\.json.*line 3, column 19"):
        CocoDetection(root, ann)


def test_non_utf8_and_non_object(tmp_path):
    root, ann = write_coco(tmp_path)
    ann.write_bytes(b'{"images": "\xff\xfe"}')
    with pytest.raises(DatasetError, match="not UTF-8"):
        CocoDetection(root, ann)
    ann.write_text("[1, 2]")
    with pytest.raises(DatasetError, match="top level must be a JSON object"):
        CocoDetection(root, ann)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    coco = base_coco()
    root, ann = write_coco(tmp_path, coco)
    del coco[key]
    ann.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=f"missing top-level key '{key}'"):
        CocoDetection(root, ann)


@pytest.mark.parametrize(
    "section,index,key,where",
    [
        ("images", 1, "file_name", r"images\[1\] \(id=2\)"),
        ("images", 0, "id", r"images\[0\] \(id='<missing>'\)"),
        ("annotations", 2, "bbox", r"annotations\[2\] \(id=12\)"),
        ("annotations", 0, "category_id", r"annotations\[0\] \(id=10\)"),
        ("annotations", 1, "image_id", r"annotations\[1\] \(id=11\)"),
        ("annotations", 1, "id", r"annotations\[1\] \(id='<missing>'\)"),
        ("categories", 2, "id", r"categories\[2\] \(id='<missing>'\)"),
    ],
)
def test_missing_entry_key_names_key_index_and_id(tmp_path, section, index, key, where):
    coco = base_coco()
    root, ann = write_coco(tmp_path, coco)
    del coco[section][index][key]
    ann.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=f"{where} is missing key '{key}'"):
        CocoDetection(root, ann)


def test_unknown_image_and_category_ids(tmp_path):
    coco = base_coco()
    coco["annotations"][1]["image_id"] = 99
    root, ann = write_coco(tmp_path, coco)
    with pytest.raises(DatasetError, match=r"image_id not in 'images'.*annotations\[1\] \(id=11\) -> image_id 99"):
        CocoDetection(root, ann)
    coco = base_coco()
    coco["annotations"][2]["category_id"] = 5
    ann.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"category_id not in 'categories'.*\(id=12\) -> category_id 5"):
        CocoDetection(root, ann)


def test_duplicate_ids(tmp_path):
    coco = base_coco()
    coco["images"][2]["id"] = 1
    root, ann = write_coco(tmp_path, coco)
    with pytest.raises(DatasetError, match=r"duplicate images id 1 \(images\[0\] and images\[2\]\)"):
        CocoDetection(root, ann)
    coco = base_coco()
    coco["categories"][1]["id"] = 42
    ann.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="duplicate categories id 42"):
        CocoDetection(root, ann)


@pytest.mark.parametrize(
    "bbox,msg",
    [
        ([1, 2, 3], "invalid 'bbox'"),
        ([1, 2, "3", 4], "invalid 'bbox'"),
        ([1, 2, None, 4], "invalid 'bbox'"),
        ("1 2 3 4", "invalid 'bbox'"),
        ([1, 2, True, 4], "invalid 'bbox'"),
        ([1, 2, float("nan"), 4], "non-finite 'bbox'"),
        ([1, 2, float("inf"), 4], "non-finite 'bbox'"),
    ],
)
def test_bad_bbox(tmp_path, bbox, msg):
    coco = base_coco()
    coco["annotations"][1]["bbox"] = bbox
    root, ann = write_coco(tmp_path, coco)  # json.dumps writes NaN / Infinity, json.loads reads them
    with pytest.raises(DatasetError, match=rf"annotations\[1\] \(id=11\) has an? {msg}"):
        CocoDetection(root, ann)


def test_bad_iscrowd_and_non_int_ids(tmp_path):
    coco = base_coco()
    coco["annotations"][0]["iscrowd"] = 2
    root, ann = write_coco(tmp_path, coco)
    with pytest.raises(DatasetError, match=r"\(id=10\) has 'iscrowd' 2"):
        CocoDetection(root, ann)
    coco = base_coco()
    coco["annotations"][0]["image_id"] = "1"
    ann.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"\(id=10\) has a non-integer 'image_id'"):
        CocoDetection(root, ann)


def test_missing_image_files_counted_at_construction(tmp_path):
    root, ann = write_coco(tmp_path, skip=("a.png", "c.png"))
    with pytest.raises(FileNotFoundError) as err:
        CocoDetection(root, ann)
    msg = str(err.value)
    assert "2 of 3 image files are missing" in msg
    assert str(root / "a.png") in msg and str(root / "c.png") in msg


def test_size_mismatch_reported_when_loading_item(tmp_path):
    root, ann = write_coco(tmp_path)
    Image.new("RGB", (41, 30)).save(root / "a.png")  # JSON says 40x30
    ds = CocoDetection(root, ann)  # construction does not open images
    ds[1]  # other items still load
    with pytest.raises(DatasetError, match=r"a\.png \(image id 1\) is 41x30 .* says 40x30"):
        ds[0]


def test_corrupt_image_reported_when_the_dataset_is_built(tmp_path):
    root, ann = write_coco(tmp_path)
    (root / "c.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"1 of 3 image files cannot be decoded .*c\.png \(image id 3\)"):
        CocoDetection(root, ann)


def test_an_image_that_breaks_after_construction_is_still_named_when_loaded(tmp_path):
    root, ann = write_coco(tmp_path)
    ds = CocoDetection(root, ann)
    (root / "c.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*c\.png \(image id 3\)"):
        ds[2]


def test_missing_width_height_read_from_file(tmp_path):
    coco = base_coco()
    root, ann = write_coco(tmp_path, coco)
    del coco["images"][1]["width"], coco["images"][1]["height"]
    ann.write_text(json.dumps(coco))
    ds = CocoDetection(root, ann)
    assert ds.coco_gt["images"][1]["width"] == 50 and ds.coco_gt["images"][1]["height"] == 40
    assert ds[1][1]["orig_size"].tolist() == [40, 50]


# ---- box policy ------------------------------------------------------------------------------------


def coco_with_bad_boxes() -> dict[str, Any]:
    coco = base_coco()
    coco["annotations"] += [
        {"id": 20, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4]},  # zero width
        {"id": 21, "image_id": 1, "category_id": 3, "bbox": [5, 5, 3, -2]},  # negative height
        {"id": 22, "image_id": 1, "category_id": 3, "bbox": [45, 5, 4, 4]},  # entirely right of the image
        {"id": 23, "image_id": 2, "category_id": 7, "bbox": [-5, 30, 20, 20]},  # partly outside: clipped
    ]
    return coco


def test_invalid_boxes_drop_warns_once_and_clips(tmp_path):
    root, ann = write_coco(tmp_path, coco_with_bad_boxes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = CocoDetection(root, ann, invalid_boxes="drop")
    msgs = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(msgs) == 1
    assert "3 of 7 annotations" in msgs[0] and all(f"id={i}" in msgs[0] for i in (20, 21, 22))
    assert sorted(a["id"] for a in ds.coco_gt["annotations"]) == [10, 11, 12, 23]
    assert len(ds.raw_target(0)["boxes"]) == 2
    clipped = next(a for a in ds.coco_gt["annotations"] if a["id"] == 23)
    assert clipped["bbox"] == [0.0, 30.0, 15.0, 10.0] and clipped["area"] == 150.0
    assert ds.raw_target(1)["boxes"][1].tolist() == [0.0, 30.0, 15.0, 40.0]


def test_invalid_boxes_error(tmp_path):
    root, ann = write_coco(tmp_path, coco_with_bad_boxes())
    with pytest.raises(DatasetError, match=r"3 of 7 annotations.*id=20.*id=21.*id=22.*invalid_boxes='error'"):
        CocoDetection(root, ann, invalid_boxes="error")
    with pytest.raises(ValueError, match="invalid_boxes"):
        CocoDetection(root, ann, invalid_boxes="ignore")


def test_valid_dataset_emits_no_warning(coco_files):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CocoDetection(*coco_files, invalid_boxes="error")


# ---- empty images, crowd, categories -------------------------------------------------------------------


def test_empty_images_kept_or_skipped(coco_files):
    ds = CocoDetection(*coco_files)
    assert len(ds) == 3 and ds.image_ids == [1, 2, 3]
    image, target = ds[2]
    assert target["boxes"].shape == (0, 4) and target["class_labels"].shape == (0,)
    assert target["class_labels"].dtype == torch.long and target["boxes"].dtype == torch.float32
    skipped = CocoDetection(*coco_files, skip_empty=True)
    assert skipped.image_ids == [1, 2]
    assert len(skipped.coco_gt["images"]) == 3  # GT for evaluation is unchanged


def test_crowd_excluded_from_targets_kept_in_gt(tmp_path):
    coco = base_coco()
    coco["annotations"][1]["iscrowd"] = 1  # image 1: one normal + one crowd
    coco["annotations"].append({"id": 30, "image_id": 3, "category_id": 3, "bbox": [1, 1, 5, 5], "iscrowd": 1})
    root, ann = write_coco(tmp_path, coco)
    ds = CocoDetection(root, ann)
    assert ds.raw_target(0)["class_labels"].tolist() == [2]  # only cat 42
    assert len(ds.raw_target(2)["boxes"]) == 0
    crowd = {a["id"]: a["iscrowd"] for a in ds.coco_gt["annotations"]}
    assert crowd == {10: 0, 11: 1, 12: 0, 30: 1}
    assert CocoDetection(root, ann, skip_empty=True).image_ids == [1, 2]  # crowd-only image is empty


def test_category_remap_round_trip(coco_files):
    ds = CocoDetection(*coco_files)
    assert ds.cat_ids == [3, 7, 42] and ds.num_classes == 3
    assert ds.class_names == ["three", "seven", "forty-two"]
    assert ds.cat_id_to_label == {3: 0, 7: 1, 42: 2}
    assert ds.raw_target(0)["class_labels"].tolist() == [2, 0]
    assert ds.raw_target(1)["class_labels"].tolist() == [1]
    assert ds.label_to_cat_id(2) == 42
    assert ds.label_to_cat_id([0, 1, 2, 0]) == [3, 7, 42, 3]
    assert ds.label_to_cat_id(torch.tensor([2, 1])).tolist() == [42, 7]
    anns = {a["id"]: a["category_id"] for a in ds.coco_gt["annotations"]}
    labels = torch.cat([ds.raw_target(i)["class_labels"] for i in range(len(ds))])
    assert ds.label_to_cat_id(labels).tolist() == [anns[10], anns[11], anns[12]]


def test_category_without_name_uses_id(tmp_path):
    coco = base_coco()
    del coco["categories"][2]["name"]
    root, ann = write_coco(tmp_path, coco)
    assert CocoDetection(root, ann).class_names == ["three", "7", "forty-two"]


# ---- items ---------------------------------------------------------------------------------------------


def test_item_contract(coco_files):
    ds = CocoDetection(*coco_files)
    image, target = ds[0]
    assert image.shape == (3, 30, 40) and image.dtype == torch.float32
    expected = (torch.tensor([200, 100, 50]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert torch.allclose(image[:, 5, 5], expected, atol=1e-6)
    assert set(target) == {"class_labels", "boxes", "image_id", "orig_size", "size"}
    assert target["image_id"] == 1 and isinstance(target["image_id"], int)
    assert target["orig_size"].tolist() == [30, 40] and target["size"].tolist() == [30, 40]
    assert target["orig_size"].dtype == torch.long
    # bbox [4, 3, 10, 6] -> cxcywh (9/40, 6/30, 10/40, 6/30)
    assert torch.allclose(target["boxes"][0], torch.tensor([9 / 40, 6 / 30, 10 / 40, 6 / 30]))


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_greyscale_and_rgba_images(tmp_path, mode):
    root, ann = write_coco(tmp_path, mode=mode)
    image, _ = CocoDetection(root, ann)[0]
    assert image.shape == (3, 30, 40)
    if mode == "L":
        assert torch.allclose(image[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0], image[1] * IMAGENET_STD[1] + IMAGENET_MEAN[1])


def test_transforms_must_end_with_to_tensor(coco_files):
    ds = CocoDetection(*coco_files, transforms=Compose([Resize(16)]))
    with pytest.raises(TypeError, match="ToTensorNormalize"):
        ds[0]


def test_dataset_with_transforms_and_loader(coco_files):
    ds = CocoDetection(*coco_files, transforms=make_transforms("train", 24))
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate)
    batches = list(loader)
    assert [len(b["labels"]) for b in batches] == [2, 1]
    for b in batches:
        assert b["pixel_values"].shape[-1] % 32 == 0 and b["pixel_values"].shape[-2] % 32 == 0
        for t in b["labels"]:
            assert t["boxes"].numel() == 0 or (t["boxes"].min() >= 0 and t["boxes"].max() <= 1)


def test_hf_losses_accept_empty_targets():
    """Images without objects are valid negatives: the HF (Deformable) DETR loss takes them."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection, ResNetConfig

    torch.manual_seed(0)
    backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 16], depths=[1, 1, 1, 1],
                            out_features=["stage2", "stage3", "stage4"])
    config = DeformableDetrConfig(
        backbone_config=backbone, use_timm_backbone=False, use_pretrained_backbone=False, d_model=32,
        encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=16, decoder_ffn_dim=16, num_queries=5, num_labels=3, num_feature_levels=3,
    )
    model = DeformableDetrForObjectDetection(config)
    empty = {"class_labels": torch.zeros(0, dtype=torch.long), "boxes": torch.zeros(0, 4), "image_id": 3,
             "orig_size": torch.tensor([32, 32]), "size": torch.tensor([32, 32])}
    one = {"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]]), "image_id": 1,
           "orig_size": torch.tensor([32, 32]), "size": torch.tensor([32, 32])}
    x, mask = torch.randn(2, 3, 32, 32), torch.ones(2, 32, 32, dtype=torch.long)
    for labels in ([empty, one], [empty, empty]):
        model.zero_grad()
        out = model(pixel_values=x[: len(labels)], pixel_mask=mask, labels=labels)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)


# ---- transforms -------------------------------------------------------------------------------------------


def _target(boxes: list[list[float]], h: int, w: int) -> dict[str, Any]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "class_labels": torch.zeros(len(boxes), dtype=torch.long), "size": torch.tensor([h, w])}


def test_flip_moves_boxes_and_twice_is_identity():
    image = Image.new("RGB", (40, 30))
    image.putpixel((2, 3), (255, 0, 0))
    target = _target([[4, 3, 14, 9], [0, 0, 40, 30]], 30, 40)
    flipped, t1 = hflip(image, target)
    assert flipped.getpixel((37, 3)) == (255, 0, 0)
    assert t1["boxes"][0].tolist() == [26, 3, 36, 9] and t1["boxes"][1].tolist() == [0, 0, 40, 30]
    back, t2 = hflip(flipped, t1)
    assert list(back.getdata()) == list(image.getdata())
    assert torch.allclose(t2["boxes"], target["boxes"])
    tensor = torch.rand(3, 30, 40)
    tt, _ = hflip(*hflip(tensor, target))
    assert torch.equal(tt, tensor)
    assert torch.equal(target["boxes"], _target([[4, 3, 14, 9], [0, 0, 40, 30]], 30, 40)["boxes"])  # not mutated


def test_random_flip_probability_and_seed():
    target = _target([[4, 3, 14, 9]], 30, 40)
    image = Image.new("RGB", (40, 30))
    assert RandomHorizontalFlip(0.0)(image, target)[1]["boxes"][0, 0] == 4
    assert RandomHorizontalFlip(1.0)(image, target)[1]["boxes"][0, 0] == 26
    flip = RandomHorizontalFlip(0.5)
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([flip(image, target)[1]["boxes"][0, 0].item() for _ in range(20)])
    assert runs[0] == runs[1] and set(runs[0]) == {4.0, 26.0}


def test_resize_scales_boxes_and_size():
    assert resized_hw(30, 40, 15) == (15, 20)
    assert resized_hw(40, 30, 15) == (20, 15)
    assert resized_hw(100, 20, 10, max_size=30) == (30, 6)  # long side capped
    image = Image.new("RGB", (40, 30))
    target = _target([[4, 3, 14, 9]], 30, 40)
    out, t = Resize(15)(image, target)
    assert out.size == (20, 15) and t["size"].tolist() == [15, 20]
    assert torch.allclose(t["boxes"], torch.tensor([[2.0, 1.5, 7.0, 4.5]]))
    tout, tt = Resize(15)(torch.rand(3, 30, 40), target)
    assert tout.shape == (3, 15, 20) and torch.allclose(tt["boxes"], t["boxes"])
    uint8, _ = Resize(15)(torch.full((3, 30, 40), 7, dtype=torch.uint8), target)
    assert uint8.dtype == torch.uint8 and (uint8 == 7).all()


def test_random_resize_seeded():
    rr = RandomResize([10, 20, 30], max_size=100)
    image, target = Image.new("RGB", (40, 30)), _target([[4, 3, 14, 9]], 30, 40)
    draws = []
    for _ in range(2):
        torch.manual_seed(7)
        draws.append([rr(image, target)[0].size[1] for _ in range(15)])
    assert draws[0] == draws[1] and set(draws[0]) == {10, 20, 30}


def test_to_tensor_normalize_boxes_cxcywh():
    image = Image.new("RGB", (40, 30), (255, 255, 255))
    tensor, t = ToTensorNormalize(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(image, _target([[4, 3, 14, 9], [0, 0, 40, 30]], 30, 40))
    assert torch.allclose(tensor, torch.ones(3, 30, 40))
    assert torch.allclose(t["boxes"], torch.tensor([[9 / 40, 0.2, 0.25, 0.2], [0.5, 0.5, 1.0, 1.0]]))
    empty = ToTensorNormalize()(image, _target([], 30, 40))[1]["boxes"]
    assert empty.shape == (0, 4)


@pytest.mark.parametrize("split", ["train", "val"])
def test_make_transforms_pipelines(split):
    torch.manual_seed(0)
    pipeline = make_transforms(split, 64)
    boxes = [[4, 3, 14, 9], [30, 0, 40, 30], [0, 10, 5, 30]]
    for _ in range(5):
        image, t = pipeline(Image.new("RGB", (40, 30)), _target(boxes, 30, 40))
        h, w = image.shape[1:]
        assert t["size"].tolist() == [h, w]
        if split == "val":
            assert (h, w) == (64, 85)
        else:
            assert 48 <= min(h, w) <= 80
        assert t["boxes"].min() >= 0 and t["boxes"].max() <= 1
        xyxy = cxcywh_to_xyxy(t["boxes"]) * torch.tensor([w, h, w, h])
        widths = xyxy[:, 2] - xyxy[:, 0]
        assert torch.allclose(widths, torch.tensor([10.0, 10.0, 5.0]) * w / 40, atol=1e-3)
    with pytest.raises(ValueError, match="split"):
        make_transforms("test", 64)


# ---- collate -------------------------------------------------------------------------------------------------


def test_collate_pads_and_masks():
    a, b = torch.ones(3, 30, 40), torch.full((3, 50, 20), 2.0)
    ta, tb = {"boxes": torch.zeros(0, 4), "image_id": 1}, {"boxes": torch.ones(1, 4), "image_id": 2}
    batch = collate([(a, ta), (b, tb)])
    assert batch["pixel_values"].shape == (2, 3, 64, 64) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_mask"].shape == (2, 64, 64) and batch["pixel_mask"].dtype == torch.long
    assert batch["pixel_mask"][0].sum() == 30 * 40 and batch["pixel_mask"][1].sum() == 50 * 20
    assert batch["pixel_mask"][0, :30, :40].all() and not batch["pixel_mask"][0, 30:].any()
    assert torch.equal(batch["pixel_values"][0, :, :30, :40], a) and batch["pixel_values"][0, :, 30:].abs().sum() == 0
    assert batch["pixel_values"][1, :, :, 20:].abs().sum() == 0
    assert batch["labels"] == [ta, tb]
    exact = collate([(a, ta), (b, tb)], pad_to_multiple=None)
    assert exact["pixel_values"].shape == (2, 3, 50, 40)
    with pytest.raises(ValueError, match="empty batch"):
        collate([])


# ---- square inputs for mask-blind families, flips off for digits ----------------------------
def _item_target(boxes: list[list[float]]) -> dict[str, Any]:
    return {"boxes": torch.tensor(boxes), "class_labels": torch.zeros(len(boxes), dtype=torch.long),
            "image_id": 1, "orig_size": torch.tensor([60, 90]), "size": torch.tensor([60, 90])}


def test_square_transforms_give_equal_unpadded_sizes():
    from detrkd.data.transforms import make_transforms

    transforms = make_transforms("train", 64, hflip=False, square=True)
    a = transforms(Image.new("RGB", (90, 60)), _item_target([[9.0, 6.0, 45.0, 30.0]]))
    b = transforms(Image.new("RGB", (40, 120)), _item_target([[0.0, 0.0, 40.0, 120.0]]))
    assert a[0].shape == b[0].shape == (3, 64, 64)
    batch = collate([a, b], pad_to_multiple=32)
    assert bool(batch["pixel_mask"].all())  # nothing padded that the model could not see
    # a box keeps its place relative to the image: (9/90, 6/60) .. (45/90, 30/60)
    torch.testing.assert_close(cxcywh_to_xyxy(a[1]["boxes"]), torch.tensor([[0.1, 0.1, 0.5, 0.5]]))


def test_hflip_off_never_mirrors():
    from detrkd.data.transforms import RandomHorizontalFlip, make_transforms

    for square in (False, True):
        names = [type(t).__name__ for t in make_transforms("train", 64, hflip=False, square=square).transforms]
        assert RandomHorizontalFlip.__name__ not in names
    names = [type(t).__name__ for t in make_transforms("train", 64, hflip=True).transforms]
    assert RandomHorizontalFlip.__name__ in names


def test_engine_picks_square_inputs_for_mask_blind_families():
    from detrkd.config import DataConfig
    from detrkd.recipe import transforms_for
    from detrkd.models.processors import family_pixels, imagenet_pixels

    data = DataConfig(root=".", image_size=64, hflip=False)
    for pixels in (family_pixels, imagenet_pixels):
        assert "SquareResize" in repr(transforms_for(pixels("rt_detr", 64), "val", data).transforms)
        assert "SquareResize" not in repr(transforms_for(pixels("deformable_detr", 64), "val", data).transforms)
