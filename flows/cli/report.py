"""``vlmbatch report``: OUT as one self-contained HTML page: figures, charts, a gallery (no Prefect)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import Opt, fail
from tasks.errors import UsageError
from tasks.outputs.lock import writer_of
from tasks.outputs.object_path import out_path
from tasks.outputs.report import write_report


def report(
    out_arg: Annotated[
        str,
        typer.Argument(metavar="OUT", help="An output dataset: a directory, or s3://bucket/prefix, gs://..."),
    ],
    images: Annotated[
        Path | None,
        Opt(help="The run's images manifest: thumbnails of the sampled rows' images (none: no thumbnails)."),
    ] = None,
    output: Annotated[
        Path,
        Opt("--output", "-o", help="The HTML file to write (outside OUT; replaces only an earlier report)."),
    ] = Path("report.html"),
    sample: Annotated[
        int, Opt(help="Rows in the gallery: a deterministic sample stratified by prompt and outcome.")
    ] = 200,
    image_root: Annotated[
        Path | None,
        Opt(help="Local image paths must resolve inside it, as in run.  [default: manifest's folder]"),
    ] = None,
    id_column: Annotated[str, Opt(help="Images-manifest id column.")] = "image_id",
    image_column: Annotated[str, Opt(help="Images-manifest image column.")] = "image",
    allow_private_urls: Annotated[
        bool, Opt("--allow-private-urls", help="Let http(s) images come from loopback or private addresses.")
    ] = False,
    force: Annotated[
        bool, Opt("--force", help="Replace the -o file even when it is not an earlier report.")
    ] = False,
) -> None:
    """OUT as one self-contained HTML page: figures, charts, and sampled rows beside their images."""
    try:
        out = out_path(out_arg)
        if out.is_dir() and (who := writer_of(out)) is not None:
            typer.echo(f"warning: {out} is being written by {who}: this report is a snapshot", err=True)
        made = write_report(
            out,
            output,
            images=images,
            sample=sample,
            image_root=image_root,
            id_column=id_column,
            image_column=image_column,
            allow_private_urls=allow_private_urls,
            force=force,
        )
    except UsageError as exc:
        raise fail(str(exc)) from None
    pictures = ""
    if images is not None:
        pictures = f", {made.thumbnails} thumbnails" + (
            f" ({made.missing} images unavailable)" if made.missing else ""
        )
    size = f"{made.bytes / 1024:,.0f} KB"
    typer.echo(f"wrote {output} ({size}): {made.rows:,} rows, {made.sampled} in the gallery{pictures}")


def register(app: typer.Typer) -> None:
    app.command()(report)
