"""The run summary's latency percentiles: constant memory, within 1 % of the exact values."""

from __future__ import annotations

import random

from tasks.summary import LatencyHistogram, percentile


def test_histogram_percentiles_are_within_one_percent_of_the_exact_ones() -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(5, 1) for _ in range(20_000)] + [0.0, 0.003, 250_000.0]
    histogram = LatencyHistogram()
    for value in values:
        histogram.add(value)
    for q in (1, 50, 95, 99):
        exact = percentile(values, q)
        assert exact is not None
        got = histogram.percentile(q)
        assert got is not None and abs(got - exact) <= 0.01 * exact + 0.1, (q, got, exact)
    assert len(histogram.counts) < 1_500  # buckets, not values
    assert LatencyHistogram().percentile(50) is None


def test_one_value() -> None:
    histogram = LatencyHistogram()
    histogram.add(123.0)
    assert histogram.percentile(50) == histogram.percentile(95) and abs(histogram.percentile(50) - 123) <= 1.3
