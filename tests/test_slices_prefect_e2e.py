"""Slices on a real Prefect server (one for the module): `prefect deploy --all`, a process work pool and
two `prefect worker start` processes. N `--slice K/N` CLI processes at once into one OUT; `--slices 4`
through the pool (every item once, slices on both workers, one global concurrency limit); a worker
killed mid-slice (its slice submitted again, every item still once). Every process started here is
stopped with its descendants, even on failure."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emulator import EmulatorServer
from tasks.inputs.work_items import item_id
from tasks.outputs.layout import STATE_DIR
from tasks.slice import Slice
from tests.builders import images_manifest
from tests.cli import rows
from tests.prefect_processes import REPO, Processes, descendants, free_port, prefect_server
from tests.s3_server import moto_server, plain_rows, s3_client, s3_env

POOL = "vlmbatch-pool"  # prefect.yaml's


@dataclass
class Pool:
    url: str
    procs: Processes
    workers: dict[str, subprocess.Popen[bytes]]
    logs: Path
    s3: str  # moto's S3 server, in the environment of the workers and the CLI


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    base = tmp_path_factory.mktemp("prefect")
    with (
        prefect_server(base / "home", base / "logs") as (url, procs),
        moto_server(base / "logs" / "moto.log") as s3,
    ):
        procs.env.update(s3_env(s3), VLMBATCH_LEASE_TTL="20")  # longer than a new run takes to start
        procs.run("prefect", "work-pool", "create", POOL, "--type", "process")
        procs.run("prefect", "deploy", "--all")
        workers = {
            name: procs.start(
                name, "prefect", "worker", "start", "--pool", POOL, "--name", name, "--limit", 2
            )
            for name in ("w1", "w2")
        }
        yield Pool(url, procs, workers, base / "logs", s3)


def _cli(pool: Pool, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", *map(str, args)],
        cwd=REPO,
        env=pool.procs.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], pool: Pool, timeout: float = 150) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(
            f"still running after {timeout} s:\n{out}\n{err}\n{pool.procs.tails()}"
        ) from None
    return proc.returncode, out + err


def _items(n: int) -> dict[str, tuple[tuple[int, int], str]]:
    return {f"s{k:03d}": ((12 + k % 7, 10), "blue") for k in range(n)}


def _slow_slices(
    tmp_path: Path, pool: Pool, emulator: EmulatorServer, n: int, slices: int, out: Path | str
) -> tuple[list[str], list[object], subprocess.Popen[str]]:
    """A run of ``slices`` slices of ``n`` items, slow enough to be caught mid-slice (2 requests at a
    time per slice, 0.4 s each): the item ids, its arguments and its parent process."""
    items = _items(n)
    images = images_manifest(tmp_path, items)
    emulator.configure(latency=0.4)
    args: list[object] = ["run", images, "--out", out, "--base-url", emulator.base_url, "--slices", slices]
    args += ["--shard-size", 2, "--concurrency", 2, "--concurrency-limit", "off"]
    return list(items), args, _cli(pool, *args)


def _shards(ids: list[str], n: int) -> dict[str, int]:
    """Each slice's shards (2 items each) by its scope: a slice with two or more still to write cannot
    finish before a kill or a Ctrl-C that follows at once."""
    return {Slice(k, n).scope: math.ceil(sum(Slice(k, n).holds(i) for i in ids) / 2) for k in range(1, n + 1)}


def _wait_for(done: Callable[[], object], parent: subprocess.Popen[str], pool: Pool, what: str) -> None:
    deadline = time.monotonic() + 90
    while not done():
        assert parent.poll() is None, _finish(parent, pool)
        assert time.monotonic() < deadline, f"{what}:\n" + pool.procs.tails()
        time.sleep(0.1)


def _exactly_once(out: Path, ids: list[str]) -> None:
    got = rows(out)
    assert sorted(r["image_id"] for r in got) == sorted(ids)
    assert {r["status"] for r in got} == {"ok"}


async def _slice_table(url: str) -> list[dict[str, Any]]:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.artifacts import read_artifacts

    with temporary_settings(updates={PREFECT_API_URL: url}):
        found = await read_artifacts(key="slices")
    data = found[0].data
    return list(json.loads(data) if isinstance(data, str) else data)


def test_slices_started_at_once_write_one_out_exactly_once(
    tmp_path: Path, pool: Pool, emulator: EmulatorServer
) -> None:
    ids = list(_items(18))
    images = images_manifest(tmp_path, _items(18))
    out = tmp_path / "out"
    emulator.configure(latency=0.05)
    common = ["run", images, "--out", out, "--base-url", emulator.base_url, "--shard-size", 2]
    common += ["--concurrency-limit", "off"]
    running = [_cli(pool, *common, "--slice", f"{k}/3") for k in (1, 2, 3)]
    results = [_finish(proc, pool) for proc in running]
    assert [code for code, _ in results] == [0, 0, 0], results
    _exactly_once(out, ids)
    assert emulator.stats()["per_item"] == {item_id(i, "caption"): 1 for i in ids}


def test_slices_through_the_work_pool_run_on_both_workers_each_item_once(
    tmp_path: Path, pool: Pool, emulator: EmulatorServer
) -> None:
    ids = list(_items(24))
    images = images_manifest(tmp_path, _items(24))
    out = tmp_path / "out"
    emulator.configure(latency=0.05, fault_script=["500"])  # one row fails: the run ends like a run
    args = ["run", images, "--out", out, "--base-url", emulator.base_url, "--slices", 4, "--shard-size", 3]
    args += ["--max-retries", 0]
    # one global limit of 4 slots for every slice: 4 slices of 2 each would otherwise have 8 in flight
    args += ["--concurrency", 2, "--concurrency-limit", "slices-test", "--concurrency-limit-slots", 4]
    code, text = _finish(_cli(pool, *args), pool)
    assert code == 2, text + pool.procs.tails()  # some rows failed, as a run of one process says
    assert "24 work items over 24 images; submitting 4 slices to the work pool" in text
    summary = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in text.splitlines()
        if line.count("│") == 3
    }
    assert (summary["work items"], summary["ok"], summary["failed"]) == ("24", "23", "1")  # summed
    got = rows(out)
    assert sorted(r["image_id"] for r in got) == sorted(ids)  # every item once
    assert sorted(r["status"] for r in got).count("failed") == 1
    assert emulator.stats()["per_item"] == {item_id(i, "caption"): 1 for i in ids}
    assert emulator.stats()["max_in_flight"] <= 4
    table = asyncio.run(_slice_table(pool.url))
    assert sorted(row["slice"] for row in table) == ["1/4", "2/4", "3/4", "4/4"]
    assert sum(row["ok"] for row in table) == 23 and {row["attempts"] for row in table} == {1}
    assert sorted(row["state"] for row in table).count("CompletedWithFailures") == 1
    assert asyncio.run(_parent_state(pool.url)) == "CompletedWithFailures"
    # a retried parent (the same flow run id) submits with the same keys: Prefect hands back the same runs
    assert asyncio.run(_resubmitted_with_the_same_keys(pool.url)) == 4
    # each worker ran some of them (each takes two at a time), and none ran one twice
    ran = {name: _ran_by(pool, name) for name in pool.workers}
    assert all(ran.values()) and sorted(ran["w1"] + ran["w2"]) == [f"slice-{k}-of-4" for k in (1, 2, 3, 4)], (
        ran
    )


async def _pending_runs(url: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        async with get_client() as client:
            pending = FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PENDING]))
            return len(await client.read_flow_runs(flow_run_filter=FlowRunFilter(state=pending)))


async def _parent_state(url: str) -> str | None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        async with get_client() as client:
            (parent,) = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["annotate-slices"]))
            )
            return parent.state.name if parent.state else None


async def _resubmitted_with_the_same_keys(url: str) -> int:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.deployments import arun_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        async with get_client() as client:
            (parent,) = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["annotate-slices"]))
            )
            children = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["annotate"]))
            )
            mine = {
                r.idempotency_key: r
                for r in children
                if (r.idempotency_key or "").startswith(f"{parent.id}/")
            }
            assert sorted(mine) == [f"{parent.id}/slice-{k}-of-4/attempt-1" for k in (1, 2, 3, 4)]
            same = 0
            for key, run in mine.items():
                again = await arun_deployment(
                    "annotate/annotate-slice",
                    parameters=run.parameters,
                    idempotency_key=key,
                    timeout=0,
                    as_subflow=False,
                )
                same += again.id == run.id
            after = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["annotate"]))
            )
            assert len(after) == len(children)  # nothing new
            return same


def _ran_by(pool: Pool, worker: str) -> list[str]:
    """The slice runs a worker started (its log: "Flow run 'slice-3-of-4' submitted to infrastructure")."""
    log = (pool.logs / f"{worker}.log").read_text(errors="replace")
    found = re.findall(r"Flow run '(slice-\d+-of-\d+)' submitted to infrastructure", log)
    return sorted(found)


def test_a_backfill_runs_each_partition_as_slices_on_the_pool(
    tmp_path: Path, pool: Pool, emulator: EmulatorServer
) -> None:
    days = ("2024-06-01", "2024-06-02")
    for day in days:
        images_manifest(
            tmp_path / "m" / f"date={day}", {f"{day}-{k}": ((16 + k, 12), "green") for k in range(4)}
        )
    images = tmp_path / "m" / "date={date}" / "images.parquet"
    out = tmp_path / "out" / "date={date}"
    args = ["backfill", images, "--out", out, "--base-url", emulator.base_url, "--slices", 2]
    args += ["--start", days[0], "--end", days[1], "--concurrency-limit", "off"]
    code, text = _finish(_cli(pool, *args), pool)
    assert code == 0, text + pool.procs.tails()
    for day in days:
        _exactly_once(tmp_path / "out" / f"date={day}", [f"{day}-{k}" for k in range(4)])
        assert all(
            p.name.startswith("part-slice-") for p in (tmp_path / "out" / f"date={day}").glob("part-*")
        )
    assert emulator.stats()["requests_total"] == 8
    outcomes = [line.split("│")[1:3] for line in text.splitlines() if line.count("│") >= 7]
    assert sorted((d.strip(), o.strip()) for d, o in outcomes if d.strip() in days) == [
        (d, "ok") for d in days
    ]


def test_a_run_of_slices_exits_with_its_slices_status(tmp_path: Path, pool: Pool) -> None:
    images = images_manifest(tmp_path, _items(4))
    nobody = f"http://127.0.0.1:{free_port()}/v1"  # the endpoint is down: every slice stops with exit 3
    args = ["run", images, "--out", tmp_path / "out", "--base-url", nobody, "--slices", 2]
    args += ["--outage-window", 1, "--concurrency-limit", "off"]
    code, text = _finish(_cli(pool, *args), pool)
    assert code == 3, text + pool.procs.tails()
    assert "error: aborted: 1/2: preflight:" in text
    table = asyncio.run(_slice_table(pool.url))
    assert [
        (row["slice"], row["exit_code"], row["state"]) for row in sorted(table, key=lambda r: r["slice"])
    ] == [
        ("1/2", 3, "Failed"),
        ("2/2", 3, "Failed"),
    ]


def test_a_worker_killed_mid_slice_has_its_slice_run_again_and_every_item_once(
    tmp_path: Path, pool: Pool, emulator: EmulatorServer
) -> None:
    out = tmp_path / "out"
    ids, _, parent = _slow_slices(tmp_path, pool, emulator, 40, 4, out)
    victim = pool.workers["w2"]
    killed: list[str] = []

    shards = _shards(ids, 4)

    def w2_writes_and_none_pending() -> bool:
        # w2 writing a slice, mid-way (a shard written, two or more to go: it cannot finish before the
        # kill), and no run Pending (one that w2 took and never started would wait 5 minutes)
        below = set(descendants(victim.pid))
        killed.clear()
        for lock in (out / STATE_DIR / "slices").glob("slice-*") if out.exists() else ():
            with contextlib.suppress(ValueError, OSError):
                written = len(list(out.glob(f"part-{lock.name}-*")))
                left = shards[lock.name] - written
                if json.loads(lock.read_text()).get("pid") in below and written and left >= 2:
                    killed.append(lock.name)
        return bool(killed) and not asyncio.run(_pending_runs(pool.url))

    _wait_for(w2_writes_and_none_pending, parent, pool, "no slice ran on w2")
    for pid in [victim.pid, *descendants(victim.pid)]:  # the worker's machine is gone
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    victim.wait(timeout=10)
    code, text = _finish(parent, pool, timeout=180)
    assert code == 0, text + pool.procs.tails()
    _exactly_once(out, ids)
    table = {row["slice"]: row for row in asyncio.run(_slice_table(pool.url))}
    for name in killed:
        number = name.split("-")[1]
        assert table[f"{number}/4"]["attempts"] == 2 and table[f"{number}/4"]["state"] == "Completed", table
    # w2 may also have just started another slice (no lock or part file yet): it is lost as well
    rerun = [row for row in table.values() if row["attempts"] == 2]
    assert all(row["state"] == "Completed" for row in rerun), table
    lost = "nothing has held its lock in OUT for 15 s (its worker is gone); marking its run Crashed"
    assert text.count(lost) == len(rerun) >= len(killed)
    per_item = emulator.stats()["per_item"]
    assert set(per_item) == {item_id(i, "caption") for i in ids}
    resent = sum(count - 1 for count in per_item.values())
    assert resent <= 2 * 8  # each lost slice: what was in flight (2) and about a second of answers


def test_a_slice_killed_on_an_object_store_runs_again_once_its_lease_has_lapsed(
    tmp_path: Path, pool: Pool, emulator: EmulatorServer
) -> None:
    """OUT on s3://: a slice's run killed (its worker reports it Crashed at once) still holds its lease
    until it lapses; the parent submits the slice again only then, so the new run is not refused."""

    bucket = f"sliced-{uuid.uuid4().hex[:8]}"
    store = s3_client(pool.s3)
    store.create_bucket(Bucket=bucket)
    out = f"s3://{bucket}/out"
    ids, _, parent = _slow_slices(tmp_path, pool, emulator, 40, 2, out)
    shards = _shards(ids, 2)["slice-1-of-2"]

    def mid_way() -> bool:
        found = store.list_objects_v2(Bucket=bucket, Prefix="out/part-slice-1-of-2-").get("Contents", [])
        return 0 < len(found) <= shards - 2

    _wait_for(mid_way, parent, pool, "slice 1/2 wrote nothing")
    lease = store.get_object(Bucket=bucket, Key="out/_vlmbatch/leases/slice-1-of-2.json")
    os.kill(json.loads(lease["Body"].read())["pid"], signal.SIGKILL)  # the slice's flow run process
    code, text = _finish(parent, pool, timeout=180)
    assert code == 0, text + pool.procs.tails()
    assert "slice-1-of-2: run slice-1-of-2 crashed" in text
    assert "submitting it again once its earlier run's lease lapses (run " in text  # still live
    got = plain_rows(pool.s3, out)
    assert sorted(r["image_id"] for r in got) == sorted(ids) and {r["status"] for r in got} == {"ok"}
    table = {row["slice"]: row for row in asyncio.run(_slice_table(pool.url))}
    assert (table["1/2"]["attempts"], table["1/2"]["state"]) == (2, "Completed"), table
    assert (table["2/2"]["attempts"], table["2/2"]["state"]) == (1, "Completed"), table
    per_item = emulator.stats()["per_item"]
    assert set(per_item) == {item_id(i, "caption") for i in ids}
    assert sum(count - 1 for count in per_item.values()) <= 2 + 2 * 4  # in flight, ~a second of answers


def test_ctrl_c_on_a_run_of_slices_cancels_their_runs_and_a_rerun_finishes_the_job(
    tmp_path: Path, pool: Pool, emulator: EmulatorServer
) -> None:
    out = tmp_path / "out"
    ids, args, parent = _slow_slices(tmp_path, pool, emulator, 80, 2, out)  # 4 s or more a slice
    shards = _shards(ids, 2)

    def both_mid_way() -> bool:
        return all(0 < len(list(out.glob(f"part-{s}-*"))) <= shards[s] - 2 for s in shards)

    _wait_for(both_mid_way, parent, pool, "the slices did not both write")
    parent.send_signal(signal.SIGINT)
    code, text = _finish(parent, pool, timeout=120)
    assert code == 130, text + pool.procs.tails()
    assert "SIGINT: cancelling the slices' runs" in text
    assert "error: interrupted by SIGINT: slices 1/2, 2/2 cancelled; what was written is kept" in text
    table = {row["slice"]: row for row in asyncio.run(_slice_table(pool.url))}
    assert {row["state"] for row in table.values()} == {"Cancelled"}, table
    assert not [p for w in pool.workers.values() for p in descendants(w.pid)]  # no slice still runs
    kept = rows(out)
    assert 0 < len(kept) < len(ids) and len({r["image_id"] for r in kept}) == len(kept)
    emulator.configure(latency=0.01)
    emulator.reset()
    code, text = _finish(_cli(pool, *args), pool)
    assert code == 0, text + pool.procs.tails()
    _exactly_once(out, ids)
    assert emulator.stats()["requests_total"] == len(ids) - len(kept)  # only what was not written
