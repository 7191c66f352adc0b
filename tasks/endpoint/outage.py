"""Tell an endpoint outage from failing work items, and stop the run instead of failing the rest.

The endpoint (each replica of it, when there are several: the run stops only when none is usable) is
unusable when, with no success in between:
- every attempt failed to connect, timed out or got 502/503/504 for longer than ``window`` seconds;
- ``threshold`` attempts in a row were refused with 401/403 (credentials rejected);
- ``threshold`` attempts in a row got 404 (the model or route does not exist);
- an answer asked to wait longer than a run waits (``Retry-After`` over ``max_wait``, 300 s): a
  gateway whose quota is spent for the day would otherwise make every item wait out the cap on every
  retry, for hours, and fail anyway.
Then the run aborts (exit 3): answered rows are kept, unattempted items get no row.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tasks.errors import RequestFailure
from tasks.retry import MAX_RETRY_AFTER

UNREACHABLE = frozenset({"connection", "timeout"})
UNREACHABLE_STATUS = frozenset({502, 503, 504})


def _unreachable(failure: RequestFailure) -> bool:
    # a connection error or a client-side timeout; a gateway's 408 says the endpoint is there but slow
    return (failure.error_type in UNREACHABLE and failure.http_status is None) or (
        failure.http_status in UNREACHABLE_STATUS
    )


def is_outage_failure(failure: RequestFailure, max_wait: float = MAX_RETRY_AFTER) -> bool:
    """A failure that says something of the endpoint as a whole: once the run stops for an outage, the
    items that failed this way get no row (the rerun asks them), not a failed one."""
    return (
        _unreachable(failure)
        or failure.error_type in ("auth", "not_found")
        or _waits_too_long(failure, max_wait)
    )


def _waits_too_long(failure: RequestFailure, max_wait: float) -> bool:
    return failure.retry_after is not None and failure.retry_after > max_wait


@dataclass(slots=True)
class _Replica:
    """What the detector knows of one replica (the endpoint itself, when there is one)."""

    failing_since: float | None = None  # unreachable with no success since
    streak: dict[str, int] = field(default_factory=lambda: {"auth": 0, "not_found": 0})
    gone: str | None = None  # why it is unusable for the rest of the run
    gone_at: float = 0.0
    last: RequestFailure | None = None


class OutageDetector:
    """One run's verdict. With several replicas (``replicas``: their names), each is followed on its
    own: one rejecting the credentials three times in a row, answering 404 three times in a row or asking
    to wait too long is *gone* (``gone(name)`` says why; the router stops sending to it), and the run's
    verdict comes only when every replica is gone or has been unreachable, none answering since, for
    ``window`` seconds (measured from the last of them to start failing)."""

    def __init__(
        self,
        *,
        window: float,
        threshold: int = 3,
        describe: str = "the endpoint",
        max_wait: float = MAX_RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
        replicas: Sequence[str] = (),
    ) -> None:
        self.window = window
        self.max_wait = max_wait
        self.threshold = threshold
        self.describe = describe
        self.clock = clock
        self.replicas = {name: _Replica() for name in replicas} or {describe: _Replica()}
        self._one = next(iter(self.replicas.values())) if len(self.replicas) == 1 else None
        self.verdict: str | None = None  # set once: why the endpoint is unusable
        self.successes = 0
        self.last_refusal: RequestFailure | None = None
        self.other_results = 0  # failures that say nothing about the endpoint as a whole

    def _state(self, replica: str | None) -> _Replica:
        if self._one is not None:
            return self._one
        return self.replicas[replica] if replica is not None else next(iter(self.replicas.values()))

    @property
    def failing_since(self) -> float | None:
        """Since when the (only) replica has been unreachable."""
        return self._state(None).failing_since

    def success(self, replica: str | None = None) -> None:
        self.successes += 1
        state = self._state(replica)
        state.failing_since = None
        state.streak = {"auth": 0, "not_found": 0}

    def gone(self, replica: str | None = None) -> str | None:
        """Why ``replica`` is unusable for the rest of the run (None: it is not)."""
        return self._state(replica).gone

    def failure(self, failure: RequestFailure, replica: str | None = None) -> str | None:
        """Record a failed attempt (at ``replica``); returns the verdict when this failure makes the
        endpoint unusable."""
        if self.verdict is not None:
            return None
        state = self._state(replica)
        if state.gone is not None:
            return None  # an answer still on its way from a replica already given up on
        if _waits_too_long(failure, self.max_wait):
            return self._give_up(
                state,
                f"asks to wait {failure.retry_after:.0f} s before trying again (Retry-After, HTTP "
                f"{failure.http_status}), longer than a run waits ({self.max_wait:.0f} s): {failure.message}",
            )
        if failure.error_type in state.streak:
            self.last_refusal = state.last = failure
            state.streak[failure.error_type] += 1
            other = "not_found" if failure.error_type == "auth" else "auth"
            state.streak[other] = 0
            if state.streak[failure.error_type] < self.threshold:
                return None
            if failure.error_type == "auth":
                why = (
                    f"rejected the credentials (HTTP {failure.http_status}) on {self.threshold} requests "
                    f"in a row: {failure.message}"
                )
            else:
                why = (
                    f"answered 404 on {self.threshold} requests in a row (unknown model or wrong URL): "
                    f"{failure.message}"
                )
            return self._give_up(state, why)
        if _unreachable(failure):
            self.last_refusal = state.last = failure
            if state.failing_since is None:
                state.failing_since = self.clock()
                return None
            return self.check()
        self.other_results += 1
        return None

    def _give_up(self, state: _Replica, why: str) -> str | None:
        state.gone, state.gone_at = why, self.clock()
        return self.check()

    def give_up(self, replica: str, why: str) -> None:
        """``replica`` is out of the run for good (dropped at preflight, or found wanting by a probe)."""
        state = self._state(replica)
        if state.gone is None:
            state.gone, state.gone_at = why, self.clock()

    def check(self) -> str | None:
        """The verdict, if every replica is now gone or unreachable for the window (also called on a
        timer: with every replica set aside, no request fails to say so)."""
        if self.verdict is not None:
            return self.verdict
        states = list(self.replicas.values())
        if any(s.gone is None and s.failing_since is None for s in states):
            return None
        now = self.clock()
        failing = [s.failing_since for s in states if s.gone is None and s.failing_since is not None]
        if failing and now - max(failing) < self.window:
            return None
        if self._one is not None:
            one = self._one
            if one.gone is not None:
                self.verdict = f"{self.describe} {one.gone}"
            else:
                message = one.last.message if one.last is not None else ""
                self.verdict = (
                    f"{self.describe} has been unreachable for {now - _since(one, now):.0f} s "
                    f"(--outage-window {self.window:g}): {message}"
                )
            return self.verdict
        reasons = []
        for name, s in self.replicas.items():
            if s.gone is not None:
                reasons.append(f"{name} {s.gone}")
            else:
                message = s.last.message if s.last is not None else ""
                reasons.append(f"{name} has been unreachable for {now - _since(s, now):.0f} s: {message}")
        self.verdict = f"every replica is unusable (--outage-window {self.window:g}): " + "; ".join(reasons)
        return self.verdict

    def final_verdict(self) -> str | None:
        """At the end of a run too small to reach a threshold: did every request fail for the endpoint?"""
        failure = self.last_refusal
        if self.verdict is None and self.successes == 0 and self.other_results == 0 and failure is not None:
            what = {
                "auth": f"rejected the credentials (HTTP {failure.http_status})",
                "not_found": "answered 404 (unknown model or wrong URL)",
            }.get(failure.error_type, "could not be reached")
            self.verdict = f"{self.describe} {what} on every request: {failure.message}"
        return self.verdict


def _since(state: _Replica, now: float) -> float:
    return now if state.failing_since is None else state.failing_since
