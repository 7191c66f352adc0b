"""Running the emulator in a background thread (:class:`EmulatorServer`) or the foreground (:func:`serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

from aiohttp import web

from emulator.gateway import reset
from emulator.server import STATE, create_app
from emulator.settings import EmulatorSettings
from emulator.state import EmulatorState

SHUTDOWN_SECONDS = 0.5  # at stop, requests still running (e.g. a hang) are cancelled after this
START_TIMEOUT = 30.0
T = TypeVar("T")


class _Running:
    """One started app: its runner, state and bound port."""

    def __init__(self, runner: web.AppRunner, state: EmulatorState, port: int) -> None:
        self.runner = runner
        self.state = state
        self.port = port

    @classmethod
    async def start(cls, settings: EmulatorSettings) -> _Running:
        app = create_app(settings)
        # handler_cancellation: a client that gives up (its timeout during a hang) frees its handler.
        runner = web.AppRunner(
            app, access_log=None, handler_cancellation=True, shutdown_timeout=SHUTDOWN_SECONDS
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port, backlog=1024)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        state, port = app[STATE], runner.addresses[0][1]
        state.settings = state.settings.with_changes(port=port)  # the port actually bound
        return cls(runner, state, port)


def base_url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


class EmulatorServer:
    """The emulator on its own event loop in a daemon thread; ``with EmulatorServer(s) as server: ...``."""

    def __init__(self, settings: EmulatorSettings | None = None) -> None:
        self._settings = settings or EmulatorSettings()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._running: _Running | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> Self:
        """Start listening; returns once the port is bound (raises what the startup raised)."""
        if self._thread is not None:
            raise RuntimeError("the emulator is already started")
        self._thread = threading.Thread(target=self._run, name="vlmbatch-emulator", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT):
            raise RuntimeError("the emulator did not start in time")
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise self._error
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # reported to start() if it happened before ready
            if not self._ready.is_set():
                self._error = exc
        finally:
            self._ready.set()
            loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._running = await _Running.start(self._settings)
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._running.runner.cleanup()

    def stop(self) -> None:
        """Stop listening and end the thread (requests still running are cancelled within ~1 s)."""
        thread, loop, stop = self._thread, self._loop, self._stop
        if thread is None or loop is None or stop is None:
            return
        with contextlib.suppress(RuntimeError):  # loop already closed
            loop.call_soon_threadsafe(stop.set)
        thread.join()
        self._thread = None

    def kill(self) -> None:
        """Die as a killed process or a lost node does: every request in progress has its connection
        reset at once (never answered), and the port closes."""
        state = self._require().state

        def reset_all() -> None:
            for transport in list(state.answering):
                reset(transport)

        self._call(reset_all)
        self.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._require().port

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return base_url(self._settings.host, self.port)

    @property
    def settings(self) -> EmulatorSettings:
        """The settings in force now (runtime changes included)."""
        return self._require().state.settings

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (the same data as ``GET /_emulator/stats``); also once stopped:
        what it saw until then."""
        if self._running is None:
            raise RuntimeError("the emulator is not running: call start() first")
        return self._running.state.stats.snapshot()

    def reset(self) -> None:
        """Clear the counters and rewind the fault script."""
        state = self._require().state
        self._call(state.reset)

    def configure(self, **changes: Any) -> EmulatorSettings:
        """Change settings at runtime (ValueError when invalid); returns the settings now in force."""
        state = self._require().state
        return self._call(lambda: state.configure(changes))

    def _require(self) -> _Running:
        if self._running is None or self._thread is None:
            raise RuntimeError("the emulator is not running: call start() first")
        return self._running

    def _call(self, action: Callable[[], T]) -> T:
        """Run ``action`` on the server's loop and return its result (or raise its error)."""
        assert self._loop is not None

        async def run() -> T:
            return action()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(timeout=10)


def serve(settings: EmulatorSettings, *, announce: Callable[[str], None] = print) -> None:
    """Run the emulator in the foreground until KeyboardInterrupt or SIGTERM.

    ``announce`` gets one line, ``emulator listening on http://HOST:PORT/v1``, once the port is bound.
    """
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(settings, announce))


async def _serve(settings: EmulatorSettings, announce: Callable[[str], None]) -> None:
    running = await _Running.start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
                handled.append(signum)
    try:
        announce(f"emulator listening on {base_url(settings.host, running.port)}")
        with contextlib.suppress(ValueError, OSError):  # stdout closed or not a stream
            sys.stdout.flush()
        await stop.wait()
    finally:
        for signum in handled:
            loop.remove_signal_handler(signum)
        await running.runner.cleanup()
