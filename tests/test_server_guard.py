"""The guard that stops Prefect's temporary server when the run that started it is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from flows.prefect_server import GUARD

SLEEPER = "import time; time.sleep(60)"


def _guard(parent: int, *command: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-I", str(GUARD), str(parent), "--", *command])


def test_the_guard_exits_with_its_commands_status() -> None:
    """Prefect restarts the server on another port when uvicorn exits 3 (port in use)."""
    proc = _guard(os.getpid(), sys.executable, "-c", "raise SystemExit(3)")
    assert proc.wait(timeout=30) == 3


def test_the_guard_passes_sigterm_on_to_its_command() -> None:
    handler = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(7));"
        " print('up', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-I", str(GUARD), str(os.getpid()), "--", sys.executable, "-c", handler],
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"up\n"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 7


def test_the_guard_stops_its_command_when_the_parent_it_was_given_is_not_its_parent() -> None:
    """As after ``kill -9`` of the run: the guard is re-parented, and stops the server within a second."""
    started = time.monotonic()
    proc = _guard(os.getpid() + 10_000_000, sys.executable, "-c", SLEEPER)  # never our pid
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    assert time.monotonic() - started < 20  # not the command's 60 s


def test_the_guard_refuses_a_malformed_command_line() -> None:
    res = subprocess.run(
        [sys.executable, "-I", str(GUARD), "x", "--", "true"], capture_output=True, timeout=30
    )
    assert res.returncode == 2 and b"usage" in res.stderr


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_guard_killed_outright_takes_its_command_with_it() -> None:
    """Prefect's stop() kills the guard after 5 s: the server under it must not outlive it."""
    proc = subprocess.Popen(
        [sys.executable, "-I", str(GUARD), str(os.getpid()), "--", sys.executable, "-c",
         "import os, time; print(os.getpid(), flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    proc.kill()
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]  # noqa: SIM115
    except OSError:
        return False
    return state != "Z"
