"""One endpoint, many runs: a Prefect global concurrency limit caps requests in flight across runs.

When runs share a Prefect server (``PREFECT_API_URL`` is set), every run reserves slots of one global
concurrency limit (``--concurrency-limit``, default ``vlmbatch-endpoint``; created with
``--concurrency-limit-slots`` slots, default 64, when missing; an existing limit is left as it is).
A shard task holds ``occupy=share`` slots while it runs — one acquisition per shard, never per request
(per-request acquisition costs a server round trip each) — where ``share`` is the run's
``--concurrency``, capped at the limit. The run then keeps one shard in flight at a time and bounds its
requests by ``share``, so the slots a run holds are always at least its requests in flight: the sum over
all runs never exceeds the limit. Between two shards the slots go back to the server, where a waiting
run (a backfill partition, the nightly job) can take them.

Without a server (the embedded API of ``vlmbatch run``) there is no limit: the run's own
``--concurrency`` applies.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tasks.config import RunConfig

log = logging.getLogger(__name__)


def server_url() -> str | None:
    """The Prefect API URL when runs talk to a shared server; None for the embedded API."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


@dataclass(frozen=True)
class EndpointLimit:
    name: str
    slots: int  # the limit's size on the server
    share: int  # slots each shard of this run holds

    @classmethod
    async def connect(cls, config: RunConfig) -> EndpointLimit | None:
        """The run's limit, created if missing; None without a server or with the limit turned off."""
        endpoint = config.endpoint
        if endpoint.concurrency_limit is None or server_url() is None:
            return None
        slots = await ensure_limit(endpoint.concurrency_limit, endpoint.concurrency_limit_slots)
        if slots is None:  # inactive: the server enforces nothing
            return None
        return cls(endpoint.concurrency_limit, slots, max(1, min(endpoint.in_flight_cap, slots)))

    def bound(self, config: RunConfig) -> RunConfig:
        """``config`` with the run's requests in flight bounded by the slots a shard holds."""
        endpoint = config.endpoint
        if endpoint.in_flight_cap <= self.share:
            return config
        field = "max_concurrency" if endpoint.concurrency == "auto" else "concurrency"
        return config.model_copy(update={"endpoint": endpoint.model_copy(update={field: self.share})})

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Hold ``share`` slots (waiting for them as long as it takes) while inside."""
        from prefect.concurrency.asyncio import concurrency

        async with concurrency(self.name, occupy=self.share):
            yield


async def ensure_limit(name: str, slots: int) -> int | None:
    """Create the global concurrency limit ``name`` with ``slots`` if missing; its size, or None when
    it is inactive."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

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
