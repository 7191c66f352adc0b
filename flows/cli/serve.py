"""``vlmbatch serve``: the deployments of prefect.yaml, served from this process without a work pool."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import Opt, fail, prepare_prefect
from flows.prefect_server import server_url
from tasks.errors import UsageError


def register(app: typer.Typer) -> None:
    @app.command(
        help="Serve the deployments of prefect.yaml (schedules included) from this process, without a "
        "work pool; flow runs start in the file's directory. Needs a Prefect server (PREFECT_API_URL)."
    )
    def serve(
        file: Annotated[
            Path | None, Opt(help="The prefect.yaml to read.  [default: the project's own]")
        ] = None,
        name: Annotated[
            list[str] | None, Opt("--name", help="Serve only this deployment (repeatable).")
        ] = None,
        limit: Annotated[int | None, Opt(help="Flow runs at once.")] = None,
    ) -> None:
        serve_command(file, name, limit)


def serve_command(file: Path | None, names: list[str] | None, limit: int | None) -> None:
    prepare_prefect(log_level="INFO")  # the runner's log: runs started, finished
    if server_url() is None:
        raise fail(
            "serve needs a Prefect server (the temporary one a run starts has no scheduler): start "
            "`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from flows.serve import PREFECT_YAML, serve_project  # Prefect's runner (seconds to import): only here

    try:
        serve_project((file or PREFECT_YAML).resolve(), names or None, limit)
    except UsageError as exc:
        raise fail(str(exc)) from None
