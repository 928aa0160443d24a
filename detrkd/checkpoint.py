"""Atomic checkpoint files and the training state they carry.

A detrkd checkpoint is a ``torch.save`` dict with the marker key ``"detrkd_checkpoint"`` (the
format version) and, as written by the training engine:

================  ===============================================================================
key               value
================  ===============================================================================
model             the trained model's ``state_dict``; for a ``DetrAdapter`` the wrapped HF
                  model's (``adapter.model.state_dict()``, loadable by transformers alone)
family            adapter family name (``detrkd.models.ADAPTERS`` key); None for other modules
hf_config         the HF config as a plain dict (``config.to_dict()``), to rebuild without the yaml
                  (a torchvision CNN student: its ``models.cnn.CnnConfig`` dict)
extra_modules     {name: state_dict} of further trained modules (distillation heads), may be empty
optimizer         optimizer ``state_dict``
scheduler         LR scheduler ``state_dict``
epoch             the epoch in progress (0-based)
global_step       steps done in total
batch_in_epoch    batches of ``epoch`` already consumed (resume skips them)
rng               {"python": ..., "numpy": ..., "torch": ..., "cuda": ...} generator states
config            the resolved run config as a plain dict
detrkd_version    ``detrkd.__version__`` of the writer
best_metric       best val AP so far (None before the first evaluation)
================  ===============================================================================

``detrkd.models.load_detector(path)`` rebuilds a detector from ``family`` + ``hf_config`` + ``model``.
Everything is stored as tensors and plain Python values, so files load with
``torch.load(weights_only=True)`` (no pickled code). Writes go to a temporary file in the same
directory, are fsync'ed and then renamed over the target (``os.replace``): a crash mid-write leaves
the previous checkpoint intact.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

import detrkd
from detrkd.errors import CheckpointError  # noqa: F401 (re-exported)

FORMAT_VERSION = 1
MARKER = "detrkd_checkpoint"
LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus the format marker and detrkd version) to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {MARKER: FORMAT_VERSION, "detrkd_version": detrkd.__version__, **state}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _fsync_dir(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _fsync_dir(directory: Path) -> None:
    """Make the rename durable (best effort; not supported on every OS / filesystem)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a detrkd checkpoint; raises ``CheckpointError`` saying what is wrong with ``path``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the write was interrupted")
    state = _torch_load(path, map_location)
    if not isinstance(state, dict) or MARKER not in state:
        what = "a plain state_dict" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path} is not a detrkd checkpoint (it holds {what}, no {MARKER!r} marker)")
    if state[MARKER] > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {state[MARKER]}, newer than this detrkd supports "
            f"({FORMAT_VERSION}); written by detrkd {state.get('detrkd_version')}"
        )
    return state


def _torch_load(path: Path, map_location: str | torch.device) -> Any:
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint file (no zip directory found)"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"a pickled {found.group(1)}" if found else "pickled Python objects"
        raise CheckpointError(f"{path} is not a detrkd checkpoint (it holds {what})") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is corrupt or truncated: {first}") from exc


# ---- model weights -----------------------------------------------------------------------
def model_entries(model: torch.nn.Module) -> dict[str, Any]:
    """``model`` / ``family`` / ``hf_config`` / ``pixels`` (how its inputs were made) entries for a
    detector adapter or any module."""
    family = getattr(model, "family", None)
    inner = getattr(model, "model", None)
    if isinstance(family, str) and isinstance(inner, torch.nn.Module) and hasattr(model, "config"):
        pixels = getattr(model, "pixels", None)
        return {"model": inner.state_dict(), "family": family, "hf_config": model.config.to_dict(),
                "pixels": None if pixels is None else pixels.as_dict()}
    return {"model": model.state_dict(), "family": None, "hf_config": None}


def load_model_entries(model: torch.nn.Module, state: dict[str, Any]) -> None:
    """Load the weights ``model_entries`` saved back into ``model`` (strict)."""
    if state.get("family") is not None:
        model.model.load_state_dict(state["model"])  # type: ignore[union-attr]
    else:
        model.load_state_dict(state["model"])


# ---- RNG state ----------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states, as tensors and plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": _to_plain(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` captured."""
    random.setstate(_to_tuple(state["python"]))
    np_state = state["numpy"]
    keys = np_state["keys"].cpu().numpy().astype(np.uint32)
    np.random.set_state((np_state["kind"], keys, np_state["pos"], np_state["has_gauss"],
                         np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _to_plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value
