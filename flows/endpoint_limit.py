"""One endpoint, many runs: a Prefect global concurrency limit caps requests in flight across runs.

When runs share a Prefect server (``PREFECT_API_URL`` is set), every run reserves slots of one global
concurrency limit (``--concurrency-limit``, default ``vlmbatch-endpoint``; created with
``--concurrency-limit-slots`` slots, default 64, when missing; an existing limit is left as it is).
A run holds ``share`` slots while any of its shard tasks runs — one acquisition per hold, never per
request (per-request acquisition costs a server round trip each) — where ``share`` is the run's
``--concurrency`` (times its replicas: it is per replica), capped at the limit, and bounds its requests
by ``share``: the slots a run holds are always at least its requests in flight (but for a limit
smaller than the replicas: one each), so the sum over all runs never exceeds the limit.

The hold is the run's, not a shard's (``SlotLease``): its shards overlap as they do without a limit,
the next one's images prepared while the last requests of the current one are in flight, and the
endpoint's slots do not fall idle at every shard boundary. So that a waiting run (a backfill
partition, the nightly job) gets its turn, a hold older than ``MAX_HOLD_S`` admits no new shard: the
shards inside finish, the slots go back to the server, and the run queues for them again.

Without a configured server (``vlmbatch run`` on the temporary one it starts itself,
flows/prefect_server.py) there is no limit: the run's own ``--concurrency`` applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.asyncio import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from flows.prefect_server import server_url
from tasks.config import RunConfig

log = logging.getLogger(__name__)

MAX_HOLD_S = 60.0  # a run's hold admits new shards for this long, then lets waiting runs in
WAIT_WARNING_S = 10.0  # a wait for the slots longer than this is logged


@dataclass(frozen=True)
class EndpointLimit:
    name: str
    slots: int  # the limit's size on the server
    share: int  # slots this run holds while its shards run

    @classmethod
    async def connect(cls, config: RunConfig) -> EndpointLimit | None:
        """The run's limit, created if missing; None without a server or with the limit turned off."""
        endpoint = config.endpoint
        if endpoint.concurrency_limit is None or server_url() is None:
            return None
        slots = await ensure_limit(endpoint.concurrency_limit, endpoint.concurrency_limit_slots)
        if slots is None:  # inactive: the server enforces nothing
            return None
        return cls(endpoint.concurrency_limit, slots, max(1, min(endpoint.total_in_flight, slots)))

    def bound(self, config: RunConfig) -> RunConfig:
        """``config`` with the run's requests in flight bounded by the slots the run holds (with several
        replicas, an equal part of them each, at least one)."""
        endpoint = config.endpoint
        if endpoint.total_in_flight <= self.share:
            return config
        field = "max_concurrency" if endpoint.concurrency == "auto" else "concurrency"
        each = max(1, self.share // len(endpoint.base_urls))
        return config.model_copy(update={"endpoint": endpoint.model_copy(update={field: each})})

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold ``share`` slots (waiting for them as long as it takes) while inside; a wait longer than
        ``WAIT_WARNING_S`` is logged, so a run queued behind others (or behind a killed run's slots)
        does not look hung."""
        warning = asyncio.get_running_loop().call_later(WAIT_WARNING_S, self._warn_waiting)
        try:
            async with concurrency(self.name, occupy=self.share):
                warning.cancel()
                yield
        finally:
            warning.cancel()

    def _warn_waiting(self) -> None:
        log.warning(
            "waiting for %d slots of the global concurrency limit %r: other runs hold them. A run that "
            "was killed (not stopped) keeps its slots until their lease expires, 5 minutes by default; "
            "`prefect gcl inspect %s` shows them",
            self.share,
            self.name,
            self.name,
        )


class SlotLease:
    """The run's ``share`` of the limit, held while any of its shards is inside ``hold()``.

    The first shard in acquires the slots (waiting as long as it takes); later ones join the hold;
    the last one out releases them. Once the hold is ``max_hold`` seconds old, a shard arriving waits
    for the shards inside to finish and the slots to go back, then queues for a new hold, behind any
    run already waiting on the server. Each hold lives in a task of its own: Prefect's ``concurrency``
    must be left in the task that entered it, and the shard that acquires is not the one that releases.
    """

    def __init__(
        self,
        acquire: Callable[[], AbstractAsyncContextManager[object]],
        *,
        max_hold: float = MAX_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.acquire = acquire  # EndpointLimit.hold
        self.max_hold = max_hold
        self.clock = clock
        self.inside = 0
        self.holds = 0  # acquisitions so far
        self._holder: tuple[asyncio.Task[None], asyncio.Event] | None = None  # the hold's task, its release
        self._since = 0.0
        self._entry = asyncio.Lock()  # one shard at a time acquires, joins or waits for the turn
        self._released = asyncio.Event()
        self._released.set()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        async with self._entry:
            if self._holder is not None and self.clock() - self._since >= self.max_hold:
                await self._released.wait()  # the shards inside finish; the slots go back
            if self._holder is None:
                await self._released.wait()  # a release still on its way to the server
                await self._start_holder()
            self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1
            if self.inside == 0 and self._holder is not None:
                (holder, release), self._holder = self._holder, None
                release.set()
                try:
                    await holder
                finally:
                    self._released.set()

    async def _start_holder(self) -> None:
        """Acquire in a task of its own, which holds the slots until its release event is set."""
        acquired, release = asyncio.Event(), asyncio.Event()

        async def holder() -> None:
            async with self.acquire():
                acquired.set()
                await release.wait()

        task = asyncio.create_task(holder(), name="vlmbatch-endpoint-slots")
        signal = asyncio.create_task(acquired.wait())
        try:
            await asyncio.wait({task, signal}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # cancelled while waiting for the slots: stop asking for them
            task.cancel()
            raise
        finally:
            signal.cancel()
        if task.done():
            task.result()  # the acquisition failed: raise its error here
        self._holder, self._since = (task, release), self.clock()
        self._released.clear()
        self.holds += 1


async def ensure_limit(name: str, slots: int) -> int | None:
    """Create the global concurrency limit ``name`` with ``slots`` if missing; its size, or None when
    it is inactive."""
    async with get_client() as client:
        try:
            found = await client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            try:
                await client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=slots)
                )
                log.info("created global concurrency limit %r with %d slots", name, slots)
            except ObjectAlreadyExists:
                pass  # another run created it first
            found = await client.read_global_concurrency_limit_by_name(name)
    return found.limit if found.active else None
