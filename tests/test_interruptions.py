"""A real ``detrkd train`` process stopped by SIGTERM, resumed, killed by SIGKILL, resumed again,
ends with the weights of an uninterrupted run; ``--seed`` runs repeat bit-for-bit."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from detrkd.checkpoint import CheckpointError, load_checkpoint
from detrkd.cli import main

REPO = Path(__file__).resolve().parents[1]
TOTAL_STEPS = 16  # 16 images, batch 2, 2 epochs


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    from detrkd.data.digits import make_digits_dataset

    out = tmp_path_factory.mktemp("digits")
    make_digits_dataset(out, train_images=16, val_images=2, image_size=64)
    return out


def write_config(tmp_path: Path, digits: Path, name: str) -> Path:
    """rt_detr tiny with denoising and random flips (both use the RNG), a checkpoint every 2 steps."""
    config = {"model": {"family": "rt_detr", "preset": "tiny", "num_queries": 10},
              "data": {"root": str(digits), "image_size": 64, "batch_size": 2},
              "optim": {"epochs": 2, "warmup_steps": 2}, "output_dir": str(tmp_path / name),
              "log_every_steps": 1, "checkpoint_every_steps": 2, "threads": 1, "seed": 7}
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config))
    return path


def start(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "detrkd", "train", "--config", str(config), "--no-progress",
                             *extra], env=env, cwd=config.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc: subprocess.Popen, path: Path, after_step: int) -> None:
    """Poll until ``path`` holds a checkpoint past ``after_step``. Writes are atomic renames, so a
    new file is a new inode: only then is it read (reading every time would slow the polling)."""
    deadline, seen = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it could be interrupted: {proc.communicate()}"
        try:
            stat = path.stat()
        except FileNotFoundError:
            stat = None
        if stat is not None and (stat.st_ino, stat.st_mtime_ns) != seen:
            seen = (stat.st_ino, stat.st_mtime_ns)
            if load_checkpoint(path)["global_step"] > after_step:
                return
        time.sleep(0.01)
    raise AssertionError(f"no checkpoint past step {after_step} in {path}")


def assert_same_run(a: Path, b: Path) -> None:
    """Same weights, optimizer moments and log (timings aside)."""
    last_a, last_b = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert last_a["global_step"] == last_b["global_step"] == TOTAL_STEPS
    for name, value in last_a["model"].items():
        assert torch.equal(value, last_b["model"][name]), name
    for key, state in last_a["optimizer"]["state"].items():
        assert torch.equal(state["exp_avg_sq"], last_b["optimizer"]["state"][key]["exp_avg_sq"])

    def log(run: Path) -> list[dict]:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(x).items() if "sec" not in k} for x in lines]

    assert log(a) == log(b)


def test_sigterm_then_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, digits, capsys):
    reference = start(write_config(tmp_path, digits, "reference"))
    config = write_config(tmp_path, digits, "run")
    last = tmp_path / "run" / "last.pt"

    victim = start(config)  # 1. SIGTERM: finish the step, write last.pt, exit 143
    wait_for_checkpoint(victim, last, after_step=0)
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 143, err
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    stopped = load_checkpoint(last)
    assert 0 < stopped["global_step"] < TOTAL_STEPS and stopped["batch_in_epoch"] > 0

    victim = start(config, "--resume")  # 2. SIGKILL: no chance to clean up
    wait_for_checkpoint(victim, last, after_step=stopped["global_step"])
    victim.kill()
    victim.communicate(timeout=60)
    assert victim.returncode == -signal.SIGKILL
    killed = load_checkpoint(last)["global_step"]
    assert stopped["global_step"] < killed < TOTAL_STEPS

    threads = torch.get_num_threads()  # 3. to the end, in this process (saves a start-up)
    try:
        code = main(["train", "--config", str(config), "--no-progress", "--resume"])
    finally:
        torch.set_num_threads(threads)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert f"done: {TOTAL_STEPS} steps" in out and f"(step {killed})" in err
    out, err = reference.communicate(timeout=180)
    assert reference.returncode == 0, err
    assert_same_run(tmp_path / "reference", tmp_path / "run")


def test_resume_from_a_truncated_checkpoint_is_a_clear_error(tmp_path, digits, capsys):
    config = write_config(tmp_path, digits, "run")
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(config, run / "config.yaml")
    (run / "last.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 100)  # a write cut short
    code = main(["train", "--resume", "--output-dir", str(run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and f"{run / 'last.pt'}" in err and "truncated" in err
    with pytest.raises(CheckpointError):
        load_checkpoint(run / "last.pt")


def test_seed_makes_a_cpu_run_repeat_bit_for_bit(tmp_path, digits, capsys):
    def train(name: str, seed: int) -> dict:
        args = ["train", "--config", str(write_config(tmp_path, digits, name)), "--seed", str(seed),
                "--set", "optim.max_steps=3", "--set", "threads=null", "--no-progress"]
        assert main(args) == 0, capsys.readouterr().err
        return load_checkpoint(tmp_path / name / "last.pt")["model"]

    threads = torch.get_num_threads()
    a, b, c = train("a", 3), train("b", 3), train("c", 4)
    assert torch.get_num_threads() == threads
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
