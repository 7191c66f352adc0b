"""The closing summary printed by ``run``, ``demo`` and ``inspect``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from tasks.outputs.summary import RunSummary


def print_summary(summary: RunSummary, console: Console | None = None) -> None:
    console = console or Console(highlight=False, soft_wrap=True)
    title = "dry run (nothing sent)" if summary.dry_run else "summary"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    done = "ready to send" if summary.dry_run else "ok"
    table.add_row("work items", str(summary.work_items))
    if summary.skipped:
        table.add_row("skipped (already ok)", str(summary.skipped))
    table.add_row(done, str(summary.ok))
    table.add_row("failed", str(summary.failed))
    for error_type, count in summary.errors.items():
        table.add_row(f"  {error_type}", str(count))
    if not summary.dry_run:
        if summary.finish_reasons:
            reasons = ", ".join(f"{k}: {v}" for k, v in summary.finish_reasons.items())
            table.add_row("finish reasons", reasons)
        table.add_row("requests sent", str(summary.requests))
        table.add_row(
            "tokens (prompt / completion)", f"{summary.prompt_tokens} / {summary.completion_tokens}"
        )
        if summary.latency_p50_ms is not None:
            table.add_row(
                "latency p50 / p95", f"{summary.latency_p50_ms:.0f} ms / {summary.latency_p95_ms:.0f} ms"
            )
    if summary.elapsed_s:
        table.add_row("elapsed", f"{summary.elapsed_s:.2f} s ({summary.rows_per_s:.1f} rows/s)")
    if summary.out:
        table.add_row("output", summary.out)
    console.print(table)
    if summary.replicas:
        console.print(replicas_table(summary))


def replicas_table(summary: RunSummary) -> Table:
    """Per replica: requests, answers, failures, ejections, p50 latency (a run with several replicas)."""
    table = Table(title="replicas", title_justify="left")
    for header in ("replica", "requests", "answered", "failures", "ejections", "latency p50"):
        if header == "replica":  # a URL: wrapped whole rather than cut short
            table.add_column(header, overflow="fold")
        else:
            table.add_column(header, justify="right")
    for r in summary.replicas:
        table.add_row(
            r.replica,
            str(r.requests),
            str(r.answered),
            str(r.failures),
            "–" if r.ejections is None else str(r.ejections),
            "–" if r.latency_p50_ms is None else f"{r.latency_p50_ms:.0f} ms",
        )
    return table
