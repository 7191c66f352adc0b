"""The mutable state of one running emulator: settings, counters, fault plan, image cache, queue."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from emulator.faults import FaultPlanner
from emulator.images import ImageLoader
from emulator.settings import STARTUP_ONLY, EmulatorSettings
from emulator.stats import Stats


class EmulatorState:
    """Owned by the server's event loop; only :attr:`stats` may be read from other threads."""

    def __init__(self, settings: EmulatorSettings) -> None:
        self.settings = settings
        self.stats = Stats()
        self.faults = FaultPlanner()
        self.images = ImageLoader(settings.image_cache_size)
        self.session: aiohttp.ClientSession | None = None  # for http(s) image URLs, set on startup
        self._semaphore = _semaphore(settings.max_concurrency)
        self._random = random.Random(settings.seed)
        self._loaded_at = time.monotonic() + settings.loading_seconds
        self.answering: set[asyncio.Transport] = set()  # connections of model requests in progress

    def loading(self) -> bool:
        """Still "loading the model" (``loading_seconds`` since it was set)."""
        return time.monotonic() < self._loaded_at

    def configure(self, changes: dict[str, Any]) -> EmulatorSettings:
        """Apply runtime changes (ValueError when unknown, fixed at startup or invalid)."""
        if fixed := sorted(STARTUP_ONLY & set(changes)):
            raise ValueError(f"settings {fixed} are fixed when the server starts")
        new = self.settings.with_changes(**changes)
        if new.max_concurrency != self.settings.max_concurrency:
            self._semaphore = _semaphore(new.max_concurrency)
        if new.seed != self.settings.seed:
            self._random = random.Random(new.seed)
        if "fault_script" in changes:
            self.faults.reset()
        if "loading_seconds" in changes:
            self._loaded_at = time.monotonic() + new.loading_seconds
        self.settings = new
        return new

    def reset(self) -> None:
        """Clear the counters and rewind the fault script."""
        self.stats.reset()
        self.faults.reset()

    def delay(self, settings: EmulatorSettings) -> float:
        """The latency of one request (time to its first token): ``latency`` plus jitter."""
        if settings.jitter > 0:
            return settings.latency + self._random.uniform(0.0, settings.jitter)
        return settings.latency

    def at_capacity(self) -> bool:
        """Every concurrency slot is taken."""
        return self._semaphore is not None and self._semaphore.locked()

    async def process(self, settings: EmulatorSettings, decode: float = 0.0) -> None:
        """Queue for a concurrency slot and hold it for the latency (+ ``decode`` seconds), like a server."""
        delay = self.delay(settings) + decode
        semaphore = self._semaphore
        if semaphore is None:
            await self._hold(delay)
            return
        async with semaphore:
            await self._hold(delay)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a concurrency slot (queueing for it first) for as long as the block runs: a stream."""
        semaphore = self._semaphore
        async with semaphore if semaphore is not None else contextlib.nullcontext():
            self.stats.start_processing()
            try:
                yield
            finally:
                self.stats.stop_processing()

    async def _hold(self, delay: float) -> None:
        self.stats.start_processing()
        try:
            if delay > 0:
                await asyncio.sleep(delay)
        finally:
            self.stats.stop_processing()


def _semaphore(max_concurrency: int) -> asyncio.Semaphore | None:
    return asyncio.Semaphore(max_concurrency) if max_concurrency > 0 else None


STATE = web.AppKey("emulator_state", EmulatorState)
