"""How many requests go out at once, and how fast: a fixed or adaptive limit, and rate limits.

``InFlightLimiter`` bounds requests on the wire. Fixed (``--concurrency N``) it is a semaphore. With
``--concurrency auto`` it adapts like TCP (AIMD): it starts small and doubles per round of answers
(slow start) until the endpoint first pushes back, then grows by one per round while latency holds
(no more than twice the best seen) and halves — at most once per round trip — when a 429, 503 or
408 arrives. After a halving it climbs back at the slow-start pace to 90 % of the limit that drew the
pushback (the endpoint took about that much a moment ago), probes by one per two rounds up to that
limit and by one per round past it, so it spends its time just under the endpoint's capacity instead
of sawing between half of it and all of it (bench/auto.py, steady rate against a hidden capacity of
32: 71–81 % of the best fixed setting with plain halving and +1 per round, 95 % with this). It never
exceeds ``--max-concurrency``.

``RateLimiter`` spaces requests for gateways that publish limits: ``--rpm`` requests and ``--tpm``
estimated tokens per minute (token buckets holding at most one second's worth, so no burst).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)

AUTO_START = 16
RECOVER_TO = 0.9  # after a cut, climb back fast to this share of the limit that drew the pushback
OVERLOAD_STATUS = frozenset({408, 429, 503})  # 408: a gateway gave up waiting, as good as a 429


@dataclass(slots=True)
class Slot:
    """What one request reports back to the limiter."""

    overloaded: bool = False
    latency: float | None = None  # seconds, of an answered request


class InFlightLimiter:
    def __init__(
        self,
        limit: int,
        *,
        adaptive: bool = False,
        maximum: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.adaptive = adaptive
        self.maximum = maximum or limit
        self.limit = float(min(AUTO_START, self.maximum) if adaptive else limit)
        self.clock = clock
        self.in_flight = 0
        self.slow_start = True
        self.best_latency = math.inf
        self.ceiling = math.inf  # the limit when the endpoint last pushed back
        self._last_cut = -math.inf
        self._waiters: deque[asyncio.Future[None]] = deque()

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[Slot]:
        await self._acquire()
        slot = Slot()
        try:
            yield slot
        finally:
            self.give_back(slot)
            self._grant()

    @property
    def free(self) -> bool:
        """A request may start now (nobody else waiting aside)."""
        return self.in_flight < int(self.limit)

    @property
    def load(self) -> float:
        """Requests in flight relative to the limit: what the replica router balances."""
        return self.in_flight / self.limit

    def give_back(self, slot: Slot) -> None:
        """A request is done: its slot is free again, its outcome adapts the limit (auto). The replica
        router (tasks/endpoint/replicas.py) takes slots itself (``in_flight += 1`` when ``free``) and
        gives them back here; its own waiters span replicas."""
        self.in_flight -= 1
        if self.adaptive:
            self.observe(slot)

    async def _acquire(self) -> None:
        """Take a slot: at once if one is free and nobody waits, else in arrival order.

        A freed slot is handed straight to the first waiter (its count taken on its behalf), so a
        release wakes one coroutine, not all of them: with hundreds waiting, a wake-all condition cost
        a loop iteration per waiter per release and delayed the refills of a burst of answers.
        """
        if not self._waiters and self.in_flight < int(self.limit):
            self.in_flight += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted, then cancelled: give it back
                self.in_flight -= 1
                self._grant()
            raise

    def _grant(self) -> None:
        while self._waiters and self.in_flight < int(self.limit):
            waiter = self._waiters.popleft()
            if not waiter.done():  # a cancelled waiter is skipped
                self.in_flight += 1
                waiter.set_result(None)

    def observe(self, slot: Slot) -> None:
        """Adapt the limit to one request's outcome (AIMD)."""
        now = self.clock()
        if slot.overloaded:
            round_trip = self.best_latency if math.isfinite(self.best_latency) else 1.0
            if now - self._last_cut >= round_trip:  # one cut per round trip, not one per 429 of a burst
                self.ceiling = self.limit
                self.limit = max(1.0, self.limit / 2)
                self._last_cut = now
            else:  # already cut in this round trip: hold the limit to the requests still out
                # A 429 comes back at once: its slot, handed straight to the next request, would only
                # draw the next 429, a storm of them at the client's own pace until the round trip
                # ends (measured: 150-250 per storm at a hidden capacity of 32).
                self.limit = max(1.0, min(self.limit, float(self.in_flight)))
            self.slow_start = False
            return
        if slot.latency is None:
            return
        self.best_latency = min(self.best_latency, slot.latency)
        if slot.latency > 2 * self.best_latency:
            # latency does not hold: don't push harder. Not a cut: an answer's latency varies 2-5x
            # with its length alone, and cutting on single slow answers collapsed the limit to ~2
            # under ordinary jitter. An endpoint that queues without refusing is held by its
            # gateway's 408s (overload) or by --max-concurrency.
            return
        if self.limit < RECOVER_TO * self.ceiling:  # slow start, or climbing back: doubles per round
            self.limit = min(float(self.maximum), self.limit + 1.0, RECOVER_TO * self.ceiling)
        else:  # +1 per round; +1 per two rounds just under where the endpoint last pushed back
            step = 0.5 if self.limit < self.ceiling else 1.0
            self.limit = min(float(self.maximum), self.limit + step / self.limit)


class Stop(Protocol):
    """What a taker of the rate limiter stops by (tasks.stopping.StopSwitch)."""

    @property
    def is_set(self) -> bool: ...

    async def sleep(self, seconds: float) -> None: ...


class RateLimiter:
    """Token buckets for requests and estimated tokens per minute; ``None`` disables either."""

    def __init__(
        self,
        rpm: float | None,
        tpm: float | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = asyncio.sleep,
    ) -> None:
        self.rates = {"requests": (rpm or 0) / 60, "tokens": (tpm or 0) / 60}  # per second
        self.level = {name: 0.0 for name in self.rates}  # start empty: no burst at the start
        self.clock = clock
        self.sleep = sleep
        self.updated = clock()
        self._lock = asyncio.Lock()
        self.active = any(self.rates.values())
        self.tpm = tpm
        self.warned = False

    async def take(self, tokens: int, stop: Stop | None = None) -> None:
        """Wait until one request of ``tokens`` estimated tokens may go, or ``stop`` is set."""
        if not self.active:
            return
        if self.tpm and tokens > self.tpm and not self.warned:
            self.warned = True
            log.warning(
                "a request's estimate (%d tokens) is more than --tpm %g allows in a minute: such requests "
                "go a minute or more apart, and a gateway with that limit may refuse them; lower "
                "--max-tokens or --max-soft-tokens, or raise --tpm",
                tokens,
                self.tpm,
            )
        async with self._lock:  # first come, first served
            need = {"requests": 1.0, "tokens": float(tokens)}
            while True:
                self._refill()
                # a request may go once its bucket holds what it needs (or a full bucket, for a big one);
                # the level then goes below zero and later requests repay the debt
                target = {n: min(need[n], self._capacity(n)) for n in self.rates}
                waits = [
                    (target[n] - self.level[n]) / rate
                    for n, rate in self.rates.items()
                    if rate and self.level[n] < target[n] - 1e-9
                ]
                if not waits:
                    break
                if stop is None:
                    await self.sleep(max(waits))  # type: ignore[misc]
                    continue
                await stop.sleep(max(waits))
                if stop.is_set:
                    return  # nothing taken: the caller drops the request
            for name, rate in self.rates.items():
                if rate:
                    self.level[name] -= need[name]

    def _capacity(self, name: str) -> float:
        return max(self.rates[name], 1.0)  # one second's worth (a big request may still go, alone)

    def _refill(self) -> None:
        now = self.clock()
        elapsed, self.updated = now - self.updated, now
        for name, rate in self.rates.items():
            self.level[name] = min(self._capacity(name), self.level[name] + elapsed * rate)


_shared: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, float, float], RateLimiter]]
_shared = weakref.WeakKeyDictionary()


def rate_limiter(endpoint: str, rpm: float | None, tpm: float | None) -> RateLimiter:
    """The rate limiter of ``endpoint``'s limits, one for every run in this event loop: a backfill's
    partitions run side by side in one, and a limiter each would multiply ``--rpm``/``--tpm`` by them."""
    if not rpm and not tpm:
        return RateLimiter(None, None)
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return RateLimiter(rpm, tpm)
    key = (endpoint, float(rpm or 0), float(tpm or 0))
    limiters = _shared.setdefault(loop, {})
    if key not in limiters:
        limiters[key] = RateLimiter(rpm, tpm)
    return limiters[key]


def estimate_tokens(prompt_text: str, images: int, max_soft_tokens: int, max_tokens: int) -> int:
    """A request's cost for --tpm: image token budgets, text at ~4 chars a token, the output budget."""
    return images * max_soft_tokens + math.ceil(len(prompt_text) / 4) + max_tokens
