"""Drives an OutputStore from the event loop: flushes about once a second on one writer thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.outputs.object_path import ObjectPath, OutPath
from tasks.outputs.store import OutputStore

FLUSH_INTERVAL = 1.0  # seconds: what a crash can lose of answered rows

log = logging.getLogger(__name__)


class AsyncWriter:
    def __init__(self, store: OutputStore, interval: float = FLUSH_INTERVAL) -> None:
        self.store = store
        self.interval = interval
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlmbatch-writer")
        self._ticker: asyncio.Task[None] | None = None

    async def __aenter__(self) -> AsyncWriter:
        self._ticker = asyncio.create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        try:
            await self._run(self.store.flush)  # whatever is left, even when the run failed
        finally:
            self._thread.shutdown(wait=True)

    async def _run(self, fn: object, *args: object) -> object:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)  # type: ignore[arg-type]

    async def _tick(self) -> None:
        """Flush every ``interval``; a failed flush (a full disk, a network mount away) is logged and
        tried again at the next tick, with the rows kept in memory: the shard's final write, which
        the run waits for, is the one that must succeed."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self._run(self.store.flush)
            except Exception as exc:
                log.warning(
                    "writing to %s failed, trying again in %g s: %s", self.store.out, self.interval, exc
                )

    async def finish(self, shard_index: int) -> OutPath | None:
        path = await self._run(self.store.finish, shard_index)
        return path if isinstance(path, Path | ObjectPath) else None
