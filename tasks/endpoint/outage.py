"""Tell an endpoint outage from failing work items, and stop the run instead of failing the rest.

The endpoint is unusable when, with no success in between:
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
from collections.abc import Callable

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


class OutageDetector:
    def __init__(
        self,
        *,
        window: float,
        threshold: int = 3,
        describe: str = "the endpoint",
        max_wait: float = MAX_RETRY_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window = window
        self.max_wait = max_wait
        self.threshold = threshold
        self.describe = describe
        self.clock = clock
        self.failing_since: float | None = None
        self.streak: dict[str, int] = {"auth": 0, "not_found": 0}
        self.verdict: str | None = None  # set once: why the endpoint is unusable
        self.successes = 0
        self.last_refusal: RequestFailure | None = None
        self.other_results = 0  # failures that say nothing about the endpoint as a whole

    def success(self) -> None:
        self.successes += 1
        self.failing_since = None
        self.streak = {"auth": 0, "not_found": 0}

    def failure(self, failure: RequestFailure) -> str | None:
        """Record a failed attempt; returns the verdict when this failure makes the endpoint unusable."""
        if self.verdict is not None:
            return None
        if _waits_too_long(failure, self.max_wait):
            self.verdict = (
                f"{self.describe} asks to wait {failure.retry_after:.0f} s before trying again (Retry-After, "
                f"HTTP {failure.http_status}), longer than a run waits ({self.max_wait:.0f} s): "
                f"{failure.message}"
            )
            return self.verdict
        if failure.error_type in self.streak:
            self.last_refusal = failure
            self.streak[failure.error_type] += 1
            other = "not_found" if failure.error_type == "auth" else "auth"
            self.streak[other] = 0
            if self.streak[failure.error_type] >= self.threshold:
                if failure.error_type == "auth":
                    self.verdict = (
                        f"{self.describe} rejected the credentials (HTTP {failure.http_status}) on "
                        f"{self.threshold} requests in a row: {failure.message}"
                    )
                else:
                    self.verdict = (
                        f"{self.describe} answered 404 on {self.threshold} requests in a row (unknown model "
                        f"or wrong URL): {failure.message}"
                    )
                return self.verdict
            return None
        if _unreachable(failure):
            self.last_refusal = failure
            now = self.clock()
            if self.failing_since is None:
                self.failing_since = now
            elif now - self.failing_since >= self.window:
                self.verdict = (
                    f"{self.describe} has been unreachable for {now - self.failing_since:.0f} s "
                    f"(--outage-window {self.window:g}): {failure.message}"
                )
                return self.verdict
            return None
        self.other_results += 1
        return None

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
