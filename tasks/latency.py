"""Latency percentiles in constant memory: a run's answers (tasks/outputs/summary.py) and each replica's
(tasks/endpoint/replicas.py) and ``vlmbatch report``'s (tasks/outputs/report_data.py) go through this one
histogram."""

from __future__ import annotations

import math
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc


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

    def add_many(self, values: pa.Array | pa.ChunkedArray) -> None:
        """``add`` for each non-null value of an Arrow array, the buckets computed by Arrow (a part file of
        rows in one call, not a Python call per row)."""
        values = values.drop_null()
        if not len(values):
            return
        clipped = pc.max_element_wise(pc.cast(values, pa.float64()), self.FLOOR_MS)
        buckets = pc.floor(pc.divide(pc.ln(pc.divide(clipped, self.FLOOR_MS)), self.STEP))
        found = pc.value_counts(pc.cast(buckets, pa.int64()))
        for bucket, n in zip(
            found.field("values").to_pylist(), found.field("counts").to_pylist(), strict=True
        ):
            self.counts[bucket] += n
        self.total += len(values)

    def buckets(self) -> list[tuple[float, int]]:
        """(the bucket's middle value, its count), smallest first."""
        return [
            (self.FLOOR_MS * math.exp((bucket + 0.5) * self.STEP), n)
            for bucket, n in sorted(self.counts.items())
        ]

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
