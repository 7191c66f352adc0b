"""Prefect's temporary API server, kept out of the way of the terminal's Ctrl-C.

Without ``PREFECT_API_URL`` Prefect runs a flow against a temporary API server that it starts as a
child process. Started as it is, the child shares the CLI's process group, so a Ctrl-C at the
terminal, which goes to the whole foreground group, kills the server at the moment it asks vlmbatch
to stop: the run can no longer record its end, retries the API for minutes, floods the terminal with
tracebacks and exits 1. In a process group of its own the server hears only vlmbatch, which stops it
once the run has written what it did (and a second Ctrl-C's hard stop terminates it:
``tasks.stopping.hard_exit``). It also runs under ``flows.server_guard``, which stops it when the run
is killed outright (``kill -9``, the OOM killer), instead of leaving it running with no parent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

GUARD = Path(__file__).with_name("server_guard.py")


class _OwnProcessGroup:
    """The ``subprocess`` module as Prefect's server module sees it: ``Popen`` starts the command under
    the guard, in a new process group."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:
        command, rest = (kwargs.pop("args"), args) if "args" in kwargs else (args[0], args[1:])
        kwargs["args"] = [sys.executable, "-I", str(GUARD), str(os.getpid()), "--", *command]
        kwargs.setdefault("process_group", 0)
        return subprocess.Popen(*rest, **kwargs)


def server_url() -> str | None:
    """The Prefect API URL when runs talk to a shared server; None for the temporary API server."""
    from prefect.settings import get_current_settings  # Prefect's settings: only once a command needs them

    url = get_current_settings().api.url
    return str(url) if url else None


def own_process_group() -> bool:
    """Start Prefect's temporary server (if this process starts one) in a process group of its own;
    whether that is arranged. Call before the first flow runs; nothing is done with a Prefect server
    configured (``PREFECT_API_URL``), or with a Prefect whose server module looks different."""
    if server_url() is not None:
        return False
    try:  # Prefect's server module (seconds to import): only where a flow runs against it
        from prefect.server.api import server
    except ImportError:
        return False
    if isinstance(server.subprocess, _OwnProcessGroup):
        return True
    if server.subprocess is not subprocess or not hasattr(server, "SubprocessASGIServer"):
        return False
    server.subprocess = _OwnProcessGroup()  # type: ignore[assignment]
    return True
