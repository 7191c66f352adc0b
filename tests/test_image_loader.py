"""The image loader as the shard runner drives it: images read and prepared a few at a time, hashed once."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import threading
import types
from pathlib import Path
from typing import Any

import pytest

import tasks.images.loader as image_loader
from tasks.config import ImageConfig, RunConfig
from tasks.endpoint.sender import ItemSender
from tasks.images import object_store
from tasks.images.prepare import PreparedImage, prepare_image
from tasks.inputs.prompt import DEFAULT_PROMPT
from tasks.inputs.work_items import ImageJob, ManyImages, Shard
from tasks.row import ResultRow
from tasks.run.shard_runner import ShardRunner
from tests.builders import COLOURS, image_bytes, shard_runner, write_images


class Trace:
    """What the pool did, in order: ("read", name) and ("prepared", name) events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.hashed = 0
        self.lock = threading.Lock()

    def add(self, what: str, name: str) -> None:
        with self.lock:
            self.events.append((what, name))

    def most_read_not_prepared(self) -> int:
        outstanding = peak = 0
        for what, _ in self.events:
            outstanding += 1 if what == "read" else -1
            peak = max(peak, outstanding)
        return peak


@pytest.fixture
def trace(monkeypatch: pytest.MonkeyPatch) -> Trace:
    trace = Trace()
    real_read, real_sha = image_loader.read_image_bytes, image_loader._sha256

    def read(source: Any, config: ImageConfig, *, image_root: Path) -> bytes:
        trace.add("read", Path(str(source.value)).stem)
        return real_read(source, config, image_root=image_root)

    def prepare(data: bytes, config: ImageConfig, sha256: str | None = None) -> PreparedImage:
        prepared = prepare_image(data, config, sha256)
        trace.add("prepared", prepared.sha256)
        return prepared

    def sha(data: bytes) -> str:
        with trace.lock:
            trace.hashed += 1
        return real_sha(data)

    monkeypatch.setattr(image_loader, "read_image_bytes", read)
    monkeypatch.setattr(image_loader, "prepare_image", prepare)
    monkeypatch.setattr(image_loader, "_sha256", sha)
    return trace


def local_images(tmp_path: Path, count: int) -> dict[str, str]:
    colours = list(COLOURS)
    specs = {f"im{i:03d}": ((40 + i, 30), colours[i % 4]) for i in range(count)}
    return {image_id: str(path) for image_id, path in write_images(tmp_path / "img", specs).items()}


def run_dry(tmp_path: Path, images: int | dict[str, str]) -> tuple[list[ResultRow], ShardRunner]:
    """A dry-run shard (everything but the request) through the shard runner: ``images`` local JPEGs,
    or these manifest values by image id."""
    values = local_images(tmp_path, images) if isinstance(images, int) else images
    jobs = [ImageJob(image_id, value, [DEFAULT_PROMPT]) for image_id, value in values.items()]
    return run_jobs(
        tmp_path, RunConfig(out=str(tmp_path / "out"), dry_run=True, endpoint={"concurrency": 64}), jobs
    )


def run_jobs(tmp_path: Path, config: RunConfig, jobs: list[ImageJob]) -> tuple[list[ResultRow], ShardRunner]:
    """One shard of ``jobs`` through a shard runner; the rows it emitted, and the runner."""
    rows: list[ResultRow] = []

    async def main() -> ShardRunner:
        runner = shard_runner(tmp_path, config, rows)
        try:
            await runner.run(Shard(0, jobs))
        finally:
            await runner.aclose()
        return runner

    return rows, asyncio.run(main())


def test_images_are_read_a_few_at_a_time_each_prepared_before_more_are_read(
    tmp_path: Path, trace: Trace
) -> None:
    rows, runner = run_dry(tmp_path, 60)
    assert len(rows) == 60 and all(row.status == "ok" and row.request_key for row in rows)
    bound = 2 * runner.images.pool._max_workers
    # 64 request slots and room for 60 images in progress: without the turns, all 60 were read before
    # the first was prepared (the pool runs in arrival order), and their bytes held at once
    assert trace.most_read_not_prepared() <= bound
    reads = [i for i, (what, _) in enumerate(trace.events) if what == "read"]
    first_prepared = next(i for i, (what, _) in enumerate(trace.events) if what == "prepared")
    assert first_prepared < reads[bound]  # the first image was ready long before the last was read


def test_each_image_is_hashed_once_and_the_hash_is_of_its_bytes(tmp_path: Path, trace: Trace) -> None:
    rows, _ = run_dry(tmp_path, 8)
    assert trace.hashed == 8  # by the loader; prepare_image was given the digest, not asked again
    for row in rows:
        data = (tmp_path / "img" / f"{row.image_id}.jpg").read_bytes()
        assert row.image_sha256 == hashlib.sha256(data).hexdigest()


def test_prepare_image_computes_the_digest_only_when_not_given() -> None:
    data = image_bytes((20, 10), COLOURS["red"])
    assert prepare_image(data, ImageConfig()).sha256 == hashlib.sha256(data).hexdigest()
    assert prepare_image(data, ImageConfig(), "given").sha256 == "given"


def test_object_store_images_are_read_many_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read waits on the network: they are not queued behind the cores' few image threads."""
    lock = threading.Lock()
    reading = most = 0
    release = threading.Event()

    def read_object(url: str, max_bytes: int) -> bytes:
        nonlocal reading, most
        with lock:
            reading += 1
            most = max(most, reading)
            if most == 24:
                release.set()
        release.wait(3)  # a slow store: every read waits until all 24 are under way (or 3 s)
        with lock:
            reading -= 1
        return image_bytes((24, 16), COLOURS["blue"])

    monkeypatch.setattr(object_store, "read_object", read_object)
    rows, _ = run_dry(tmp_path, {f"o{i:02d}": f"s3://photos/o{i:02d}.jpg" for i in range(24)})
    assert len(rows) == 24 and all(row.status == "ok" and row.sent_width == 24 for row in rows)
    assert most == 24 <= image_loader.OBJECT_STORE_READS  # not the image pool's few threads


def test_a_shard_runs_on_a_few_workers_not_a_coroutine_per_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = most = 0
    real_job = ShardRunner._job

    async def job(self: ShardRunner, shard_index: int, one: ImageJob) -> None:
        nonlocal live, most
        live += 1
        most = max(most, live)
        try:
            await real_job(self, shard_index, one)
        finally:
            live -= 1

    monkeypatch.setattr(ShardRunner, "_job", job)
    rows, runner = run_dry(tmp_path, 150)
    assert len(rows) == 150 and {row.image_id for row in rows} == {f"im{i:03d}" for i in range(150)}
    assert most <= runner.workers < 150  # 64 request slots + a few: not one coroutine per job


def test_an_images_original_bytes_are_let_go_before_its_request_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the prepared image travels with the request: a phone photo's megabytes, kept for every
    request in flight, would be hundreds of MB at C=256."""
    originals: list[bytes] = []
    real_read = image_loader.read_image_bytes

    def read(source: Any, config: ImageConfig, *, image_root: Path) -> bytes:
        data = bytes(bytearray(real_read(source, config, image_root=image_root)))  # an object of its own
        originals.append(data)
        return data

    in_flight: list[ResultRow] = []
    all_out = asyncio.Event()
    held: list[int] = []

    async def fill(self: ItemSender, row: ResultRow, request: Any) -> bool:
        in_flight.append(row)
        if len(in_flight) == 7:  # every request is out at once: no image is being read or prepared
            gc.collect()
            for data in originals:
                holders = [r for r in gc.get_referrers(data) if r is not originals]
                held.append(sum(not isinstance(r, types.FrameType) for r in holders))  # this frame aside
            all_out.set()
        await all_out.wait()
        row.text = "a caption"
        return True

    monkeypatch.setattr(image_loader, "read_image_bytes", read)
    monkeypatch.setattr(ItemSender, "fill", fill)
    values = local_images(tmp_path, 6)
    jobs = [ImageJob(image_id, value, [DEFAULT_PROMPT]) for image_id, value in values.items()]
    jobs.append(
        ImageJob(
            "pair", ManyImages((("im000", values["im000"]), ("im001", values["im001"]))), [DEFAULT_PROMPT]
        )
    )
    rows, _ = run_jobs(tmp_path, RunConfig(out=str(tmp_path / "out"), endpoint={"concurrency": 4}), jobs)
    assert len(rows) == 7 and all(row.status == "ok" and row.text == "a caption" for row in rows)
    assert len(originals) == 8  # six images, and the pair's two read again for it
    assert held == [0] * 8
