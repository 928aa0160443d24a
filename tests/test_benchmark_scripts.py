"""Every script in benchmarks/ imports (names it uses from detrkd still exist) and does nothing
heavy at import time: its work is behind ``if __name__ == "__main__"``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def test_there_are_scripts():
    assert len(SCRIPTS) >= 5


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_benchmark_script_imports(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # scripts import their siblings, as when run from there
    spec = importlib.util.spec_from_file_location(f"bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert callable(getattr(module, "main", None)), f"{script.name} has no main()"
    sys.modules.pop(spec.name, None)


def test_grad_share_is_the_summed_step_along_the_detection_gradient(monkeypatch):
    """benchmarks/grad_share.py: norms and cosines of each term's gradient, and the det share of
    the summed step (cos of the sum with the detection gradient), on gradients known by hand."""
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from grad_share import batch_shares

    p = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
    shares = batch_shares({"det/loss": 3 * p[0], "kd/l1": 4 * p[1], "kd/against": -0.5 * p[0]}, [p])
    assert shares["det/loss"] == pytest.approx((3.0, 1.0))
    assert shares["kd/l1"] == pytest.approx((4.0, 0.0))  # orthogonal to the detection gradient
    assert shares["kd/against"] == pytest.approx((0.5, -1.0))
    assert shares["total"] == pytest.approx(((2.5 ** 2 + 16) ** 0.5, 2.5 / (2.5 ** 2 + 16) ** 0.5))
    sys.modules.pop("grad_share", None)
