"""Overlapping shards in one shard runner: they hand out their jobs one after another, in start order."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from emulator import EmulatorServer
from tasks.config import RunConfig
from tasks.endpoint import sender as item_sender
from tasks.endpoint.answers import Answer
from tasks.inputs.prompt import DEFAULT_PROMPT
from tasks.inputs.work_items import ImageJob, Shard
from tasks.row import ResultRow
from tasks.run.shard_runner import ShardRunner
from tests.builders import shard_runner, write_images


@pytest.fixture
def image(tmp_path: Path) -> str:
    return str(write_images(tmp_path / "img", {"one": ((32, 24), "green")})["one"])


def make_runner(tmp_path: Path, rows: list[ResultRow]) -> ShardRunner:
    """A dry-run shard runner (everything but the request), rows collected as they are emitted."""
    return shard_runner(
        tmp_path, RunConfig(out=str(tmp_path / "out"), dry_run=True, endpoint={"concurrency": 4}), rows
    )


def shard(index: int, image: str, jobs: int) -> Shard:
    return Shard(index, [ImageJob(f"s{index}-{i:03d}", image, [DEFAULT_PROMPT]) for i in range(jobs)])


def test_a_later_shard_takes_no_job_before_the_earlier_one_has_handed_out_its_last(
    tmp_path: Path, image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    taken: list[str] = []
    real_job = ShardRunner._job

    async def job(self: ShardRunner, shard_index: int, one: ImageJob) -> None:
        taken.append(one.image_id or "")
        await real_job(self, shard_index, one)

    monkeypatch.setattr(ShardRunner, "_job", job)
    rows: list[ResultRow] = []

    async def main() -> int:
        runner = make_runner(tmp_path, rows)
        try:
            size = 3 * runner.workers  # more jobs than workers: side by side, the shards would interleave
            await asyncio.gather(*(runner.run(shard(i, image, size)) for i in range(3)))
        finally:
            await runner.aclose()
        return size

    size = asyncio.run(main())
    assert len(rows) == len(taken) == 3 * size and all(row.status == "ok" for row in rows)
    shards = [image_id.split("-")[0] for image_id in taken]
    assert shards == ["s0"] * size + ["s1"] * size + ["s2"] * size


def test_a_cancelled_shard_does_not_hold_up_the_next(tmp_path: Path, image: str) -> None:
    rows: list[ResultRow] = []

    async def main() -> None:
        runner = make_runner(tmp_path, rows)
        try:
            first = asyncio.create_task(runner.run(shard(0, image, 10 * runner.workers)))
            second = asyncio.create_task(runner.run(shard(1, image, 5)))
            while not rows:  # the first shard is under way, the second waits for its turn
                await asyncio.sleep(0.001)
            assert not any(str(row.image_id).startswith("s1") for row in rows)
            first.cancel()
            await asyncio.wait_for(second, 10)
            assert first.cancelled()
        finally:
            await runner.aclose()

    asyncio.run(main())
    assert sorted(str(row.image_id) for row in rows if str(row.image_id).startswith("s1")) == [
        f"s1-{i:03d}" for i in range(5)
    ]


def test_a_failure_inside_vlmbatch_costs_its_row_not_the_shard(
    tmp_path: Path,
    image: str,
    emulator: EmulatorServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_fill = item_sender._fill

    def fill(row: ResultRow, answer: Answer, keep_reasoning: bool) -> None:
        if row.image_id == "s0-001":
            raise RuntimeError("a bug")
        real_fill(row, answer, keep_reasoning)

    monkeypatch.setattr(item_sender, "_fill", fill)
    rows: list[ResultRow] = []
    config = RunConfig(
        out=str(tmp_path / "out"), endpoint={"base_url": emulator.base_url, "preflight": False}
    )

    async def main() -> None:
        runner = shard_runner(tmp_path, config, rows)
        try:
            await runner.run(shard(0, image, 3))
        finally:
            await runner.aclose()

    asyncio.run(main())
    by_id = {row.image_id: row for row in rows}
    assert sorted(by_id) == ["s0-000", "s0-001", "s0-002"]
    assert by_id["s0-000"].status == by_id["s0-002"].status == "ok"
    failed = by_id["s0-001"]
    assert (failed.status, failed.error_type) == ("failed", "internal_error")
    assert failed.error_message == "vlmbatch failed on this item: RuntimeError: a bug"
    assert "image 's0-001', prompt 'caption': failed inside vlmbatch" in caplog.text
    assert emulator.stats()["requests_total"] == 3
