"""``vlmbatch inspect`` and ``vlmbatch export``: the commands that read OUT (no Prefect)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import fail
from flows.cli.summary_table import print_summary
from tasks.errors import UsageError
from tasks.inputs.manifests import read_prompts_manifest
from tasks.outputs.export import export_output
from tasks.outputs.lock import writer_of
from tasks.outputs.object_path import out_path
from tasks.outputs.reading import read_summary_columns
from tasks.outputs.summary import summarize_table

OUT_HELP = "An output dataset: a directory, or s3://bucket/prefix or gs://bucket/prefix."


def inspect(out_arg: Annotated[str, typer.Argument(metavar="OUT", help=OUT_HELP)]) -> None:
    """Counts by status and error type, token totals and latency percentiles of OUT."""
    try:
        out = out_path(out_arg)
        if isinstance(out, Path) and not out.is_dir():
            raise UsageError(f"{out} is not a directory")
        who = writer_of(out)
    except UsageError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # an object store's SDK: no bucket, access denied, no endpoint
        raise fail(f"{out_arg} cannot be read: {type(exc).__name__}: {exc}"[:300]) from None
    if who is not None:
        typer.echo(f"warning: {out} is being written by {who}: these counts are a snapshot", err=True)
    try:
        table = read_summary_columns(out)
    except UsageError as exc:
        raise fail(str(exc)) from None
    except Exception as exc:  # pyarrow raises several types for unreadable datasets
        raise fail(f"{out} is not a readable vlmbatch output: {exc}") from None
    print_summary(summarize_table(table, str(out)))


def export(
    out: Annotated[str, typer.Argument(help=OUT_HELP)],
    dest: Annotated[Path, typer.Argument(help="The Parquet file to write (outside OUT).")],
    json_columns: Annotated[
        bool,
        typer.Option(
            "--json-columns",
            help="Add the JSON answers' top-level properties as typed columns: typed from the prompts' "
            "JSON Schemas with --prompts, else inferred from the values.",
        ),
    ] = False,
    prompts: Annotated[
        Path | None, typer.Option(help="The prompts manifest the output was made with (for --json-columns).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Replace FILE even when it is not an earlier export.")
    ] = False,
) -> None:
    """OUT as one Parquet file, optionally with typed JSON columns (for an OUT written without them)."""

    try:
        schemas = read_prompts_manifest(prompts) if prompts is not None else None
        written = export_output(out_path(out), dest, json_columns=json_columns, prompts=schemas, force=force)
    except UsageError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"wrote {written} rows to {dest}")


def register(app: typer.Typer) -> None:
    app.command()(inspect)
    app.command()(export)
