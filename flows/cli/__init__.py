"""The ``vlmbatch`` command line (flows/cli/app.py puts its commands together).

``main`` starts Prefect's temporary server before anything else, when the command line asks for a
flow run and no Prefect server is configured: the server needs 2–3 s to come up, and it does so on the
other core while the commands' modules are imported (half a second) and the run is validated and
planned. The command finds the server already on its way (``flows.prefect_server``), and stops it if
the run turns out not to need it (a dry run set in the environment or a config file, a usage error).
"""

from __future__ import annotations

import os
import sys

from flows.prefect_server import start_temporary_server, temporary_server_lost

FLOW_COMMANDS = ("run", "demo", "backfill")
NO_FLOW_FLAGS = ("--dry-run", "--deployment", "--slices", "--help", "-h")  # --slices: the configured server


def wants_a_flow_run(args: list[str]) -> bool:
    """Whether this command line will run a flow here (a guess from the words alone, which the command
    corrects: it stops a server it turns out not to need)."""
    words = [a for a in args if not a.startswith("-")]
    return (
        bool(words)
        and words[0] in FLOW_COMMANDS
        and not any(a.partition("=")[0] in NO_FLOW_FLAGS for a in args)
    )


def main() -> None:
    if wants_a_flow_run(sys.argv[1:]):
        start_temporary_server()
    # The commands' modules (half a second to import) come after the server is on its way.
    from flows.cli.app import app

    try:
        app()
    except SystemExit as done:
        if temporary_server_lost():
            # Prefect's server went with the signal that stopped the run: what was done is written and
            # the run said so; Prefect's exit handlers would only retry it, for seconds per queued event.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(done.code if isinstance(done.code, int) else 1)
        raise
