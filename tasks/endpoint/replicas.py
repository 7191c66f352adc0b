"""Several replicas of one model (``--base-url`` given more than once): balanced, health-checked, none lost.

Each ``Replica`` is a base URL with its own key, its own connection pool (``EndpointClient``), its own
in-flight limit (``InFlightLimiter``: ``--concurrency N`` per replica, or ``auto`` adapting each one on
its own), its health and its counters. The ``Router`` hands out request slots:

- **Least outstanding requests**: a request goes to the usable replica with the fewest requests in
  flight relative to its limit (ties: the first listed). A replica that answers four times slower
  holds its slots four times longer, so it gets about a quarter of the traffic. When no replica has a
  free slot, requests wait in arrival order and each freed slot goes to the first of them.
- **Ejection**: a replica that fails to connect, times out or answers 5xx ``EJECT_AFTER`` times in a
  row is set aside for a cooldown (5 s, doubling on each ejection up to 60 s; back to 5 s once it has
  served a minute without one), then probed in the background on its readiness route
  (``/health/ready``; ``/models`` where that route is 404) and readmitted only when the probe answers
  2xx. A replica that started set aside (unreachable at preflight) is probed with the whole preflight.
- **Pauses**: a 429 or 503 with ``Retry-After`` pauses that replica alone for that long.
- **Gone**: a replica the outage detector gives up on (credentials rejected or 404 three times in a
  row, ``Retry-After`` beyond what a run waits) or that preflight dropped gets nothing more.
- **Never the last one**: ejection and pauses only apply while another replica is in service: with
  a single replica (or the last one left) failures go through the retry policy's backoff exactly as
  with one endpoint, and the outage detector (tasks/endpoint/outage.py) gives its verdict only when
  every replica has been unusable for ``--outage-window``.

``--rpm``/``--tpm`` stay per run (tasks/endpoint/concurrency.py's RateLimiter, taken once a slot is
held). Which replica answered is each row's ``replica`` column (the base URL without credentials).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Collection, Sequence
from dataclasses import dataclass

from tasks.config import EndpointConfig, public_url
from tasks.endpoint.client import EndpointClient
from tasks.endpoint.concurrency import InFlightLimiter, Slot
from tasks.endpoint.outage import OutageDetector
from tasks.endpoint.preflight import PreflightFailed, PreflightResult, preflight
from tasks.errors import RequestFailure
from tasks.latency import LatencyHistogram
from tasks.stopping import StopSwitch

log = logging.getLogger(__name__)

EJECT_AFTER = 3  # failures in a row (refused, timed out, 5xx) that set a replica aside
COOLDOWN_S = 5.0  # the first ejection's length; doubles with each ejection
MAX_COOLDOWN_S = 60.0  # the longest; a replica in service this long starts again at COOLDOWN_S
TICK_S = 0.5  # how often the watch looks for probes due and for the outage verdict


def unhealthy(failure: RequestFailure) -> bool:
    """A failure that says the replica is not serving: refused, reset or timed out on the client's side,
    or a 5xx. (A 408 is a gateway's timeout, a 429 busy: those are load, not health.)"""
    if failure.http_status is None:
        return failure.error_type in ("connection", "timeout")
    return failure.http_status >= 500


class Replica:
    """One base URL of the model: its client, limit, health and counters."""

    def __init__(self, config: EndpointConfig, url: str, key: str | None) -> None:
        self.url = url
        self.name = public_url(url)  # how it is shown and stored: never its user:password
        self._key = key
        self.client = EndpointClient(config, key, base_url=url)
        cap = config.in_flight_cap
        self.limiter = InFlightLimiter(cap, adaptive=config.concurrency == "auto", maximum=cap)
        self.consecutive = 0  # unhealthy failures in a row
        self.ejected = False
        self.ejected_until = 0.0  # when the next probe is due
        self.cooldown = COOLDOWN_S  # the next ejection's (or failed probe's) length
        self.readmitted_at = -math.inf
        self.paused_until = 0.0  # Retry-After
        self.gone: str | None = None  # why it gets nothing more in this run
        self.checked = True  # False: never passed preflight; its probe is the whole preflight
        self.probing = False
        self.health_route: str | None = None  # "/health/ready" or "/models", once known
        self.requests = 0  # attempts sent
        self.failures = 0  # attempts failed
        self.ejections = 0
        self.latencies = LatencyHistogram()  # of answered attempts

    def __repr__(self) -> str:
        return f"Replica({self.name!r}, {self.client!r})"

    async def preflight(self, stop: StopSwitch) -> None:
        """The whole preflight, once (a replica that has never passed it)."""
        await preflight(self.client.config, self._key, stop=stop, base_url=self.url, window=0.0)

    @property
    def in_service(self) -> bool:
        return self.gone is None and not self.ejected

    def usable(self, now: float) -> bool:
        return self.gone is None and not self.ejected and now >= self.paused_until


@dataclass(slots=True)
class Lease:
    """A request slot at one replica."""

    replica: Replica
    slot: Slot


class Router:
    """Hands out request slots across replicas, follows their health, probes the ejected ones.

    Create it in the event loop that uses it; ``aclose`` it at the end.
    """

    def __init__(
        self,
        config: EndpointConfig,
        keys: Sequence[str | None],
        *,
        stop: StopSwitch,
        detector: OutageDetector,
        checked: PreflightResult | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.replicas = [Replica(config, url, key) for url, key in zip(config.base_urls, keys, strict=True)]
        self.several = len(self.replicas) > 1
        self.stop = stop
        self.detector = detector
        self.clock = clock
        self._waiters: deque[tuple[asyncio.Future[Replica | None], Collection[Replica]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._watch: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._closed = False
        self._watch_due = False  # a replica starts set aside: the watch starts with the first request
        if checked is not None:
            for replica in self.replicas:
                if replica.url in checked.dropped:
                    replica.gone = f"left out at preflight: {checked.dropped[replica.url]}"
                    detector.give_up(replica.name, replica.gone)
                elif replica.url in checked.waiting:
                    replica.checked = False
                    replica.ejected = True
                    replica.ejected_until = clock() + COOLDOWN_S
                    self._watch_due = True
        stop.when_set(self._wake_all)

    async def aclose(self) -> None:
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        tasks = [t for t in (self._watch, *self._probes) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica in self.replicas:
            await replica.client.aclose()

    # --- slots ---------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def slot(self, avoid: Collection[Replica] = ()) -> AsyncIterator[Lease | None]:
        """A slot at the best usable replica (one not in ``avoid``, the replicas this item failed on,
        while another is in service): at once if one is free and nobody waits, else in arrival order.
        None when the run stops while waiting."""
        if self._watch_due:
            self._watch_due = False
            self._start_watch()
        replica = None if self._waiters else self._pick(avoid)
        if replica is not None:
            replica.limiter.in_flight += 1
        else:
            replica = await self._wait(avoid)
            if replica is None:
                yield None
                return
        lease = Lease(replica, Slot())
        try:
            yield lease
        finally:
            replica.limiter.give_back(lease.slot)
            if self._waiters:
                self._grant()

    def _pick(self, avoid: Collection[Replica]) -> Replica | None:
        if not self.several:  # one endpoint: just its limit
            only = self.replicas[0]
            return only if only.limiter.free else None
        now = self.clock()
        best: Replica | None = None
        fallback: Replica | None = None  # an avoided replica, if nothing else is in service
        elsewhere = False
        for replica in self.replicas:
            if not replica.usable(now):
                elsewhere = elsewhere or (replica.in_service and replica not in avoid)
                continue
            limiter = replica.limiter
            if replica in avoid:
                if limiter.free and (fallback is None or limiter.load < fallback.limiter.load):
                    fallback = replica
                continue
            elsewhere = True
            if limiter.free and (best is None or limiter.load < best.limiter.load):
                best = replica
        if best is None and not elsewhere:
            return fallback
        return best

    async def _wait(self, avoid: Collection[Replica]) -> Replica | None:
        if self.stop.is_set:
            return None
        waiter: asyncio.Future[Replica | None] = asyncio.get_running_loop().create_future()
        self._waiters.append((waiter, avoid))
        self._grant()  # behind a retry waiting for another replica, the slot it leaves may be this one's
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and (granted := waiter.result()) is not None:
                granted.limiter.in_flight -= 1  # granted, then cancelled: give it back
                self._grant()
            raise

    def _grant(self) -> None:
        """Hand free slots to the waiters, first come first served. A retry waiting for a replica it has
        not failed on lets those behind it take a slot it would not (no head-of-line blocking)."""
        waiters = self._waiters
        i = 0
        while i < len(waiters):
            waiter, avoid = waiters[i]
            if waiter.done():  # cancelled
                del waiters[i]
                continue
            replica = self._pick(avoid)
            if replica is None:
                if not avoid:
                    break  # no free slot for anyone
                i += 1
                continue
            del waiters[i]
            replica.limiter.in_flight += 1
            waiter.set_result(replica)
        if waiters:
            self._wake_when_paused()

    def _wake_when_paused(self) -> None:
        """With requests waiting, grant again when the first pause ends."""
        if not self.several:
            return
        now = self.clock()
        ends = [r.paused_until for r in self.replicas if r.in_service and r.paused_until > now]
        if not ends:
            return
        when = min(ends)
        if self._timer is not None and not self._timer.cancelled() and self._timer.when() <= when:
            return
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(max(0.0, when - now), self._grant)

    def _wake_all(self) -> None:
        """The run stops: nobody waits for a slot any more."""
        while self._waiters:
            waiter, _ = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --- outcomes ------------------------------------------------------------------------------------

    def succeeded(self, replica: Replica, latency_ms: float) -> None:
        replica.consecutive = 0
        replica.latencies.add(latency_ms)
        self.detector.success(replica.name)

    def failed(self, replica: Replica, failure: RequestFailure) -> None:
        """One attempt at ``replica`` failed: the outage detector hears of it, and the replica may be
        given up on, paused (Retry-After) or ejected."""
        replica.failures += 1
        verdict = self.detector.failure(failure, replica.name)
        if verdict is not None:
            self.stop.set("outage", verdict)
            return
        if not self.several or replica.gone is not None:
            return
        if (why := self.detector.gone(replica.name)) is not None:
            replica.gone = why
            log.warning("replica %s gets no more requests in this run: %s", replica.name, why)
            self._grant()
            return
        now = self.clock()
        if failure.retry_after and failure.http_status in (429, 503) and self._others_in_service(replica):
            replica.paused_until = max(
                replica.paused_until, now + min(failure.retry_after, self.detector.max_wait)
            )
        if unhealthy(failure):
            replica.consecutive += 1
            if (
                replica.consecutive >= EJECT_AFTER
                and not replica.ejected
                and self._others_in_service(replica)
            ):
                self._eject(replica, now, failure)

    def elsewhere(self, tried: Collection[Replica]) -> bool:
        """Whether a replica this item has not failed on is usable now: its retry may go there at once."""
        now = self.clock()
        return any(r.usable(now) for r in self.replicas if r not in tried)

    def _others_in_service(self, replica: Replica) -> bool:
        return any(other.in_service for other in self.replicas if other is not replica)

    def _eject(self, replica: Replica, now: float, failure: RequestFailure) -> None:
        if now - replica.readmitted_at >= MAX_COOLDOWN_S:
            replica.cooldown = COOLDOWN_S  # it served a minute since its last ejection: start over
        replica.ejected = True
        replica.ejections += 1
        replica.ejected_until = now + replica.cooldown
        log.warning(
            "replica %s set aside for %g s after %d failures in a row (%s); its requests go to the others",
            replica.name,
            replica.cooldown,
            replica.consecutive,
            failure,
        )
        replica.cooldown = min(MAX_COOLDOWN_S, 2 * replica.cooldown)
        self._start_watch()

    # --- probes --------------------------------------------------------------------------------------

    def _start_watch(self) -> None:
        if (
            self._watch is not None
            or self._closed
            or not any(r.ejected and r.gone is None for r in self.replicas)
        ):
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # outside the run's loop: with its next request
            self._watch_due = True
            return
        self._watch = asyncio.ensure_future(self._watching())

    async def _watching(self) -> None:
        """While a replica is set aside: probe those due, and give the outage verdict if every replica
        has been unusable for the window (no request may be failing to say so)."""
        try:
            while not self._closed and not self.stop.is_set:
                now = self.clock()
                ejected = [r for r in self.replicas if r.ejected and r.gone is None]
                if not ejected:
                    break
                for replica in ejected:
                    if not replica.probing and now >= replica.ejected_until:
                        replica.probing = True
                        probe = asyncio.ensure_future(self._probe(replica))
                        self._probes.add(probe)
                        probe.add_done_callback(self._probes.discard)
                if (verdict := self.detector.check()) is not None:
                    self.stop.set("outage", verdict)
                    break
                await self.stop.sleep(TICK_S)
        finally:
            self._watch = None

    async def _probe(self, replica: Replica) -> None:
        try:
            if replica.checked:
                await self._health(replica)
            else:
                await replica.preflight(self.stop)
        except RequestFailure as failure:
            self._probe_failed(replica, failure)
        except PreflightFailed as exc:
            if exc.transient:
                self._probe_failed(replica, RequestFailure("connection", str(exc)))
            else:
                replica.gone = f"failed its preflight: {exc}"
                self.detector.give_up(replica.name, replica.gone)
                log.warning("replica %s is left out of this run: %s", replica.name, exc)
        except Exception as exc:  # a probe must never take the run down
            log.exception("probing replica %s failed", replica.name)
            self._probe_failed(replica, RequestFailure("connection", f"{type(exc).__name__}: {exc}"))
        else:
            replica.checked = True
            replica.ejected = False
            replica.consecutive = 0
            replica.readmitted_at = self.clock()
            log.warning("replica %s is back in service: its health route answers", replica.name)
            self._grant()
        finally:
            replica.probing = False

    def _probe_failed(self, replica: Replica, failure: RequestFailure) -> None:
        """Still not ready: the outage detector hears of it (a replica set aside at preflight starts
        its unusable time here), and the next probe waits a longer cooldown."""
        verdict = self.detector.failure(failure, replica.name)
        if verdict is not None:
            self.stop.set("outage", verdict)
        if (why := self.detector.gone(replica.name)) is not None and replica.gone is None:
            replica.gone = why
            log.warning("replica %s gets no more requests in this run: %s", replica.name, why)
            return
        replica.ejected_until = self.clock() + replica.cooldown
        replica.cooldown = min(MAX_COOLDOWN_S, 2 * replica.cooldown)

    async def _health(self, replica: Replica) -> None:
        """The readiness route answers 2xx (``/health/ready``; ``/models`` where that is 404)."""
        route = replica.health_route or "/health/ready"
        try:
            await replica.client.get_json(route)
        except RequestFailure as failure:
            if route != "/health/ready" or failure.error_type != "not_found":
                raise
            route = "/models"
            await replica.client.get_json(route)
        replica.health_route = route
