"""Prefect artifacts of a run: progress updated per shard, a summary (and a few answers) at the end, a
backfill table.

Artifacts are a view, never a reason to lose a run: a failure to publish one is logged and ignored.
Keys (which group an artifact's versions on the Artifacts page) may hold only lowercase letters,
digits and dashes.
"""

from __future__ import annotations

import html
import logging
import re
import time
from collections.abc import Sequence
from typing import Any
from uuid import UUID

from prefect.artifacts import (
    acreate_markdown_artifact,
    acreate_progress_artifact,
    acreate_table_artifact,
    aupdate_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import Artifact

from tasks.outputs.summary import RunSummary, SampleAnswer

log = logging.getLogger(__name__)


def artifact_key(*parts: str | None) -> str:
    text = "-".join(p for p in parts if p)
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", text.lower())).strip("-")


def markdown_cell(text: str | None) -> str:
    """``text`` as one cell of a markdown table: on one line, its pipes, markdown and HTML as plain text
    (None: a dash)."""
    if text is None:
        return "–"
    text = " ".join(text.split()).replace("\\", "\\\\")
    text = html.escape(text, quote=False)
    return re.sub(r"([|`*_\[\]~])", r"\\\1", text)


def summary_markdown(
    summary: RunSummary, *, title: str = "vlmbatch run", sample: Sequence[SampleAnswer] = ()
) -> str:
    """Counts by status and error type, tokens, latency percentiles, throughput, output location; then
    a few answers, the first words of each."""

    def ms(value: float | None) -> str:
        return "–" if value is None else f"{value:.0f} ms"

    done = "ready to send" if summary.dry_run else "ok"
    rows: list[tuple[str, str]] = [
        ("work items", str(summary.work_items)),
        ("skipped (already ok)", str(summary.skipped)),
        (done, str(summary.ok)),
        ("failed", str(summary.failed)),
        *((f"failed: `{kind}`", str(n)) for kind, n in summary.errors.items()),
        ("requests sent", str(summary.requests)),
        ("prompt tokens", str(summary.prompt_tokens)),
        ("completion tokens", str(summary.completion_tokens)),
        ("latency p50 / p95", f"{ms(summary.latency_p50_ms)} / {ms(summary.latency_p95_ms)}"),
        ("elapsed", f"{summary.elapsed_s:.1f} s"),
        ("rows per second", f"{summary.rows_per_s:.2f}"),
        ("output", f"`{summary.out}`" if summary.out else "– (dry run)"),
    ]
    if summary.finish_reasons:
        # as the server sent them: escaped like the sample's cells, so none can break the table
        reasons = ", ".join(f"{markdown_cell(k)}: {v}" for k, v in summary.finish_reasons.items())
        rows.insert(-4, ("finish reasons", reasons))
    lines = [f"## {title}", "", "| | |", "|---|---:|", *(f"| {k} | {v} |" for k, v in rows)]
    if summary.replicas:
        lines += [
            "",
            "### replicas",
            "",
            "| replica | requests | answered | failures | ejections | latency p50 |",
            "|---|---:|---:|---:|---:|---:|",
            *(
                f"| `{markdown_cell(r.replica)}` | {r.requests} | {r.answered} | {r.failures} | "
                f"{'–' if r.ejections is None else r.ejections} | {ms(r.latency_p50_ms)} |"
                for r in summary.replicas
            ),
        ]
    if sample:
        lines += ["", "### Sample answers", "", "| prompt | image | answer (first words) |", "|---|---|---|"]
        lines += [
            f"| {markdown_cell(a.prompt_id)} | {markdown_cell(a.image_id)} | {markdown_cell(a.answer)} |"
            for a in sample
        ]
    return "\n".join(lines) + "\n"


async def publish_summary(
    summary: RunSummary, *, key: str, title: str, sample: Sequence[SampleAnswer] = ()
) -> UUID | None:
    try:
        return await acreate_markdown_artifact(
            summary_markdown(summary, title=title, sample=sample), key=key, description=f"{title}: summary"
        )
    except Exception as exc:  # a view only: never fail a run over it
        log.warning("could not publish the summary artifact: %s", exc)
        return None


class Progress:
    """A progress artifact of one run, created at 0 % and updated as shards finish."""

    EVERY_S = 1.0  # at most one update a second (a rerun of a finished job races through its shards)

    def __init__(self, total: int, description: str) -> None:
        self.total = total
        self.done = 0
        self.description = description
        self.artifact_id: UUID | None = None
        self._updated = 0.0
        self._sent: float | None = None  # the percentage last sent

    @property
    def percent(self) -> float:
        return 100.0 if self.total <= 0 else round(min(100.0, 100.0 * self.done / self.total), 2)

    async def start(self) -> None:
        try:
            self.artifact_id = await acreate_progress_artifact(self.percent, description=self.description)
            self._sent = self.percent
        except Exception as exc:
            log.warning("could not create the progress artifact: %s", exc)

    async def advance(self, items: int) -> None:
        self.done += items
        if time.monotonic() - self._updated >= self.EVERY_S or self.done >= self.total:
            await self.publish()

    async def publish(self) -> None:
        """Send the current percentage now (the flow calls it once more at the end)."""
        if self.artifact_id is None or self.percent == self._sent:
            return
        self._updated, self._sent = time.monotonic(), self.percent

        try:
            await aupdate_progress_artifact(self.artifact_id, self.percent)
        except Exception as exc:
            log.warning("could not update the progress artifact: %s", exc)


def outcomes_table(outcomes: Sequence[Any]) -> list[dict[str, Any]]:
    """One row per partition: the outcome and its counts (``PartitionOutcome`` models)."""
    return [outcome.model_dump(mode="json") for outcome in outcomes]


async def publish_table(rows: list[dict[str, Any]], *, key: str, description: str) -> UUID | None:
    try:
        return await acreate_table_artifact(rows, key=key, description=description)
    except Exception as exc:
        log.warning("could not publish the %s artifact: %s", key, exc)
        return None


SLICE_RESULT = "slice-result"  # a slice's summary and exit status, read by the run of all slices


async def publish_slice_result(summary: RunSummary, exit_code: int, message: str) -> None:
    """A slice's outcome as a one-row table artifact of its flow run (flows/slices.py reads it back)."""
    row = {"summary": summary.model_dump_json(), "exit_code": exit_code, "message": message}
    await publish_table([row], key=SLICE_RESULT, description="this slice's summary and exit status")


async def read_artifacts(
    *, key: str | None = None, flow_run_ids: Sequence[Any] = (), kind: str | None = None
) -> list[Any]:
    """Artifacts by key, flow runs and type, newest first. (A raw request: Prefect 3.8's client sends
    the filters left out as nulls, which its server rejects, and an empty task-run filter drops every
    artifact created outside a task.)"""
    body: dict[str, Any] = {"sort": "CREATED_DESC", "limit": 200, "offset": 0}
    artifacts: dict[str, Any] = {}
    if key is not None:
        artifacts["key"] = {"any_": [key]}
    if kind is not None:
        artifacts["type"] = {"any_": [kind]}
    if artifacts:
        body["artifacts"] = artifacts
    if flow_run_ids:
        body["flow_runs"] = {"id": {"any_": [str(i) for i in flow_run_ids]}}
    async with get_client() as client:
        response = await client.request("POST", "/artifacts/filter", json=body)  # type: ignore[arg-type]
    return [Artifact.model_validate(item) for item in response.json()]
