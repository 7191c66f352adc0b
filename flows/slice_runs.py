"""The slices' flow runs, as the parent of ``--slices N`` (flows/slices.py) submits, watches, submits
again and cancels them.

- Each submission has an idempotency key made of the parent's flow run id, the slice and the attempt:
  a retried parent (same flow run id) finds the slices it already submitted instead of doubling them.
- A slice whose run crashed — Prefect says so, or its run still shows Running while OUT shows no live
  holder of the slice's lock for ``LOST_AFTER_S`` (its worker or node is gone: nobody will tell
  Prefect; on an object store the dead run's lease counts as held until it lapses, its TTL after the
  last renewal) — is marked Crashed and submitted again (Prefect does not retry crashed runs), up to
  ``MAX_ATTEMPTS`` runs a slice, as is a slice that stopped because it lost its lease (exit 4). It is
  submitted again once nothing holds its part of OUT: while its own earlier run's lease is live it
  waits; held by another run, or still held after ``LAPSE_WAIT_S``, the slice ends with exit 4
  naming the holder. The new
  run resumes what the earlier one wrote (and counts those rows as skipped).
- The first Ctrl-C or SIGTERM cancels the slices' runs at once (through their workers, which stop
  them as a SIGTERM stops a run: rows written) and waits up to ``CANCEL_WAIT_S`` for them to end; a
  second one exits once the cancellations are sent (5 s at most). A failure to reach Prefect or OUT
  is tried again each poll for ``UNREACHABLE_S``; the parent failing for any reason cancels them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.deployments import arun_deployment
from prefect.states import Cancelled, Cancelling, Crashed

from flows.artifacts import SLICE_RESULT, read_artifacts
from tasks.outputs.lock import scope_holder
from tasks.outputs.object_path import OutPath
from tasks.outputs.summary import RunSummary
from tasks.slice import Slice
from tasks.stopping import EXIT_CODES, StopSwitch, hard_exit, signals_stop

MAX_ATTEMPTS = 3  # runs of one slice, the first included
LOST_AFTER_S = 15.0  # a Running slice with no live lock holder this long is lost
PENDING_LOST_AFTER_S = 300.0  # a run a worker took (Pending) that never started: its worker is gone
# (generous: on a container pool, Pending includes starting the container, pulling its image)
LAPSE_WAIT_S = 615.0  # the longest lease TTL (VLMBATCH_LEASE_TTL ≤ 600 s) and a margin
CANCEL_WAIT_S = 60.0  # after a Ctrl-C, how long the slices' runs have to end (a worker's grace: 30 s)
SECOND_SIGNAL_WAIT_S = 5.0  # a second Ctrl-C waits this long at most for the cancellations to be sent
UNCLAIMED_WARN_S = 60.0  # a slice's run Scheduled this long: no worker polls the pool? (said once)
UNREACHABLE_S = 300.0  # Prefect's API or OUT failing every poll this long: the parent gives up
POLL_S = 1.0
TAKEN = (StateType.PENDING, StateType.RUNNING)  # a worker has the run
EXIT_CRASHED = 70
EXIT_LEASE_LOST = 4  # OutLost: the slice stopped writing; what it wrote is kept, a rerun continues


@dataclass
class AttemptClock:
    """When the slice's current run was first seen in each state (monotonic), new for each attempt."""

    running_since: float | None = None
    pending_since: float | None = None
    scheduled_since: float | None = None  # no worker has taken it
    held_at: float | None = None  # when its lock was last seen held
    again_since: float | None = None  # waiting since to submit it again (its earlier run's lease)


@dataclass
class SliceWatch:
    part: Slice
    run: FlowRun | None = None
    attempts: int = 0
    clock: AttemptClock = field(default_factory=AttemptClock)
    summary: RunSummary | None = None
    exit_code: int | None = None  # set once the slice is over
    detail: str = ""


class SliceRuns:
    """The parent's hold on its slices' runs (create it inside the flow run, in its event loop)."""

    def __init__(
        self,
        client: PrefectClient,
        deployment_id: UUID,
        parameters: dict[Slice, dict[str, Any]],
        out: OutPath,
        parent: str,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
        pool: str = "",
    ) -> None:
        self.client, self.deployment_id, self.parameters = client, deployment_id, parameters
        self.out, self.parent, self.log, self.pool = out, parent, logger, pool
        self.unclaimed_said = False
        self.watches = [SliceWatch(part) for part in parameters]
        self.stop = StopSwitch()  # Ctrl-C or SIGTERM
        self.stopped_at: float | None = None
        self.cancelling: asyncio.Task[None] | None = None
        self.failing_since: float | None = None

    async def run(self) -> list[SliceWatch]:
        """Submit every slice and watch them until each is over; the watches, each with its exit
        status, summary (when its run published one) and detail."""
        self.stop.when_set(self._on_stop)
        with signals_stop(self.stop, on_second=self._on_second):
            try:
                for watch in self.watches:
                    if self.stop.is_set:
                        break
                    await self._submit(watch)
                while pending := [w for w in self.watches if w.exit_code is None]:
                    await self.stop.sleep(POLL_S)
                    await self._poll_or_wait(pending)
            except BaseException:
                if self.cancelling is None:  # the parent failed: its slices must not run on unwatched
                    failed = f"the run of all slices failed ({self.parent})"
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._cancel_all(failed))
                raise
            finally:
                if self.cancelling is not None and not self.cancelling.done():
                    with contextlib.suppress(Exception):
                        await self.cancelling
        return self.watches

    # --- submitting ---------------------------------------------------------------------------

    async def _submit(self, watch: SliceWatch) -> None:
        """Submit the slice's next attempt. Counted once Prefect has it: a submission that failed
        (maybe made, its answer lost) is tried again with the same key, which finds the run made."""
        attempt, scope = watch.attempts + 1, watch.part.scope
        watch.run = await arun_deployment(
            self.deployment_id,
            parameters={"config": self.parameters[watch.part]},
            flow_run_name=scope + (f"-attempt-{attempt}" if attempt > 1 else ""),
            idempotency_key=f"{self.parent}/{scope}/attempt-{attempt}",
            timeout=0,
            as_subflow=True,
        )
        watch.attempts = attempt
        if self.stop.is_set:  # stopped while it was being submitted: cancelled with the others
            await self._cancel(watch.run, self._stopped_message())
        watch.clock = AttemptClock()

    async def _again(self, watch: SliceWatch, why: str) -> None:
        """Submit a slice again once nothing holds its part of OUT (its earlier run's lease may be
        live a while after that run died); held by another run, the slice ends with exit 4."""
        assert watch.run is not None
        watch.exit_code = None  # pending again (its result read again next poll)
        now = time.monotonic()
        clock = watch.clock
        first = clock.again_since is None
        clock.again_since = clock.again_since or now
        holder = await asyncio.to_thread(scope_holder, self.out, watch.part.scope)  # a request
        if holder is not None:
            if f"run {watch.run.id} " not in holder or now - clock.again_since > LAPSE_WAIT_S:
                watch.exit_code = EXIT_LEASE_LOST
                watch.detail = f"{why}; not run again: its part of OUT is still held, {holder}"
                return
            if first:
                self.log.warning(
                    "%s: %s; submitting it again once its earlier run's lease lapses (%s)",
                    watch.part.scope,
                    why,
                    holder,
                )
            return
        self.log.warning("%s: %s; submitting it again", watch.part.scope, why)
        watch.summary = None  # the new run's replaces it (the earlier one's rows count as skipped)
        await self._submit(watch)

    # --- watching -------------------------------------------------------------------------------

    async def _poll_or_wait(self, pending: list[SliceWatch]) -> None:
        """One poll; a failure to reach Prefect or OUT is tried again next poll, ``UNREACHABLE_S`` long."""
        try:
            await self._poll(pending)
            self.failing_since = None
        except Exception as exc:
            now = time.monotonic()
            if self.stopped_at is not None and now - self.stopped_at > CANCEL_WAIT_S:
                for watch in pending:  # stopped, and Prefect or OUT out of reach: no longer waited for
                    watch.exit_code = self._stop_code()
                    watch.detail = f"cancelled, not confirmed in {CANCEL_WAIT_S:.0f} s ({exc})"
                return
            if self.failing_since is None:
                self.failing_since = now
                self.log.warning("watching the slices failed (%s: %s); trying again", type(exc).__name__, exc)
            elif now - self.failing_since > UNREACHABLE_S:
                raise

    async def _poll(self, pending: list[SliceWatch]) -> None:
        runs = await _read_runs(self.client, [w.run.id for w in pending if w.run is not None])
        taken = any(r.state is not None and r.state.type in TAKEN for r in runs.values())
        for watch in pending:
            if watch.run is None:  # never submitted: the parent was stopped first
                watch.exit_code, watch.detail = self._stop_code(), "not submitted (the parent was stopped)"
                continue
            run = watch.run = runs.get(watch.run.id, watch.run)
            if self.stop.is_set:
                await self._after_stop(watch, run)
                continue
            lost = await asyncio.to_thread(_lost, watch, run, self.out)  # an object store: requests
            if lost is not None:  # a cancellation nobody confirms ends as Cancelled: not run again
                cancelled = run.state is not None and run.state.type == StateType.CANCELLING
                final: State[Any] = Cancelled(message=lost) if cancelled else Crashed(message=lost)
                self.log.warning("%s: %s; marking its run %s", watch.part.scope, lost, final.name)
                await self.client.set_flow_run_state(run.id, final, force=True)
                run = watch.run = await self.client.read_flow_run(run.id)
            state = run.state
            if state is not None and state.type == StateType.SCHEDULED and not taken:
                self._unclaimed(watch)  # (while others run, it waits for a free worker: as it should)
            if state is None or not state.is_final():
                continue
            if state.type == StateType.CRASHED:
                if watch.attempts < MAX_ATTEMPTS:
                    await self._again(watch, f"run {run.name} crashed ({state.message})")
                    continue
                watch.exit_code = EXIT_CRASHED
                watch.detail = f"crashed {watch.attempts} times; last: {state.message}"
                continue
            await _settle(watch, run)
            if watch.exit_code == EXIT_LEASE_LOST and watch.attempts < MAX_ATTEMPTS:
                await self._again(watch, f"run {run.name} {watch.detail}")

    def _unclaimed(self, watch: SliceWatch) -> None:
        """Say once when a slice's run has waited ``UNCLAIMED_WARN_S`` for a worker while no slice's
        run is taken: none may be polling the pool, and the parent would otherwise wait in silence."""
        now, clock = time.monotonic(), watch.clock
        clock.scheduled_since = clock.scheduled_since or now
        if not self.unclaimed_said and now - clock.scheduled_since > UNCLAIMED_WARN_S:
            self.unclaimed_said = True
            self.log.warning(
                "%s: no worker has taken its run for %.0f s; is a worker polling the work pool? "
                "(`prefect worker start --pool %s`); waiting on",
                watch.part.scope,
                UNCLAIMED_WARN_S,
                self.pool or "<its pool>",
            )

    # --- stopping -------------------------------------------------------------------------------

    def _stop_code(self) -> int:
        return EXIT_CODES.get(self.stop.reason or "", 130)

    def _on_stop(self) -> None:
        """The first signal: cancel the slices' runs now (not at the next poll)."""
        self.stopped_at = time.monotonic()
        self.log.warning(
            "%s: cancelling the slices' runs (each writes what it has done); a second one stops at once",
            self.stop.reason,
        )
        self.cancelling = asyncio.ensure_future(self._cancel_all(self._stopped_message()))

    def _stopped_message(self) -> str:
        return f"the run of all slices was stopped ({self.stop.reason})"

    def _on_second(self, code: int) -> None:
        """The second signal: exit once the cancellations are sent (``SECOND_SIGNAL_WAIT_S`` at most)."""
        cancelling = self.cancelling
        if cancelling is None or cancelling.done():
            hard_exit(code)
            return
        cancelling.add_done_callback(lambda _: hard_exit(code))
        asyncio.get_running_loop().call_later(SECOND_SIGNAL_WAIT_S, hard_exit, code)

    async def _cancel_all(self, message: str) -> None:
        """Cancel every slice run not over, as ``prefect flow-run cancel`` does: Cancelling, not forced
        (Prefect refuses it for a run that ended meanwhile, and cancels one no worker took at once)."""
        runs = await _read_runs(self.client, [w.run.id for w in self.watches if w.run is not None])
        await asyncio.gather(
            *(self._cancel(r, message) for r in runs.values() if r.state is None or not r.state.is_final())
        )

    async def _cancel(self, run: FlowRun, message: str) -> None:
        with contextlib.suppress(Exception):  # refused (ended meanwhile) or unreachable: read back
            await self.client.set_flow_run_state(run.id, Cancelling(message=message))

    async def _after_stop(self, watch: SliceWatch, run: FlowRun) -> None:
        """After a stop: a run that ended is settled from its result (a slice that had finished is
        not cut short); a crashed one is not submitted again; one not yet Cancelling is asked again
        (the first request failed); one not over within ``CANCEL_WAIT_S`` (a lost worker never
        confirms) is left as interrupted."""
        state = run.state
        asked = state is None or state.is_final() or state.type == StateType.CANCELLING
        if not asked and self.cancelling is not None and self.cancelling.done():  # the first round failed
            await self._cancel(run, self._stopped_message())
        if state is not None and state.type == StateType.CRASHED:
            watch.exit_code = self._stop_code()
            watch.detail = f"crashed, not run again (the parent was stopped): {state.message or ''}".strip()
        elif state is not None and state.is_final():
            await _settle(watch, run)
        elif time.monotonic() - (self.stopped_at or 0.0) > CANCEL_WAIT_S:
            watch.exit_code = self._stop_code()
            shown = state.name if state is not None else "unknown"
            watch.detail = f"cancelled, not over after {CANCEL_WAIT_S:.0f} s (state {shown})"


def _lost(watch: SliceWatch, run: FlowRun, out: OutPath) -> str | None:
    """Why a slice's run that Prefect still shows Pending, Running or Cancelling (someone cancelled it,
    and its worker never confirms) is gone, or None."""
    state = run.state
    if state is None or state.type not in (StateType.RUNNING, StateType.PENDING, StateType.CANCELLING):
        return None
    now, clock = time.monotonic(), watch.clock
    if state.type == StateType.PENDING:
        clock.pending_since = clock.pending_since or now
        if now - clock.pending_since > PENDING_LOST_AFTER_S:
            return f"its run was Pending for {PENDING_LOST_AFTER_S:.0f} s without starting"
        return None
    clock.running_since = clock.running_since or now
    if scope_holder(out, watch.part.scope) is not None:
        clock.held_at = now
        return None
    since = max(clock.running_since, clock.held_at or 0.0)
    if now - since > LOST_AFTER_S:
        return (
            f"its run shows {state.name or state.type.value.title()} but nothing has held its lock in "
            f"OUT for {LOST_AFTER_S:.0f} s (its worker is gone)"
        )
    return None


async def _read_runs(client: PrefectClient, ids: list[Any]) -> dict[Any, FlowRun]:
    if not ids:
        return {}
    runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return {run.id: run for run in runs}


async def _settle(watch: SliceWatch, run: FlowRun) -> None:
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
        watch.exit_code, watch.detail = 130, f"cancelled: {state.message}" if state.message else "cancelled"
    elif state.type == StateType.COMPLETED:
        watch.exit_code, watch.detail = EXIT_CRASHED, "completed without its result"
    else:  # failed before it ran (a usage error: the manifest or OUT, as a worker sees them)
        watch.exit_code, watch.detail = 1, state.message or state.name or "failed"
