"""The backfill flow: the annotate flow over a range of date partitions, a bounded number at a time.

Each partition is one child flow run of ``annotate`` (a subflow, in this process) with ``{date}`` in
the config's paths filled in. Completeness is decided by annotate's own resume, which skips every item
already ``ok`` with the same request key without reading an image or sending a request: a complete
partition costs a cheap child run that sends nothing and is reported ``skipped``; a partial one is
resumed; ``force`` (``--force``) re-runs everything. A partition whose input manifest is missing is
reported ``missing input`` and not run. The outcome of every partition is published as a table
artifact (``backfill-partitions``).
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Sequence
from typing import Any, Literal

from prefect import flow, get_run_logger
from pydantic import BaseModel

from flows.annotate import annotate
from flows.artifacts import outcomes_table, publish_table
from flows.slices import annotate_slices
from flows.states import with_failed_rows
from tasks.config import RunConfig
from tasks.errors import ConfigError, EndpointUnusable, RunInterrupted, RunStopped, UsageError
from tasks.outputs.summary import RunSummary
from tasks.partitions import Partition, select_partitions

Outcome = Literal[
    "ok", "failed rows", "skipped", "dry run", "missing input", "error", "interrupted", "not started"
]


class PartitionOutcome(BaseModel):
    partition: str
    outcome: Outcome
    work_items: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    detail: str = ""
    out: str = ""
    exit_code: int = 0


class BackfillIncomplete(Exception):
    """Some partitions could not run to the end (error, endpoint unusable, interrupted)."""

    def __init__(self, message: str, outcomes: list[PartitionOutcome]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


def counts_of(partition: Partition, summary: object) -> dict[str, Any]:
    """The row counts of a partition's summary (a run stopped early has one too), for its outcome."""
    if not isinstance(summary, RunSummary):
        return {"out": partition.config.out}
    return {
        "work_items": summary.work_items,
        "ok": summary.ok,
        "failed": summary.failed,
        "skipped": summary.skipped,
        "out": partition.config.out,
    }


def outcome_of(partition: Partition, summary: RunSummary) -> PartitionOutcome:
    counts = counts_of(partition, summary)
    if summary.dry_run:
        detail = f"nothing sent; {summary.ok} ready to send" + (
            f", {summary.failed} would fail" if summary.failed else ""
        )
        code = 2 if summary.failed else 0
        return PartitionOutcome(
            partition=partition.name, outcome="dry run", detail=detail, exit_code=code, **counts
        )
    if summary.failed:
        return PartitionOutcome(
            partition=partition.name,
            outcome="failed rows",
            detail=summary.errors_text,
            exit_code=2,
            **counts,
        )
    if summary.work_items and summary.skipped == summary.work_items:
        detail = "already complete: nothing sent"
        return PartitionOutcome(partition=partition.name, outcome="skipped", detail=detail, **counts)
    detail = f"resumed: {summary.skipped} already ok" if summary.skipped else ""
    return PartitionOutcome(partition=partition.name, outcome="ok", detail=detail, **counts)


def exit_code(outcomes: Sequence[PartitionOutcome]) -> int:
    """130/143 interrupted, else 3 when the endpoint was unusable, else 2 when some partition has
    failed rows or an error (any other status: a usage error, a lost lease, slices that crashed), else
    0 (ok, skipped and missing-input partitions)."""
    codes = {o.exit_code for o in outcomes}
    for code in (143, 130, 3):
        if code in codes:
            return code
    return 2 if codes - {0} else 0


@flow(name="backfill", description="The annotate flow over a range of date partitions ({date} in paths).")
async def backfill(
    config: RunConfig, start: datetime.date, end: datetime.date, max_parallel: int = 2
) -> list[PartitionOutcome]:
    logger = get_run_logger()
    if max_parallel < 1:
        raise ConfigError(f"--max-parallel must be at least 1 (got {max_parallel})")
    partitions = select_partitions(config, start, end)
    logger.info(
        "%d partitions %s..%s, %d at a time → %s", len(partitions), start, end, max_parallel, config.out
    )
    gate = asyncio.Semaphore(max_parallel)
    stopping: list[str] = []  # why no further partition starts

    async def run_one(partition: Partition) -> PartitionOutcome:
        name = partition.name
        if partition.missing is not None:
            return PartitionOutcome(partition=name, outcome="missing input", detail=partition.missing)
        async with gate:
            if stopping:
                return PartitionOutcome(partition=name, outcome="not started", detail=stopping[0])
            sliced = partition.config.slices is not None  # its slices on the work pool (flows/slices.py)
            child = (annotate_slices if sliced else annotate).with_options(flow_run_name=f"annotate-{name}")
            try:
                return outcome_of(partition, await child(partition.config))
            except RunInterrupted as exc:
                stopping.append(f"backfill interrupted during {name}")
                done = exc.summary
                if isinstance(done, RunSummary) and done.ok + done.failed + done.skipped >= done.work_items:
                    # the signal came after its last row: complete, though the backfill still exits 130/143
                    return outcome_of(partition, done).model_copy(update={"exit_code": exc.exit_code})
                code = exc.exit_code
                counts = counts_of(partition, exc.summary)  # what it did before it stopped
                return PartitionOutcome(
                    partition=name, outcome="interrupted", detail=str(exc), exit_code=code, **counts
                )
            except EndpointUnusable as exc:
                stopping.append(f"the endpoint was unusable during {name}")
                counts = counts_of(partition, exc.summary)
                return PartitionOutcome(
                    partition=name, outcome="error", detail=str(exc), exit_code=3, **counts
                )
            except RunStopped as exc:  # its slices did not all finish (flows/slices.py)
                counts = counts_of(partition, exc.summary)
                code = exc.exit_code
                return PartitionOutcome(
                    partition=name, outcome="error", detail=str(exc), exit_code=code, **counts
                )
            except UsageError as exc:
                return PartitionOutcome(partition=name, outcome="error", detail=str(exc), exit_code=1)
            except Exception as exc:  # a crash in one partition must not lose the others' outcomes
                detail = f"{type(exc).__name__}: {exc}"
                return PartitionOutcome(partition=name, outcome="error", detail=detail, exit_code=1)

    outcomes = list(await asyncio.gather(*(run_one(p) for p in partitions)))
    for o in outcomes:
        logger.info("%s: %s %s", o.partition, o.outcome, o.detail)
    await publish_table(
        outcomes_table(outcomes),
        key="backfill-partitions",
        description=f"backfill {start}..{end}: outcome per partition",
    )
    missing = [o.partition for o in outcomes if o.outcome == "missing input"]
    if missing:  # a deployment's run would otherwise look complete with nothing done
        logger.warning(
            "%d of %d partitions have no input, so nothing ran for them: %s",
            len(missing),
            len(outcomes),
            ", ".join(missing),
        )
    broken = [o for o in outcomes if o.outcome in ("error", "interrupted", "not started")]
    if broken:
        raise BackfillIncomplete(
            f"{len(broken)} of {len(outcomes)} partitions did not finish: "
            + ", ".join(f"{o.partition} ({o.outcome})" for o in broken),
            outcomes,
        )
    failed = [o for o in outcomes if o.outcome == "failed rows"]
    if failed:
        rows = sum(o.failed for o in failed)
        where = ", ".join(o.partition for o in failed)
        return with_failed_rows(outcomes, f"{rows} rows failed in {len(failed)} partitions ({where})")
    return outcomes
