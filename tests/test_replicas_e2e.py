"""Three emulators as three replicas of the model, through the real CLI: one killed mid-run, one four times
slower, one reloading its model (503) for a while, all three down, one without the model, one key each."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from emulator import EmulatorServer, EmulatorSettings
from tasks.endpoint import replicas as replicas_module
from tasks.inputs.work_items import item_id
from tasks.row import LATER_COLUMNS
from tests.builders import images_manifest
from tests.cli import rows, vlmbatch


class Logged:
    """What tasks.endpoint logged during a test (its warnings: set aside, back in service, left out)."""

    def __init__(self) -> None:
        self.records: list[logging.LogRecord] = []

    @property
    def text(self) -> str:
        return "\n".join(record.getMessage() for record in self.records)


@pytest.fixture
def endpoint_log() -> Iterator[Logged]:
    """Like pytest's caplog, on the endpoint's logger itself: Prefect's logging set-up (on its first import in
    this process, inside a CLI run) replaces the root logger's handlers, pytest's among them."""
    logged = Logged()
    handler = logging.Handler(logging.INFO)
    handler.emit = logged.records.append  # type: ignore[method-assign, assignment]
    logger = logging.getLogger("tasks.endpoint")
    logger.addHandler(handler)
    yield logged
    logger.removeHandler(handler)


@pytest.fixture
def replicas() -> Iterator[Callable[..., list[EmulatorServer]]]:
    """``replicas(n, **settings)``: n emulators of their own (stopped at the end)."""
    started: list[EmulatorServer] = []

    def start(n: int = 3, **settings: Any) -> list[EmulatorServer]:
        servers = [EmulatorServer(EmulatorSettings(**settings)).start() for _ in range(n)]
        started.extend(servers)
        return servers

    yield start
    for server in started:
        server.stop()


def manifest(tmp_path: Path, n: int) -> Path:
    return images_manifest(tmp_path, {f"img{i:04d}": ((24, 16), "blue") for i in range(n)})


def base_urls(servers: list[EmulatorServer]) -> list[str]:
    return [arg for server in servers for arg in ("--base-url", server.base_url)]


def when(condition: Callable[[], bool], then: Callable[[], None]) -> threading.Thread:
    """Run ``then`` once ``condition`` holds (polled on a thread: the CLI runs in this one)."""

    def watch() -> None:
        deadline = time.monotonic() + 120
        while not condition() and time.monotonic() < deadline:
            time.sleep(0.005)
        then()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def arrivals(server: EmulatorServer) -> int:
    return int(server.stats()["requests_total"])


def test_a_replica_killed_mid_run_loses_nothing(
    tmp_path: Path, replicas: Callable[..., list[EmulatorServer]], endpoint_log: Logged
) -> None:
    """Its requests in flight are cut (it answers them never) and answered by the others: exit 0, no
    failed row."""
    servers = replicas(3, latency=0.3)
    killed, killed_url = servers[0], servers[0].base_url
    killer = when(lambda: arrivals(killed) >= 10, killed.kill)  # in its third wave: requests in flight
    res = vlmbatch(
        "run", manifest(tmp_path, 120), "--out", tmp_path / "out", "--concurrency", 4, *base_urls(servers)
    )
    killer.join()
    assert res.code == 0, res.err
    out = rows(tmp_path / "out")
    assert len(out) == 120 and {r["status"] for r in out} == {"ok"}
    cut = {e["item"] for e in killed.stats()["log"] if e["status"] == "cancelled"}
    assert cut, "the kill cut no request in flight"
    by_item = {item_id(r["image_id"], r["prompt_id"]): r for r in out}
    for item in cut:  # answered elsewhere, on a later attempt
        assert by_item[item]["replica"] != killed_url and by_item[item]["attempts"] >= 2
    survivors = {s.base_url for s in servers[1:]}
    assert Counter(r["replica"] for r in out).keys() <= {killed_url, *survivors}
    assert f"replica {killed_url} set aside" in endpoint_log.text
    assert "replicas" in res.out and "ejections" in res.out  # the closing summary's table per replica


def test_a_replica_four_times_slower_gets_clearly_less_traffic(
    tmp_path: Path, replicas: Callable[..., list[EmulatorServer]]
) -> None:
    fast_a, fast_b = replicas(2, latency=0.1)
    (slow,) = replicas(1, latency=0.4)
    servers = [fast_a, slow, fast_b]  # the slow one is not last: order alone decides nothing
    res = vlmbatch(
        "run", manifest(tmp_path, 270), "--out", tmp_path / "out", "--concurrency", 4, *base_urls(servers)
    )
    assert res.code == 0, res.err
    answered = Counter(r["replica"] for r in rows(tmp_path / "out"))
    assert sum(answered.values()) == 270
    # at 4 in flight each, it holds its slots four times longer: about a ninth of the traffic
    assert answered[slow.base_url] * 2 < min(answered[fast_a.base_url], answered[fast_b.base_url]), answered
    assert "replicas" in res.out and "latency p50" in res.out
    inspect = vlmbatch("inspect", tmp_path / "out", env={"COLUMNS": "200"})  # per replica, from the rows
    assert inspect.code == 0 and "replicas" in inspect.out
    for server in (fast_a, slow, fast_b):
        assert re.search(
            re.escape(server.base_url) + r"\s*│\s*\d+\s*│\s*" + str(answered[server.base_url]), inspect.out
        ), inspect.out


def test_a_replica_answering_503_while_its_model_reloads_is_ejected_and_readmitted_once_ready(
    tmp_path: Path,
    replicas: Callable[..., list[EmulatorServer]],
    monkeypatch: pytest.MonkeyPatch,
    endpoint_log: Logged,
) -> None:
    monkeypatch.setattr(
        replicas_module, "COOLDOWN_S", 1.0
    )  # the test's patience; the schedule is unit-tested
    servers = replicas(3, latency=0.2)
    reloading = servers[1]
    # after its 20th request, it reloads its model for 2 s: 503 with Retry-After 1 on requests and readiness
    changer = when(lambda: arrivals(reloading) >= 20, lambda: reloading.configure(loading_seconds=2.0))
    res = vlmbatch(
        "run", manifest(tmp_path, 420), "--out", tmp_path / "out", "--concurrency", 4, *base_urls(servers)
    )
    changer.join()
    assert res.code == 0, res.err
    out = rows(tmp_path / "out")
    assert len(out) == 420 and {r["status"] for r in out} == {"ok"}
    log = reloading.stats()["log"]
    statuses = [e["status"] for e in sorted(log, key=lambda e: e["t"])]
    first_503, last_503 = statuses.index(503), len(statuses) - 1 - statuses[::-1].index(503)
    assert 200 in statuses[:first_503] and 200 in statuses[last_503:]  # served, refused, served again
    assert statuses.count(503) <= 3 * 4, statuses  # set aside quickly: not hammered while it loads
    readmitted = [
        e["t"] for e in log if e["status"] == 200 and e["t"] > max(x["t"] for x in log if x["status"] == 503)
    ]
    assert (
        readmitted and min(readmitted) - min(e["t"] for e in log if e["status"] == 503) >= 2.0
    )  # only once ready
    assert f"replica {reloading.base_url} set aside" in endpoint_log.text
    assert f"replica {reloading.base_url} is back in service" in endpoint_log.text
    assert sum(1 for r in out if r["replica"] == reloading.base_url) > 0


def test_every_replica_down_exits_3_after_the_window_keeping_the_answered_rows(
    tmp_path: Path, replicas: Callable[..., list[EmulatorServer]]
) -> None:
    servers = replicas(3, latency=0.2)
    killed_at: list[float] = []

    def kill_all() -> None:
        killed_at.append(time.monotonic())
        for server in servers:
            server.kill()

    killer = when(lambda: sum(arrivals(s) for s in servers) >= 40, kill_all)
    res = vlmbatch(
        "run", manifest(tmp_path, 400), "--out", tmp_path / "out", "--concurrency", 4, "--outage-window", 2,
        *base_urls(servers),
    )  # fmt: skip
    ended = time.monotonic()
    killer.join()
    assert res.code == 3, res.err
    assert "every replica is unusable (--outage-window 2)" in res.err
    assert ended - killed_at[0] >= 2.0
    out = rows(tmp_path / "out")
    assert 0 < len(out) < 400 and all(r["status"] == "ok" for r in out)  # unattempted items: no row
    ok = re.search(r"│ ok\s*│ (\d+)", res.out)
    assert ok is not None and int(ok.group(1)) == len(out)  # every answer the run got is written
    # (an answer the emulator sent as the kill cut its connection never arrived: that item has no row)
    assert len(out) <= sum(s.stats()["by_status"].get("200", 0) for s in servers)


def test_a_replica_without_the_model_is_dropped_at_preflight(
    tmp_path: Path, replicas: Callable[..., list[EmulatorServer]], endpoint_log: Logged
) -> None:
    good = replicas(2, latency=0.01)
    (wrong,) = replicas(1, latency=0.01, models=("someone/else",))
    res = vlmbatch(
        "run", manifest(tmp_path, 20), "--out", tmp_path / "out", *base_urls([good[0], wrong, good[1]])
    )
    assert res.code == 0, res.err
    assert f"replica {wrong.base_url} is left out of this run" in endpoint_log.text  # a warning naming it
    assert "does not serve the model 'google/gemma-4-31b-it'; it serves: someone/else" in endpoint_log.text
    assert arrivals(wrong) == 0 and len(rows(tmp_path / "out")) == 20
    nobody = vlmbatch("run", manifest(tmp_path, 20), "--out", tmp_path / "out2", *base_urls([wrong, wrong]))
    assert nobody.code == 1 and "more than once" in nobody.err
    (other,) = replicas(1, latency=0.01, models=("someone/else",))
    nobody = vlmbatch("run", manifest(tmp_path, 20), "--out", tmp_path / "out2", *base_urls([wrong, other]))
    assert nobody.code == 3 and "preflight: no replica is usable" in nobody.err
    assert wrong.base_url in nobody.err and other.base_url in nobody.err


def test_each_replica_with_its_own_key(tmp_path: Path, replicas: Callable[..., list[EmulatorServer]]) -> None:
    a = replicas(1, latency=0.01, api_key="key-of-a-123")[0]
    b = replicas(1, latency=0.01, api_key="key-of-b-456")[0]
    env = {"KEY_A": "key-of-a-123", "KEY_B": "key-of-b-456"}
    res = vlmbatch(
        "run", manifest(tmp_path, 30), "--out", tmp_path / "out", *base_urls([a, b]),
        "--api-key-env", "KEY_A", "--api-key-env", "KEY_B", env=env,
    )  # fmt: skip
    assert res.code == 0, res.err
    assert arrivals(a) > 0 and arrivals(b) > 0
    assert a.stats()["by_status"] == {"200": arrivals(a)} and b.stats()["by_status"] == {"200": arrivals(b)}
    assert not any(key in res.out + res.err for key in env.values())


def test_a_rerun_into_an_out_written_before_the_replica_column(
    tmp_path: Path, replicas: Callable[..., list[EmulatorServer]]
) -> None:
    """One replica: OUT keeps its columns (nothing rewritten); several: the column is added, null, to the
    older files first, so a plain pyarrow.dataset(OUT) reads one schema either way."""
    a, b = replicas(2, latency=0.01)
    images, out = manifest(tmp_path, 12), tmp_path / "out"
    assert vlmbatch("run", images, "--out", out, "--base-url", a.base_url, "--limit", 6).code == 0
    for part in out.glob("part-*.parquet"):  # as a version before the columns wrote it
        pq.write_table(pq.read_table(part).drop_columns(list(LATER_COLUMNS)), part)
    old = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    res = vlmbatch("run", images, "--out", out, "--base-url", a.base_url, "--limit", 9)
    assert res.code == 0, res.err
    assert arrivals(a) == 9  # the six done before were skipped
    schemas = [pq.read_schema(p) for p in sorted(out.glob("part-*.parquet"))]
    assert len(schemas) > len(old) and all("replica" not in s.names for s in schemas)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in old} == old

    res = vlmbatch("run", images, "--out", out, *base_urls([a, b]))
    assert res.code == 0, res.err
    assert arrivals(a) + arrivals(b) == 12
    assert all("replica" in pq.read_schema(p).names for p in out.glob("part-*.parquet"))
    table = ds.dataset(out).to_table()  # one schema: no unify needed
    assert "tool_calls" not in table.column_names  # not needed by this run: still left out
    replicas_seen = Counter(table["replica"].to_pylist())
    assert replicas_seen[None] == 9 and sum(replicas_seen.values()) == 12
    assert set(replicas_seen) - {None} <= {a.base_url, b.base_url}
    inspect = vlmbatch("inspect", out)
    assert inspect.code == 0 and re.search(r"ok\s*[│|]\s*12", inspect.out), inspect.out
