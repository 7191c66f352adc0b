"""Counters of the model requests (chat completions, responses) received, safe to read from any thread."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any

LOG_SIZE = 20_000
FEATURES = ("with_tools", "tool_calls", "continued", "thinking_on", "thinking_off")


class Stats:
    """What happened to each model request: counted on arrival, status recorded on completion.

    A status is an HTTP code, ``"reset"`` (connection dropped on purpose) or ``"cancelled"`` (the
    client went away before the answer, e.g. its timeout fired during a ``hang`` or mid-stream).
    ``by_route`` counts arrivals per route path, ``streamed`` the answers sent as event streams.

    What the requests used, counted once a request's body is valid (whatever its outcome then), each
    also listed in its log entry's ``features``: ``with_tools`` (function tools offered, chat or
    Responses), ``tool_calls`` (answers that call a function), ``continued`` (a final assistant message
    continued: ``continue_final_message``), ``thinking_on`` (``enable_thinking`` truthy, or the
    Responses API's ``reasoning``) and ``thinking_off`` (``enable_thinking`` given and falsy, e.g.
    ``false``; absent counts as neither).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._clear()

    def _clear(self) -> None:
        self.requests_total = 0
        self.by_status: dict[str, int] = {}
        self.per_item: dict[str, int] = {}
        self.by_route: dict[str, int] = {}
        self.streamed = 0
        self.features: dict[str, int] = dict.fromkeys(FEATURES, 0)
        self.faults: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.processing = 0
        self.max_processing = 0
        self.log: deque[dict[str, Any]] = deque(maxlen=LOG_SIZE)

    def now(self) -> float:
        """Seconds since the server started."""
        return time.monotonic() - self._started

    def arrive(self, item: str, route: str = "/v1/chat/completions") -> int:
        """Count a request of work item ``item`` on ``route``; returns its attempt number (1-based)."""
        with self._lock:
            self.requests_total += 1
            self.by_route[route] = self.by_route.get(route, 0) + 1
            attempt = self.per_item.get(item, 0) + 1
            self.per_item[item] = attempt
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            return attempt

    def finish(
        self,
        item: str,
        status: int | str,
        arrived: float,
        fault: str | None,
        *,
        route: str = "/v1/chat/completions",
        streamed: bool = False,
        features: Iterable[str] = (),
    ) -> None:
        key = str(status)
        given = set(features)
        used = [name for name in FEATURES if name in given]
        entry = {
            "item": item,
            "status": status,
            "t": round(arrived, 6),
            "fault": fault,
            "route": route,
            "features": used,
        }
        with self._lock:
            for name in used:
                self.features[name] += 1
            self.in_flight -= 1
            self.by_status[key] = self.by_status.get(key, 0) + 1
            if fault is not None:
                self.faults[fault] = self.faults.get(fault, 0) + 1
            if streamed:
                self.streamed += 1
            self.log.append(entry)

    def start_processing(self) -> None:
        with self._lock:
            self.processing += 1
            self.max_processing = max(self.max_processing, self.processing)

    def stop_processing(self) -> None:
        with self._lock:
            self.processing -= 1

    def reset(self) -> None:
        """Forget everything but the requests still inside the server."""
        with self._lock:
            in_flight, processing = self.in_flight, self.processing
            self._clear()
            self.in_flight = self.max_in_flight = in_flight
            self.processing = self.max_processing = processing

    def snapshot(self, log: bool = True) -> dict[str, Any]:
        """A JSON-ready copy of every counter (``log``: with the log of requests, which may be long).
        ``monotonic_start`` is ``time.monotonic()`` when the server started: a log entry's ``t`` plus it is
        on the machine's monotonic clock, which other processes share (several emulators compared)."""
        with self._lock:
            return {
                "monotonic_start": self._started,
                "requests_total": self.requests_total,
                "by_status": dict(self.by_status),
                "per_item": dict(self.per_item),
                "by_route": dict(self.by_route),
                "streamed": self.streamed,
                **self.features,
                "max_in_flight": self.max_in_flight,
                "max_processing": self.max_processing,
                "in_flight": self.in_flight,
                "processing": self.processing,
                "faults": dict(self.faults),
                **({"log": list(self.log)} if log else {}),
            }
