"""Real Prefect processes for tests: `prefect server start` on a free loopback port with its own
PREFECT_HOME, workers and CLI commands, each in its own session and stopped with all its descendants,
even on failure."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from flows.serve import PREFECT_YAML

REPO = PREFECT_YAML.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class Processes:
    """Processes started by this test, each in its own session, each stopped with all its descendants."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env, self.logs = env, logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, *args: object, cwd: Path = REPO) -> subprocess.Popen[bytes]:
        log = (self.logs / f"{name}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", *map(str, args)],
            cwd=cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.started.append((name, proc))
        return proc

    def run(self, *args: object, timeout: float = 120, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(
            [sys.executable, "-m", *map(str, args)],
            cwd=REPO,
            env=env or self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        output = done.stdout.decode() + done.stderr.decode()
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{output[-4000:]}"
        return output

    def stop_all(self) -> None:
        for _name, proc in reversed(self.started):  # worker before server
            family = [proc.pid, *descendants(proc.pid)]
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for pid in family:  # the group, and descendants that left it
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL) if pid == proc.pid else os.kill(pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def tails(self) -> str:
        parts = []
        for name, _proc in self.started:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
            parts.append(f"----- {name} (last lines) -----\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(parts)


@contextlib.contextmanager
def prefect_server(home: Path, logs: Path) -> Iterator[tuple[str, Processes]]:
    """A Prefect server for the block: its API URL and the Processes to start more with (its env)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "VLMBATCH_"))}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_LOGGING_LEVEL="INFO",
        PREFECT_WORKER_QUERY_SECONDS="1",  # pick runs up at once (default: every 10 s)
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="2",  # a schedule's runs at once (default 60 s)
        PWD=str(REPO),  # prefect.yaml's working_dir is "{{ $PWD }}", resolved by `prefect deploy`
    )
    logs.mkdir(parents=True, exist_ok=True)
    procs = Processes(env, logs)
    try:
        server = procs.start("server", "prefect", "server", "start", "--host", "127.0.0.1", "--port", port)
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
            assert server.poll() is None, "prefect server exited:\n" + procs.tails()
            assert time.monotonic() < deadline, "prefect server not healthy in 90 s:\n" + procs.tails()
            time.sleep(0.5)
        yield url, procs
    except BaseException:
        print(procs.tails())
        raise
    finally:
        procs.stop_all()
