"""What a person reads: progress lines without a terminal, evaluation lines with n/a and integer
counts, a summary whose epoch agrees with metrics.jsonl, config typos found in other sections."""

from __future__ import annotations

import json
import re

import pytest

from detrkd.config import ConfigError, load_config
from test_run_state import train  # noqa: F401
from test_interruptions import digits, write_config  # noqa: F401 (fixture)


def test_progress_eval_and_summary_lines(tmp_path, digits, capsys):
    config = write_config(tmp_path, digits, "run")
    assert train("--config", str(config), "--set", "optim.max_steps=9", "--set", "eval_every_epochs=1") == 0
    out, err = capsys.readouterr()
    progress = [line for line in err.splitlines() if line.startswith("step ")]
    assert len(progress) == 9  # log_every_steps = 1, stderr is not a terminal here
    assert re.fullmatch(r"step 3/9 \(epoch 1/2\): loss \d+\.\d{4}, lr \d\.\d{2}e-\d\d, \d+\.\d img/s, ETA \d+:\d\d",
                        progress[2]), progress[2]
    evals = [line for line in err.splitlines() if " eval: " in line]
    assert evals and "=-1" not in evals[0]
    assert re.search(r"num_images=2(,|$)", evals[0]) and "-1.0000" not in evals[0], evals[0]
    summary = next(line for line in out.splitlines() if line.startswith("stopped at"))
    last = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary.startswith(f"stopped at optim.max_steps: 9 steps, epoch {last['epoch']},"), summary
    assert f"detrkd export --checkpoint {tmp_path / 'run'}" in out  # how to hand it to transformers


def test_did_you_mean_finds_a_key_in_another_section():
    base = {"model": {"family": "rt_detr", "preset": "tiny"}, "data": {"root": "x"}}
    with pytest.raises(ConfigError, match=r"did you mean 'optim\.warmup_steps'"):
        load_config({**base, "warmup_steps": 10})
    with pytest.raises(ConfigError, match=r"did you mean 'data\.batch_size'"):
        load_config({**base, "optim": {"batch_size": 4}})


def test_warnings_are_one_line_and_loading_bars_quiet(tmp_path, capsys):
    """A dropped box warns in one line (no echoed source line); transformers' weight-loading bar
    stays quiet when a from_pretrained teacher is loaded."""
    from detrkd.cli import main
    from detrkd.data.digits import make_digits_dataset
    from detrkd.models import build_detector, save_detector

    root = tmp_path / "data"
    make_digits_dataset(root, train_images=4, val_images=2, image_size=64)
    ann = root / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    coco["annotations"][0]["bbox"] = [500, 500, 10, 10]  # entirely outside its image: dropped
    ann.write_text(json.dumps(coco))
    save_detector(build_detector("rt_detr", "tiny", 10), tmp_path / "teacher")
    capsys.readouterr()
    code = main(["distill", "--family", "rt_detr", "--preset", "tiny", "--data", str(root), "--no-progress",
                 "--teacher", str(tmp_path / "teacher"), "--output-dir", str(tmp_path / "run"),
                 "--set", "data.image_size=64", "--set", "optim.max_steps=1", "--set", "methods={}"])
    err = capsys.readouterr().err
    assert code == 0, err
    warning = [line for line in err.splitlines() if "warning" in line.lower()]
    assert warning and warning[0].startswith("detrkd: warning: 1 of") and "dropped" in warning[0], err
    assert "warnings.warn" not in err and "UserWarning" not in err
    assert "Loading weights" not in err and "%|" not in err, err
