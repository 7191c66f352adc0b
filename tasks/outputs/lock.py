"""One writer per OUT: an exclusive flock on ``_vlmbatch/lock``, freed by the kernel when its run dies.

The lock file also says who holds it (run id, pid, host, since), for the message a second run gets and
for readers (``inspect``, ``export``) that warn or refuse while a run is writing. A writer of one scope
of OUT (tasks/outputs/layout.py) locks ``_vlmbatch/lock-<scope>`` instead. OUT on an object store has
no flock: its writer holds a lease (tasks/outputs/lease.py); ``writer_lock`` and ``writer_of`` choose.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from tasks.errors import UsageError
from tasks.outputs.layout import OUT_SCOPE, STATE_DIR, check_scope
from tasks.outputs.lease import Lease, live_holders
from tasks.outputs.object_path import ObjectPath, OutPath


class OutLock:
    """An exclusive lock on OUT (or one scope of it) for one run. flock: released by the kernel when the
    process dies."""

    def __init__(self, out: Path, run_id: str, scope: str = OUT_SCOPE) -> None:
        name = "lock" if scope == OUT_SCOPE else f"lock-{check_scope(scope)}"
        self.path = out / STATE_DIR / name
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
        if (other := self._other_kind()) is not None:  # checked holding ours: two cannot both miss
            self.release()
            raise UsageError(
                f"--out {self.path.parent.parent} is being written by {other}; wait for it to finish or "
                "choose another --out"
            )

    def _other_kind(self) -> str | None:
        """A live writer that excludes this one: of one scope, for the whole-OUT writer; the whole-OUT
        writer, for a writer of one scope."""
        state = self.path.parent
        others = sorted(state.glob("lock-*")) if self.path.name == "lock" else [state / "lock"]
        return next((who for lock in others if (who := _held(lock)) is not None), None)

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


def writer_lock(
    out: OutPath, run_id: str, scope: str = OUT_SCOPE, on_lost: Callable[[str], None] | None = None
) -> OutLock | Lease:
    """The lock of a run writing OUT: flock on a local OUT, a lease on an object store (``on_lost`` is
    called, from another thread, if the lease is lost while the run holds it)."""
    if isinstance(out, ObjectPath):
        return Lease(out, run_id, scope, on_lost=on_lost)
    return OutLock(out, run_id, scope)


def writer_of(out: OutPath) -> str | None:
    """Which run is writing OUT now (its lock is held), or None: for readers (export, inspect), which
    would otherwise read part files as they are rewritten or replaced."""
    if isinstance(out, ObjectPath):
        holders = live_holders(out)
        return "; ".join(holders) if holders else None
    state = out / STATE_DIR
    holders = [who for lock in [state / "lock", *sorted(state.glob("lock-*"))] if (who := _held(lock))]
    return "; ".join(holders) if holders else None


def _held(lock: Path) -> str | None:
    try:
        fh = open(lock)  # noqa: SIM115 - closed below
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
