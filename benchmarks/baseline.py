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
import shlex
from pathlib import Path
from typing import Any

import yaml

from detrkd.bench import STATS, detrkd_cmd, ensure_trained, evaluate_run, run, train_minutes
from detrkd.provenance import git_sha, hardware


def role_row(run_dir: Path, stats: dict[str, Any]) -> dict[str, Any]:
    """One role's entry, from the run's resolved ``config.yaml`` and its val ``stats``."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    return {
        "family": config["model"]["family"], "preset": config["model"]["preset"],
        **{k: round(stats[k], 4) for k in STATS},
        "images_per_sec": round(stats["images_per_sec"], 2), "val_images": stats["num_images"],
        "train_minutes": round(train_minutes(run_dir), 1),
        "epochs": config["optim"]["epochs"], "batch_size": config["data"]["batch_size"],
        "image_size": config["data"]["image_size"], "threads": config["threads"],
        "run_dir": str(run_dir),
    }


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
        cmd = detrkd_cmd("data", "digits", "--out", str(args.data))
        run(cmd)
    commands.append(shlex.join(["detrkd", "data", "digits", "--out", str(args.data)]))
    rows = {}
    for role, config in (("teacher", args.teacher), ("student", args.student)):
        run_dir = Path(yaml.safe_load(config.read_text())["output_dir"])
        commands.append(ensure_trained("train", config, run_dir, [f"data.root={args.data}"]))
        stats, eval_command = evaluate_run(run_dir, args.data)
        commands.append(eval_command)
        rows[role] = role_row(run_dir, stats)
    import torch

    threads = sorted({rows[role]["threads"] for role in rows}, key=str)
    result = {**rows, "hardware": hardware(), "threads": threads[0] if len(threads) == 1 else threads,
              "torch": torch.__version__,
              "git_sha": git_sha(),
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
