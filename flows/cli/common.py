"""What every ``vlmbatch`` command shares: exit statuses, the one way to print an error, Prefect's setup.

Exit statuses (README.md, "Exit status"): 0 every row ok; 1 usage, config or manifest error (nothing
sent, nothing written); 2 the run finished and some rows failed; 3 aborted, the endpoint is unusable;
70 vlmbatch itself failed (what was written is kept); 130/143 interrupted by SIGINT/SIGTERM (what was
done is written; a rerun continues).
"""

from __future__ import annotations

import os

import click
import typer

EXIT_OK, EXIT_USAGE, EXIT_FAILED_ROWS = 0, 1, 2
EXIT_CRASHED = 70  # EX_SOFTWARE: vlmbatch itself failed; what was written is kept
EXIT_SIGINT = 130

# A bad flag is a usage error: exit 1 like every other one (click's own default, 2, means "rows failed"
# here). Recent typer versions carry their own copy of click, so set it on whichever classes are in use.
for _usage_error in {
    click.exceptions.UsageError,
    getattr(getattr(typer, "_click", None), "exceptions", click.exceptions).UsageError,
}:
    _usage_error.exit_code = EXIT_USAGE

Opt = typer.Option


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print ``error: message`` on stderr; raise what this returns to exit with ``code``."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code)


def prepare_prefect(*, log_level: str | None = None) -> None:
    """Defaults for Prefect in a CLI process (the user's own settings win), before Prefect is imported:
    no analytics, WARNING logs (or ``log_level``)."""
    if log_level is not None:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", log_level)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
