"""The distillation API (``Distiller``), its config and the ``detrkd distill`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import Tensor

from detrkd.config import ConfigError, DistillConfig, load_config
from detrkd.distill.base import DistillContext, DistillMethod, Distiller, Weights
from detrkd.distill.methods import build_methods
from detrkd.recipe import init_from_teacher
from detrkd.models import build_detector, save_detector


class FinalBoxMSE(DistillMethod):
    """A minimal method for API tests: MSE of the first k final-layer boxes (query i to i)."""

    terms = {"mse": 1.0}

    def __init__(self, student=None, teacher=None, k: int = 5, scale: float = 1.0):
        super().__init__()
        self.k, self.scale = k, scale

    def forward(self, ctx: DistillContext) -> dict[str, Tensor]:
        s = ctx.student_out.predictions.boxes[-1, :, : self.k]
        t = ctx.teacher_out.predictions.boxes[-1, :, : self.k]
        return {"mse": self.scale * (s - t).pow(2).mean()}


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = build_detector("rt_detr", "tiny", 4, num_queries=20)
    student = build_detector("rt_detr", "tiny", 4, num_queries=10, d_model=32, encoder_hidden_dim=32,
                             decoder_in_channels=[32, 32, 32])
    return teacher, student


def test_terms_are_named_weighted_in_one_place_and_sum_to_the_loss(pair, two_image_batch):
    """lambda and the per-term weight are applied by the Distiller; both the scaled and the
    method's own (unscaled) value are reported, and the scaled ones add up to the loss."""
    teacher, student = pair
    distiller = Distiller(student, teacher, {"boxes": FinalBoxMSE()}, {"boxes": Weights(3.0, {"mse": 2.0})}).train()
    loss, terms = distiller(two_image_batch)
    assert set(terms) == {"det/loss", "boxes/mse", "boxes/mse:unscaled"}
    torch.testing.assert_close(loss, terms["det/loss"] + terms["boxes/mse"])
    torch.testing.assert_close(terms["boxes/mse"], 6.0 * terms["boxes/mse:unscaled"])
    default = Distiller(student, teacher, {"boxes": FinalBoxMSE()}).train()  # lambda 1, the class's terms
    torch.manual_seed(2)
    _, a = default(two_image_batch)
    torch.manual_seed(2)
    _, b = distiller(two_image_batch)
    torch.testing.assert_close(a["boxes/mse"], a["boxes/mse:unscaled"])
    torch.testing.assert_close(b["boxes/mse"], 6.0 * a["boxes/mse"])


def test_a_term_without_a_weight_is_an_error(pair, two_image_batch):
    teacher, student = pair
    distiller = Distiller(student, teacher, {"boxes": FinalBoxMSE()}, {"boxes": Weights(1.0, {"l1": 1.0})}).train()
    with pytest.raises(KeyError, match=r"method boxes returned term\(s\) \['mse'\] without a weight"):
        distiller(two_image_batch)


def test_teacher_is_frozen_and_stays_in_eval_mode(pair, two_image_batch):
    teacher, student = pair
    distiller = Distiller(student, teacher, {"boxes": FinalBoxMSE()})
    distiller.train()
    assert not teacher.training and student.training
    assert not any(p.requires_grad for p in teacher.parameters())
    loss, _ = distiller(two_image_batch)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_no_methods_is_plain_detection_training(pair, two_image_batch):
    teacher, student = pair
    distiller = Distiller(student, teacher, {}).train()
    torch.manual_seed(3)
    loss, terms = distiller(two_image_batch)
    torch.manual_seed(3)
    own = student(two_image_batch["pixel_values"], two_image_batch["pixel_mask"], labels=two_image_batch["labels"]).loss
    assert list(terms) == ["det/loss"]
    torch.testing.assert_close(loss, own)


def test_class_sets_must_agree(pair):
    teacher, _ = pair
    other = build_detector("rt_detr", "tiny", 7)
    with pytest.raises(ValueError, match="predicts 4 classes but the student .* predicts 7"):
        Distiller(other, teacher, {})
    named = build_detector("rt_detr", "tiny", 4, id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    renamed = build_detector("rt_detr", "tiny", 4, id2label={0: "a", 1: "b", 2: "x", 3: "d"})
    with pytest.raises(ValueError, match="class names differ"):
        Distiller(renamed, named, {})
    Distiller(named, teacher, {})  # HF's default names ("LABEL_i") mean "unnamed": no conflict


def test_teacher_of_the_wrong_family_or_class_set_names_the_file(pair, tmp_path):
    from detrkd.checkpoint import model_entries, save_checkpoint
    from detrkd.recipe import load_teacher

    teacher, _ = pair
    base = {"model": {"family": "rt_detr", "preset": "tiny"}, "data": {"root": "d"}}

    def load(path) -> None:
        load_teacher(load_config({**base, "teacher": str(path)}, schema=DistillConfig), num_classes=4)

    other_module = save_checkpoint(tmp_path / "head.pt", model_entries(torch.nn.Linear(2, 2)))
    with pytest.raises(ConfigError, match=r"head\.pt is a detrkd checkpoint without a detector"):
        load(other_module)
    mislabelled = save_checkpoint(tmp_path / "mixed.pt", {**model_entries(teacher), "family": "detr"})
    with pytest.raises(ConfigError, match=r"mixed\.pt: checkpoint says family 'detr' but its HF config is 'rt_detr'"):
        load(mislabelled)
    (tmp_path / "resnet").mkdir()
    (tmp_path / "resnet" / "config.json").write_text(json.dumps({"model_type": "resnet"}))
    with pytest.raises(ConfigError, match=r"resnet/config\.json: HF model type 'resnet' is not a supported DETR family"):
        load(tmp_path / "resnet")
    save_detector(build_detector("rt_detr", "tiny", 7), tmp_path / "seven")
    with pytest.raises(ConfigError, match=r"seven predicts 7 classes, the data has 4"):
        load(tmp_path / "seven")
    load(save_checkpoint(tmp_path / "ok.pt", model_entries(teacher)))


def test_weights_for_unknown_methods_are_rejected(pair):
    teacher, student = pair
    with pytest.raises(ValueError, match="unknown methods"):
        Distiller(student, teacher, {"boxes": FinalBoxMSE()}, {"boxe": Weights(1.0, {})})


def test_build_methods_names_bad_options(pair, monkeypatch):
    import detrkd.distill.methods as methods_module

    teacher, student = pair
    monkeypatch.setitem(methods_module.METHODS, "boxes", FinalBoxMSE)
    methods, weights = build_methods({"boxes": {"weight": 2, "k": 3, "terms": {"mse": 4}}}, student, teacher)
    assert weights == {"boxes": Weights(2.0, {"mse": 4.0})} and methods["boxes"].k == 3
    assert build_methods({"boxes": {}}, student, teacher)[1] == {"boxes": Weights(1.0, {"mse": 1.0})}
    with pytest.raises(ConfigError, match=r"methods\.boxes: .*valid options: weight, terms, k, scale"):
        build_methods({"boxes": {"kk": 3}}, student, teacher)
    with pytest.raises(ConfigError, match=r"methods\.boxes\.k: expected int, got 'three'"):
        build_methods({"boxes": {"k": "three"}}, student, teacher)
    with pytest.raises(ConfigError, match=r"methods\.boxes\.terms: unknown term\(s\) \['l1'\]; boxes's terms: mse"):
        build_methods({"boxes": {"terms": {"l1": 5}}}, student, teacher)
    with pytest.raises(ConfigError, match=r"methods\.boxes\.weight: expected float, got 'big'"):
        build_methods({"boxes": {"weight": "big"}}, student, teacher)
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="unknown distillation method 'nope'"):
        build_methods({"nope": {}}, student, teacher)


def test_init_from_teacher_copies_matching_tensors():
    torch.manual_seed(0)
    teacher = build_detector("rt_detr", "tiny", 4)
    student = build_detector("rt_detr", "tiny", 4)
    narrow = build_detector("rt_detr", "tiny", 4, decoder_layers=1)
    assert init_from_teacher(student, teacher) == len(teacher.state_dict())
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(student.state_dict()[key], value)
    copied = init_from_teacher(narrow, teacher)
    assert 0 < copied < len(teacher.state_dict())


def test_distill_config_rejects_unknown_keys():
    base = {"model": {"family": "rt_detr", "preset": "tiny"}, "data": {"root": "d"}, "teacher": "t.pt"}
    config = load_config({**base, "methods": {"agfd": {"weight": 50}}}, schema=DistillConfig)
    assert config.methods == {"agfd": {"weight": 50}} and config.teacher == "t.pt"
    with pytest.raises(ConfigError, match="teachr"):
        load_config({**base, "teachr": "x"}, schema=DistillConfig)


def test_cli_distill_runs_and_resumes(tmp_path: Path, capsys):
    from detrkd.cli import main
    from detrkd.data.digits import make_digits_dataset

    make_digits_dataset(tmp_path / "data", train_images=4, val_images=2, image_size=64)
    torch.manual_seed(0)
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "teacher")
    config = {"model": {"family": "rt_detr", "preset": "tiny", "num_queries": 10},
              "data": {"root": str(tmp_path / "data"), "image_size": 64, "batch_size": 2, "hflip": False},
              "optim": {"epochs": 2, "warmup_steps": 1}, "teacher": str(tmp_path / "teacher"),
              "methods": {}, "output_dir": str(tmp_path / "run"), "log_every_steps": 1,
              "checkpoint_every_steps": 1}
    (tmp_path / "distill.yaml").write_text(json.dumps(config))
    args = ["distill", "--config", str(tmp_path / "distill.yaml"), "--no-progress"]
    assert main(args + ["--set", "optim.max_steps=2"]) == 0
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "stopped at optim.max_steps: 2 steps" in out and "done: 4 steps" in out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    assert "det/loss" in records[0]
    assert main(args + ["--set", "teacher=" + str(tmp_path / "missing"), "--output-dir",
                        str(tmp_path / "run2")]) == 2
    assert "missing" in capsys.readouterr().err


def test_no_methods_skips_the_teacher_forward(pair, two_image_batch, monkeypatch):
    teacher, student = pair
    distiller = Distiller(student, teacher, {}).train()
    monkeypatch.setattr(teacher, "forward", lambda *a, **k: pytest.fail("teacher ran without methods"))
    loss, terms = distiller(two_image_batch)
    assert list(terms) == ["det/loss"] and torch.isfinite(loss)


def test_a_methods_own_parameters_get_its_optim_options(tmp_path: Path):
    """Active sampling's ASM trains at asm_lr with no warm-up (its Eq. 16 target is the fixed
    teacher's: under the student's 300-step warm-up it sampled uniformly for ~300 steps), the
    student keeps its warm-up; asm_warmup: true restores the shared schedule."""
    from detrkd.data.digits import make_digits_dataset
    from detrkd.recipe import build_distill_trainer

    make_digits_dataset(tmp_path / "data", train_images=4, val_images=2, image_size=64)
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "teacher")
    raw = {"model": {"family": "rt_detr", "preset": "tiny"},
           "data": {"root": str(tmp_path / "data"), "image_size": 64, "batch_size": 2, "hflip": False},
           "optim": {"lr": 2e-4, "epochs": 2, "warmup_steps": 100}, "teacher": str(tmp_path / "teacher"),
           "methods": {"active_sampling": {"hidden": 16}}, "output_dir": str(tmp_path / "run")}
    trainer = build_distill_trainer(load_config(raw, schema=DistillConfig), progress=False)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}  # after the scheduler's step 0
    assert lrs["distill/active_sampling"] == pytest.approx(1e-3)
    assert lrs["main"] == pytest.approx(2e-4 / 100)
    raw["methods"]["active_sampling"].update(asm_warmup=True, asm_lr=None)
    raw["output_dir"] = str(tmp_path / "run2")
    trainer = build_distill_trainer(load_config(raw, schema=DistillConfig), progress=False)
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["distill/active_sampling"] == pytest.approx(lrs["main"])


def test_logged_lr_is_the_students_and_a_methods_group_is_logged_apart(tmp_path: Path):
    """The progress line and metrics.jsonl's "lr" are the student's learning rate (its warm-up),
    not the largest of all groups (the ASM's constant 1e-3 hid the student's 2e-4 schedule); a
    method's own group is logged as "lr/distill/<method>"."""
    from detrkd.data.digits import make_digits_dataset
    from detrkd.recipe import build_distill_trainer

    make_digits_dataset(tmp_path / "data", train_images=4, val_images=2, image_size=64)
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "teacher")
    raw = {"model": {"family": "rt_detr", "preset": "tiny"},
           "data": {"root": str(tmp_path / "data"), "image_size": 64, "batch_size": 2, "hflip": False},
           "optim": {"lr": 2e-4, "epochs": 1, "warmup_steps": 100}, "teacher": str(tmp_path / "teacher"),
           "methods": {"active_sampling": {"hidden": 16}}, "output_dir": str(tmp_path / "run"),
           "log_every_steps": 1, "eval_every_epochs": 0}
    trainer = build_distill_trainer(load_config(raw, schema=DistillConfig), progress=False)
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert [r["lr"] for r in train] == pytest.approx([2e-4 / 100, 2e-4 * 2 / 100])
    assert [r["lr/distill/active_sampling"] for r in train] == pytest.approx([1e-3, 1e-3])
