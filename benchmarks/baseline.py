"""The baseline table: a teacher preset and a student preset trained on the digits data.

Runs (each step skipped when its output already exists, so an interrupted run resumes):
  1. ``detrkd data digits --out DATA``                      (if DATA is missing)
  2. ``detrkd train --config TEACHER_CFG``                   (``--resume`` if a run dir exists)
  3. ``detrkd train --config STUDENT_CFG``                   (same schedule)
  4. ``detrkd eval --checkpoint RUN/last.pt --out RUN/eval_val.json``  (full val split)
and writes ``benchmarks/results/baseline.json`` plus a markdown table next to it.

Usage: python benchmarks/baseline.py [--data data/digits] [--teacher configs/digits_teacher.yaml]
           [--student configs/digits_student.yaml] [--out benchmarks/results/baseline.json]
"""

from __future__ import annotations

import argparse
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


def train_commands(config: Path, run_dir: Path, data: Path) -> list[list[str]]:
    """The command that (re)starts a run, or none if its last checkpoint is final."""
    base = detrkd("train", "--config", str(config), "--set", f"data.root={data}", "--no-progress")
    if not (run_dir / "last.pt").exists():
        return [base]
    if run_finished(run_dir):
        return []
    return [base + ["--resume"]]


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


def role_row(run_dir: Path) -> dict[str, Any]:
    """One role's entry, from the run's resolved ``config.yaml`` and ``eval_val.json``."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    stats = json.loads((run_dir / "eval_val.json").read_text())
    return {
        "family": config["model"]["family"], "preset": config["model"]["preset"],
        **{k: round(stats[k], 4) for k in STATS},
        "images_per_sec": round(stats["images_per_sec"], 2), "val_images": stats["num_images"],
        "train_minutes": round(train_minutes(run_dir), 1),
        "epochs": config["optim"]["epochs"], "batch_size": config["data"]["batch_size"],
        "image_size": config["data"]["image_size"], "threads": config["threads"],
        "run_dir": str(run_dir.relative_to(ROOT)),
    }


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


def markdown(result: dict[str, Any]) -> str:
    head = "| role | family | preset | AP | AP50 | AP75 | APs | APm | APl | train min |"
    lines = [head, "|" + "---|" * 10]
    for role in ("teacher", "student"):
        r = result[role]
        cells = [role, r["family"], r["preset"], *(f"{r[k]:.3f}" for k in STATS), f"{r['train_minutes']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/digits"))
    parser.add_argument("--teacher", type=Path, default=Path("configs/digits_teacher.yaml"))
    parser.add_argument("--student", type=Path, default=Path("configs/digits_student.yaml"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/baseline.json"))
    args = parser.parse_args()
    commands: list[str] = []
    if not (args.data / "annotations" / "instances_val.json").exists():
        cmd = detrkd("data", "digits", "--out", str(args.data))
        run(cmd)
    commands.append(shlex.join(["detrkd", "data", "digits", "--out", str(args.data)]))
    rows = {}
    for role, config in (("teacher", args.teacher), ("student", args.student)):
        run_dir = ROOT / yaml.safe_load(config.read_text())["output_dir"]
        for cmd in train_commands(config, run_dir, args.data):
            run(cmd)
        commands.append(shlex.join(["detrkd", "train", "--config", str(config)]))
        eval_cmd = detrkd("eval", "--checkpoint", str(run_dir / "last.pt"), "--data", str(args.data),
                          "--out", str(run_dir / "eval_val.json"), "--no-progress")
        if not (run_dir / "eval_val.json").exists():
            run(eval_cmd)
        commands.append(shlex.join(["detrkd", *eval_cmd[3:]]))
        rows[role] = role_row(run_dir)
    import torch

    threads = sorted({rows[role]["threads"] for role in rows}, key=str)
    result = {**rows, "hardware": hardware(), "threads": threads[0] if len(threads) == 1 else threads,
              "torch": torch.__version__,
              "git_sha": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                        capture_output=True, text=True).stdout.strip(),
              "command": commands, "script": "python benchmarks/baseline.py"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    gap = rows["teacher"]["ap"] - rows["student"]["ap"]
    print(f"teacher - student AP gap: {gap * 100:.1f} points")


if __name__ == "__main__":
    main()
