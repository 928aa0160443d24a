"""QSKD evidence on the digits data: QSKD vs the no-KD student, and AGFD / LAPD alone.

Needs the baseline runs (``python benchmarks/baseline.py``): its teacher is the teacher, its
student is the no-KD row (same config, schedule, seed and data order as every distilled run).
Each distilled run is ``detrkd distill --config configs/digits_qskd.yaml`` with its ``methods``
overridden; finished runs are skipped, interrupted ones resumed. Writes
``benchmarks/results/qskd.json`` (rows: method, ap, ap50, ap75, aps, apm, apl, teacher_ap,
student_ap, train_minutes, command) and a markdown table next to it.

Usage: python benchmarks/qskd.py [--only qskd agfd_only ...] [--data data/digits]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from common import ROOT, STATS, ensure_trained, evaluate_run, git_sha, hardware, train_minutes

CONFIG = Path("configs/digits_qskd.yaml")
# row name -> methods override (the config's own methods are the paper's default: "qskd")
ROWS: dict[str, dict[str, Any] | None] = {
    "qskd": None,
    "agfd_only": {"agfd": {"weight": 50.0}},
    "lapd_only": {"lapd": {"weight": 1.0}},
}


def row(method: str, run_dir: Path, stats: dict[str, Any], teacher_ap: float, student_ap: float,
        commands: list[str]) -> dict[str, Any]:
    gap = teacher_ap - student_ap
    return {"method": method, **{k: round(stats[k], 4) for k in STATS},
            "teacher_ap": round(teacher_ap, 4), "student_ap": round(student_ap, 4),
            "gap_closed": round((stats["ap"] - student_ap) / gap, 3) if gap > 0 else None,
            "train_minutes": round(train_minutes(run_dir), 1),
            "threads": yaml.safe_load((run_dir / "config.yaml").read_text())["threads"],
            "run_dir": str(run_dir.relative_to(ROOT)), "command": commands}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | AP | AP50 | AP75 | APs | APm | APl | gap closed | train min |", "|" + "---|" * 9]
    for r in rows:
        gap = "" if r["gap_closed"] is None else f"{r['gap_closed']:.2f}"
        cells = [r["method"], *(f"{r[k]:.3f}" for k in STATS), gap, f"{r['train_minutes']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/digits"))
    parser.add_argument("--baseline", type=Path, default=Path("benchmarks/results/baseline.json"))
    parser.add_argument("--only", nargs="*", choices=sorted(ROWS), help="run only these rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/qskd.json"))
    args = parser.parse_args()
    baseline = json.loads(args.baseline.read_text())
    teacher_dir, student_dir = (ROOT / baseline[r]["run_dir"] for r in ("teacher", "student"))
    teacher_stats, teacher_eval = evaluate_run(teacher_dir, args.data)
    student_stats, student_eval = evaluate_run(student_dir, args.data)
    t_ap, s_ap = teacher_stats["ap"], student_stats["ap"]
    rows = [row("teacher", teacher_dir, teacher_stats, t_ap, s_ap, baseline["command"][:3]),
            row("no_kd", student_dir, student_stats, t_ap, s_ap, baseline["command"][3:])]
    for name in args.only or ROWS:
        run_dir = ROOT / "runs" / f"digits_{name}"
        sets = [f"data.root={args.data}", f"teacher={(teacher_dir / 'last.pt').relative_to(ROOT)}"]
        if ROWS[name] is not None:
            sets.append("methods=" + json.dumps(ROWS[name]))
        command = ensure_trained("distill", CONFIG, run_dir, sets)
        stats, eval_command = evaluate_run(run_dir, args.data)
        rows.append(row(name, run_dir, stats, t_ap, s_ap, [command, eval_command]))
    result = {"rows": rows, "hardware": hardware(), "git_sha": git_sha(), "script": "python benchmarks/qskd.py"}
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    args.out.with_name(args.out.stem + "_meta.json").write_text(
        json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2) + "\n")
    table = markdown(rows)
    args.out.with_suffix(".md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
