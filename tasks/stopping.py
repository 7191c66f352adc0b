"""A run's stop switch: set by Ctrl-C/SIGTERM or by the outage detector; checked before every send.

Once set, no new request is sent and no backoff is waited out; requests already on the wire finish
(or time out). Work items not attempted get no row, so the rerun picks them up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class StopSwitch:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self.reason: str | None = None  # "SIGINT", "SIGTERM" or "outage"
        self.message: str | None = None

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, reason: str, message: str) -> None:
        if not self._event.is_set():
            self.reason, self.message = reason, message
            self._event.set()

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the switch is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=seconds)


@contextlib.contextmanager
def signals_stop(switch: StopSwitch, on_second: Callable[[int], None]) -> Iterator[None]:
    """While inside, the first SIGINT/SIGTERM sets ``switch``; a second calls ``on_second(exit_code)``.

    Only possible in the main thread; elsewhere (e.g. a worker thread) signals keep their handlers.
    """
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []

    def handler(sig: signal.Signals) -> None:
        if switch.reason in EXIT_CODES:
            on_second(EXIT_CODES[switch.reason])
        switch.set(
            sig.name, f"stopped by {sig.name}: finishing requests in flight, then writing what is done"
        )

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, handler, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def child_pids() -> list[int]:
    """Our direct child processes (e.g. Prefect's temporary API server), from /proc where there is one."""
    me, found = os.getpid(), []
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            found.append(int(entry.parent.name))
    return found


def hard_exit(code: int) -> None:
    """Stop at once: files are always complete (atomic writes); children are not left behind."""
    sys.stderr.write("second signal: stopping at once; a rerun continues where this run stopped\n")
    sys.stderr.flush()
    for pid in child_pids():
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    os._exit(code)
