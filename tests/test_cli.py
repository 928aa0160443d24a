"""The ``detrkd`` command: error handling, config assembly, and an end-to-end smoke run."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from detrkd.checkpoint import load_checkpoint
from detrkd.cli import build_parser, format_stats, main, train_overrides
from detrkd.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("detrkd: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


# ---- errors -----------------------------------------------------------------------------
def test_no_command_is_a_usage_error(capsys):
    code, _, err = run_main(capsys)
    assert code == 2 and "detrkd: error:" in err


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--config", tmp_path / "nope.yaml")
    assert_one_line_error(code, err, "config file not found", "nope.yaml")


def test_unknown_config_key_with_suggestion(capsys, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {family: detr, preset: tiny}\ndata: {root: x}\noptim: {lr: 1.0e-4, epoch: 2}\n")
    code, _, err = run_main(capsys, "train", "--config", cfg)
    assert_one_line_error(code, err, "unknown config key 'optim.epoch'", "did you mean 'optim.epochs'?")


def test_bad_override_type(capsys):
    code, _, err = run_main(capsys, "train", "--family", "detr", "--preset", "tiny", "--data", "x",
                            "--set", "optim.lr=abc")
    assert_one_line_error(code, err, "optim.lr: expected float, got 'abc'")


def test_train_without_config_needs_the_required_keys(capsys):
    code, _, err = run_main(capsys, "train", "--preset", "tiny", "--data", "x")
    assert_one_line_error(code, err, "missing required config key 'model.family'")


def test_train_with_missing_data(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--family", "detr", "--preset", "tiny",
                            "--data", tmp_path / "nodata", "--output-dir", tmp_path / "run")
    assert_one_line_error(code, err, "not found", "nodata")


def test_resume_without_a_run(capsys, tmp_path):
    code, _, err = run_main(capsys, "train", "--family", "detr", "--preset", "tiny", "--data", "x",
                            "--output-dir", tmp_path / "run", "--resume")
    assert_one_line_error(code, err, "cannot resume: no last.pt")


def test_eval_missing_checkpoint(capsys, tmp_path):
    code, _, err = run_main(capsys, "eval", "--checkpoint", tmp_path / "x.pt", "--data", tmp_path)
    assert_one_line_error(code, err, "checkpoint not found", "x.pt")


def test_eval_truncated_checkpoint(capsys, tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"PK\x03\x04 not much")
    code, _, err = run_main(capsys, "eval", "--checkpoint", bad, "--data", tmp_path)
    assert_one_line_error(code, err, str(bad), "truncated")


def test_predict_rejects_a_dir_without_config(capsys, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    code, _, err = run_main(capsys, "predict", "--checkpoint", tmp_path, "--image", tmp_path / "a.png",
                            "--out", tmp_path / "b.png")
    assert_one_line_error(code, err, "config.json")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        main(["--debug", "train", "--config", str(tmp_path / "nope.yaml")])
    with pytest.raises(ConfigError):  # --debug is also accepted after the subcommand
        main(["train", "--config", str(tmp_path / "nope.yaml"), "--debug"])


def test_python_dash_m_reports_one_line_and_exit_code_2(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "detrkd", "train", "--config", str(tmp_path / "no.yaml")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"detrkd: error: config file not found: {tmp_path / 'no.yaml'}"]


# ---- config assembly ----------------------------------------------------------------------
def test_shortcuts_then_set_overrides(tmp_path):
    args = build_parser().parse_args(["train", "--family", "detr", "--preset", "tiny", "--data", "123",
                                      "--epochs", "3", "--output-dir", "runs/a",
                                      "--set", "optim.epochs=5", "--set", "optim.lr=3e-4"])
    cfg = load_config(None, train_overrides(args))
    assert cfg.data.root == "123"  # a shortcut value is taken literally, not parsed as YAML
    assert cfg.optim.epochs == 5 and cfg.optim.lr == 3e-4 and cfg.output_dir == "runs/a"


def test_example_configs_load():
    from detrkd.config import DistillConfig

    teacher = load_config(REPO / "configs" / "digits_teacher.yaml")
    student = load_config(REPO / "configs" / "digits_student.yaml")
    qskd = load_config(REPO / "configs" / "digits_qskd.yaml", schema=DistillConfig)
    assert {c.model.family for c in (teacher, student, qskd)} == {"rt_detr"}
    assert {c.data.root for c in (teacher, student, qskd)} == {"data/digits"}
    assert (teacher.model.preset, student.model.preset, qskd.model.preset) == ("small", "tiny", "tiny")
    # the distilled student and the no-KD student share the schedule
    assert qskd.optim == student.optim and qskd.data == student.data and qskd.seed == student.seed
    assert set(qskd.methods) == {"agfd", "lapd"} and qskd.teacher.endswith("digits_teacher/last.pt")


def test_format_stats_table():
    table = format_stats({"ap": 0.5, "ap50": 0.75, "apl": -1.0, "images_per_sec": 12.345, "num_images": 4.0})
    lines = table.splitlines()
    assert lines[0].split() == ["AP", "@[.50:.95]", "0.5000"]
    assert lines[2].endswith("n/a") and lines[-2].split() == ["images/s", "12.35"]
    assert lines[-1].split() == ["images", "4"]


def test_parser_has_all_commands():
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"data", "train", "eval", "predict", "export", "distill", "methods", "analyze", "bench"}


# ---- end to end -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("digits")
    assert main(["data", "digits", "--out", str(out), "--train-images", "6", "--val-images", "3",
                 "--image-size", "96", "--seed", "1", "--overwrite"]) == 0
    return out


def test_smoke_data_train_eval_predict_resume(capsys, digits, tmp_path):
    assert (digits / "annotations" / "instances_train.json").is_file()
    run = tmp_path / "run"
    train = ["train", "--family", "deformable_detr", "--preset", "tiny", "--data", digits,
             "--epochs", "1", "--output-dir", run, "--no-progress", "--set", "data.image_size=96",
             "--set", "data.batch_size=3", "--set", "optim.warmup_steps=1", "--set", "log_every_steps=1"]

    code, out, err = run_main(capsys, *train, "--set", "optim.max_steps=1")
    assert code == 0, err
    assert "stopped at optim.max_steps: 1 steps" in out
    assert load_checkpoint(run / "last.pt")["global_step"] == 1

    code, out, err = run_main(capsys, "train", "--resume", "--output-dir", run, "--no-progress",
                              "--set", "optim.max_steps=null")
    assert code == 0, err
    assert "done: 2 steps, epoch 1" in out and "resumed from" in err
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["type"] for r in records] == ["train", "train", "eval"]
    assert (run / "best.pt").is_file() and (run / "config.yaml").is_file()

    code, out, err = run_main(capsys, "eval", "--checkpoint", run / "last.pt", "--out", tmp_path / "m.json",
                              "--no-progress")
    assert code == 0, err
    assert "AP @[.50:.95]" in out and "images/s" in out
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["num_images"] == 3 and -1.0 <= metrics["ap"] <= 1.0

    image = digits / "val" / sorted(os.listdir(digits / "val"))[0]
    code, out, err = run_main(capsys, "predict", "--checkpoint", run / "best.pt", "--image", image,
                              "--out", tmp_path / "pred.png", "--threshold", "0")
    assert code == 0, err
    assert "detections with score >= 0.0" in out
    with Image.open(tmp_path / "pred.png") as pred, Image.open(image) as src:
        assert pred.format == "PNG" and pred.size == src.size
        assert pred.convert("RGB").tobytes() != src.convert("RGB").tobytes()  # boxes were drawn


def test_smoke_refuses_to_overwrite_a_run(capsys, digits, tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "last.pt").write_bytes(b"")
    code, _, err = run_main(capsys, "train", "--family", "deformable_detr", "--preset", "tiny",
                            "--data", digits, "--output-dir", run)
    assert_one_line_error(code, err, "already holds a run", "--resume")
