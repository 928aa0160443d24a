"""Checkpoints: atomic writes, clear errors, RNG round trip, weights-only loading."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

import detrkd
from detrkd import checkpoint as ckpt
from detrkd.checkpoint import (CheckpointError, load_checkpoint, load_model_entries, model_entries,
                               rng_state, save_checkpoint, set_rng_state)


def small_state(value: float = 1.0) -> dict:
    return {"model": {"w": torch.full((3,), value)}, "epoch": 2, "global_step": 10,
            "config": {"optim": {"lr": 1e-4}, "seed": None}, "best_metric": None}


def test_round_trip_adds_marker_and_version(tmp_path):
    path = save_checkpoint(tmp_path / "sub" / "last.pt", small_state())
    state = load_checkpoint(path)
    assert state["detrkd_checkpoint"] == ckpt.FORMAT_VERSION
    assert state["detrkd_version"] == detrkd.__version__
    assert torch.equal(state["model"]["w"], torch.ones(3)) and state["config"]["seed"] is None
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temp file left behind


def test_crash_during_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path / "last.pt", small_state(1.0))
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")  # something was written when the crash hit
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_state(2.0))
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # the temp file was removed


def test_write_goes_through_a_temp_file_and_replace(tmp_path, monkeypatch):
    calls = []
    real_replace = ckpt.os.replace
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (calls.append((a, b)), real_replace(a, b)))
    path = save_checkpoint(tmp_path / "x.pt", small_state())
    (src, dst), = calls
    assert str(dst) == str(path) and src != str(path) and str(tmp_path) in str(src)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        load_checkpoint(tmp_path / "nope.pt")


def test_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is not a file"):
        load_checkpoint(tmp_path)


@pytest.mark.parametrize("keep", [0, 10, 0.5, -5])
def test_truncated_file(tmp_path, keep):
    path = save_checkpoint(tmp_path / "last.pt", small_state())
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (keep if keep >= 0 else len(data) + keep)
    path.write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match=str(path)) as err:
        load_checkpoint(path)
    assert any(word in str(err.value) for word in ("empty", "truncated"))


def test_corrupt_content(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", small_state())
    data = bytearray(path.read_bytes())
    start = data.find(b"data.pkl") + 40
    data[start:start + 64] = b"\xff" * 64  # scribble over the pickle, keep the zip directory
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{path}"):
        load_checkpoint(path)


def test_text_file_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pt"
    path.write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(path)


def test_plain_state_dict_is_not_a_detrkd_checkpoint(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(nn.Linear(2, 2).state_dict(), path)
    with pytest.raises(CheckpointError, match="is not a detrkd checkpoint .*plain state_dict"):
        load_checkpoint(path)


class Pickled:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"detrkd_checkpoint": 1, "x": Pickled()}, path)
    with pytest.raises(CheckpointError, match="is not a detrkd checkpoint .*Pickled"):
        load_checkpoint(path)


def test_newer_format_is_refused(tmp_path):
    path = save_checkpoint(tmp_path / "new.pt", {"detrkd_checkpoint": 99})
    with pytest.raises(CheckpointError, match="format 99, newer"):
        load_checkpoint(path)


def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    np.random.randn()  # leave a cached gaussian in numpy's state
    path = save_checkpoint(tmp_path / "rng.pt", {"rng": rng_state()})
    expected = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    set_rng_state(load_checkpoint(path)["rng"])
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == expected


def test_model_entries_for_plain_modules(tmp_path):
    src, dst = nn.Linear(3, 2), nn.Linear(3, 2)
    entries = model_entries(src)
    assert entries["family"] is None and entries["hf_config"] is None
    load_model_entries(dst, load_checkpoint(save_checkpoint(tmp_path / "m.pt", entries)))
    assert torch.equal(src.weight, dst.weight)
