"""The ``vlmbatch`` command line: one module per command, put together here.

``common`` holds what they share (exit statuses, error printing, Prefect's setup). Commands that run a
flow import Prefect only when they run; ``inspect``, ``export``, ``report``, ``--help`` and ``--version``
never do.
"""

from __future__ import annotations

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


def main() -> None:
    app()
