"""Running ``detrkd`` commands for the benchmarks and reading their run directories.

Every benchmark run is a real ``detrkd train`` / ``detrkd distill`` subprocess (the command a user
would type, recorded next to the result), so a run is isolated (threads, memory) and can be resumed:
a finished run is reused, an interrupted one is continued with ``--resume``.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from ..provenance import PROVENANCE_FILE

STATS = ("ap", "ap50", "ap75", "aps", "apm", "apl")
RAW_OUTPUTS = ("config.yaml", "metrics.jsonl", "eval_val.json")  # what a result table keeps of each run


def run(cmd: Sequence[str], cwd: Path | None = None) -> None:
    """Run a command, echoing it; raises ``CalledProcessError`` on failure."""
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(list(cmd), check=True, cwd=cwd)


def detrkd_cmd(*args: str) -> list[str]:
    """``python -m detrkd ARGS`` with this interpreter."""
    return [sys.executable, "-m", "detrkd", *args]


def shown(args: Sequence[str]) -> str:
    """The command line as a user types it (``detrkd ...``)."""
    return shlex.join(["detrkd", *args])


class RowBusy(RuntimeError):
    """Another process is training this run directory now (it holds the run's lock)."""


def is_busy(run_dir: Path) -> bool:
    """True if a live process holds ``run_dir``'s lock (``detrkd.runlock``); never creates it."""
    from detrkd.runlock import RunLock, RunLocked

    if not (run_dir / ".lock").exists():
        return False
    lock = RunLock(run_dir)
    try:
        lock.acquire()
    except RunLocked:
        return True
    lock.release()
    return False


def wait_until_free(run_dir: Path, poll_seconds: float = 60.0) -> None:
    """Block while another process trains ``run_dir`` (e.g. a second ``bench`` started on the same rows)."""
    if is_busy(run_dir):
        print(f"+ waiting for {run_dir}: another process is training it", flush=True)
        while is_busy(run_dir):
            time.sleep(poll_seconds)


def ensure_trained(command: str, config: Path, run_dir: Path, sets: Sequence[str]) -> str:
    """Run ``detrkd <command> --config <config> --set ...`` to completion in ``run_dir`` (resuming
    an interrupted run, skipping a finished one); returns the command line. ``RowBusy`` when
    another process is training ``run_dir`` (before or as this one starts)."""
    args = [command, "--config", str(config), *(x for kv in sets for x in ("--set", kv)),
            "--set", f"output_dir={run_dir}"]
    if is_busy(run_dir):
        raise RowBusy(str(run_dir))
    resume = (run_dir / "last.pt").exists()
    if (resume or (run_dir / RESTORED_FILE).exists()) and run_finished(run_dir):
        return shown(args)
    try:
        run(detrkd_cmd(*args, "--no-progress", *(["--resume"] if resume else [])))
    except subprocess.CalledProcessError as exc:
        if exc.returncode == 2 and is_busy(run_dir):  # taken between the check and the start
            raise RowBusy(str(run_dir)) from None
        raise
    return shown(args)


RESTORED_FILE = "restored.json"  # in a run directory rebuilt from committed raw outputs (no checkpoint)


def trained_in(records: Sequence[dict[str, Any]]) -> set[str]:
    """The output directories the provenance ``records`` of a run were trained in (``--set
    output_dir=DIR`` / ``--output-dir DIR`` of each start and resume)."""
    dirs = set()
    for record in records:
        argv = record.get("argv", [])
        for i, arg in enumerate(argv):
            if arg.startswith("output_dir="):
                dirs.add(arg.split("=", 1)[1])
            elif arg == "--output-dir" and i + 1 < len(argv):
                dirs.add(argv[i + 1])
    return dirs


def restore_run(run_dir: Path, raw_dirs: Sequence[Path], tag: str, torch_version: str) -> Path | None:
    """Rebuild a finished run's directory from its raw outputs (``<raw dir>/<tag>_<file>``, as the
    result tables keep them) when ``run_dir`` holds no run: only from a run trained in this very
    directory on this torch (its provenance says so), and only finished. The directory gets the run
    files and its evaluation, no checkpoint, and ``restored.json`` saying where they came from.
    Returns the raw directory used, or None (nothing written)."""
    if (run_dir / "config.yaml").exists() or (run_dir / "last.pt").exists():
        return None
    for raw in raw_dirs:
        files = {name: raw / f"{tag}_{name}" for name in (*RAW_OUTPUTS, PROVENANCE_FILE)}
        if not all(f.is_file() for f in files.values()):
            continue
        records = read_jsonl(files[PROVENANCE_FILE])
        if trained_in(records) != {str(run_dir)} or {r.get("torch") for r in records} != {torch_version}:
            continue
        if not reaches_last_epoch(yaml.safe_load(files["config.yaml"].read_text()), read_jsonl(files["metrics.jsonl"])):
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, src in files.items():
            shutil.copyfile(src, run_dir / name)
        (run_dir / RESTORED_FILE).write_text(json.dumps(
            {"from": str(raw), "files": sorted(str(f) for f in files.values()),
             "note": "rebuilt from the committed raw outputs of a finished run; its checkpoint was not kept"},
            indent=2) + "\n")
        return raw
    return None


def evaluate_run(run_dir: Path, data: Path, checkpoint: Path | None = None) -> tuple[dict[str, Any], str]:
    """(COCO stats of ``checkpoint`` (default ``run_dir/last.pt``) on the full val split, the
    command); cached in ``run_dir/eval_val.json``."""
    out = run_dir / "eval_val.json"
    args = ["eval", "--checkpoint", str(checkpoint or run_dir / "last.pt"), "--data", str(data), "--out", str(out)]
    if not out.exists():
        run(detrkd_cmd(*args, "--no-progress"))
    return json.loads(out.read_text()), shown(args)


def run_config(run_dir: Path) -> dict[str, Any]:
    """The resolved ``config.yaml`` a run wrote."""
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def run_finished(run_dir: Path) -> bool:
    """True if ``metrics.jsonl`` holds the evaluation of the final epoch."""
    return reaches_last_epoch(run_config(run_dir), read_metrics(run_dir))


def reaches_last_epoch(config: dict[str, Any], metrics: Sequence[dict[str, Any]]) -> bool:
    """True if the ``metrics`` records hold the evaluation of the ``config``'s final epoch."""
    epochs = config["optim"]["epochs"]
    return any(r.get("type") == "eval" and r.get("epoch") == epochs for r in metrics)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "metrics.jsonl")


def eval_curve(run_dir: Path) -> list[list[float]]:
    """[epoch, AP] of the periodic evaluations in ``metrics.jsonl``."""
    return [[r["epoch"], round(r["ap"], 4)] for r in read_metrics(run_dir) if r.get("type") == "eval"]


def train_minutes(run_dir: Path) -> float:
    """Wall time of the training steps (data loading included, evaluation excluded), from the
    per-window ``sec_per_step`` of ``metrics.jsonl``; exact across resumes."""
    seconds, last_step = 0.0, 0
    for record in read_metrics(run_dir):
        if record.get("type") == "train":
            seconds += record["sec_per_step"] * (record["step"] - last_step)
            last_step = record["step"]
    return seconds / 60
