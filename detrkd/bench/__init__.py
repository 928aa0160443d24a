"""Benchmarks: accuracy suites (``detrkd bench accuracy``), step-time overhead (``detrkd bench
overhead``) and the public helpers the scripts in ``benchmarks/`` build on.

    from detrkd.bench import Pair, fixed_batch, detector_on_split, ensure_trained, evaluate_run

Names are imported on first use (the accuracy suites are read by ``detrkd --help``, which starts
without torch; the overhead helpers need it).
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> module that defines it
EXPORTS: dict[str, str] = {
    **dict.fromkeys(("PRESETS", "SETTINGS", "SUITES", "run_suite"), "detrkd.bench.accuracy"),
    **dict.fromkeys(("Pair", "fixed_batch", "step_fn", "run_overhead", "time_round_robin"), "detrkd.bench.overhead"),
    **dict.fromkeys(("STATS", "detrkd_cmd", "ensure_trained", "evaluate_run", "run", "train_minutes",
                     "read_metrics"), "detrkd.bench.runs"),
    **dict.fromkeys(("detector_on_split", "load_for_inference"), "detrkd.inference"),
}
__all__ = sorted(EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in EXPORTS:
        raise AttributeError(f"module 'detrkd.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)
