"""The run directory tells the truth: a refused --resume writes nothing, a changed key is applied
or refused (never only recorded), one run per directory at a time, Ctrl-C saves like SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from detrkd.checkpoint import load_checkpoint
from detrkd.cli import main
from test_interruptions import (REPO, TOTAL_STEPS, digits, start, wait_for_checkpoint,  # noqa: F401 (fixture)
                                write_config)

RUN_FILES = ("config.yaml", "provenance.jsonl", "metrics.jsonl", "last.pt")


def train(*args: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main(["train", "--no-progress", *args])
    finally:
        torch.set_num_threads(threads)


def snapshot(run: Path) -> dict[str, bytes]:
    return {name: (run / name).read_bytes() for name in RUN_FILES if (run / name).exists()}


@pytest.fixture
def stopped_run(tmp_path, digits):
    """A run stopped at optim.max_steps = 2 of 16 (its config, its directory)."""
    config = write_config(tmp_path, digits, "run")
    assert train("--config", str(config), "--set", "optim.max_steps=2") == 0
    return config, tmp_path / "run"


@pytest.mark.parametrize("change,named", [("data.batch_size=4", "batches of"), ("seed=3", "seed (7 -> 3)"),
                                          ("model.num_queries=12", "model.num_queries (10 -> 12)")])
def test_a_refused_resume_changes_nothing(stopped_run, capsys, change, named):
    config, run = stopped_run
    before = snapshot(run)
    capsys.readouterr()
    assert train("--config", str(config), "--resume", "--set", change) == 2
    err = capsys.readouterr().err
    assert named in err and "cannot resume" in err and "Traceback" not in err
    assert snapshot(run) == before


def test_a_changed_learning_rate_is_applied_on_resume_and_recorded(stopped_run, capsys):
    config, run = stopped_run
    assert train("--config", str(config), "--resume", "--set", "optim.lr=1e-3", "--set", "optim.backbone_lr=1e-3",
                 "--set", "optim.max_steps=3") == 0
    state = load_checkpoint(run / "last.pt")
    groups = {g["name"]: g for g in state["optimizer"]["param_groups"]}
    assert groups["main"]["initial_lr"] == groups["backbone"]["initial_lr"] == pytest.approx(1e-3)
    assert state["scheduler"]["base_lrs"][0] == pytest.approx(1e-3)
    assert groups["main"]["lr"] == pytest.approx(1e-3, rel=0.05)  # past its 2 warm-up steps, cosine barely started
    record = json.loads((run / "provenance.jsonl").read_text().splitlines()[-1])
    assert record["resume"] and record["changed"]["optim.lr"] == [1e-4, 1e-3]
    assert "changed: " in capsys.readouterr().err


def holder(run: Path) -> subprocess.Popen:
    """Another process holding ``run``'s lock (as a live run does), until killed."""
    code = ("import sys, time; from detrkd.runlock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True,
                            env={"PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_two_runs_cannot_share_a_directory_and_a_dead_holder_does_not_block(tmp_path, digits, capsys):
    config = write_config(tmp_path, digits, "run")
    run = tmp_path / "run"
    proc = holder(run)
    try:
        assert train("--config", str(config), "--set", "optim.max_steps=1") == 2
        err = capsys.readouterr().err
        assert f"{run} is in use by another run (process {proc.pid}" in err
        assert sorted(p.name for p in run.iterdir()) == [".lock"]  # nothing of the refused run
    finally:
        proc.kill()
        proc.wait()
    assert train("--config", str(config), "--set", "optim.max_steps=1") == 0  # the kernel freed the lock


def test_ctrl_c_saves_last_pt_and_prints_the_resume_command(tmp_path, digits):
    config = write_config(tmp_path, digits, "run")
    last = tmp_path / "run" / "last.pt"
    victim = start(config)
    wait_for_checkpoint(victim, last, after_step=0)
    victim.send_signal(signal.SIGINT)
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err
    assert "stopped by SIGINT" in err and "Traceback" not in err
    assert f"continue with: detrkd train --config {config} --no-progress --resume" in err
    stopped = load_checkpoint(last)["global_step"]
    assert 0 < stopped < TOTAL_STEPS
    assert train("--config", str(config), "--resume") == 0  # and it continues from there to the end
    assert load_checkpoint(last)["global_step"] == TOTAL_STEPS


@pytest.mark.parametrize("family", ["rt_detr", "detr"])
def test_a_diverging_run_is_caught_and_leaves_a_finite_resumable_checkpoint(tmp_path, digits, capsys, family):
    """lr 1e6: the first update blows the activations up, the next forwards give NaN boxes. The
    non-finite guard skips those steps (before transformers' loss would raise on NaN boxes), aborts
    after optim.max_nonfinite_in_row, and last.pt holds finite weights a resume can continue from."""
    config = write_config(tmp_path, digits, "run")
    huge = ["--set", f"model.family={family}", "--set", "optim.lr=1e6", "--set", "optim.backbone_lr=1e6",
            "--set", "checkpoint_every_steps=1", "--set", "optim.max_nonfinite_in_row=3"]
    assert train("--config", str(config), *huge) == 2
    err = capsys.readouterr().err
    assert "non-finite for 3 steps in a row" in err and "Traceback" not in err and "tensor(" not in err
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and records[-1].get("skipped_steps", 0) >= 1 or "skipped" in err
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert train("--config", str(config), "--resume", *huge[:2], "--set", "optim.lr=1e-4",
                 "--set", "optim.backbone_lr=1e-4", "--set", "optim.max_steps=" + str(state["global_step"] + 2)) == 0


def test_nan_detections_at_evaluation_are_named(tmp_path, digits, capsys):
    """DETR at lr 1e3: the training losses stay finite, the BatchNorm statistics do not, so the
    evaluation's detections are NaN: one line saying so, not COCO's 'scores must not be NaN'."""
    config = write_config(tmp_path, digits, "run")
    assert train("--config", str(config), "--set", "model.family=detr", "--set", "optim.lr=1e3",
                 "--set", "optim.backbone_lr=1e3", "--set", "optim.clip_grad=0", "--set", "optim.epochs=1") == 2
    err = capsys.readouterr().err
    assert "detections on image" in err and "NaN / inf" in err and "diverged" in err
