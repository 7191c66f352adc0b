"""Latency percentiles in constant memory: a run's answers (tasks/outputs/summary.py) and each replica's
(tasks/endpoint/replicas.py) go through this one histogram."""

from __future__ import annotations

import math
from collections import Counter


class LatencyHistogram:
    """Latencies in log-spaced buckets 1 % wide: percentiles within 1 %, in constant memory (a run of
    a million rows must not keep a million floats)."""

    STEP = math.log(1.01)
    FLOOR_MS = 0.01

    def __init__(self) -> None:
        self.counts: Counter[int] = Counter()
        self.total = 0

    def add(self, ms: float) -> None:
        self.counts[math.floor(math.log(max(ms, self.FLOOR_MS) / self.FLOOR_MS) / self.STEP)] += 1
        self.total += 1

    def percentile(self, q: float) -> float | None:
        if not self.total:
            return None
        rank = max(1, math.ceil(q / 100 * self.total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return round(self.FLOOR_MS * math.exp((bucket + 0.5) * self.STEP), 1)
        return None  # unreachable: the counts add up to total
