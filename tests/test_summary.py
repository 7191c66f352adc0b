"""The run summary: latency percentiles (constant memory, within 1 % of the exact values), as printed."""

from __future__ import annotations

import json
import random

import pyarrow as pa
from rich.console import Console

from flows.cli.summary_table import print_summary
from tasks.latency import LatencyHistogram
from tasks.outputs.summary import AnswerSample, RunSummary, calls_text, percentile
from tasks.row import ResultRow


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


def test_a_whole_column_at_once_counts_as_each_value_would() -> None:
    rng = random.Random(3)
    values = [rng.lognormvariate(5, 1.5) for _ in range(5_000)] + [0.0, -1.0, 0.004, 1e6]
    one_by_one, at_once = LatencyHistogram(), LatencyHistogram()
    for value in values:
        one_by_one.add(value)
    at_once.add_many(pa.chunked_array([pa.array(values[:100]), pa.array([None, *values[100:]])]))
    at_once.add_many(pa.array([], pa.float64()))
    assert at_once.total == one_by_one.total == len(values)
    assert at_once.counts == one_by_one.counts
    assert [n for _, n in at_once.buckets()] == [n for _, n in sorted(one_by_one.counts.items())]


def test_one_value() -> None:
    histogram = LatencyHistogram()
    histogram.add(123.0)
    assert histogram.percentile(50) == histogram.percentile(95) and abs(histogram.percentile(50) - 123) <= 1.3


def test_the_printed_summary_gives_the_elapsed_time_to_the_hundredth() -> None:
    """A short job's time (the saturation benchmark reads it: 0.1 s is 1.2 % of an 8 s job)."""
    console = Console(record=True, width=100)
    print_summary(RunSummary(work_items=4000, ok=4000, elapsed_s=8.437, rows_per_s=474.1), console)
    text = console.export_text()
    assert "8.44 s (474.1 rows/s)" in text and "ok" in text


def test_latency_percentiles_are_of_answers_not_of_failures() -> None:
    """Failed rows carry their last attempt's latency; a fast 429 or a long timeout is not an answer."""
    from tasks.errors import ItemFailure
    from tasks.outputs.summary import SummaryBuilder, summarize_table
    from tasks.outputs.table import rows_to_table
    from tasks.row import OUTPUT_SCHEMA, ResultRow

    ok = ResultRow("a", "p", "caption", "ok", text="x", latency_ms=100.0)
    failed = ResultRow("b", "p", "caption", "ok", latency_ms=30_000.0).fail(ItemFailure("timeout", "slow"))
    builder = SummaryBuilder()
    for row in (ok, failed):
        builder.add(row)
    built = builder.build(work_items=2, elapsed_s=1.0, out=None)
    assert built.latency_p95_ms is not None and abs(built.latency_p95_ms - 100) <= 1.5
    read = summarize_table(rows_to_table([ok, failed], OUTPUT_SCHEMA), out="o")
    assert read.latency_p95_ms == 100.0 and read.failed == 1


def test_the_answer_sample_keeps_a_few_first_answers_per_prompt_whatever_the_run_size() -> None:
    sample = AnswerSample(per_prompt=2, prompts=3, words=5)
    for i in range(10_000):
        prompt = f"p{i % 7}"
        sample.add(
            ResultRow(image_id=f"img{i}", prompt_id=prompt, task="qa", status="ok", text=f"answer {i} " * 4)
        )
    sample.add(ResultRow(image_id="x", prompt_id="p0", task="qa", status="failed", error_type="timeout"))
    rows = sample.rows
    assert [(r.prompt_id, r.image_id) for r in rows] == [
        ("p0", "img0"), ("p0", "img7"), ("p1", "img1"), ("p1", "img8"), ("p2", "img2"), ("p2", "img9"),
    ]  # fmt: skip
    assert rows[0].answer == "answer 0 answer 0 answer…"
    short = AnswerSample(words=5)
    short.add(ResultRow(image_id=None, prompt_id="j", task="qa", status="ok", text="", json='{"a": 1}'))
    short.add(ResultRow(image_id=None, prompt_id="u", task="qa", status="ok", text="x" * 500))
    assert [r.answer for r in short.rows] == ['{"a": 1}', "x" * 50 + "…"]


def test_the_answer_sample_shows_an_answer_that_is_only_a_function_call() -> None:
    sample = AnswerSample()
    calls = [
        {"name": "record_detections", "arguments": {"count": 3, "labels": ["cat", "dog", "cat"]}},
        {"name": "done", "arguments": {}},
    ]
    sample.add(ResultRow(None, "detect", "qa", "ok", tool_calls=json.dumps(calls)))
    sample.add(ResultRow(None, "other", "qa", "ok", text="  ", tool_calls='[{"name": "f", "arguments": 1}]'))
    sample.add(ResultRow(None, "odd", "qa", "ok", tool_calls='{"not": "a list"}'))
    deep = '[{"name": "f", "arguments": ' + "[" * 100_000 + "]" * 100_000 + "}]"
    sample.add(ResultRow(None, "deep", "qa", "ok", tool_calls=deep))
    assert [r.answer for r in sample.rows] == [
        'record_detections(count=3, labels=["cat", "dog", "cat"]); done()',
        "f(1)",
        '{"not": "a list"}',
        deep[:120] + "…",
    ]
    assert calls_text(json.dumps(calls)) == 'record_detections(count=3, labels=["cat", "dog", "cat"]); done()'
    assert calls_text(None) is None and calls_text("not json") == "not json"
