"""Run a command, and stop it when the process that asked for it is gone.

``python -I server_guard.py PARENT_PID -- COMMAND...`` is how vlmbatch starts Prefect's temporary API
server (``flows.prefect_server``). A run killed outright (``kill -9``, the kernel's OOM killer) cannot
stop the server it started; without the guard that server lived on with no parent, holding its port
and ~150 MB, one more after every such run of a nightly job. The guard:

- runs COMMAND as its child, in its own process group (which the child inherits), set on Linux to be
  killed when the guard dies (so Prefect's ``kill()`` of a server slow to stop still reaches it);
- passes SIGTERM and SIGINT on to it (also one that came while it was being started), so Prefect's
  ``terminate()`` and vlmbatch's hard stop reach the server as before;
- checks twice a second that its parent is still PARENT_PID, and stops the child (SIGTERM, then
  SIGKILL after 5 s) when it is not;
- exits with the child's status (a signal N as 128 + N), so Prefect still sees uvicorn's "port in use"
  exit 3 and tries another port.

Standard library only, and run with ``-I``: it starts in milliseconds and imports nothing of the project.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

POLL_S = 0.5
STOP_GRACE_S = 5.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _exit_status(code: int) -> int:
    return code if code >= 0 else 128 - code


def _die_with_the_guard() -> None:
    """In the child, before it runs COMMAND (Linux): SIGKILL when the guard dies, so even a guard that is
    killed outright (Prefect's stop() kills after 5 s) leaves no server behind. The guard has one
    thread, so running this between fork and exec is safe."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the polling below is all there is
        pass


def guard(parent: int, command: list[str]) -> int:
    pending: list[int] = []  # signals that came before the child was there to take them
    child: subprocess.Popen[bytes] | None = None

    def forward(signum: int, _frame: object) -> None:
        if child is None:
            pending.append(signum)
        else:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    child = subprocess.Popen(command, preexec_fn=_die_with_the_guard)  # the guard has one thread
    for signum in pending:
        child.send_signal(signum)
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
