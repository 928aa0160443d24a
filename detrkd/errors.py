"""The errors the ``detrkd`` command turns into one line and an exit status (no torch import, so
that ``detrkd --help`` starts fast)."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or not a detrkd checkpoint."""


class TrainingError(RuntimeError):
    """Training cannot start or continue (bad run directory, resume mismatch, ...)."""


class NonFiniteLossError(TrainingError):
    """The loss (or gradient) was non-finite for ``max_nonfinite_in_row`` steps in a row."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after writing ``last.pt``; ``--resume`` continues it.
    ``signum``: the signal (None when another process of a data-parallel run received it)."""

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum
