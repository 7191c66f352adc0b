"""Crashes and signals, with the real ``vlmbatch`` in a subprocess against the emulator."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emulator import EmulatorServer
from tests.builders import images_manifest
from tests.cli import rows, vlmbatch

N, CONCURRENCY, LATENCY = 120, 4, 0.2
RATE = CONCURRENCY / LATENCY  # answers per second


@pytest.fixture(scope="session")
def sub_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of CLI subprocesses: their own Prefect home (no database shared with pytest's)."""
    env = dict(os.environ)
    env["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-subprocess"))
    return env


@pytest.fixture
def start(sub_env: dict[str, str]) -> Iterator[Callable[[list[object]], subprocess.Popen[str]]]:
    """Start ``vlmbatch`` in a subprocess; whatever is still running at the end is killed."""
    procs: list[subprocess.Popen[str]] = []

    def launch(args: list[object], group: bool = False) -> subprocess.Popen[str]:
        """``group``: in a process group of its own, as a terminal's foreground job is."""
        proc = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *map(str, args)],
            env=sub_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            process_group=0 if group else None,
        )
        procs.append(proc)
        return proc

    yield launch
    for proc in procs:
        if proc.poll() is None:
            kill_9(proc)


def wait_for(condition: Callable[[], bool], proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"vlmbatch ended early ({proc.returncode}): {proc.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


def run_args(tmp_path: Path, emulator: EmulatorServer) -> list[object]:
    images = images_manifest(tmp_path, {f"i{k:03d}": ((10 + k, 10), "red") for k in range(N)})
    return [
        "run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url,
        "--concurrency", CONCURRENCY, "--shard-size", 40,
    ]  # fmt: skip


def finish_and_check(tmp_path: Path, emulator: EmulatorServer, args: list[object], kept: list[dict]) -> None:
    """Rerun to completion: exactly one row per item, and only the missing items are sent."""
    emulator.reset()
    res = vlmbatch(*args)
    assert res.code == 0, res.err
    got = rows(tmp_path / "out")
    assert [r["image_id"] for r in got] == [f"i{k:03d}" for k in range(N)]
    assert all(r["status"] == "ok" for r in got)
    assert emulator.stats()["requests_total"] == N - len(kept)


def kill_9(proc: subprocess.Popen[str]) -> None:
    """SIGKILL the run, then its orphaned children (Prefect's temporary API server) so none linger."""
    children = [pid for pid in _all_pids() if _parent(pid) == proc.pid]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def _descendants(pid: int) -> list[int]:
    found, parents = [], {pid}
    while True:
        more = [p for p in _all_pids() if _parent(p) in parents and p not in found]
        if not more:
            return found
        found += more
        parents.update(more)


def _all_pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _tmp_file_exists(out: Path) -> bool:
    try:
        return any(e.name.startswith(".tmp-") for e in os.scandir(out))
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("moment", ["early", "mid-shard", "during-a-write"])
def test_kill_9_then_rerun_loses_at_most_a_second_and_duplicates_nothing(
    tmp_path: Path, emulator: EmulatorServer, start: Callable[..., subprocess.Popen[str]], moment: str
) -> None:
    emulator.configure(latency=LATENCY)
    args = run_args(tmp_path, emulator)
    proc = start(args)
    answered = lambda: emulator.stats()["by_status"].get("200", 0)  # noqa: E731
    if moment == "early":
        wait_for(lambda: answered() >= 3, proc)
    elif moment == "mid-shard":
        wait_for(lambda: answered() >= 55, proc)  # inside the second shard
    else:
        wait_for(lambda: answered() >= 20, proc)
        out = tmp_path / "out"
        # a write is only ~1 ms long: if none was caught, this is a mid-run kill
        with contextlib.suppress(AssertionError):
            wait_for(lambda: _tmp_file_exists(out), proc, timeout=10)
    kill_9(proc)
    answered_before_kill = answered()
    kept = rows(tmp_path / "out") if any((tmp_path / "out").glob("part-*.parquet")) else []
    keys = [r["image_id"] for r in kept]
    assert len(keys) == len(set(keys)) and all(r["status"] == "ok" for r in kept)
    lost = answered_before_kill - len(kept)
    assert 0 <= lost <= CONCURRENCY + 1.5 * RATE  # in flight, plus about a second of answers
    finish_and_check(tmp_path, emulator, args, kept)


def test_kill_9_of_the_run_stops_prefects_temporary_server_too(
    tmp_path: Path, emulator: EmulatorServer, start: Callable[..., subprocess.Popen[str]]
) -> None:
    """A run killed outright cannot stop the API server it started: the server's guard does, instead of
    leaving it running with no parent after every OOM kill of a nightly job."""
    emulator.configure(latency=LATENCY)
    proc = start(run_args(tmp_path, emulator))
    wait_for(lambda: emulator.stats()["requests_total"] >= 10, proc)
    descendants = _descendants(proc.pid)  # the server, and the guard it runs under
    assert descendants
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 15
    while (alive := [pid for pid in descendants if _parent(pid) is not None]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:  # not to leave them behind when the test fails
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not alive


def test_sigterm_stops_sending_writes_what_is_done_and_exits_143(
    tmp_path: Path, emulator: EmulatorServer, start: Callable[..., subprocess.Popen[str]]
) -> None:
    emulator.configure(latency=LATENCY)
    args = run_args(tmp_path, emulator)
    proc = start(args)
    wait_for(lambda: emulator.stats()["requests_total"] >= 10, proc)
    proc.send_signal(signal.SIGTERM)
    sent_at_signal = emulator.stats()["requests_total"]
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err
    stats = emulator.stats()
    assert stats["requests_total"] <= sent_at_signal + CONCURRENCY  # nothing new after the signal
    kept = rows(tmp_path / "out")
    assert len(kept) == stats["by_status"]["200"]  # every answer written, none failed
    assert all(r["status"] == "ok" for r in kept) and len(kept) < N
    finish_and_check(tmp_path, emulator, args, kept)


def test_a_terminal_ctrl_c_to_the_whole_process_group_stops_gracefully_with_130(
    tmp_path: Path, emulator: EmulatorServer, start: Callable[..., subprocess.Popen[str]]
) -> None:
    """A terminal sends Ctrl-C to every process of the foreground job: Prefect's temporary server must
    not be among them, or the run loses its API under it (it used to retry for minutes, then exit 1)."""
    emulator.configure(latency=LATENCY)
    args = run_args(tmp_path, emulator)
    proc = start(args, group=True)
    wait_for(lambda: emulator.stats()["requests_total"] >= 10, proc)
    children = [pid for pid in _all_pids() if _parent(pid) == proc.pid]
    assert children  # the temporary API server
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    deadline = time.monotonic() + 10
    while any(_parent(pid) is not None for pid in children) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_parent(pid) is not None for pid in children)  # the server stopped with the run
    kept = rows(tmp_path / "out")
    assert all(r["status"] == "ok" for r in kept) and len(kept) < N
    finish_and_check(tmp_path, emulator, args, kept)


def test_an_expected_stop_prints_one_error_line_not_a_traceback(
    tmp_path: Path, start: Callable[..., subprocess.Popen[str]]
) -> None:
    images = images_manifest(tmp_path, {"a": ((20, 20), "red")})
    args = [
        "run",
        images,
        "--out",
        tmp_path / "out",
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--outage-window",
        1,
    ]
    proc = start(args)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "error: preflight: cannot reach the endpoint at http://127.0.0.1:9/v1/models" in err
    assert "Traceback" not in err and "Encountered exception" not in err and "Finished in state" not in err


def test_sigterm_stops_a_backfill_with_partitions_running_side_by_side(
    tmp_path: Path, emulator: EmulatorServer, start: Callable[..., subprocess.Popen[str]]
) -> None:
    """Each partition's flow run puts Prefect's own SIGTERM handler in place as it starts: vlmbatch's
    must be back in place for every running partition, or SIGTERM crashes the backfill (exit 1)."""
    emulator.configure(latency=LATENCY)
    for day in ("2024-05-01", "2024-05-02"):
        images_manifest(
            tmp_path / f"date={day}", {f"{day}-{k:03d}": ((10 + k, 10), "red") for k in range(60)}
        )
    args: list[object] = ["backfill", tmp_path / "date={date}" / "images.parquet"]
    args += ["--out", tmp_path / "out" / "date={date}", "--start", "2024-05-01", "--end", "2024-05-02"]
    args += ["--max-parallel", 2, "--base-url", emulator.base_url, "--concurrency", CONCURRENCY]
    proc = start(args)
    wait_for(lambda: emulator.stats()["max_in_flight"] > CONCURRENCY, proc)  # both partitions sending
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert out.count("interrupted") >= 2 and "Traceback" not in err


def test_a_second_ctrl_c_stops_at_once_without_corrupt_files(
    tmp_path: Path, emulator: EmulatorServer, start: Callable[..., subprocess.Popen[str]]
) -> None:
    emulator.configure(latency=5.0)  # in-flight requests would take long to finish
    args = run_args(tmp_path, emulator)
    proc = start(args)
    wait_for(lambda: emulator.stats()["requests_total"] >= CONCURRENCY, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert time.monotonic() - started < 3.0  # did not wait for the 5 s requests in flight
    kept = rows(tmp_path / "out") if any((tmp_path / "out").glob("part-*.parquet")) else []
    emulator.configure(latency=0.01)
    finish_and_check(tmp_path, emulator, args, kept)


def test_demo_runs_through_the_installed_command(tmp_path: Path, sub_env: dict[str, str]) -> None:
    command = Path(sys.executable).with_name("vlmbatch")
    res = subprocess.run(
        [command, "demo", "--out", tmp_path / "demo", "--latency", "0.05"],
        env=sub_env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert res.returncode == 0, res.stderr
    assert "summary" in res.stdout and "stand-in for the model" in res.stdout
    got = rows(tmp_path / "demo")
    assert len(got) == 7 and all(r["status"] == "ok" for r in got)
    assert {r["title"] for r in got} >= {"Chelsea the cat", "A coffee cup"}


def test_sigterm_to_every_process_of_the_run_exits_143_in_seconds(
    tmp_path: Path, emulator: EmulatorServer, start: Callable[..., subprocess.Popen[str]]
) -> None:
    """systemd's control-group kill and Slurm's scancel send SIGTERM to every process of the job, the
    temporary Prefect server too: the run still writes what it did and exits 143, in seconds (the flow
    run's end cannot be recorded on a server that is gone; it used to retry that for about 4 minutes,
    then exit 70 with a traceback)."""
    emulator.configure(latency=LATENCY)
    args = run_args(tmp_path, emulator)
    proc = start(args)
    wait_for(lambda: emulator.stats()["requests_total"] >= 10, proc)
    everyone = [proc.pid, *_descendants(proc.pid)]
    assert len(everyone) >= 3  # the run, the guard, the server
    signalled = time.monotonic()
    for pid in everyone:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    took = time.monotonic() - signalled
    assert proc.returncode == 143, err
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    assert took < 30, took
    kept = rows(tmp_path / "out")
    assert all(r["status"] == "ok" for r in kept) and len(kept) < N
    finish_and_check(tmp_path, emulator, args, kept)
