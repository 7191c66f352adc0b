"""One writer per OUT: an exclusive flock on ``_vlmbatch/lock``, freed by the kernel when its run dies.

The lock file also says who holds it (run id, pid, host, since), for the message a second run gets and
for readers (``inspect``, ``export``) that warn or refuse while a run is writing.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import IO

from tasks.errors import UsageError
from tasks.outputs.layout import STATE_DIR


class OutLock:
    """An exclusive lock on OUT for one run. flock: released by the kernel when the process dies."""

    def __init__(self, out: Path, run_id: str) -> None:
        self.path = out / STATE_DIR / "lock"
        self.run_id = run_id
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            _lock_within(fh, LOCK_PATIENCE_S)
        except BlockingIOError:
            fh.seek(0)
            who = _holder(fh.read())
            fh.close()
            raise UsageError(
                f"--out {self.path.parent.parent} is being written by {who}; wait for it to finish or choose "
                "another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        fh.write(
            json.dumps(
                {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(), "since": since}
            )
        )
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


LOCK_PATIENCE_S = 1.0  # a reader's probe (writer_of) holds the lock shared for a moment: not a run


def _lock_within(fh: IO[str], seconds: float) -> None:
    """flock(LOCK_EX), trying for ``seconds``; BlockingIOError if another still holds it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def writer_of(out: Path) -> str | None:
    """Which run is writing OUT now (its lock is held), or None: for readers (export, inspect), which
    would otherwise read part files as they are rewritten or replaced."""
    try:
        fh = open(out / STATE_DIR / "lock")  # noqa: SIM115 - closed below
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fh.read())
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def _holder(text: str) -> str:
    try:
        info = json.loads(text.strip() or "{}")
        pid, host, since = info.get("pid"), info.get("host"), info.get("since")
        return f"run {info.get('run_id')} (pid {pid} on {host}, since {since})"
    except (ValueError, AttributeError):
        return "another run"
