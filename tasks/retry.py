"""The one retry policy: tenacity, jittered exponential backoff, Retry-After honoured.

With several replicas, a failure whose retry can go at once to another replica, one the item has not
failed on yet (``RequestFailure.retry_elsewhere``), is retried without waiting: the backoff and the
Retry-After are the failing replica's business (the router sets it aside or pauses it), not the
item's. Every attempt still counts towards ``max_retries``; once the item has failed on every usable
replica, the backoff applies as with a single endpoint.

Only transient failures (``RequestFailure.retryable``: 408, 409, 429, 5xx, timeouts, connection
errors, unparseable answers) are retried; a 400, 401, 403, 404 or 422 is final at once. The endpoint
client (tasks/endpoint/client.py) never retries by itself, so every attempt is one request and is counted by
the caller. The first attempt runs before any tenacity machinery is built: most requests succeed at
once, and building it per request cost a tenth of the client's time at hundreds of requests a second.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt, stop_before_delay
from tenacity.stop import stop_base
from tenacity.wait import wait_exponential_jitter

from tasks.errors import ItemFailure

T = TypeVar("T")
MAX_RETRY_AFTER = 300.0  # seconds of a server's Retry-After honoured; beyond it the endpoint is unusable


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, ItemFailure) and exc.retryable


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_retries: int = 6  # retries after the first attempt
    initial: float = 0.5  # first backoff, seconds; doubles each retry
    maximum: float = 30.0  # backoff cap, seconds
    max_retry_after: float = MAX_RETRY_AFTER  # a server's Retry-After is honoured up to this
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        if getattr(exc, "retry_elsewhere", False):
            return 0.0  # another replica takes it now
        retry_after = exc.retry_after if isinstance(exc, ItemFailure) else None
        if retry_after is not None and retry_after > 0:
            # the server said when: wait that long, plus a little jitter so clients do not stampede
            # (0, negative or a date gone by: no real answer, so the backoff, not a retry at once)
            return min(retry_after, self.max_retry_after) + random.uniform(
                0, min(1.0, 0.1 * retry_after + 0.05)
            )
        return float(
            wait_exponential_jitter(initial=self.initial, max=self.maximum, jitter=self.initial)(state)
        )

    def retrying(
        self,
        stop: stop_base | None = None,
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> AsyncRetrying:
        """``stop``: after ``max_retries`` retries, unless said otherwise."""
        return AsyncRetrying(
            stop=stop or stop_after_attempt(self.max_retries + 1),
            wait=self.wait,
            retry=retry_if_exception(_retryable),
            reraise=True,
            sleep=self.sleep,
            before_sleep=before_sleep,
        )

    async def call_within(
        self,
        seconds: float,
        attempt: Callable[[], Awaitable[T]],
        before_sleep: Callable[[RetryCallState], None] | None = None,
    ) -> T:
        """Run ``attempt``, retrying transient failures for up to ``seconds`` in all rather than a number
        of times (no retry that would start later; a longer Retry-After re-raises at once)."""
        async for trial in self.retrying(stop_before_delay(seconds), before_sleep):
            with trial:
                return await attempt()
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover

    async def call(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt`` until it succeeds, fails terminally, or retries run out (re-raising)."""
        first: ItemFailure | None = None
        try:
            return await attempt()
        except ItemFailure as exc:
            if not exc.retryable or self.max_retries == 0:
                raise
            first = exc
        async for trial in self.retrying():
            with trial:
                if first is not None:  # tenacity's attempt 1 is the one already made: its failure replayed
                    replayed, first = first, None
                    raise replayed
                return await attempt()
        raise AssertionError("unreachable: tenacity re-raises the last failure")  # pragma: no cover


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None
