"""Helpers shared by the benchmark scripts: running detrkd commands, reading run directories."""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
STATS = ("ap", "ap50", "ap75", "aps", "apm", "apl")


def run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


def detrkd(*args: str) -> list[str]:
    return [sys.executable, "-m", "detrkd", *args]


def ensure_trained(command: str, config: Path, run_dir: Path, sets: list[str]) -> str:
    """Run ``detrkd <command> --config <config> --set ...`` to completion (resuming an interrupted
    run, skipping a finished one); returns the command line as a user would type it."""
    args = [command, "--config", str(config), *(x for kv in sets for x in ("--set", kv))]
    args += ["--set", f"output_dir={run_dir.relative_to(ROOT)}"]
    if not (run_dir / "last.pt").exists():
        run(detrkd(*args, "--no-progress"))
    elif not run_finished(run_dir):
        run(detrkd(*args, "--no-progress", "--resume"))
    return shlex.join(["detrkd", *args])


def evaluate_run(run_dir: Path, data: Path) -> tuple[dict[str, Any], str]:
    """(COCO stats of ``run_dir/last.pt`` on the full val split, the command); cached in
    ``run_dir/eval_val.json``."""
    args = ["eval", "--checkpoint", str((run_dir / "last.pt").relative_to(ROOT)), "--data", str(data),
            "--out", str((run_dir / "eval_val.json").relative_to(ROOT))]
    if not (run_dir / "eval_val.json").exists():
        run(detrkd(*args, "--no-progress"))
    return json.loads((run_dir / "eval_val.json").read_text()), shlex.join(["detrkd", *args])


def run_finished(run_dir: Path) -> bool:
    """True if ``metrics.jsonl`` holds the evaluation of the final epoch."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    epochs = config["optim"]["epochs"]
    return any(r.get("type") == "eval" and r.get("epoch") == epochs for r in read_metrics(run_dir))


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def train_minutes(run_dir: Path) -> float:
    """Wall time of the training steps (data loading included, evaluation excluded), from the
    per-window ``sec_per_step`` of ``metrics.jsonl``; exact across resumes."""
    seconds, last_step = 0.0, 0
    for record in read_metrics(run_dir):
        if record.get("type") == "train":
            seconds += record["sec_per_step"] * (record["step"] - last_step)
            last_step = record["step"]
    return seconds / 60


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"




def git_sha() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
