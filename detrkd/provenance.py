"""Where a result came from: the code version, the software and the machine.

Every ``detrkd train`` / ``detrkd distill`` start (and every ``--resume``) appends one record to
the run directory's ``provenance.jsonl``, so a run resumed under other code says so, and benchmark
tables can name the code each row was trained with (not only the code that wrote the table).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROVENANCE_FILE = "provenance.jsonl"
RUN_FILES = ("config.yaml", "metrics.jsonl", PROVENANCE_FILE)  # how a run was trained (what a shipped model carries)
_PACKAGE_DIR = Path(__file__).resolve().parent


def git_sha(path: Path = _PACKAGE_DIR) -> str:
    """Short commit of the git checkout holding ``path`` (default: this package), with ``+dirty``
    when tracked files differ from it; ``unknown`` outside a checkout (e.g. an installed wheel)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        sha = git("rev-parse", "--short", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def hardware() -> str:
    """CPU model, core count and OS (plus the CUDA device when there is one)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} logical cores, {platform.system()} {platform.release()}"
    import torch

    if torch.cuda.is_available():
        text += f"; {torch.cuda.get_device_name()}"
    return text


def run_record(resume: bool, world_size: int = 1) -> dict[str, Any]:
    """One ``provenance.jsonl`` record for a run starting (or resuming) now."""
    import torch
    import transformers

    from detrkd import __version__

    return {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "resume": resume, "git_sha": git_sha(),
            "detrkd": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "world_size": world_size, "hardware": hardware(), "argv": sys.argv}


def append_run_record(run_dir: Path, resume: bool, world_size: int = 1,
                      changed: dict[str, list[Any]] | None = None) -> None:
    """Append ``run_record`` to ``run_dir/provenance.jsonl``; ``changed``: the config keys a resume
    changed ({key: [old, new]}, applied), recorded when there are any."""
    record = run_record(resume, world_size)
    if changed:
        record["changed"] = changed
    with open(run_dir / PROVENANCE_FILE, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")


def resume_command() -> str:
    """This process's command line with ``--resume`` (the way to continue an interrupted run), as a
    user types it (``detrkd ...`` for the CLI and ``python -m detrkd``)."""
    prog = "detrkd" if Path(sys.argv[0]).name in ("detrkd", "__main__.py") else sys.argv[0]
    return shlex.join([prog, *(a for a in sys.argv[1:] if a != "--resume"), "--resume"])


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/provenance.jsonl``, one per start / resume ([] when not recorded)."""
    path = run_dir / PROVENANCE_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_git_shas(run_dir: Path) -> list[str]:
    """The distinct code versions a run was trained with, in order ([] when not recorded)."""
    return list(dict.fromkeys(r["git_sha"] for r in read_records(run_dir)))


def read_commands(run_dir: Path) -> list[str]:
    """The command lines that trained a run, as typed (``detrkd distill ...``), one per start /
    resume in order ([] when not recorded): what actually ran, whoever started it."""
    return [shlex.join(["detrkd", *r["argv"][1:]]) for r in read_records(run_dir)]
