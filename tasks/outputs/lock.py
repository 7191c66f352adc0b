"""Who may write OUT: one writer per *scope*, with flocks the kernel frees when their run dies.

A scope is a plain string naming what of OUT a run writes: ``out`` for a run of the whole job,
``slice-K-of-N`` for a slice (``--slice K/N``). The rule (README.md, "Slices"):

- a run of the whole job holds ``_vlmbatch/lock`` exclusively: it is OUT's only writer;
- a slice holds ``_vlmbatch/lock`` shared and ``_vlmbatch/slices/slice-K-of-N`` exclusively: any
  number of slices write OUT at once, each slice once, and a whole-job run refuses while any slice
  runs (and a slice while a whole-job run does);
- the slices writing OUT at one time all cut it the same way (the same N): slices of another N would
  overlap theirs, so a slice of another N refuses while they run;
- locks are taken, and OUT's start-up upkeep (temporaries, later columns, healing) and rewrites of
  files other writers may also rewrite are done, holding ``_vlmbatch/gate`` (``out_gate``): so the
  writers live at that moment are known and none can start meanwhile.

Each lock file also says who holds it (run id, pid, host, since), for the message a refused run gets
and for readers (``inspect``, ``export``, ``report``) that warn or refuse while a run is writing.

OUT on an object store has no flock: a writer holds a lease per scope (tasks/outputs/lease.py) under
the same rules; ``writer_lock``, ``live_scopes``, ``scope_holder`` and ``writer_of`` choose.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from tasks.errors import UsageError
from tasks.outputs.layout import OUT_SCOPE, STATE_DIR
from tasks.outputs.lease import Lease, lease_holder, live_leases
from tasks.outputs.object_path import ObjectPath, OutPath
from tasks.slice import scope_of_slice

SLICES_DIR = "slices"  # _vlmbatch/slices/<scope>: a slice's own lock


class OutLock:
    """The lock of one run on its scope of OUT (``out``, or ``slice-K-of-N``)."""

    def __init__(self, out: Path, run_id: str, scope: str = OUT_SCOPE) -> None:
        self.out = out
        self.path = out / STATE_DIR / "lock"
        self.run_id = run_id
        self.scope = scope
        self.slice = scope_of_slice(scope)
        if scope != OUT_SCOPE and self.slice is None:
            raise ValueError(f"unknown scope {scope!r}")
        self._held: list[IO[str]] = []

    @property
    def held(self) -> bool:
        return bool(self._held)

    def acquire(self) -> None:
        """Take the scope's lock, or raise UsageError naming who holds what stands in the way."""
        with out_gate(self.out):
            if self.slice is None:
                self._acquire_all()
            else:
                self._acquire_slice(self.slice[1])

    def _acquire_all(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            _lock_within(fh, fcntl.LOCK_EX, LOCK_PATIENCE_S)
        except BlockingIOError:
            fh.seek(0)
            text = fh.read()
            fh.close()
            if slices := live_slices(self.out):
                raise UsageError(
                    f"--out {self.out} is being written by {_listed(slices)}; a run of the whole job waits "
                    "until no slice is running (or run it as the same slices: --slice K/N)"
                ) from None
            raise UsageError(
                f"--out {self.out} is being written by {_holder(text)}; wait for it to finish or choose "
                "another --out"
            ) from None
        _say_who(fh, self.run_id, self.scope)
        self._held.append(fh)

    def _acquire_slice(self, n: int) -> None:
        main = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            _lock_within(main, fcntl.LOCK_SH, LOCK_PATIENCE_S)
        except BlockingIOError:
            main.seek(0)
            who = _holder(main.read())
            main.close()
            raise UsageError(
                f"--out {self.out} is being written by {who}, a run of the whole job; its slices wait "
                "until it has finished"
            ) from None
        others = {scope: who for scope, who in live_slices(self.out).items() if scope != self.scope}
        other_cuts = {s: w for s, w in others.items() if (scope_of_slice(s) or (0, n))[1] != n}
        if other_cuts:
            main.close()
            raise UsageError(
                f"--out {self.out} is being written by {_listed(other_cuts)}: slices cut another way "
                f"than --slice {self.slice[0] if self.slice else '?'}/{n} would overlap them; every slice "
                "writing one OUT at a time takes the same N"
            )
        (self.out / STATE_DIR / SLICES_DIR).mkdir(exist_ok=True)
        fh = open(self.out / STATE_DIR / SLICES_DIR / self.scope, "a+")  # noqa: SIM115 - held
        try:
            _lock_within(fh, fcntl.LOCK_EX, LOCK_PATIENCE_S)
        except BlockingIOError:
            fh.seek(0)
            who = _holder(fh.read())
            fh.close()
            main.close()
            raise UsageError(
                f"--out {self.out}: slice {self.scope} is being written by {who}; wait for it to finish"
            ) from None
        _say_who(fh, self.run_id, self.scope)
        self._held += [main, fh]

    def release(self) -> None:
        for fh in reversed(self._held):
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
        self._held = []


def writer_lock(
    out: OutPath, run_id: str, scope: str = OUT_SCOPE, on_lost: Callable[[str], None] | None = None
) -> OutLock | Lease:
    """The lock of a run writing ``scope`` of OUT: flocks on a local OUT, a lease on an object store
    (``on_lost`` is called, from another thread, if the lease is lost while the run holds it)."""
    if isinstance(out, ObjectPath):
        return Lease(out, run_id, scope, on_lost=on_lost)
    return OutLock(out, run_id, scope)


@contextlib.contextmanager
def writers_gate(out: OutPath) -> Iterator[None]:
    """``out_gate`` on a local OUT; nothing on an object store, where every rewrite of a file another
    writer may also change is conditional on the version read (tasks/outputs/store.py)."""
    if isinstance(out, ObjectPath):
        yield
        return
    with out_gate(out):
        yield


LOCK_PATIENCE_S = 1.0  # a reader's probe (writer_of) holds a lock shared for a moment: not a run


@contextlib.contextmanager
def out_gate(out: Path) -> Iterator[None]:
    """Hold OUT's gate (an exclusive flock on ``_vlmbatch/gate``, waited for): writers take their locks,
    and do what another live writer might do to the same files at the same time, inside it. Not
    re-entrant: never nest it."""
    path = out / STATE_DIR / "gate"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _say_who(fh: IO[str], run_id: str, scope: str) -> None:
    fh.seek(0)
    fh.truncate()
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    who = {"run_id": run_id, "pid": os.getpid(), "host": socket.gethostname(), "since": since}
    fh.write(json.dumps(who | {"scope": scope}))
    fh.flush()


def _lock_within(fh: IO[str], mode: int, seconds: float) -> None:
    """flock(``mode``), trying for ``seconds``; BlockingIOError if another still holds it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def _probe(path: Path) -> str | None:
    """Who holds ``path`` exclusively (a shared probe of a moment fails), or None."""
    try:
        fh = open(path)  # noqa: SIM115 - closed below
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fh.read())
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def live_slices(out: Path) -> dict[str, str]:
    """The slices writing OUT now: scope → who (``run … (pid … on …, since …)``), by scope."""
    found = {}
    with contextlib.suppress(OSError), os.scandir(out / STATE_DIR / SLICES_DIR) as entries:
        names = sorted(e.name for e in entries if scope_of_slice(e.name) is not None)
        for name in names:
            if (who := _probe(out / STATE_DIR / SLICES_DIR / name)) is not None:
                found[name] = who
    return found


def live_scopes(out: OutPath) -> set[str]:
    """The scopes with a live writer (``out``, or the slices)."""
    if isinstance(out, ObjectPath):
        return set(live_leases(out))
    scopes = set(live_slices(out))
    if _probe(out / STATE_DIR / "lock") is not None:
        scopes.add(OUT_SCOPE)
    return scopes


def scope_holder(out: OutPath, scope: str) -> str | None:
    """Who writes ``scope`` of OUT now, or None (no live writer: never started, finished or died; on an
    object store, a writer that died is live until its lease expires)."""
    if isinstance(out, ObjectPath):
        return lease_holder(out, scope)
    if scope == OUT_SCOPE:
        return _probe(out / STATE_DIR / "lock")
    return _probe(out / STATE_DIR / SLICES_DIR / scope)


def writer_of(out: OutPath) -> str | None:
    """Which run (or slices) is writing OUT now, or None: for readers (export, inspect), which would
    otherwise read part files as they are rewritten or replaced."""
    if isinstance(out, ObjectPath):
        leases = live_leases(out)
        if OUT_SCOPE in leases:
            return leases[OUT_SCOPE]
        return _listed(leases) if leases else None
    if (who := _probe(out / STATE_DIR / "lock")) is not None:
        return who
    slices = live_slices(out)
    return _listed(slices) if slices else None


def _listed(slices: dict[str, str]) -> str:
    shown = [f"{scope}: {who}" for scope, who in list(slices.items())[:4]]
    more = f" and {len(slices) - 4} more" if len(slices) > 4 else ""
    return f"slices ({'; '.join(shown)}{more})"


def _holder(text: str) -> str:
    try:
        info = json.loads(text.strip() or "{}")
        pid, host, since = info.get("pid"), info.get("host"), info.get("since")
        return f"run {info.get('run_id')} (pid {pid} on {host}, since {since})"
    except (ValueError, AttributeError):
        return "another run"
