"""The Prefect API a CLI run talks to: the user's server, or a temporary one that vlmbatch starts.

With a Prefect server configured (``PREFECT_API_URL``, in the environment or the active profile), runs
use it. Without one, ``vlmbatch run``, ``demo`` and ``backfill`` start a temporary server themselves,
through Prefect's documented interfaces only: the command ``prefect server start --no-ui
--no-services`` on a free loopback port, and the setting ``PREFECT_API_URL`` pointed at it with
``prefect.settings.temporary_settings``. Nothing of Prefect is patched. With no services it records
flow runs, their logs and artifacts, not task runs (the services that persist task runs and events
cost its start-up 0.3–0.5 s, and nobody watches a temporary server's UI).

It is started before anything else the command does, so it comes up (2–3 s, mostly importing
Prefect's server) on the other core while the CLI imports, validates the manifests and plans; the CLI
itself never imports ``prefect.server``. ``vlmbatch run`` does not even wait for it: its job sends
while the server comes up, and the flow run takes the job over once it answers (flows/cli/run.py,
flows/annotate.py); that needs surely no configured server (``no_server_anywhere``). The server:

- runs in a process group of its own, so a terminal's Ctrl-C (sent to the whole foreground group)
  reaches vlmbatch alone, which stops the server once the run has written what it did; a second
  Ctrl-C's hard stop terminates it (``tasks.stopping.hard_exit``);
- runs under ``flows/server_guard.py``, which stops it when the run is killed outright (``kill -9``,
  the OOM killer) instead of leaving it running with no parent;
- keeps its records in Prefect's usual database (``PREFECT_HOME``), where a later ``prefect server
  start`` shows the runs.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from tasks.stopping import signal_received

GUARD = Path(__file__).with_name("server_guard.py")
STARTUP_TIMEOUT_S = 120.0  # a new database's migrations take ~10 s on 2 cores; a loaded machine more
STARTS = 3  # tries, each on a fresh port (another process may take a free port before the server does)


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


class ServerFailed(RuntimeError):
    """The temporary server did not come up; the message has the end of its log."""


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` from the environment: known without importing Prefect (a profile's is seen
    once Prefect is imported: ``server_url``)."""
    return os.environ.get("PREFECT_API_URL") or None


def no_server_anywhere() -> bool:
    """Whether Prefect surely has no server configured, known without importing Prefect (a second):
    no ``PREFECT_API_URL`` in the environment, nor in the profiles file, nor in a ``.env``,
    ``prefect.toml`` or ``pyproject.toml`` of the working directory where Prefect also reads settings.
    On the side of caution: a file that might name one (a ``.env`` with any Prefect setting, any
    ``prefect.toml``, a ``[tool.prefect]`` table) counts as a maybe, answered by Prefect itself later.
    A run starts before its flow run only when this is true: with a server, its global concurrency
    limit must be held before the first request."""
    if any(name.startswith("PREFECT_API_URL") for name in os.environ):
        return False
    here = Path.cwd()
    if (here / "prefect.toml").exists() or _mentions(here / ".env", "PREFECT_"):
        return False
    if _mentions(here / "pyproject.toml", "tool.prefect"):
        return False
    home = Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()
    profiles = Path(os.environ.get("PREFECT_PROFILES_PATH") or home / "profiles.toml").expanduser()
    return not _mentions(profiles, "API_URL")


def _mentions(path: Path, text: str) -> bool:
    """Whether the file at ``path`` exists and holds ``text`` (unreadable: a maybe, so yes)."""
    try:
        return text.lower() in path.read_text(errors="replace").lower()
    except FileNotFoundError:
        return False
    except OSError:
        return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class TemporaryServer:
    """``prefect server start`` under the guard, on loopback, until ``stop`` (or this process ends).

    A thread watches it come up: it polls the health route, then sends one API request, since a new
    server's first request costs it a third of a second (its database and routes warm up), which is
    then paid while the CLI is still busy rather than by the flow's first call. A server that exits
    before it answers (another process took its port) is started again on another port."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.log: IO[bytes] = tempfile.TemporaryFile(prefix="vlmbatch-prefect-server-")  # noqa: SIM115
        self.starts = 0
        self.failure: str | None = None
        self.used = False  # a flow has run against it: its clients may still send to it until exit
        self._up = threading.Event()  # ready, or failed (``failure``)
        self._start()
        threading.Thread(target=self._watch, name="vlmbatch-prefect-server", daemon=True).start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def settled(self) -> bool:
        """Whether it is up or failed (``wait_ready`` then returns at once)."""
        return self._up.is_set()

    @property
    def ready(self) -> bool:
        return self._up.is_set() and self.failure is None and self.process is not None

    def _start(self) -> None:
        self.starts += 1
        self.port = _free_port()
        command = [
            *(sys.executable, "-m", "prefect", "server", "start"),
            *("--host", "127.0.0.1", "--port", str(self.port), "--no-ui", "--no-services"),
        ]
        env = {
            **os.environ,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": os.environ.get("PREFECT_SERVER_LOGGING_LEVEL", "WARNING"),
        }
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-I", str(GUARD), str(os.getpid()), "--", *command],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            process_group=0,  # the terminal's Ctrl-C is vlmbatch's to handle
        )

    def answers(self, route: str, timeout: float = 5) -> bool:
        """Whether the server answers ``route`` with 200."""
        with (
            contextlib.suppress(OSError, urllib.error.URLError),
            _DIRECT.open(f"{self.api_url}{route}", timeout=timeout) as reply,
        ):
            return bool(reply.status == 200)
        return False

    def _watch(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while (process := self.process) is not None:
            if process.poll() is not None:
                log = self._log_tail()
                if "already in use" not in log or self.starts >= STARTS:  # only a lost port is tried again
                    self.failure = (
                        f"the temporary Prefect server exited with status {process.returncode}:\n{log}"
                    )
                    break
                self._start()
            elif time.monotonic() > deadline:
                self.failure = (
                    f"the temporary Prefect server did not answer within {STARTUP_TIMEOUT_S:.0f} s:\n"
                    + self._log_tail()
                )
                self.stop()
                break
            elif self.answers("/health"):
                self.answers("/admin/version")  # its first API request: the warm-up
                break
            else:
                time.sleep(0.05)
        self._up.set()

    def wait_ready(self) -> str:
        """Block until the server answers (``STARTUP_TIMEOUT_S`` at most); returns its API URL.
        ServerFailed if it did not come up."""
        while not self._up.wait(0.1):  # in short waits, so that a Ctrl-C is seen at once
            pass
        if self.failure is not None or self.process is None:
            raise ServerFailed(self.failure or "the temporary Prefect server was stopped")
        return self.api_url

    def _log_tail(self, limit: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-limit:]

    def stop(self) -> None:
        """Ask the server to stop (SIGTERM, passed on by the guard) and go on at once: the guard sees
        it through, and kills it if this process ends first."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(OSError):
                process.send_signal(signal.SIGTERM)


_SERVER: TemporaryServer | None = None


def start_temporary_server() -> TemporaryServer | None:
    """The process's temporary server, started now if there is none (and none is needed when
    ``PREFECT_API_URL`` is set); it is stopped when the process exits."""
    global _SERVER
    if configured_api_url() is not None:
        return None
    alive = _SERVER is not None and _SERVER.process is not None and _SERVER.process.poll() is None
    if _SERVER is None or not alive or _SERVER.failure is not None:
        _SERVER = TemporaryServer()
        atexit.register(_SERVER.stop)
    return _SERVER


def stop_temporary_server() -> None:
    """Stop the process's temporary server if it was started on a guess and no run used it (this run
    turned out not to need it); one that runs used stays up until the process exits."""
    if _SERVER is not None and not _SERVER.used:
        _SERVER.stop()


def temporary_server_lost() -> bool:
    """Whether the temporary server that runs used has gone while this process needed it (e.g. a
    SIGTERM sent to every process of the job by systemd or Slurm): calls to it can only fail now."""
    server = _SERVER
    if server is None or not server.used or server.process is None:
        return False
    if server.process.poll() is not None:
        return True
    # stopping with the run (it closed its port, then waits for its connections): ask it, after a signal
    return signal_received() is not None and not server.answers("/health", timeout=0.5)


def server_url() -> str | None:
    """The Prefect API URL when runs talk to a shared server; None for a temporary server."""
    from prefect.settings import get_current_settings  # Prefect's settings: only once a command needs them

    url = get_current_settings().api.url
    if not url or (_SERVER is not None and str(url) == _SERVER.api_url):
        return None
    return str(url)


@contextlib.contextmanager
def prefect_api(server: TemporaryServer | None) -> Iterator[None]:
    """Runs inside talk to the temporary ``server`` (once it is up), or to the configured server when
    there is one (a profile's ``PREFECT_API_URL`` wins over a server started before it was seen)."""
    from prefect.settings import (  # Prefect: only for flow runs
        PREFECT_API_URL,
        PREFECT_CLIENT_MAX_RETRIES,
        temporary_settings,
    )

    if server is None:
        yield
        return
    if server_url() is not None:  # the active profile names a server: use it, not ours
        stop_temporary_server()
        yield
        return
    warm_up()
    url = server.wait_ready()
    server.used = True
    # One retry, not five with exponential backoff (a minute per call): a loopback server that does not
    # answer is gone, typically stopped by the same SIGTERM as the run (systemd, Slurm), and the run
    # should end in seconds with what it wrote, not retry for minutes.
    with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_CLIENT_MAX_RETRIES: 1}):
        yield


def warm_up() -> None:
    """Import now, while the server comes up, what Prefect imports at a flow's first call (its flow
    engine, the encoder of flow parameters, the visualization check): half a second that would
    otherwise come after the server is ready. Only imports: if a module moves in a later Prefect, the
    flow imports what it needs itself, as it would without this."""
    for name in (
        "prefect.flow_engine",
        "prefect.task_engine",
        "fastapi.encoders",
        "prefect.utilities.visualization",
    ):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
