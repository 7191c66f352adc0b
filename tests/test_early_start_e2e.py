"""``vlmbatch run`` does not wait for Prefect: the job sends while the temporary server comes up, and the
flow run takes it over once the server answers. The real CLI in a subprocess (a fresh temporary server,
as a user's run has), the emulator, and the server's own records read back through its HTTP API.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from emulator import EmulatorServer
from flows.prefect_server import TemporaryServer
from tasks.outputs.layout import OUT_SCOPE, prepare_out_dir
from tasks.outputs.lock import writer_lock
from tasks.outputs.object_path import out_path
from tests.builders import images_manifest
from tests.cli import rows
from tests.test_prefect_server import IMPORT_PROBE, ROOT

N, SHARD = 32, 8  # one request at a time, 0.25 s each: 8 s, so that the flow run comes in the middle


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A Prefect home whose database exists (as a user's does after the first run): a new database's
    migrations would hold the server back for the whole run."""
    home = tmp_path_factory.mktemp("prefect-home")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PREFECT_HOME", str(home))
        server = TemporaryServer()
        try:
            server.wait_ready()
        finally:
            server.stop()
    yield home


def run_cli(args: list[object], home: Path, **env: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """The CLI in a subprocess; also the Prefect modules it imported."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "VLMBATCH_"))}
    environ.update(PREFECT_HOME=str(home), PYTHONPATH=str(ROOT), **env)
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, *map(str, args)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    stderr, modules = done.stderr.rsplit("\nMODULES ", 1)
    done.stderr = stderr
    return done, json.loads(modules)


def post(url: str, route: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{url}{route}", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


def when(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


def test_requests_go_out_before_prefects_server_is_up_and_the_flow_run_records_the_whole_run(
    tmp_path: Path, emulator: EmulatorServer, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    emulator.configure(latency=0.25)
    images = images_manifest(tmp_path, {f"i{k:02d}": ((10 + k, 10), "red") for k in range(N)})
    out = tmp_path / "out"
    args = ["run", images, "--out", out, "--base-url", emulator.base_url, "--concurrency", 1]
    done, modules = run_cli([*args, "--shard-size", SHARD], home, PREFECT_LOGGING_LEVEL="INFO")
    assert done.returncode == 0, done.stderr[-3000:]
    # what talks to Prefect on the job's behalf does so in the flow run's context: outside it, Prefect
    # would start an in-process ephemeral API (importing its server) instead of using the flow run's
    assert not [m for m in modules if m.startswith("prefect.server")]
    got = rows(out)
    assert [r["status"] for r in got] == ["ok"] * N and emulator.stats()["requests_total"] == N
    (run_id,) = {r["run_id"] for r in got}  # one run id, on every row
    first_answer = min(r["finished_at"] for r in got)
    # every shard a Prefect task run, those the job started before the flow run existed too (a server
    # without services records no task runs or logs: Prefect's console lines show them)
    finished = re.findall(r"Task run '(shard-\d+)' - Finished in state Completed", done.stderr)
    assert sorted(finished) == [f"shard-{k}" for k in range(N // SHARD)], done.stderr[-3000:]

    # The server's records, read through a server of our own on the run's Prefect home.
    monkeypatch.setenv("PREFECT_HOME", str(home))
    server = TemporaryServer()
    try:
        url = server.wait_ready()
        (flow_run,) = post(url, "/flow_runs/filter", {"flow_runs": {"name": {"any_": [run_id]}}})
        assert flow_run["state"]["type"] == "COMPLETED", flow_run["state"]
        # the first answer was back (so its request sent) before the flow run could even be created
        assert first_answer < when(flow_run["created"])
        artifacts = post(url, "/artifacts/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
        summary = [a for a in artifacts if a["key"] == "annotate-summary"]
        progress = [a for a in artifacts if a["type"] == "progress"]
        assert len(summary) == 1 and f"| ok | {N} |" in summary[0]["data"]
        assert len(progress) == 1 and progress[0]["data"] == 100.0
    finally:
        server.stop()


def test_a_server_that_never_comes_up_leaves_the_run_to_finish_without_a_flow_run(
    tmp_path: Path, emulator: EmulatorServer, home: Path
) -> None:
    emulator.configure(latency=0.0)
    images = images_manifest(tmp_path, {f"i{k:02d}": ((10 + k, 10), "blue") for k in range(6)})
    out = tmp_path / "out"
    broken = f"sqlite+aiosqlite:///{tmp_path}/missing/dir/prefect.db"  # the server cannot open it
    done, _ = run_cli(
        ["run", images, "--out", out, "--base-url", emulator.base_url],
        home,
        PREFECT_API_DATABASE_CONNECTION_URL=broken,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "warning: the run goes on without Prefect, and no flow run records it" in done.stderr
    assert "the temporary Prefect server exited with status" in done.stderr
    assert [r["status"] for r in rows(out)] == ["ok"] * 6
    assert emulator.stats()["requests_total"] == 6


def test_a_run_refused_because_another_writes_out_ends_at_once_with_no_flow_run(
    tmp_path: Path, emulator: EmulatorServer, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    out = prepare_out_dir(out_path(str(tmp_path / "out")))
    holder = writer_lock(out, "the-other-run", OUT_SCOPE)
    holder.acquire()
    try:
        done, _ = run_cli(["run", images, "--out", out, "--base-url", emulator.base_url], home)
    finally:
        holder.release()
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"error: --out {out} is being written by run the-other-run (pid {os.getpid()} " in done.stderr
    assert "Traceback" not in done.stderr and "Failed to initialize plugins" not in done.stderr
    assert emulator.stats()["requests_total"] == 0
    monkeypatch.setenv("PREFECT_HOME", str(home))
    server = TemporaryServer()
    try:
        url = server.wait_ready()
        runs = post(url, "/flow_runs/filter", {"flow_runs": {"state": {"type": {"any_": ["FAILED"]}}}})
        assert runs == []  # no flow run was made for it (the CLI's own error line is the record)
    finally:
        server.stop()
