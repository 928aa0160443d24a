"""``detrkd export``: a run directory or checkpoint -> a transformers ``from_pretrained`` directory.

The directory holds what ``save_pretrained`` writes (``config.json`` with ``id2label``, weights as
safetensors), the image processor of detrkd's preprocessing (``preprocessor_config.json``,
``models.processors``) and ``detrkd_export.json``: where the weights came from (checkpoint, step, the run's
config and its ``provenance.jsonl`` records: commit, versions, command lines). detrkd loads it as a
teacher, a student's ``model.pretrained`` or a ``--checkpoint``; transformers loads it alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from detrkd.checkpoint import BEST, LAST, CheckpointError, load_checkpoint, load_model_entries
from detrkd.provenance import RUN_FILES, git_sha, read_records

EXPORT_INFO = "detrkd_export.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_checkpoint(path: Path) -> Path:
    """A run directory's ``best.pt`` (else ``last.pt``), or ``path`` itself when it is a file."""
    if path.is_dir():
        for name in (BEST, LAST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a directory without {BEST} or {LAST}: not a detrkd run directory")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _usual_modes(directory: Path) -> None:
    """The modes a hand-made directory would have (mkdtemp makes it 0700, safetensors its file 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def export_checkpoint(source: Path, out: Path, dtype: str = "float32", command: str | None = None,
                      run_files: bool = False) -> dict[str, Any]:
    """Write ``source`` (run dir or .pt) as a ``from_pretrained`` directory ``out`` (created; it
    must not hold files yet), weights in ``dtype``; atomic: written beside and renamed. Returns
    the ``detrkd_export.json`` record (``command``: the export's own command line, recorded).
    ``run_files``: also copy the run's ``RUN_FILES`` (a shipped teacher's evidence)."""
    from detrkd.models import detector_from_state, save_detector
    from detrkd.models.processors import checkpoint_pixels

    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty: choose another --out")
    checkpoint = resolve_checkpoint(Path(source))
    state = load_checkpoint(checkpoint)
    if state.get("family") is None or state.get("hf_config") is None:
        raise CheckpointError(f"{checkpoint} holds no detector (no family / hf_config)")
    model = detector_from_state(state["family"], state["hf_config"])
    load_model_entries(model, state)
    run_dir = checkpoint.parent
    record = {"source": str(checkpoint), "global_step": state.get("global_step"), "family": state["family"],
              "dtype": dtype, "exported_at_git": git_sha(), "config": state.get("config"),
              "provenance": read_records(run_dir), "command": command}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.model.to(DTYPES[dtype])
        model.pixels = checkpoint_pixels(state)
        save_detector(model, staging)  # with the image processor of its pixels
        (staging / EXPORT_INFO).write_text(json.dumps(record, indent=2, default=str) + "\n")
        for name in RUN_FILES if run_files else ():
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, staging / name)
        _usual_modes(staging)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
