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


@pytest.mark.parametrize("family", ["rt_detr", "detr", "deformable_detr"])
def test_classes_reordered_by_name_predict_the_same_class_under_its_new_label(family):
    from detrkd.models.relabel import align_classes

    torch.manual_seed(0)
    model = build_detector(family, "tiny", 4, id2label={0: "a", 1: "b", 2: "c", 3: "d"},
                           label2id={"a": 0, "b": 1, "c": 2, "d": 3}).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x).predictions.logits
        assert align_classes(model.model, ["c", "a", "d", "b"]) and model.config.id2label[0] == "c"
        after = model(x).predictions.logits
    order = [2, 0, 3, 1]
    if family == "rt_detr":  # two-stage: the top-k query choice is a max over classes, unchanged
        torch.testing.assert_close(after, before[..., order], atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(after[..., :4], before[..., order], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"missing \['e'\]"):
        align_classes(model.model, ["a", "b", "c", "e"])


def test_a_teacher_with_the_datas_names_in_another_order_is_reordered(tmp_path, digits, capsys):
    names = [c["name"] for c in json.loads((digits / "annotations" / "instances_train.json").read_text())["categories"]]
    shuffled = names[::-1]
    teacher = build_detector("rt_detr", "tiny", 10, id2label=dict(enumerate(shuffled)),
                             label2id={n: i for i, n in enumerate(shuffled)})
    save_detector(teacher, tmp_path / "teacher")
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--student", "rt_detr:tiny", "--method", "kd_detr",
                 "--data", str(digits), "--output-dir", str(tmp_path / "run"), "--no-progress",
                 "--set", "data.image_size=64", "--set", "optim.max_steps=1", "--set", "methods.kd_detr.general=8"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "reordered by name" in err


def test_student_directory_shortcut(tmp_path, digits, capsys):
    save_detector(build_detector("rt_detr", "tiny", 80), tmp_path / "coco80")
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "teacher")
    code = main(["distill", "--teacher", str(tmp_path / "teacher"), "--student", str(tmp_path / "coco80"),
                 "--method", "fitnet", "--data", str(digits), "--output-dir", str(tmp_path / "run"), "--no-progress",
                 "--set", "data.image_size=64", "--set", "optim.max_steps=1"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "re-initialised its class heads" in err and load_detector(tmp_path / "run" / "last.pt").num_classes == 10
