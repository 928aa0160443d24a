"""The cross-family digits row's configs (RT-DETR teacher -> RF-DETR student): they share the
no-KD student's schedule and data, and both run end to end for two steps on a tiny digits set."""

from __future__ import annotations

from pathlib import Path

from detrkd.cli import main
from detrkd.config import DistillConfig, load_config

REPO = Path(__file__).resolve().parents[1]
STUDENT = REPO / "configs" / "digits_rf_detr_student.yaml"
LAPD = REPO / "configs" / "digits_rf_detr_lapd.yaml"
SMALL = ("data.image_size=64", "data.batch_size=2", "optim.max_steps=2", "optim.warmup_steps=1",
         "eval_max_images=2", "threads=1", "log_every_steps=1")


def test_the_configs_share_the_digits_student_schedule():
    baseline = load_config(REPO / "configs" / "digits_student.yaml")
    student, lapd = load_config(STUDENT), load_config(LAPD, schema=DistillConfig)
    assert (student.model.family, student.model.preset) == ("rf_detr", "tiny")
    assert (lapd.model.family, lapd.model.preset) == ("rf_detr", "tiny")
    for config in (student, lapd):
        assert config.optim == baseline.optim and config.data.image_size == baseline.data.image_size
        assert config.data.batch_size == baseline.data.batch_size and config.seed == baseline.seed
        assert config.model.pixels == baseline.model.pixels == "imagenet"
    assert set(lapd.methods) == {"lapd"} and lapd.teacher == "runs/digits_teacher/last.pt"


def test_rt_detr_teacher_distils_into_the_rf_detr_student(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sets = [x for kv in SMALL for x in ("--set", kv)]
    assert main(["data", "digits", "--out", "data/t", "--train-images", "6", "--val-images", "2",
                 "--image-size", "64"]) == 0
    assert main(["train", "--config", str(REPO / "configs" / "digits_teacher.yaml"), *sets, "--set",
                 "model.preset=tiny", "--set", "data.root=data/t", "--output-dir", "teacher", "--no-progress"]) == 0
    assert main(["train", "--config", str(STUDENT), *sets, "--set", "data.root=data/t", "--output-dir", "no_kd",
                 "--no-progress"]) == 0
    assert main(["distill", "--config", str(LAPD), *sets, "--set", "data.root=data/t", "--set", "teacher=teacher/last.pt",
                 "--output-dir", "lapd", "--no-progress"]) == 0
    assert (tmp_path / "no_kd" / "last.pt").exists() and (tmp_path / "lapd" / "last.pt").exists()
    metrics = (tmp_path / "lapd" / "metrics.jsonl").read_text()
    assert "lapd/" in metrics
