"""Students from real checkpoints: a from_pretrained directory with another class count is loaded
with class heads re-initialised for the dataset's categories (named after them), the rest kept."""

from __future__ import annotations

import json

import pytest
import torch

from detrkd.cli import main
from detrkd.models import build_detector, load_detector, save_detector
from test_interruptions import digits  # noqa: F401 (fixture)


@pytest.mark.parametrize("family", ["rt_detr", "detr"])
def test_a_student_from_a_checkpoint_with_other_classes(tmp_path, digits, capsys, family):
    torch.manual_seed(0)
    pretrained = build_detector(family, "tiny", 80)
    save_detector(pretrained, tmp_path / "coco80")
    run = tmp_path / "run"
    code = main(["train", "--data", str(digits), "--output-dir", str(run), "--no-progress",
                 "--set", "model.family=" + family, "--set", f"model.pretrained={tmp_path / 'coco80'}",
                 "--set", "data.image_size=64", "--set", "optim.max_steps=1", "--set", "optim.lr=0",
                 "--set", "optim.backbone_lr=0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "predicts 80 classes, the data 10: re-initialised its class heads" in err
    student = load_detector(run / "last.pt")
    names = [c["name"] for c in json.loads((digits / "annotations" / "instances_train.json").read_text())["categories"]]
    assert student.num_classes == 10 and [student.config.id2label[i] for i in range(10)] == names
    kept = {k: v for k, v in pretrained.model.state_dict().items() if "backbone" in k and v.is_floating_point()
            and "running" not in k}
    now = student.model.state_dict()
    assert kept and all(torch.equal(now[k], v) for k, v in kept.items())  # lr 0: the loaded weights, unchanged


def test_a_detrkd_checkpoint_with_other_classes_is_still_a_clear_error(tmp_path, digits, capsys):
    code = main(["train", "--family", "rt_detr", "--preset", "tiny", "--data", str(digits), "--no-progress",
                 "--output-dir", str(tmp_path / "a"), "--set", "data.image_size=64", "--set", "optim.max_steps=1"])
    assert code == 0
    ckpt = tmp_path / "a" / "last.pt"
    from detrkd.checkpoint import load_checkpoint, save_checkpoint
    state = load_checkpoint(ckpt)
    other = build_detector("rt_detr", "tiny", 7)
    from detrkd.checkpoint import model_entries
    save_checkpoint(tmp_path / "seven.pt", {**state, **model_entries(other)})
    capsys.readouterr()
    code = main(["train", "--data", str(digits), "--output-dir", str(tmp_path / "b"), "--no-progress",
                 "--set", "model.family=rt_detr", "--set", f"model.pretrained={tmp_path / 'seven.pt'}",
                 "--set", "data.image_size=64"])
    assert code == 2 and "detrkd export" in capsys.readouterr().err
