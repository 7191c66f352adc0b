"""Small CLI behaviours: help texts, the emulate command, usage errors."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

from tests.cli import vlmbatch

VLMBATCH = Path(sys.executable).with_name("vlmbatch")


def test_emulate_runs_the_emulator_under_its_own_name() -> None:
    res = subprocess.run([VLMBATCH, "emulate", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("usage: vlmbatch emulate")
    assert "--fault-rate" in res.stdout and "--reject-over-capacity" in res.stdout
    proc = subprocess.Popen(
        [VLMBATCH, "emulate", "--port", "0", "--latency", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("emulator listening on http://127.0.0.1:")
        with urllib.request.urlopen(line.split()[-1] + "/health/ready", timeout=5) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_unknown_flag_is_a_usage_error_exit_1() -> None:
    res = vlmbatch("run", "x.parquet", "--out", "o", "--no-such-flag")
    assert res.code == 1 and "No such option" in res.err
