"""Run a command, and stop it when the process that asked for it is gone.

``python -I server_guard.py PARENT_PID -- COMMAND...`` is how vlmbatch starts Prefect's temporary API
server (``flows.prefect_server``). A run killed outright (``kill -9``, the kernel's OOM killer) cannot
stop the server it started; without the guard that server lived on with no parent, holding its port
and ~150 MB, one more after every such run of a nightly job. The guard:

- runs COMMAND as its child, in its own process group (which the child inherits);
- passes SIGTERM and SIGINT on to it, so Prefect's ``terminate()`` and vlmbatch's hard stop reach the
  server as before;
- checks twice a second that its parent is still PARENT_PID, and stops the child (SIGTERM, then
  SIGKILL after 5 s) when it is not;
- exits with the child's status (a signal N as 128 + N), so Prefect still sees uvicorn's "port in use"
  exit 3 and tries another port.

Standard library only, and run with ``-I``: it starts in milliseconds and imports nothing of the project.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

POLL_S = 0.5
STOP_GRACE_S = 5.0


def _exit_status(code: int) -> int:
    return code if code >= 0 else 128 - code


def guard(parent: int, command: list[str]) -> int:
    child = subprocess.Popen(command)

    def forward(signum: int, _frame: object) -> None:
        child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        try:
            return _exit_status(child.wait(timeout=POLL_S))
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:
            child.terminate()
            try:
                return _exit_status(child.wait(timeout=STOP_GRACE_S))
            except subprocess.TimeoutExpired:
                child.kill()
                return _exit_status(child.wait())


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        sys.stderr.write("usage: server_guard.py PARENT_PID -- COMMAND...\n")
        return 2
    return guard(int(argv[0]), argv[2:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
