"""Date templating, the scheduled default date, partition selection, backfill outcomes (fast, no flow)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

from flows.artifacts import artifact_key, summary_markdown
from tasks.config import RunConfig, build_config
from tasks.errors import ConfigError
from tasks.outputs.summary import RunSummary, SampleAnswer
from tasks.partitions import (
    date_range,
    day_before,
    needs_date,
    parse_date,
    render,
    resolve_paths,
    select_partitions,
)
from tests.builders import write_parquet
from tests.cli import vlmbatch

TEMPLATE = {"images": "m/date={date}/images.parquet", "out": "out/date={date}"}


def test_parse_date_is_strict() -> None:
    assert parse_date("2024-02-29") == date(2024, 2, 29)
    assert parse_date(date(2024, 1, 2)) == date(2024, 1, 2)
    for bad in ("2024-02-30", "20240101", "2024/01/01", "2024-1-1", "yesterday"):
        with pytest.raises(ConfigError, match="--date"):
            parse_date(bad)


def test_render_replaces_only_the_placeholder() -> None:
    assert render("m/date={date}/x-{date}.parquet", "2024-05-01") == "m/date=2024-05-01/x-2024-05-01.parquet"
    assert render("m/{other}/{date}", date(2024, 5, 1)) == "m/{other}/2024-05-01"


def test_resolve_paths_fills_every_templated_path() -> None:
    cfg = build_config(
        {**TEMPLATE, "prompts": "p/{date}.parquet", "image_root": "img/{date}", "date": "2024-05-01"},
        environ={},
    )
    resolved = resolve_paths(cfg)
    assert resolved.images == "m/date=2024-05-01/images.parquet"
    assert resolved.out == "out/date=2024-05-01"
    assert resolved.prompts == "p/2024-05-01.parquet"
    assert resolved.image.image_root == "img/2024-05-01"
    assert resolved.date == "2024-05-01" and not needs_date(resolved)
    plain = build_config({"images": "a.parquet", "out": "o"}, environ={})
    assert resolve_paths(plain) is plain


def test_a_placeholder_without_a_date_is_a_config_error() -> None:
    cfg = build_config(TEMPLATE, environ={})
    with pytest.raises(ConfigError, match=r"IMAGES, --out contain \{date\}: give --date YYYY-MM-DD"):
        resolve_paths(cfg)
    with pytest.raises(ConfigError, match="--date"):
        build_config({**TEMPLATE, "date": "2024-13-01"}, environ={})


def test_scheduled_runs_take_the_day_before_in_the_schedules_timezone() -> None:
    # 02:00 in Berlin (summer time) is 00:00 UTC: the partition is the 1st, in Berlin and in UTC
    assert day_before(datetime(2024, 5, 2, 0, 0, tzinfo=UTC), "Europe/Berlin") == date(2024, 5, 1)
    # 23:30 UTC on the 1st is already the 2nd in Tokyo: the day before is the 1st there, the 30th in UTC
    late = datetime(2024, 5, 1, 23, 30, tzinfo=UTC)
    assert day_before(late, "Asia/Tokyo") == date(2024, 5, 1)
    assert day_before(late, None) == date(2024, 4, 30)
    assert day_before(datetime(2024, 3, 1, 2, 0), "UTC") == date(2024, 2, 29)  # naive means UTC
    with pytest.raises(ConfigError, match="unknown timezone"):
        day_before(late, "Mars/Olympus")


def test_date_range_is_inclusive_and_checked() -> None:
    assert date_range("2024-02-28", "2024-03-01") == [date(2024, 2, 28), date(2024, 2, 29), date(2024, 3, 1)]
    assert date_range("2024-05-01", "2024-05-01") == [date(2024, 5, 1)]
    with pytest.raises(ConfigError, match="before --start"):
        date_range("2024-05-02", "2024-05-01")
    with pytest.raises(ConfigError, match="partitions"):
        date_range("2000-01-01", "2024-01-01")
    with pytest.raises(ConfigError, match="--end"):
        date_range("2024-05-01", "May 2")


def test_select_partitions_marks_missing_inputs(tmp_path: Path) -> None:
    for day in ("2024-05-01", "2024-05-03"):
        write_parquet(tmp_path / f"m/date={day}/images.parquet", {"image_id": ["a"], "image": ["a.jpg"]})
    write_parquet(tmp_path / "p/2024-05-01.parquet", {"prompt_id": ["c"], "prompt": ["Caption."]})
    template = RunConfig(
        images=f"{tmp_path}/m/date={{date}}/images.parquet",
        prompts=f"{tmp_path}/p/{{date}}.parquet",
        out=f"{tmp_path}/out/date={{date}}",
    )
    parts = select_partitions(template, "2024-05-01", date(2024, 5, 3))
    assert [p.name for p in parts] == ["2024-05-01", "2024-05-02", "2024-05-03"]
    assert parts[0].missing is None
    assert parts[0].config.out == f"{tmp_path}/out/date=2024-05-01" and parts[0].config.date == "2024-05-01"
    assert parts[1].missing is not None and parts[1].missing.startswith("images manifest")
    assert parts[2].missing is not None and parts[2].missing.startswith("prompts manifest")


def test_a_backfill_needs_the_placeholder_in_out() -> None:
    with pytest.raises(ConfigError, match=r"\{date\} in --out"):
        select_partitions(RunConfig(images="m/{date}.parquet", out="out"), "2024-05-01", "2024-05-02")


def test_a_manifest_path_without_the_placeholder_must_exist(tmp_path: Path) -> None:
    """The same file for every date: a typo in it is a usage error, not a missing input everywhere."""
    write_parquet(tmp_path / "m/date=2024-05-01/images.parquet", {"image_id": ["a"], "image": ["a.jpg"]})
    template = RunConfig(
        images=f"{tmp_path}/m/date={{date}}/images.parquet",
        prompts=f"{tmp_path}/prompts-typo.parquet",
        out=f"{tmp_path}/out/date={{date}}",
    )
    with pytest.raises(
        ConfigError, match=r"--prompts .*prompts-typo.parquet does not exist \(and has no \{date\}"
    ):
        select_partitions(template, "2024-05-01", "2024-05-02")


def test_run_with_a_templated_path_and_no_date_exits_1(tmp_path: Path) -> None:
    res = vlmbatch("run", tmp_path / "m/date={date}/images.parquet", "--out", tmp_path / "o/{date}")
    assert res.code == 1
    assert "contain {date}: give --date YYYY-MM-DD" in res.err
    res = vlmbatch(
        "run", tmp_path / "m/date={date}/images.parquet", "--out", tmp_path / "o", "--date", "05/01"
    )
    assert res.code == 1 and "--date" in res.err


def test_summary_artifact_and_keys() -> None:
    summary = RunSummary(
        out="/data/out/date=2024-05-01",
        work_items=10,
        skipped=2,
        ok=7,
        failed=1,
        errors={"rate_limited": 1},
        prompt_tokens=700,
        completion_tokens=120,
        requests=9,
        latency_p50_ms=101.0,
        latency_p95_ms=180.4,
        elapsed_s=2.0,
        rows_per_s=4.0,
    )
    text = summary_markdown(summary, title="annotate 2024-05-01")
    for needle in (
        "## annotate 2024-05-01",
        "| ok | 7 |",
        "| failed | 1 |",
        "| failed: `rate_limited` | 1 |",
        "| prompt tokens | 700 |",
        "| latency p50 / p95 | 101 ms / 180 ms |",
        "| rows per second | 4.00 |",
        "`/data/out/date=2024-05-01`",
    ):
        assert needle in text
    assert artifact_key("annotate-summary", "2024-05-01") == "annotate-summary-2024-05-01"
    assert artifact_key("Backfill", "A_B") == "backfill-a-b"


def test_the_summary_artifact_shows_a_few_answers_that_cannot_break_its_table() -> None:
    sample = [
        SampleAnswer(prompt_id="caption", image_id="cat", answer="A grey cat on a sofa."),
        SampleAnswer(prompt_id="a|b", image_id=None, answer="x | y\n\n## no heading <script>f()</script>"),
        SampleAnswer(prompt_id="md", image_id="i_1", answer="*bold* `code` [link](http://x) \\| ~~x~~ &amp;"),
    ]
    text = summary_markdown(RunSummary(work_items=3, ok=3), title="annotate", sample=sample)
    table = text.split("### Sample answers\n\n")[1].splitlines()
    assert table[:2] == ["| prompt | image | answer (first words) |", "|---|---|---|"]
    assert table[2] == "| caption | cat | A grey cat on a sofa. |"
    assert len(table) == 5  # one line per answer: the newlines are gone
    for line in table:
        assert len(re.findall(r"(?<!\\)\|", line.replace("\\\\", ""))) == 4  # only the table's own pipes
    assert table[3] == "| a\\|b | – | x \\| y ## no heading &lt;script&gt;f()&lt;/script&gt; |"
    assert table[4] == (
        "| md | i\\_1 | \\*bold\\* \\`code\\` \\[link\\](http://x) \\\\\\| \\~\\~x\\~\\~ &amp;amp; |"
    )
    assert "<script>" not in text
    assert "Sample answers" not in summary_markdown(RunSummary(), title="annotate")


def test_the_servers_finish_reasons_cannot_break_the_summary_table() -> None:
    reasons = {"stop": 5, "a|b\n## heading <b>bold</b>": 2, "tool_calls": 1}
    text = summary_markdown(RunSummary(work_items=8, ok=8, finish_reasons=reasons), title="annotate")
    (line,) = [line for line in text.splitlines() if line.startswith("| finish reasons |")]
    assert (
        line == "| finish reasons | stop: 5, a\\|b ## heading &lt;b&gt;bold&lt;/b&gt;: 2, tool\\_calls: 1 |"
    )
    assert len(re.findall(r"(?<!\\)\|", line)) == 3  # only the table's own pipes
    assert "<b>" not in text and "\n## heading" not in text
