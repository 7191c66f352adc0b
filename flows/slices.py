"""The fan-out (``vlmbatch run … --slices N``): one job as N slice flow runs on a Prefect work pool.

The parent flow run (``annotate-slices``, in the CLI's process) submits one flow run of the
deployment ``annotate/annotate-slice`` (prefect.yaml) per slice, ``--slice K/N`` in its config, so
every worker polling the pool, on any machine, takes slices; they write one OUT together
(tasks/outputs/lock.py) and share the endpoint's global concurrency limit (flows/endpoint_limit.py).

- Each submission has an idempotency key made of the parent's flow run id, the slice and the attempt:
  a retried parent (same flow run id) finds the slices it already submitted instead of doubling them.
- The parent waits for them. A slice whose run crashed — Prefect says so, or its run still shows
  Running while OUT shows no live holder of the slice's lock for ``LOST_AFTER_S`` (its worker or node
  is gone: nobody will tell Prefect; on an object store the dead run's lease counts as held until it
  lapses, its TTL after the last renewal) — is marked Crashed and submitted again (Prefect does not
  retry crashed runs), up to ``MAX_ATTEMPTS`` runs a slice, as is a slice that stopped because it lost
  its lease (exit 4). A slice is submitted again only once nothing holds its part of OUT (a killed
  run's lease lapsed), or after ``LAPSE_WAIT_S`` (then the new run names the holder). The new run
  resumes what the lost one wrote.
- Ctrl-C or SIGTERM cancels the slices' runs (through their workers, which stop them as a SIGTERM
  does a run) and waits up to ``CANCEL_WAIT_S`` for them; the parent exits 130 or 143.
- It ends like a run: the slices' summaries summed, the same exit statuses and final states
  (CompletedWithFailures), and a table artifact (``slices``) with one row per slice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.orchestration import PrefectClient, get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.deployments import arun_deployment
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Cancelled, Cancelling, Crashed
from pydantic import BaseModel

from flows.artifacts import SLICE_RESULT, publish_table, read_artifacts
from flows.states import with_failed_rows
from tasks.config import RunConfig
from tasks.errors import ConfigError, EndpointUnusable, RunInterrupted, RunStopped
from tasks.outputs.lock import scope_holder
from tasks.outputs.object_path import OutPath, out_path
from tasks.outputs.summary import ReplicaSummary, RunSummary
from tasks.run.plan import plan_run
from tasks.slice import Slice
from tasks.stopping import EXIT_CODES, StopSwitch, hard_exit, signals_stop

SLICE_DEPLOYMENT = "annotate/annotate-slice"
MAX_ATTEMPTS = 3  # runs of one slice, the first included
LOST_AFTER_S = 15.0  # a Running slice with no live lock holder this long is lost
PENDING_LOST_AFTER_S = 300.0  # a run a worker took (Pending) that never started: its worker is gone
# (generous: on a container pool, Pending includes starting the container, pulling its image)
LAPSE_WAIT_S = 615.0  # the longest lease TTL (VLMBATCH_LEASE_TTL ≤ 600 s) and a margin
POLL_S = 1.0
CANCEL_WAIT_S = 60.0  # after a Ctrl-C, how long the slices' runs have to end (a worker's grace: 30 s)
EXIT_CRASHED = 70
EXIT_LEASE_LOST = 4  # OutLost: the slice stopped writing; what it wrote is kept, a rerun continues


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


@dataclass
class _Watch:
    part: Slice
    run: FlowRun | None = None
    attempts: int = 0
    running_since: float | None = None  # when this attempt was first seen Running (monotonic)
    pending_since: float | None = None
    held_at: float | None = None  # when its lock was last seen held
    again_since: float | None = None  # waiting since to submit it again (a dead run's lease to lapse)
    summary: RunSummary | None = None
    exit_code: int | None = None  # set once the slice is over
    detail: str = ""


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
    watches = [_Watch(Slice(k, n)) for k in range(1, n + 1)]
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

        async def submit(watch: _Watch) -> None:
            watch.attempts += 1
            key = f"{parent}/{watch.part.scope}/attempt-{watch.attempts}"
            watch.run = await arun_deployment(
                target.id,
                parameters={"config": slice_config(config, watch.part)},
                flow_run_name=f"{watch.part.scope}"
                + (f"-attempt-{watch.attempts}" if watch.attempts > 1 else ""),
                idempotency_key=key,
                timeout=0,
                as_subflow=True,
            )
            watch.running_since = watch.pending_since = watch.held_at = watch.again_since = None

        async def again(watch: _Watch, why: str) -> bool:
            """Submit a slice again once nothing holds its part of OUT: False while it waits."""
            now = time.monotonic()
            first = watch.again_since is None
            watch.again_since = watch.again_since or now
            if now - watch.again_since < LAPSE_WAIT_S:
                holder = await asyncio.to_thread(scope_holder, out, watch.part.scope)  # a request
                if holder is not None:
                    if first:
                        logger.warning(
                            "%s: %s; submitting it again once its part of OUT is free (%s)",
                            watch.part.scope,
                            why,
                            holder,
                        )
                    return False
            logger.warning("%s: %s; submitting it again", watch.part.scope, why)
            await submit(watch)
            return True

        stop = StopSwitch()  # Ctrl-C or SIGTERM: the slices' runs are cancelled, and waited for
        stopped_at: float | None = None
        with signals_stop(stop, on_second=hard_exit):
            for watch in watches:
                await submit(watch)
            while pending := [w for w in watches if w.exit_code is None]:
                await stop.sleep(POLL_S)
                if stop.is_set and stopped_at is None:
                    stopped_at = time.monotonic()
                    logger.warning(
                        "%s: cancelling the slices' runs (each writes what it has done); a second one "
                        "stops at once",
                        stop.reason,
                    )
                    await _cancel(client, [w.run for w in pending if w.run is not None], stop)
                runs = await _read_runs(client, [w.run.id for w in pending if w.run is not None])
                for watch in pending:
                    assert watch.run is not None
                    run = watch.run = runs.get(watch.run.id, watch.run)
                    if stopped_at is not None:
                        _settled_after_stop(watch, run, stop, time.monotonic() - stopped_at)
                        if watch.exit_code is None and run.state is not None and run.state.is_final():
                            await _settle(watch, run)
                        continue
                    lost = await asyncio.to_thread(_lost, watch, run, out)  # an object store: requests
                    if lost is not None:
                        logger.warning("%s: %s; marking its run Crashed", watch.part.scope, lost)
                        await client.set_flow_run_state(run.id, Crashed(message=lost), force=True)
                        run = watch.run = await client.read_flow_run(run.id)
                    state = run.state
                    if state is None or not state.is_final():
                        continue
                    if state.type == StateType.CRASHED:
                        if watch.attempts < MAX_ATTEMPTS:
                            await again(watch, f"run {run.name} crashed ({state.message})")
                            continue
                        watch.exit_code = EXIT_CRASHED
                        watch.detail = f"crashed {watch.attempts} times; last: {state.message}"
                        continue
                    await _settle(watch, run)
                    if watch.exit_code == EXIT_LEASE_LOST and watch.attempts < MAX_ATTEMPTS:
                        why, watch.exit_code, watch.summary = f"run {run.name} {watch.detail}", None, None
                        await again(watch, why)
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
    if stop.reason in EXIT_CODES:  # the parent was stopped: its signal's status, whatever the slices'
        cut = [o.slice for o in broken]
        message = f"slices {', '.join(cut)} cancelled" if cut else "every slice had finished"
        raise RunInterrupted(
            f"interrupted by {stop.reason}: {message}; what was written is kept, rerun to continue",
            summary,
            EXIT_CODES[stop.reason],
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


def _lost(watch: _Watch, run: FlowRun, out: OutPath) -> str | None:
    """Why a slice's run that Prefect still shows Pending or Running is gone, or None."""
    state = run.state
    if state is None or state.type not in (StateType.RUNNING, StateType.PENDING):
        return None
    now = time.monotonic()
    if state.type == StateType.PENDING:
        watch.pending_since = watch.pending_since or now
        if now - watch.pending_since > PENDING_LOST_AFTER_S:
            return f"its run was Pending for {PENDING_LOST_AFTER_S:.0f} s without starting"
        return None
    watch.running_since = watch.running_since or now
    if scope_holder(out, watch.part.scope) is not None:
        watch.held_at = now
        return None
    since = max(watch.running_since, watch.held_at or 0.0)
    if now - since > LOST_AFTER_S:
        return (
            f"its run shows Running but nothing has held its lock in OUT for {LOST_AFTER_S:.0f} s "
            "(its worker is gone)"
        )
    return None


async def _cancel(client: PrefectClient, runs: list[FlowRun], stop: StopSwitch) -> None:
    """Cancel the slices' runs: one no worker has taken yet at once; one a worker runs through its
    worker (Cancelling), which stops it as a SIGTERM does a run: in-flight requests finished, rows
    written."""
    message = f"the run of all slices was stopped ({stop.reason})"
    for run in runs:
        state = run.state
        if state is None or state.is_final():
            continue
        new: State[Any] = (
            Cancelled(message=message) if state.type == StateType.SCHEDULED else Cancelling(message=message)
        )
        with contextlib.suppress(Exception):  # one that ended meanwhile: read back as it is
            await client.set_flow_run_state(run.id, new, force=True)


def _settled_after_stop(watch: _Watch, run: FlowRun, stop: StopSwitch, waited: float) -> None:
    """After a stop, a slice that is not over within ``CANCEL_WAIT_S`` (a lost worker never confirms)
    is left, as interrupted; a crashed one is not submitted again."""
    state = run.state
    code = EXIT_CODES.get(stop.reason or "", 130)
    if state is not None and state.type == StateType.CRASHED:
        watch.exit_code, watch.detail = code, f"crashed while cancelled: {state.message or ''}".strip()
    elif (state is None or not state.is_final()) and waited > CANCEL_WAIT_S:
        watch.exit_code = code
        shown = state.name if state is not None else "unknown"
        watch.detail = f"cancelled, not over after {CANCEL_WAIT_S:.0f} s (state {shown})"


async def _read_runs(client: PrefectClient, ids: list[Any]) -> dict[Any, FlowRun]:
    if not ids:
        return {}
    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return {run.id: run for run in runs}


async def _settle(watch: _Watch, run: FlowRun) -> None:
    """A slice's run is over (not crashed): its summary and exit status from its artifact."""
    state = run.state
    assert state is not None
    found = await read_artifacts(key=SLICE_RESULT, flow_run_ids=[run.id])
    if found:
        data = found[0].data
        rows = data if isinstance(data, list) else json.loads(data)
        row = rows[0]
        watch.summary = RunSummary.model_validate_json(row["summary"])
        watch.exit_code = int(row["exit_code"])
        watch.detail = str(row.get("message") or "")
        return
    if state.type == StateType.CANCELLED:
        watch.exit_code, watch.detail = 130, f"cancelled: {state.message or ''}".strip()
    elif state.type == StateType.COMPLETED:
        watch.exit_code, watch.detail = EXIT_CRASHED, "completed without its result"
    else:  # failed before it ran (a usage error: the manifest or OUT, as a worker sees them)
        watch.exit_code, watch.detail = 1, state.message or state.name or "failed"


def _outcome(watch: _Watch) -> SliceOutcome:
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
    for code in (143, 130, 3, EXIT_LEASE_LOST, EXIT_CRASHED, 1, 2):
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
