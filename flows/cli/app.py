"""The ``vlmbatch`` app: one module per command, put together here.

``common`` holds what they share (exit statuses, error printing, Prefect's setup). Commands that run a
flow import Prefect only when they run; ``inspect``, ``export``, ``report``, ``--help`` and
``--version`` never do.
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Annotated

import typer

from flows.cli import backfill, demo, emulate, outputs, report, run, serve

app = typer.Typer(
    add_completion=False,
    rich_markup_mode=None,
    no_args_is_help=True,
    help="Batch captioning and visual Q&A over Parquet manifests against OpenAI-compatible VLM endpoints.",
)
for command in (run, demo, emulate, outputs, report, backfill, serve):
    command.register(app)


def _show_version(value: bool) -> None:
    if value:
        versions = ", ".join(f"{name} {_version_of(name)}" for name in ("prefect", "pyarrow", "pillow"))
        typer.echo(f"vlmbatch {_version_of('vlmbatch')} ({versions}; Python {sys.version.split()[0]})")
        raise typer.Exit()


def _version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Show the versions and exit."),
    ] = False,
) -> None:
    """Batch captioning and visual Q&A over Parquet manifests against OpenAI-compatible VLM endpoints."""
