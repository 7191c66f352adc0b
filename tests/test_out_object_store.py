"""OUT on S3: the real ``vlmbatch`` CLI against moto's S3 server on loopback and the endpoint emulator.

A run into ``s3://``, resume and replaced rows, inspect and export, a backfill partition, the writer's
lease (conditional create, two runs racing, refusal naming the holder, a killed holder's lease taken
over), and a ``kill -9`` mid-run with the rerun writing every item exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")
import pyarrow.parquet as pq

from emulator import EmulatorServer
from tasks.config import RunConfig
from tasks.errors import OutLost, UsageError
from tasks.outputs.lease import Lease
from tasks.outputs.lock import live_scopes, scope_holder, writer_of
from tasks.outputs.object_path import LeaseLost, ObjectPath, out_path
from tasks.run.job import Job
from tasks.run.plan import plan_run
from tests.builders import images_manifest
from tests.cli import vlmbatch
from tests.leases import race
from tests.s3_server import moto_server, s3_client, s3_env
from tests.s3_server import plain_rows as s3_rows
from tests.test_interrupts_e2e import kill_9, start, sub_env, wait_for  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def moto_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with moto_server(tmp_path_factory.mktemp("moto") / "server.log") as url:
        yield url


@pytest.fixture
def s3(moto_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A new bucket, and the environment pointing at it (as a user's would): its name."""
    values = s3_env(moto_url)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    bucket = f"out-{uuid.uuid4().hex[:12]}"
    client().create_bucket(Bucket=bucket)
    yield bucket


def client():  # type: ignore[no-untyped-def]
    return s3_client(os.environ["AWS_ENDPOINT_URL"])


def to_s3(env: dict[str, str], lease_ttl: float = 30) -> None:
    """Point the CLI subprocesses' environment at the bucket's S3 server, as ``s3`` does this process.

    A lease counts as lost ``lease_ttl / 2`` seconds after its last renewal: short ones (for tests of
    take-overs) must still leave a run a few seconds to renew on a loaded 2-core CI machine, where an
    in-process CLI holds pytest's GIL for a second or more."""
    env.update(s3_env(os.environ["AWS_ENDPOINT_URL"]), VLMBATCH_LEASE_TTL=f"{lease_ttl:g}")


def plain_rows(url: str) -> list[dict]:
    """What a plain ``pyarrow.dataset`` reader of OUT sees (pyarrow's own S3 filesystem)."""
    return s3_rows(os.environ["AWS_ENDPOINT_URL"], url)


def keys(bucket: str, prefix: str = "") -> list[str]:
    listed = client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(item["Key"] for item in listed.get("Contents", []))


def test_a_run_into_s3_resumes_replaces_and_reads_back(
    tmp_path: Path, emulator: EmulatorServer, s3: str
) -> None:
    images = images_manifest(tmp_path, {f"i{k}": ((20 + k, 20), "red") for k in range(6)})
    out = f"s3://{s3}/runs/out"
    client().put_object(Bucket=s3, Key="runs/out/.probe-0123", Body=b"")  # a killed run's debris
    args = ["run", images, "--out", out, "--base-url", emulator.base_url, "--shard-size", 4]
    res = vlmbatch(*args)
    assert res.code == 0, res.err
    got = plain_rows(out)
    assert [r["image_id"] for r in got] == [f"i{k}" for k in range(6)]
    assert {r["status"] for r in got} == {"ok"}
    stored = keys(s3, "runs/out/")
    assert len([k for k in stored if k.startswith("runs/out/part-")]) == 2  # a file per shard
    assert any(k.startswith("runs/out/_vlmbatch/hashes/") for k in stored)  # the hash cache
    assert not any("leases" in k for k in stored)  # released at the end
    assert "runs/out/.probe-0123" not in stored  # the debris cleaned up

    emulator.reset()  # resume: nothing sent, no image read again (the hash cache)
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 0

    emulator.reset()  # a changed request key for 3 items: their rows leave the older file (rewritten)
    assert vlmbatch(*args, "--max-tokens", 77, "--limit", 3).code == 0
    assert emulator.stats()["requests_total"] == 3
    assert [r["image_id"] for r in plain_rows(out)] == [f"i{k}" for k in range(6)]
    emulator.reset()  # and for all: every row replaced (emptied files deleted), none doubled
    assert vlmbatch(*args, "--max-tokens", 77).code == 0
    assert emulator.stats()["requests_total"] == 3
    again = plain_rows(out)
    assert [r["image_id"] for r in again] == [f"i{k}" for k in range(6)]
    assert all(r["request_key"] != old["request_key"] for r, old in zip(again, got, strict=True))

    shown = vlmbatch("inspect", out)
    assert shown.code == 0, shown.err
    assert "6" in shown.out and "ok" in shown.out
    dest = tmp_path / "all.parquet"
    exported = vlmbatch("export", out, dest)
    assert exported.code == 0, exported.err
    assert pq.read_table(dest).num_rows == 6
    page = vlmbatch("report", out, "-o", tmp_path / "report.html")
    assert page.code == 0, page.err
    assert "6 rows" in page.out


def test_foreign_objects_missing_bucket_and_a_backfill_partition(
    tmp_path: Path, emulator: EmulatorServer, s3: str
) -> None:
    images = images_manifest(tmp_path, {"a": ((20, 20), "red"), "b": ((30, 20), "blue")})
    client().put_object(Bucket=s3, Key="taken/notes.txt", Body=b"x")
    res = vlmbatch("run", images, "--out", f"s3://{s3}/taken", "--base-url", emulator.base_url)
    assert res.code == 1 and "notes.txt" in res.err
    res = vlmbatch("run", images, "--out", f"s3://no-{s3}/out", "--base-url", emulator.base_url)
    assert res.code == 1 and "no bucket" in res.err

    template = f"s3://{s3}/daily/date={{date}}"
    res = vlmbatch(
        "backfill", images, "--out", template, "--base-url", emulator.base_url,
        "--start", "2026-03-01", "--end", "2026-03-02",
    )  # fmt: skip
    assert res.code == 0, res.err + res.out
    for day in ("2026-03-01", "2026-03-02"):
        assert [r["image_id"] for r in plain_rows(f"s3://{s3}/daily/date={day}")] == ["a", "b"]


def test_two_runs_racing_for_a_lease_one_wins(s3: str) -> None:
    out = out_path(f"s3://{s3}/race")
    assert isinstance(out, ObjectPath)
    leases = [Lease(out, f"run-{k}", ttl=30) for k in range(4)]
    outcomes, winner = race(leases)
    refusals = [o for o in outcomes if o != "held"]
    assert all(f"is being written by run {winner.run_id} (pid " in o for o in refusals), refusals
    winner.release()
    assert keys(s3, "race/") == []


def test_a_lease_lapses_when_its_holder_stops_renewing_and_is_taken_over(s3: str) -> None:
    out = out_path(f"s3://{s3}/lapse")
    assert isinstance(out, ObjectPath)
    lost: list[str] = []
    first = Lease(out, "first", ttl=2, on_lost=lost.append)
    first.acquire()
    first._stop.set()  # as if frozen: no more renewals (the thread ends)
    first._thread.join()  # type: ignore[union-attr]
    first.check()  # still within half the time to live
    time.sleep(1.2)
    with pytest.raises(LeaseLost):
        first.check()  # past half its time to live: it writes no more
    assert lost and "not renewed" in lost[0]
    with pytest.raises(UsageError, match="is being written by run first"):
        Lease(out, "second", ttl=2).acquire()  # not yet expired for others
    time.sleep(2.2)  # the store's clock and Last-Modified are to the second: expired by 3 s at most
    second = Lease(out, "second", ttl=2)
    second.acquire()  # expired: taken over
    body = json.loads(client().get_object(Bucket=s3, Key="lapse/_vlmbatch/leases/out.json")["Body"].read())
    assert body["run_id"] == "second"
    second.release()


def test_a_whole_out_writer_and_a_scope_writer_exclude_each_other(s3: str) -> None:
    out = out_path(f"s3://{s3}/scopes")
    assert isinstance(out, ObjectPath)
    one, two = Lease(out, "slice-1", scope="slice-1-of-2"), Lease(out, "slice-2", scope="slice-2-of-2")
    one.acquire()
    two.acquire()  # two scopes side by side
    with pytest.raises(UsageError, match="is being written by run slice-"):
        Lease(out, "whole").acquire()
    with pytest.raises(UsageError, match="slices cut another way"):
        Lease(out, "thirds", scope="slice-1-of-3").acquire()
    with pytest.raises(UsageError, match=r"is being written by run slice-1 .*slice-1-of-2"):
        Lease(out, "again", scope="slice-1-of-2").acquire()
    assert live_scopes(out) == {"slice-1-of-2", "slice-2-of-2"}
    who = writer_of(out)
    assert who is not None and "run slice-1 " in who and "run slice-2 " in who
    two.release()
    one.release()
    assert live_scopes(out) == set() and writer_of(out) is None
    whole = Lease(out, "whole")
    whole.acquire()
    with pytest.raises(UsageError, match="is being written by run whole"):
        Lease(out, "slice-1", scope="slice-1-of-2").acquire()
    assert scope_holder(out, "out") is not None and scope_holder(out, "slice-1-of-2") is None
    whole.release()


def test_slices_written_side_by_side_into_s3_are_the_job_once(
    tmp_path: Path,
    emulator: EmulatorServer,
    s3: str,
    sub_env: dict[str, str],  # noqa: F811
    start: Callable[..., subprocess.Popen[str]],  # noqa: F811
) -> None:
    """Two slices run at once into one s3:// OUT (as two workers would), each holding its own lease;
    a slice cut another way refuses meanwhile; together they are every item once, and a run of the
    whole job afterwards sends nothing."""

    n = 40
    emulator.configure(latency=0.1)
    to_s3(sub_env)
    images = images_manifest(tmp_path, {f"i{k:03d}": ((10 + k, 10), "red") for k in range(n)})
    out = f"s3://{s3}/sliced"
    args = [
        "run",
        images,
        "--out",
        out,
        "--base-url",
        emulator.base_url,
        "--concurrency",
        2,
        "--shard-size",
        5,
    ]
    procs = [start([*args, "--slice", f"{k}/2"]) for k in (1, 2)]
    wait_for(lambda: len(keys(s3, "sliced/_vlmbatch/leases/")) == 2, procs[0])
    other = vlmbatch(*args, "--slice", "1/3")
    assert other.code == 1 and "slices cut another way" in other.err, other.err
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert emulator.stats()["requests_total"] == n  # each item sent once, by its own slice
    got = plain_rows(out)
    assert [r["image_id"] for r in got] == [f"i{k:03d}" for k in range(n)]
    parts = [k for k in keys(s3, "sliced/") if k.startswith("sliced/part-")]
    assert {p.split("-of-")[0] for p in parts} == {"sliced/part-slice-1", "sliced/part-slice-2"}
    emulator.configure(latency=0.01)
    emulator.reset()
    res = vlmbatch(*args)
    assert res.code == 0, res.err
    assert emulator.stats()["requests_total"] == 0


def test_kill_9_mid_run_then_the_lease_is_taken_over_and_every_item_written_once(
    tmp_path: Path,
    emulator: EmulatorServer,
    s3: str,
    sub_env: dict[str, str],  # noqa: F811
    start: Callable[..., subprocess.Popen[str]],  # noqa: F811
) -> None:

    n, concurrency, latency = 120, 4, 0.3
    warm = images_manifest(tmp_path / "warm", {"w": ((10, 10), "red")})  # Prefect's API up in this process
    assert vlmbatch("run", warm, "--out", f"s3://{s3}/warm", "--base-url", emulator.base_url).code == 0
    emulator.configure(latency=latency)
    emulator.reset()
    to_s3(sub_env, lease_ttl=6)
    images = images_manifest(tmp_path, {f"i{k:03d}": ((10 + k, 10), "red") for k in range(n)})
    out = f"s3://{s3}/killed"
    args = ["run", images, "--out", out, "--base-url", emulator.base_url,
            "--concurrency", concurrency, "--shard-size", 20]  # fmt: skip
    proc = start(args)
    answered = lambda: emulator.stats()["by_status"].get("200", 0)  # noqa: E731
    wait_for(lambda: answered() >= 24, proc)

    second = vlmbatch(*args)  # a second live run into the same OUT refuses, naming the holder
    assert proc.poll() is None, "the first run ended before the second one tried: make it longer"
    assert second.code == 1, second.err
    assert "is being written by run " in second.err and f"pid {proc.pid} " in second.err
    assert vlmbatch("export", out, tmp_path / "x.parquet").code == 1  # not while it is written

    kill_9(proc)
    killed_at = time.monotonic()
    answered_before_kill = answered()
    kept = plain_rows(out)
    assert len({(r["image_id"], r["prompt_id"]) for r in kept}) == len(kept)  # never a row twice
    lost = answered_before_kill - len(kept)
    assert 0 <= lost <= concurrency + (concurrency / latency) * 1.5  # in flight and ~a second of answers

    refused = vlmbatch(*args)  # its lease is still live (renewed under 6 s ago)
    if time.monotonic() - killed_at < 4:
        assert refused.code == 1 and f"pid {proc.pid} " in refused.err
    time.sleep(max(0.0, killed_at + 7.2 - time.monotonic()))  # its lease expired: the next run takes over
    emulator.configure(latency=0.01)
    emulator.reset()
    res = vlmbatch(*args)
    assert res.code == 0, res.err
    got = plain_rows(out)
    assert [r["image_id"] for r in got] == [f"i{k:03d}" for k in range(n)]
    assert all(r["status"] == "ok" for r in got)
    assert emulator.stats()["requests_total"] == n - len(kept)  # only what the killed run had not written


def test_a_run_whose_lease_is_taken_writes_no_more_and_exits_4(
    tmp_path: Path,
    emulator: EmulatorServer,
    s3: str,
    sub_env: dict[str, str],  # noqa: F811
    start: Callable[..., subprocess.Popen[str]],  # noqa: F811
) -> None:
    """As when the holder was frozen past its lease and another run took OUT over: the next renewal
    finds the lease not as it left it, and the run stops with exit 4, writing nothing after."""

    emulator.configure(latency=0.3)
    to_s3(sub_env, lease_ttl=6)
    images = images_manifest(tmp_path, {f"i{k:03d}": ((10 + k, 10), "red") for k in range(200)})
    args = ["run", images, "--out", f"s3://{s3}/taken", "--base-url", emulator.base_url,
            "--concurrency", 4, "--shard-size", 50]  # fmt: skip
    proc = start(args)
    wait_for(lambda: emulator.stats()["by_status"].get("200", 0) >= 8, proc)
    lease = "taken/_vlmbatch/leases/out.json"
    other = {"run_id": "usurper", "pid": 1, "host": "elsewhere", "since": "now", "ttl": 3}
    client().put_object(Bucket=s3, Key=lease, Body=json.dumps(other).encode())
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err[-2000:]
    assert "taken over by run usurper" in err and "Traceback" not in err
    parts = {k: client().head_object(Bucket=s3, Key=k)["ETag"] for k in keys(s3, "taken/part-")}
    time.sleep(0.5)
    assert {k: client().head_object(Bucket=s3, Key=k)["ETag"] for k in keys(s3, "taken/part-")} == parts
    assert json.loads(client().get_object(Bucket=s3, Key=lease)["Body"].read())["run_id"] == "usurper"
    assert emulator.stats()["requests_total"] < 200  # it stopped sending


def test_a_lease_taken_over_before_the_run_began_stops_it_with_exit_4_before_any_request(
    tmp_path: Path, emulator: EmulatorServer, s3: str
) -> None:
    """The CLI takes OUT's lease before Prefect's flow run begins (early start): lost meanwhile, with no
    one yet told, the run stops as exit 4 (OutLost) when it begins, not as a crash."""

    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    out = out_path(f"s3://{s3}/early")
    assert isinstance(out, ObjectPath)
    lease = Lease(out, "early-run", ttl=2)
    lease.acquire()
    other = {"run_id": "usurper", "pid": 1, "host": "elsewhere", "since": "now", "ttl": 30}
    client().put_object(Bucket=s3, Key="early/_vlmbatch/leases/out.json", Body=json.dumps(other).encode())
    time.sleep(1.5)  # a renewal (every ttl / 6) finds it taken over
    config = RunConfig(
        images=str(images), out=str(out), endpoint={"base_url": emulator.base_url, "preflight": False}
    )

    async def main() -> None:
        job = Job(plan_run(config), run_id="early-run", lock=lease)
        await job.run()

    with pytest.raises(OutLost, match="taken over by run usurper") as stopped:
        asyncio.run(main())
    assert stopped.value.exit_code == 4 and "nothing was sent" in str(stopped.value)
    assert emulator.stats()["requests_total"] == 0
    assert keys(s3, "early/part-") == []


def test_rows_removed_from_one_file_by_writers_at_once_all_stay_removed(s3: str) -> None:
    """Writers of several scopes may each remove their rows from one older file at the same moment:
    each rewrite is conditional on the version it read, so none brings back another's removed row."""
    from tasks.outputs.index import identity_hash
    from tasks.outputs.layout import read_table, write_atomic
    from tasks.outputs.store import remove_rows
    from tasks.outputs.table import rows_to_table
    from tasks.row import OUTPUT_SCHEMA
    from tests.test_outputs import row

    out = out_path(f"s3://{s3}/shared")
    assert isinstance(out, ObjectPath)
    path = out / "part-000000-old.parquet"
    ids = [f"img{k}" for k in range(9)]
    write_atomic(rows_to_table([row(i) for i in ids], OUTPUT_SCHEMA), path)
    gate = threading.Barrier(8)

    def remove(image_id: str) -> None:
        gate.wait()
        remove_rows(path, {identity_hash(image_id, "cap")})

    threads = [threading.Thread(target=remove, args=(i,)) for i in ids[:8]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert read_table(path)["image_id"].to_pylist() == ["img8"]
