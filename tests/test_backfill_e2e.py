"""``vlmbatch backfill`` in-process (local mode): partitions resumed, skipped, missing; artifacts."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from emulator import EmulatorServer
from flows.artifacts import read_artifacts
from flows.backfill import PartitionOutcome, exit_code
from tasks.config import RunConfig
from tasks.errors import EndpointUnusable
from tasks.outputs.summary import RunSummary
from tests.builders import images_manifest
from tests.cli import rows, vlmbatch

D1, D2, D3 = "2024-05-01", "2024-05-02", "2024-05-03"


def _partition(root: Path, day: str, n: int) -> None:
    images_manifest(root / f"date={day}", {f"{day}-{k}": ((16 + k, 12), "blue") for k in range(n)})


def test_backfill_resumes_partial_skips_complete_and_reports_missing(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    manifests, out = tmp_path / "manifests", tmp_path / "out"
    _partition(manifests, D1, 6)  # D1 partial: 2 of 6 done below
    _partition(manifests, D3, 3)  # D3 complete below; D2 has no input at all
    images, out_t = manifests / "date={date}" / "images.parquet", out / "date={date}"
    common = ["--out", out_t, "--base-url", emulator.base_url, "--shard-size", 2]
    assert vlmbatch("run", images, *common, "--date", D1, "--limit", 2).code == 0
    assert vlmbatch("run", images, *common, "--date", D3).code == 0
    assert len(rows(out / f"date={D1}")) == 2
    d3_before = rows(out / f"date={D3}")
    emulator.reset()

    res = vlmbatch("backfill", images, *common, "--start", D1, "--end", D3, "--max-parallel", 2)
    assert res.code == 0, res.err + res.out
    assert emulator.stats()["requests_total"] == 4  # only D1's four missing items were sent
    assert len(rows(out / f"date={D1}")) == 6
    assert rows(out / f"date={D3}") == d3_before  # complete: untouched
    assert not (out / f"date={D2}").exists()
    lines = {line.split("│")[1].strip(): line for line in res.out.splitlines() if "│ 2024-" in line}
    assert "│ ok " in lines[D1] and "resumed: 2" in lines[D1]
    assert "missing input" in lines[D2]
    assert "skipped" in lines[D3]

    # the table artifact: partitions × outcome; every child publishes its own summary
    table = asyncio.run(read_artifacts(key="backfill-partitions"))[0]  # newest first
    outcomes = {row["partition"]: row for row in json.loads(table.data)}
    assert {d: outcomes[d]["outcome"] for d in (D1, D2, D3)} == {
        D1: "ok",
        D2: "missing input",
        D3: "skipped",
    }
    assert outcomes[D1]["ok"] == 4 and outcomes[D1]["skipped"] == 2 and outcomes[D3]["skipped"] == 3
    summary = asyncio.run(read_artifacts(key=f"annotate-summary-{D1}"))[0]
    assert "| ok | 4 |" in summary.data and f"date={D1}" in summary.data
    assert "| prompt | image | answer (first words) |" in summary.data  # and what was answered
    assert re.search(rf"\| caption \| {D1}-\d \| A 1\d×12 image", summary.data), summary.data

    # --force re-runs a complete partition
    emulator.reset()
    res = vlmbatch("backfill", images, *common, "--start", D3, "--end", D3, "--force")
    assert res.code == 0, res.err
    assert emulator.stats()["requests_total"] == 3
    assert len(rows(out / f"date={D3}")) == 3


async def _last_run_state(flow_name: str) -> tuple[str | None, str | None]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async with get_client() as client:
        (run,) = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
            limit=1,
            sort=FlowRunSort.START_TIME_DESC,
        )
    assert run.state is not None
    return run.state.name, run.state.message


def test_backfill_failed_rows_and_usage_errors(tmp_path: Path, emulator: EmulatorServer) -> None:
    manifests = tmp_path / "manifests"
    _partition(manifests, D1, 2)
    (manifests / f"date={D1}" / "img" / f"{D1}-0.jpg").write_bytes(b"not an image")
    images = manifests / "date={date}" / "images.parquet"
    base = ["backfill", images, "--base-url", emulator.base_url, "--start", D1, "--end", D1]
    res = vlmbatch(*base, "--out", tmp_path / "out" / "date={date}")
    assert res.code == 2  # a partition with failed rows
    assert "failed rows" in res.out and "bad_image: 1" in res.out
    assert asyncio.run(_last_run_state("backfill")) == (
        "CompletedWithFailures",  # what a deployment's run shows instead of the exit status
        f"1 rows failed in 1 partitions ({D1})",
    )
    res = vlmbatch(*base, "--out", tmp_path / "flat")
    assert res.code == 1 and "{date} in --out" in res.err
    typo = ["backfill", tmp_path / "manifest" / "date={date}" / "images.parquet", *base[2:]]
    res = vlmbatch(*typo, "--out", tmp_path / "out2" / "date={date}")
    assert res.code == 0 and "missing input" in res.out  # as documented, but said out loud:
    assert "warning: no date had its input" in res.err
    res = vlmbatch(*base[:-4], "--start", D1, "--end", "2024-04-30", "--out", tmp_path / "o" / "{date}")
    assert res.code == 1 and "before --start" in res.err


def test_a_stopped_partition_reports_what_it_did_and_a_dry_run_says_so(
    tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifests = tmp_path / "manifests"
    _partition(manifests, D1, 6)
    images = manifests / "date={date}" / "images.parquet"
    base = ["backfill", images, "--base-url", emulator.base_url, "--start", D1, "--end", D1]
    base += ["--out", tmp_path / "out" / "date={date}", "--concurrency", 1]

    res = vlmbatch(*base, "--dry-run", env={"COLUMNS": "200"})
    assert res.code == 0, res.err
    (line,) = [line for line in res.out.splitlines() if f"│ {D1}" in line]
    assert "dry run" in line and "nothing sent; 6 ready to send" in line
    assert emulator.stats()["requests_total"] == 0

    class Stopped:  # annotate for this partition: the endpoint became unusable after 2 answers
        def with_options(self, **_: object) -> object:
            async def child(config: RunConfig) -> RunSummary:
                summary = RunSummary(out=config.out, work_items=6, ok=2, failed=0)
                raise EndpointUnusable("aborted: the endpoint rejected the credentials", summary)

            return child

    monkeypatch.setattr("flows.backfill.annotate", Stopped())
    res = vlmbatch(*base, env={"COLUMNS": "200"})
    assert res.code == 3, res.err
    (line,) = [line for line in res.out.splitlines() if f"│ {D1}" in line]
    cells = [cell.strip() for cell in line.split("│")]
    assert cells[2:6] == ["error", "6", "2", "0"]  # what it did before it stopped, not zeros


def test_a_partition_that_finished_before_the_signal_is_ok_not_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tasks.errors import RunInterrupted

    manifests = tmp_path / "manifests"
    for day in (D1, D2):
        _partition(manifests, day, 3)

    class Signalled:  # SIGTERM came after D1's last row was written, and in the middle of D2
        def with_options(self, **_: object) -> object:
            async def child(config: RunConfig) -> RunSummary:
                await asyncio.sleep(0.5 if config.date == D2 else 0)  # both under way when it comes
                done = 3 if config.date == D1 else 1
                summary = RunSummary(out=config.out, work_items=3, ok=done, failed=0)
                raise RunInterrupted("interrupted by SIGTERM; rerun to continue", summary, 143)

            return child

    monkeypatch.setattr("flows.backfill.annotate", Signalled())
    images = manifests / "date={date}" / "images.parquet"
    res = vlmbatch(
        "backfill", images, "--out", tmp_path / "out" / "date={date}", "--start", D1, "--end", D2,
        "--base-url", "http://127.0.0.1:9/v1", env={"COLUMNS": "200"},
    )  # fmt: skip
    assert res.code == 143, res.err
    outcome = {
        d: [c.strip() for c in line.split("│")][2]
        for d in (D1, D2)
        for line in res.out.splitlines()
        if f"│ {d}" in line
    }
    assert outcome == {D1: "ok", D2: "interrupted"}
    alone = vlmbatch(
        "backfill", images, "--out", tmp_path / "out" / "date={date}", "--start", D1, "--end", D1,
        "--base-url", "http://127.0.0.1:9/v1",
    )  # fmt: skip
    assert alone.code == 143  # complete, but the backfill was still stopped by the signal


def test_a_partition_stopped_with_any_other_status_makes_the_backfill_exit_2() -> None:
    """A partition whose run lost its lease (4) or whose slices crashed (70) is an error, as README
    says: exit 2 (it exited 0 before), unless a stronger status (3, 130, 143) comes from another."""
    ok = PartitionOutcome(partition="2026-01-01", outcome="ok")
    for code in (1, 2, 4, 70):
        stopped = PartitionOutcome(partition="2026-01-02", outcome="error", exit_code=code)
        assert exit_code([ok, stopped]) == 2
    unusable = PartitionOutcome(partition="2026-01-03", outcome="error", exit_code=3)
    assert exit_code([ok, PartitionOutcome(partition="b", outcome="error", exit_code=4), unusable]) == 3
    assert exit_code([ok]) == 0
