"""The fan-out (``vlmbatch run … --slices N``): one job as N slice flow runs on a Prefect work pool.

The parent flow run (``annotate-slices``, in the CLI's process) submits one flow run of the
deployment ``annotate/annotate-slice`` (prefect.yaml) per slice, ``--slice K/N`` in its config, so
every worker polling the pool, on any machine, takes slices; they write one OUT together
(tasks/outputs/lock.py) and share the endpoint's global concurrency limit (flows/endpoint_limit.py).

- The parent submits, watches, submits again (a crashed slice, one that lost its lease) and, on
  Ctrl-C or SIGTERM, cancels the slices' runs: flows/slice_runs.py.
- It ends like a run: the slices' summaries summed, the same exit statuses and final states
  (CompletedWithFailures), and a table artifact (``slices``) with one row per slice.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.artifacts import publish_table
from flows.slice_runs import EXIT_CRASHED, EXIT_LEASE_LOST, SliceRuns, SliceWatch
from flows.states import with_failed_rows
from tasks.config import RunConfig
from tasks.errors import ConfigError, EndpointUnusable, RunInterrupted, RunStopped
from tasks.outputs.object_path import OutPath, out_path
from tasks.outputs.summary import ReplicaSummary, RunSummary
from tasks.run.plan import plan_run
from tasks.slice import Slice
from tasks.stopping import EXIT_CODES

SLICE_DEPLOYMENT = "annotate/annotate-slice"


class SliceOutcome(BaseModel):
    slice: str
    flow_run: str = ""
    attempts: int = 0
    state: str = ""
    work_items: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    exit_code: int = 0
    detail: str = ""


class SlicesIncomplete(RunStopped):
    """Some slice ended without finishing its part (crashed every time, or a usage error)."""

    def __init__(self, message: str, summary: object, exit_code: int) -> None:
        super().__init__(message, summary)
        self.exit_code = exit_code


def slice_config(config: RunConfig, part: Slice) -> dict[str, Any]:
    """The parameter of a slice's flow run: this run's config, its slice set, local paths absolute
    (a worker starts in the deployment's directory, maybe on another machine with the same mounts)."""
    data = config.model_copy(update={"slices": None, "slice": part.spec}).model_dump(mode="json")
    for key in ("images", "prompts", "out"):
        if isinstance(data.get(key), str) and "://" not in data[key]:
            data[key] = os.path.abspath(data[key])
    root = data["image"].get("image_root")
    if isinstance(root, str) and "://" not in root:
        data["image"]["image_root"] = os.path.abspath(root)
    return data


@flow(name="annotate-slices", description="One job as N slice flow runs of annotate/annotate-slice.")
async def annotate_slices(config: RunConfig, deployment: str = SLICE_DEPLOYMENT) -> RunSummary:
    started = time.perf_counter()
    logger = get_run_logger()
    n = config.slices
    if n is None:
        raise ConfigError("annotate-slices needs --slices N")
    plan = plan_run(config.model_copy(update={"slices": None}))  # exit 1 before anything is submitted
    config = plan.config  # paths resolved ({date})
    out = out_path(config.out)
    parent = str(flow_run.id or "local")
    async with get_client() as client:
        try:
            target = await client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            raise ConfigError(
                f"no deployment {deployment!r} on the server: `prefect deploy --all` from the repository "
                "root declares it (prefect.yaml), and a worker of its pool runs the slices"
            ) from None
        logger.info(
            "%d work items in %d slices → %s, on work pool %r",
            plan.work_items,
            n,
            out,
            target.work_pool_name,
        )
        parameters = {part: slice_config(config, part) for part in (Slice(k, n) for k in range(1, n + 1))}
        runs = SliceRuns(client, target.id, parameters, out, parent, logger, target.work_pool_name or "")
        watches = await runs.run()
    outcomes = [_outcome(w) for w in watches]
    await publish_table(
        [o.model_dump(mode="json") for o in outcomes],
        key="slices",
        description=f"{n} slices → {out}: one row per slice",
    )
    summary = summed([w.summary for w in watches if w.summary is not None], plan.work_items, out, started)
    for o in outcomes:
        logger.info(
            "%s: %s, %d ok, %d failed, %d skipped %s", o.slice, o.state, o.ok, o.failed, o.skipped, o.detail
        )
    code = exit_code([o.exit_code for o in outcomes])
    broken = [o for o in outcomes if o.exit_code not in (0, 2)]
    if (reason := runs.stop.reason) in EXIT_CODES:  # the parent was stopped: its signal's status
        cut = [o.slice for o in broken if o.exit_code in (130, 143)]
        others = [f"{o.slice}: {o.detail or o.state}" for o in broken if o.exit_code not in (130, 143)]
        message = "; ".join(([f"slices {', '.join(cut)} cancelled"] if cut else []) + others)
        raise RunInterrupted(
            f"interrupted by {reason}: {message or 'every slice had finished'}; what was written is "
            "kept, rerun to continue",
            summary,
            EXIT_CODES[reason],
        )
    if broken:
        message = "; ".join(f"{o.slice}: {o.detail or o.state}" for o in broken)
        if code in (130, 143):
            raise RunInterrupted(f"interrupted: {message}; rerun to continue", summary, code)
        if code == 3:
            raise EndpointUnusable(f"aborted: {message}", summary)
        raise SlicesIncomplete(f"{len(broken)} of {n} slices did not finish: {message}", summary, code)
    if summary.failed:
        return with_failed_rows(
            summary,
            f"{summary.failed} of {summary.work_items} rows failed ({summary.errors_text}); "
            "a rerun retries them",
        )
    return summary


def _outcome(watch: SliceWatch) -> SliceOutcome:
    s = watch.summary
    state = watch.run.state if watch.run is not None else None
    return SliceOutcome(
        slice=watch.part.spec,
        flow_run=watch.run.name if watch.run is not None else "",
        attempts=watch.attempts,
        state=(state.name or "") if state is not None else "",
        work_items=s.work_items if s else 0,
        ok=s.ok if s else 0,
        failed=s.failed if s else 0,
        skipped=s.skipped if s else 0,
        exit_code=watch.exit_code or 0,
        detail=watch.detail,
    )


def exit_code(codes: list[int]) -> int:
    """The run's exit status from its slices': interrupted, endpoint unusable, lease lost, crashed,
    usage, rows."""
    for code in (143, 130, 3, EXIT_LEASE_LOST, EXIT_CRASHED, 1, 2):  # flows/slice_runs.py
        if code in codes:
            return code
    return max(codes, default=0)


def summed(parts: list[RunSummary], work_items: int, out: OutPath, started: float) -> RunSummary:
    """One summary of the slices' (latency percentiles are per slice: not summed, left out)."""
    errors: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    replicas: dict[str, ReplicaSummary] = {}
    for s in parts:
        errors.update(s.errors)
        reasons.update(s.finish_reasons)
        for r in s.replicas:
            mine = replicas.setdefault(r.replica, ReplicaSummary(replica=r.replica, ejections=0))
            mine.requests += r.requests
            mine.answered += r.answered
            mine.failures += r.failures
            mine.ejections = (
                None if r.ejections is None or mine.ejections is None else mine.ejections + r.ejections
            )
    elapsed = time.perf_counter() - started
    ok, failed = sum(s.ok for s in parts), sum(s.failed for s in parts)
    return RunSummary(
        out=str(out),
        work_items=work_items,
        skipped=sum(s.skipped for s in parts),
        ok=ok,
        failed=failed,
        errors=dict(errors.most_common()),
        finish_reasons=dict(reasons.most_common()),
        prompt_tokens=sum(s.prompt_tokens for s in parts),
        completion_tokens=sum(s.completion_tokens for s in parts),
        requests=sum(s.requests for s in parts),
        elapsed_s=elapsed,
        rows_per_s=(ok + failed) / elapsed if elapsed > 0 else 0.0,
        replicas=list(replicas.values()),
    )
