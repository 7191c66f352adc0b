"""A progress bar on the terminal, fed by the annotate flow's finished rows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tasks.row import ResultRow
from tasks.run.job import add_row_listener


@contextmanager
def progress_bar(total: int, *, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    progress = Progress(
        TextColumn("[bold]annotating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[failed]} failed"),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    bar = progress.add_task("rows", total=total, failed=0)
    failed = 0

    def on_row(row: ResultRow | None) -> None:
        nonlocal failed
        failed += row is not None and row.status == "failed"
        progress.update(bar, advance=1, failed=failed)

    unsubscribe = add_row_listener(on_row)
    try:
        with progress:
            yield
    finally:
        unsubscribe()
