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
        self.reason: str | None = None  # "SIGINT", "SIGTERM", "outage" or "lease" (OUT's lease lost)
        self.message: str | None = None
        self._callbacks: list[Callable[[], None]] = []

    @property
    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self, reason: str, message: str) -> None:
        if not self._event.is_set():
            self.reason, self.message = reason, message
            self._event.set()
            for callback in self._callbacks:
                callback()

    def when_set(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once the switch is set (at once if it is): e.g. to wake what waits for a
        request slot that may never come."""
        if self.is_set:
            callback()
        else:
            self._callbacks.append(callback)

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake at once when the switch is set."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=seconds)


_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[str] = []  # the signals a run of this process took, in order (reset by forget_signals)


def signal_received() -> str | None:
    """The first SIGINT/SIGTERM a run of this process took since ``forget_signals``, if any: a caller
    that sees the run fail afterwards (e.g. Prefect's server went down with the same signal) can tell
    an interruption from a crash."""
    return _received[0] if _received else None


def forget_signals() -> None:
    _received.clear()


Watcher = tuple[StopSwitch, Callable[[int], None]]
_watching: dict[asyncio.AbstractEventLoop, list[Watcher]] = {}  # the runs inside signals_stop, by loop


@contextlib.contextmanager
def signals_stop(switch: StopSwitch, on_second: Callable[[int], None]) -> Iterator[None]:
    """While inside, the first SIGINT/SIGTERM sets ``switch``; a second calls ``on_second(exit_code)``.

    Runs sharing an event loop (a backfill's partitions) share the handlers: a signal sets every
    run's switch, and the handlers stay until the last run is out, then the previous ones are back.
    Only possible in the main thread; elsewhere (e.g. a worker thread) signals keep their handlers.
    """
    loop = asyncio.get_running_loop()
    watchers = _watching.get(loop)
    # installed on every entry: a flow run's start puts Prefect's own SIGTERM handler in place
    if _install(loop) and watchers is None:
        watchers = _watching[loop] = []
    if watchers is not None:
        watchers.append((switch, on_second))
    try:
        yield
    finally:
        if watchers is not None:
            watchers.remove((switch, on_second))
            if not watchers:
                del _watching[loop]
                for sig in _SIGNALS:
                    with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                        loop.remove_signal_handler(sig)


def _install(loop: asyncio.AbstractEventLoop) -> bool:
    installed = False
    for sig in _SIGNALS:
        try:
            loop.add_signal_handler(sig, _handle, loop, sig)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):
            pass
    return installed


def _handle(loop: asyncio.AbstractEventLoop, sig: signal.Signals) -> None:
    _received.append(sig.name)
    watchers = list(_watching.get(loop, ()))
    for switch, on_second in watchers:
        if switch.reason in EXIT_CODES:
            on_second(EXIT_CODES[switch.reason])
    for switch, _ in watchers:
        switch.set(
            sig.name, f"stopped by {sig.name}: finishing requests in flight, then writing what is done"
        )


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
