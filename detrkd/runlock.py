"""One run per directory: an exclusive lock on ``run_dir/.lock`` for the life of a run.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when the holding process
ends, however it ends (crash, SIGKILL): a stale ``.lock`` file never blocks a later run. The
file's text (pid, host, start time) is only there to name the holder in the refusal. ``flock``
locks are per machine on most network file systems: two runs on different nodes writing to one
shared directory are not caught.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import IO, Any

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """``with RunLock(run_dir):`` holds ``run_dir/.lock`` (the directory is created) or raises
    ``RunLocked`` naming the directory and the holding process."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._file: IO[str] | None = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder(handle)
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunLocked(f"{self.run_dir} is in use by another run ({holder}); wait for it to end "
                            f"or use another output directory") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": datetime.datetime.now().isoformat(timespec="seconds")}) + "\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _holder(handle: IO[str]) -> str:
    """'process 123 on host, since ...' from a lock file's text (or 'a process' if unreadable)."""
    handle.seek(0)
    try:
        info = json.loads(handle.read() or "{}")
        return f"process {info['pid']} on {info['host']}, since {info['since']}"
    except (ValueError, KeyError):
        return "a process whose lock file is unreadable"
