"""torchvision CNN students (Faster R-CNN, RetinaNet): detrkd's batch reaches the torchvision model
unchanged, targets and labels convert, torchvision's own losses and detections come back, the
ResNet-50 preset is torchvision's own model, checkpoints rebuild it, config errors are one line,
and `detrkd train / eval / predict / export` run it end to end with an exact resume."""

from __future__ import annotations

import json
import os

import pytest
import torch

from detrkd.checkpoint import load_checkpoint, load_model_entries, model_entries
from detrkd.cli import main
from detrkd.config import ConfigError, ModelConfig
from detrkd.recipe import check_model_config
from detrkd.models import detector_from_state
from detrkd.models.cnn import build_cnn_detector, cnn_options
from detrkd.models.cnn.base import PrebatchedTransform, image_sizes, torchvision_target
from detrkd.models.processors import family_pixels

FAMILIES = ("faster_rcnn", "retinanet")


def _batch() -> dict:
    """Two images, the second 64 x 48 inside a 64 x 64 padded batch (zeros right of column 48)."""
    torch.manual_seed(0)
    pixels = torch.randn(2, 3, 64, 64)
    mask = torch.ones(2, 64, 64, dtype=torch.long)
    pixels[1, :, :, 48:], mask[1, :, 48:] = 0.0, 0
    labels = [{"class_labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
              {"class_labels": torch.tensor([2, 0, 3]),
               "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.5, 0.5, 0.0, 0.2], [0.7, 0.6, 0.2, 0.3]])}]
    return {"pixel_values": pixels, "pixel_mask": mask, "labels": labels}


@pytest.fixture(scope="module", params=FAMILIES)
def student(request):
    torch.manual_seed(0)
    return build_cnn_detector(request.param, "tiny", 5, [f"c{i}" for i in range(5)])


def test_the_batch_reaches_torchvision_as_detrkd_made_it():
    """PrebatchedTransform: no renormalisation, no resize; torchvision's padding equals detrkd's."""
    batch = _batch()
    sizes = image_sizes(batch["pixel_values"], batch["pixel_mask"])
    assert sizes == [(64, 64), (64, 48)]
    crops = [batch["pixel_values"][i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
    images, _ = PrebatchedTransform().eval()(crops)
    assert torch.equal(images.tensors, batch["pixel_values"]) and images.image_sizes == sizes


def test_targets_are_pixel_boxes_with_area_and_the_model_labels():
    label = _batch()["labels"][1]
    target = torchvision_target(label, (64, 48), offset=1)
    assert target["labels"].tolist() == [3, 4] and target["labels"].dtype == torch.int64  # zero-width box dropped
    torch.testing.assert_close(target["boxes"][0], torch.tensor([9.6, 12.8, 19.2, 25.6]))


def test_training_returns_torchvision_losses_and_internals(student):
    batch = _batch()
    student.train()
    out = student(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"])
    keys = {"faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
            "retinanet": {"classification", "bbox_regression"}}[student.family]
    assert set(out.loss_dict) == keys and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, sum(out.loss_dict.values()))
    assert out.image_sizes == [(64, 64), (64, 48)] and out.padded_size == (64, 64)
    assert all(f.shape[1] == student.hidden_size for f in out.features.values())
    assert out.targets[1]["labels"].tolist() == ([3, 4] if student.family == "faster_rcnn" else [2, 3])
    out.loss.backward()
    assert student.model.backbone.body.conv1.weight.grad.abs().sum() > 0
    student.zero_grad()
    with pytest.raises(ValueError, match="training mode needs labels"):
        student(batch["pixel_values"], batch["pixel_mask"])
    with pytest.raises(ValueError, match="no decoder cross-attention"):
        student(batch["pixel_values"], batch["pixel_mask"], labels=batch["labels"], with_attention=True)


def test_detect_gives_detrkd_labels_scaled_to_the_asked_sizes(student):
    batch = _batch()
    student.eval()
    with torch.no_grad():
        raw = student(batch["pixel_values"], batch["pixel_mask"]).detections
    got = student.detect(batch["pixel_values"], batch["pixel_mask"], [[128, 128], [64, 96]])
    assert not student.training
    for det, res, scale in zip(raw, got, ([2.0, 2.0], [2.0, 1.0])):
        torch.testing.assert_close(res["boxes"], det["boxes"] * torch.tensor(scale).repeat(2))
        torch.testing.assert_close(res["labels"], det["labels"] - student.label_offset)
        assert len(res["scores"]) <= student.config.options.detections
        assert res["labels"].numel() == 0 or 0 <= res["labels"].min() <= res["labels"].max() < 5


def test_a_checkpoint_rebuilds_the_same_detector(student):
    batch = _batch()
    entries = model_entries(student)
    assert entries["family"] == student.family and entries["hf_config"]["options"]["fpn_channels"] == 32
    rebuilt = detector_from_state(entries["family"], entries["hf_config"])
    load_model_entries(rebuilt, entries)
    assert rebuilt.config == student.config and rebuilt.config.id2label[4] == "c4"
    student.eval(), rebuilt.eval()
    torch.testing.assert_close(rebuilt.detect(batch["pixel_values"], batch["pixel_mask"], [[64, 64]] * 2),
                               student.detect(batch["pixel_values"], batch["pixel_mask"], [[64, 64]] * 2))


@pytest.mark.parametrize("family, builder", [("faster_rcnn", "fasterrcnn_resnet50_fpn"),
                                             ("retinanet", "retinanet_resnet50_fpn")])
def test_the_resnet50_preset_is_torchvisions_own_model(family, builder):
    """Same state-dict keys and shapes as torchvision's builder (so an export loads into it)."""
    import torchvision

    with torch.device("meta"):
        ours = build_cnn_detector(family, "resnet50", 7).model.state_dict()
        num_classes = 8 if family == "faster_rcnn" else 7
        theirs = getattr(torchvision.models.detection, builder)(weights=None, weights_backbone=None,
                                                                 num_classes=num_classes).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_pixels_are_torchvisions_imagenet_normalisation_with_the_detr_resize():
    pixels = family_pixels("faster_rcnn", 256)
    assert (pixels.size, pixels.square, pixels.max_size) == (256, False, 427)
    assert pixels.mean == (0.485, 0.456, 0.406) and pixels.std == (0.229, 0.224, 0.225)


@pytest.mark.parametrize("section, message", [
    ({"preset": "huge"}, "unknown faster_rcnn preset 'huge'; choose one of ['resnet50', 'small', 'tiny']"),
    ({"overrides": {"fpn_channel": 8}}, "'fpn_channel' is not a faster_rcnn option; did you mean 'fpn_channels'?"),
    ({"overrides": {"anchor_sizes": [8, 16]}}, "anchor_sizes needs one size per FPN level (5)"),
    ({"overrides": {"widths": 16}}, "widths must be a list, got 16"),
    ({"overrides": {"fpn_channels": 0}}, "fpn_channels must be integers >= 1"),
    ({"overrides": {"fpn_channels": 20}}, "fpn_channels 20 is not divisible by head_group_norm 8"),
    ({"backbone": "tiny"}, "model.backbone is a DETR setting"),
    ({"num_queries": 10}, "model.num_queries is a DETR setting"),
])
def test_bad_model_sections_are_one_clear_config_error(section, message):
    model = ModelConfig(**{"family": "faster_rcnn", "preset": "tiny", **section})
    with pytest.raises(ConfigError, match=None) as info:
        check_model_config(model)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_overrides_change_the_options():
    options = cnn_options("retinanet", "small", {"fpn_channels": 16, "anchor_sizes": [8, 16, 32, 64, 128]})
    assert options.fpn_channels == 16 and options.anchor_sizes == (8, 16, 32, 64, 128)
    assert options.widths == (32, 64, 128, 256)


# ---- end to end --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits")
    assert main(["data", "digits", "--out", str(out), "--train-images", "6", "--val-images", "3",
                 "--image-size", "96", "--seed", "1", "--overwrite"]) == 0
    return out


def _train(capsys, digits, run, family, *extra):
    code = main(["train", "--family", family, "--preset", "tiny", "--data", str(digits), "--epochs", "1",
                 "--output-dir", str(run), "--no-progress", "--set", "data.image_size=96", "--set",
                 "data.batch_size=3", "--set", "optim.warmup_steps=1", "--set", "log_every_steps=1", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out, err


@pytest.mark.parametrize("family", FAMILIES)
def test_train_resume_eval_predict_export(capsys, digits, tmp_path, family):
    straight, split = tmp_path / "straight", tmp_path / "split"
    out, _ = _train(capsys, digits, straight, family)
    assert f"for torchvision: detrkd export --checkpoint {straight}" in out  # not "for transformers"
    _train(capsys, digits, split, family, "--set", "optim.max_steps=1")
    code = main(["train", "--resume", "--output-dir", str(split), "--no-progress", "--set", "optim.max_steps=null"])
    assert code == 0 and "resumed from" in capsys.readouterr().err
    want, got = (load_checkpoint(d / "last.pt") for d in (straight, split))
    assert want["global_step"] == got["global_step"] == 2 and want["family"] == family
    for key, value in want["model"].items():  # an interrupted and resumed run ends where a straight one does
        assert torch.equal(got["model"][key], value), key

    assert main(["eval", "--checkpoint", str(split / "last.pt"), "--out", str(tmp_path / "m.json"),
                 "--no-progress"]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 3 and metrics["image_size"] == 96 and -1.0 <= metrics["ap"] <= 1.0

    image = digits / "val" / sorted(os.listdir(digits / "val"))[0]
    assert main(["predict", "--checkpoint", str(split / "best.pt"), "--image", str(image), "--out",
                 str(tmp_path / "pred.json"), "--threshold", "0"]) == 0
    capsys.readouterr()
    predicted = json.loads((tmp_path / "pred.json").read_text())["detections"]

    exported = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(split), "--out", str(exported)]) == 0
    assert {p.name for p in exported.iterdir()} == {"model.pt", "torchvision.json", "detrkd_export.json"}
    assert main(["eval", "--checkpoint", str(exported), "--data", str(digits), "--out", str(tmp_path / "e.json"),
                 "--no-progress"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["ap"] == metrics["ap"]
    _standalone_matches(exported, image, predicted)


def _standalone_matches(exported, image, predicted):
    """torchvision alone (its own transform, set to detrkd's preprocessing) finds what predict found
    (a 96 px image at 96 px: no resize, so the two preprocessings agree)."""
    from PIL import Image
    from torchvision.transforms.functional import pil_to_tensor

    from detrkd.models.cnn.export import load_torchvision

    record = json.loads((exported / "torchvision.json").read_text())
    assert record["torchvision"]["transform"]["min_size"] == 96 and record["torchvision"]["builder"] is None
    model = load_torchvision(exported).eval()
    with Image.open(image) as im, torch.no_grad():
        det = model([pil_to_tensor(im.convert("RGB")).float() / 255])[0]
    offset = record["torchvision"]["label_offset"]
    assert [d["label"] for d in predicted] == (det["labels"] - offset).tolist()
    torch.testing.assert_close(torch.tensor([d["box"] for d in predicted]).reshape(-1, 4), det["boxes"],
                               atol=1e-3, rtol=0)


def test_a_checkpoint_is_a_pretrained_start_and_keeps_its_pixels(tmp_path):
    from detrkd.checkpoint import save_checkpoint
    from detrkd.config import DataConfig, TrainConfig
    from detrkd.recipe import make_detector
    from detrkd.models.processors import family_pixels

    student = build_cnn_detector("retinanet", "tiny", 5)
    student.pixels = family_pixels("retinanet", 96)
    save_checkpoint(tmp_path / "last.pt", model_entries(student))
    config = TrainConfig(model=ModelConfig("retinanet", pretrained=str(tmp_path / "last.pt")), data=DataConfig("d"))
    check_model_config(config.model)
    loaded = make_detector(config, 5)
    assert loaded.config == student.config and loaded.pixels.size == 96
    for key, value in student.model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    with pytest.raises(ConfigError, match="starts from a detrkd checkpoint"):
        check_model_config(ModelConfig("retinanet", pretrained=str(tmp_path)))


def test_analyze_refuses_a_cnn_checkpoint_in_one_line(capsys, digits, tmp_path):
    from detrkd.checkpoint import save_checkpoint
    from detrkd.models.processors import family_pixels

    student = build_cnn_detector("faster_rcnn", "tiny", 10)
    student.pixels = family_pixels("faster_rcnn", 96)
    save_checkpoint(tmp_path / "cnn.pt", model_entries(student))
    assert main(["analyze", "gqs", "--checkpoint", str(tmp_path / "cnn.pt"), "--data", str(digits)]) == 2
    assert "analyze gqs reads a DETR's query predictions" in capsys.readouterr().err
