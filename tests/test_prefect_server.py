"""The temporary Prefect server vlmbatch starts itself (``prefect server start``, Prefect's public CLI),
and what each command imports: the CLI process never imports ``prefect.server``, and the commands that
run no flow never import Prefect at all.

These tests start real servers and real CLI processes. If a Prefect release changes the command's
flags or the health route, ``test_the_temporary_server_comes_up_answers_and_stops`` fails here, loudly,
rather than every run failing in the field.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from emulator import EmulatorServer
from flows.cli import wants_a_flow_run
from flows.prefect_server import ServerFailed, TemporaryServer
from tests.builders import images_manifest

ROOT = Path(__file__).resolve().parent.parent


def test_which_command_lines_start_the_server_early() -> None:
    assert wants_a_flow_run(["run", "images.parquet", "--out", "o"])
    assert wants_a_flow_run(["demo"])
    assert wants_a_flow_run(["backfill", "i/{date}.parquet", "--start", "2024-01-01", "--end", "2024-01-02"])
    assert not wants_a_flow_run(["run", "images.parquet", "--out", "o", "--dry-run"])
    assert not wants_a_flow_run(["backfill", "x", "--deployment", "backfill/backfill"])
    assert not wants_a_flow_run(["run", "--help"])
    assert not wants_a_flow_run(["inspect", "o"])
    assert not wants_a_flow_run(["--version"])
    assert not wants_a_flow_run([])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_the_temporary_server_comes_up_answers_and_stops() -> None:
    server = TemporaryServer()
    try:
        url = server.wait_ready()
        assert url == f"http://127.0.0.1:{server.port}/api"
        with urllib.request.urlopen(f"{url}/admin/version", timeout=10) as reply:
            assert json.loads(reply.read())  # Prefect's version string
        assert server.process is not None
        guard = server.process.pid
        command = Path(f"/proc/{guard}/cmdline").read_bytes().split(b"\0")
        assert b"server_guard.py" in command[2] and command[6:10] == [b"-m", b"prefect", b"server", b"start"]
        assert b"--no-services" in command and os.getpgid(guard) == guard  # a process group of its own
    finally:
        server.stop()
    deadline = time.monotonic() + 15
    while _alive(guard) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(guard)


def test_a_server_that_cannot_start_is_a_clear_failure(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(
        "PREFECT_API_DATABASE_CONNECTION_URL", f"sqlite+aiosqlite:///{tmp_path}/missing/dir/x.db"
    )
    server = TemporaryServer()
    with pytest.raises(ServerFailed, match="exited with status"):
        server.wait_ready()
    assert server.starts == 1  # not a lost port: not tried again


IMPORT_PROBE = """
import atexit, json, sys
def report():
    prefect = sorted(m for m in sys.modules if m.split(".")[0] == "prefect")
    sys.stderr.write("\\nMODULES " + json.dumps(prefect) + "\\n")
atexit.register(report)
sys.argv = ["vlmbatch", *sys.argv[1:]]
from flows.cli import main
main()
"""


def _cli(args: list[object], cwd: Path, env: dict[str, str]) -> tuple[int, str, list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    marker = done.stderr.rsplit("\nMODULES ", 1)
    assert len(marker) == 2, done.stderr[-3000:]
    return done.returncode, done.stdout + marker[0], json.loads(marker[1])


@pytest.fixture()
def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "VLMBATCH_"))}
    env["PYTHONPATH"] = str(ROOT)
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    return env


def test_a_run_never_imports_prefects_server_and_the_rest_never_import_prefect(
    tmp_path: Path, emulator: EmulatorServer, cli_env: dict[str, str]
) -> None:
    images = images_manifest(tmp_path, {f"i{k}": ((16, 16), "red") for k in range(3)})
    out = tmp_path / "out"
    code, output, modules = _cli(
        ["run", images, "--out", out, "--base-url", emulator.base_url], tmp_path, cli_env
    )
    assert code == 0, output
    assert "prefect.flow_engine" in modules and not [m for m in modules if m.startswith("prefect.server")]
    for args in (
        ["run", images, "--out", tmp_path / "dry", "--dry-run"],
        ["inspect", out],
        ["export", out, tmp_path / "all.parquet"],
        ["report", out, "--images", images, "-o", tmp_path / "report.html"],
        ["--help"],
        ["--version"],
    ):
        code, output, modules = _cli(args, tmp_path, cli_env)
        assert code == 0, (args, output)
        assert modules == [], (args, modules)


def test_a_run_starts_before_prefect_only_where_surely_no_server_is_configured(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With a server, its global concurrency limit must be held before the first request: any place
    where Prefect might read PREFECT_API_URL from makes the run wait for Prefect as before."""
    from flows.prefect_server import no_server_anywhere

    for name in [n for n in os.environ if n.startswith("PREFECT_API_URL") or n == "PREFECT_PROFILES_PATH"]:
        monkeypatch.delenv(name)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert no_server_anywhere()
    (home / "profiles.toml").write_text('[profiles.local]\nPREFECT_LOGGING_LEVEL = "INFO"\n')
    assert no_server_anywhere()
    (home / "profiles.toml").write_text('[profiles.local]\nPREFECT_API_URL = "http://10.0.0.5:4200/api"\n')
    assert not no_server_anywhere()  # what `prefect config set PREFECT_API_URL=...` writes
    (home / "profiles.toml").unlink()
    for name, text in ((".env", "PREFECT_PROFILES_PATH=/x\n"), ("prefect.toml", "")):
        (tmp_path / name).write_text(text)
        assert not no_server_anywhere(), name
        (tmp_path / name).unlink()
    (tmp_path / "pyproject.toml").write_text('[tool.prefect.api]\nurl = "http://10.0.0.5:4200/api"\n')
    assert not no_server_anywhere()
    (tmp_path / "pyproject.toml").unlink()
    monkeypatch.setenv("PREFECT_API_URL", "http://10.0.0.5:4200/api")
    assert not no_server_anywhere()
