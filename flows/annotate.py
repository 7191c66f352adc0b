"""The annotate flow: manifests → shards → one Prefect task per shard → Parquet in OUT.

Shards, not rows, are orchestrated: each shard task runs its work items concurrently on the flow's
event loop, and a few shards overlap so the endpoint never idles at a shard boundary. Requests in
flight are bounded across the whole run by one ``InFlightLimiter`` (``--concurrency N`` or ``auto``) and
paced by ``--rpm``/``--tpm``, both in the ShardRunner's ItemSender (tasks/endpoint/concurrency.py).
The job itself is the engine's (tasks/run/job.py, planned by tasks/run/plan.py); this module is the
Prefect side: the flow and its shard task, the artifacts, the Secret block, the scheduled date, the
global concurrency limit and the final state.

``vlmbatch run`` does not wait for Prefect: with a temporary server (none configured), the CLI starts
the job before the server is up (``EarlyJob``: its shards run bare, through a ``ShardHandover``), and
the flow run, once the server answers, takes the job over instead of starting one (``_adopt``): from
then on every shard is a Prefect task; each shard started before gets a task run that follows it to
its end. A flow run that is not the CLI's (a deployment's, a backfill's partition) runs as it always
did.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from dataclasses import dataclass
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from flows.api_key import load_api_key
from flows.artifacts import Progress, artifact_key, publish_slice_result, publish_summary
from flows.endpoint_limit import EndpointLimit, SlotLease
from flows.prefect_server import temporary_server_lost
from flows.schedule import scheduled_date
from flows.states import with_failed_rows
from tasks.config import RunConfig
from tasks.errors import ConfigError, RunStopped
from tasks.inputs.work_items import Shard
from tasks.outputs.layout import prepare_out_dir
from tasks.outputs.lease import Lease
from tasks.outputs.lock import OutLock, writer_lock
from tasks.outputs.summary import AnswerSample, RunSummary
from tasks.outputs.writer import AsyncWriter
from tasks.partitions import needs_date, resolve_paths
from tasks.row import ResultRow
from tasks.run.job import Job, ShardHandover, StartedShard, run_shard
from tasks.run.plan import RunPlan, plan_run
from tasks.run.shard_runner import ShardRunner
from tasks.stopping import hard_exit, signals_stop


@task(cache_policy=NO_CACHE, task_run_name="shard-{index}", retries=0)
async def annotate_shard(
    index: int,
    shard: Shard,
    runner: ShardRunner,
    writer: AsyncWriter | None,
    lease: SlotLease | None = None,
    skipped_before: int = 0,
    started: StartedShard | None = None,
) -> str | None:
    """One shard (tasks.run.job.run_shard) as a Prefect task. With a global endpoint limit, the run's
    share of its slots is held while the shard's requests run. ``started``: a shard the CLI's job ran
    before the flow run existed; the task run follows it to its end (its outcome is the shard's).

    The caller passes its arguments inside ``quote``: Prefect would otherwise walk every work item of
    the shard (and the runner) looking for futures, twice per task, about 0.2 ms per item.
    """
    if started is not None:
        path = await started.wait()
        return str(path) if path else None
    async with lease.hold() if lease is not None else contextlib.nullcontext():
        path = await run_shard(shard, runner, writer, skipped_before, logger=get_run_logger())
    return str(path) if path else None


@dataclass(eq=False)
class EarlyJob:
    """A job the CLI started before its flow run existed (``vlmbatch run`` with a temporary server),
    for the flow run of ``config`` in this process to take over (``offer``, then the flow's ``_adopt``)."""

    config: RunConfig  # the flow's parameter, as the CLI passes it
    plan: RunPlan
    job: Job
    handover: ShardHandover
    answers: AnswerSample
    run: asyncio.Task[RunSummary]  # preflight, then job.run(handover), on the CLI's event loop


_offered: list[EarlyJob] = []


def offer(early: EarlyJob) -> None:
    """Let the next flow run of ``early.config`` in this process take ``early`` over."""
    _offered.append(early)


def withdraw(early: EarlyJob) -> bool:
    """Take back an offer no flow run took; whether it was still there."""
    if early in _offered:
        _offered.remove(early)
        return True
    return False


def _take(config: RunConfig) -> EarlyJob | None:
    for early in _offered:
        if early.config == config:
            _offered.remove(early)
            return early
    return None


@flow(name="annotate", description="Caption and Q&A over an images manifest, written to Parquet.")
async def annotate(config: RunConfig) -> RunSummary:
    started = time.perf_counter()
    if config.slices is not None:  # the fan-out is a flow of its own (flows/slices.py)
        raise ConfigError("the annotate flow runs one slice (--slice K/N) or the whole job, not --slices")
    early = _take(config)  # a job the CLI started before this flow run existed
    if early is None and config.date is None and needs_date(config):  # scheduled: the day before
        config = config.model_copy(update={"date": await scheduled_date()})
    run_id = early.job.run_id if early is not None else str(flow_run.id or uuid.uuid4())
    lock = None if early is not None else slice_lock(config, run_id)  # an early job holds its own
    try:
        if early is not None:
            return await _adopt(early)
        return await _annotate(config, run_id, lock, started)
    except RunStopped as stopped:  # preflight or run: a slice says how it ended to its parent too
        if config.slice is not None:
            done = stopped.summary if isinstance(stopped.summary, RunSummary) else RunSummary(out=config.out)
            await publish_slice_result(done, stopped.exit_code, str(stopped))
        raise
    finally:
        if lock is not None:
            lock.release()


def slice_lock(config: RunConfig, run_id: str) -> OutLock | Lease | None:
    """A slice takes its lock first thing: from then on OUT shows it alive (flows/slices.py watches
    for a slice whose process is gone), before planning or preflight, which may take minutes."""
    part = config.part
    if part is None or config.dry_run:
        return None
    out = prepare_out_dir(resolve_paths(config).out)
    lock = writer_lock(out, run_id, part.scope)
    lock.acquire()
    return lock


async def _annotate(
    config: RunConfig, run_id: str, lock: OutLock | Lease | None, started: float
) -> RunSummary:
    logger = get_run_logger()
    plan = plan_run(config)
    config = plan.config  # paths resolved
    logger.info(
        "%d work items over %d images from %s → %s",
        plan.work_items,
        plan.num_images,
        config.images,
        config.out,
    )
    key = None if config.dry_run else await load_api_key(config.endpoint)  # held in memory only
    limit = None if config.dry_run else await EndpointLimit.connect(config)
    lease = None if limit is None else SlotLease(limit.hold)
    if limit is not None:
        logger.info(
            "endpoint limit %r (%d slots): the run holds %d while its shards run",
            limit.name,
            limit.slots,
            limit.share,
        )
    answers = AnswerSample()  # a few answers per prompt for the summary artifact, bounded

    def on_row(row: ResultRow | None) -> None:
        if row is not None:
            answers.add(row)

    job = Job(
        plan,
        run_id=run_id,
        lock=lock,
        api_key=key,
        config=config if limit is None else limit.bound(config),
        on_row=on_row,
        logger=logger,
        started=started,
    )
    await job.preflight()
    progress = Progress(plan.work_items, f"work items done → {config.out}")
    await progress.start()

    async def shard_task(shard: Shard, runner: ShardRunner, writer: AsyncWriter | None, done: int) -> object:
        # quoted: Prefect unwraps them for the task without walking their contents
        return await annotate_shard(  # type: ignore[call-overload]
            shard.index, quote(shard), quote(runner), quote(writer), quote(lease), done
        )

    async def advance(shard: Shard) -> None:
        if not temporary_server_lost():
            await progress.advance(shard.num_items)

    result = await job.run(shard_task, on_shard_done=advance)
    return await _finish(job, result, progress, answers)


async def _finish(job: Job, result: RunSummary, progress: Progress, answers: AnswerSample) -> RunSummary:
    """The run's artifacts published, its stop raised, its final state (with failed rows: a Completed
    state that says so)."""
    config = job.config
    get_run_logger().info(
        "done: %d ok, %d failed, %d skipped %s", result.ok, result.failed, result.skipped, result.errors or ""
    )
    if not temporary_server_lost():  # gone with a signal to every process: nothing to publish to
        await progress.publish()  # where the run got to (updates come at most once a second)
        title = f"annotate {config.date}" if config.date else "annotate"
        if config.slice is not None:
            title += f", slice {config.slice}"
        await publish_summary(
            result, key=artifact_key("annotate-summary", config.date), title=title, sample=answers.rows
        )
    job.raise_if_stopped(result)
    if config.slice is not None:
        await publish_slice_result(result, result.exit_code, "")
    if result.exit_code == 2 and not config.dry_run:  # the CLI's exit 2, where a deployment's run shows it
        message = (
            f"{result.failed} of {result.work_items} rows failed ({result.errors_text}); a rerun retries them"
        )
        return with_failed_rows(result, message)
    return result


async def _adopt(early: EarlyJob) -> RunSummary:
    """The flow run takes over the job the CLI started: shards from now on are Prefect tasks, those
    already started get a task run each that follows them, the progress artifact starts where the job
    is, and the job's result is the flow's (artifacts, stop, final state: as a run of its own)."""
    # first: the flow run's start put Prefect's SIGTERM handler in place of the job's
    with signals_stop(early.job.stop, on_second=hard_exit):
        return await _adopted(early)


async def _adopted(early: EarlyJob) -> RunSummary:
    logger = get_run_logger()
    job, plan, handover = early.job, early.plan, early.handover
    logger.info(
        "%d work items over %d images from %s → %s (run %s, started %.1f s before its flow run)",
        plan.work_items,
        plan.num_images,
        job.config.images,
        job.config.out,
        job.run_id,
        time.perf_counter() - job.started,
    )
    loop = asyncio.get_running_loop()
    flow_context = contextvars.copy_context()  # the flow run's: Prefect's tasks must start inside it

    def in_flow(call: Any) -> asyncio.Task[Any]:
        """``call()``'s coroutine run in (a copy of) the flow run's context. Whatever talks to Prefect
        on the job's behalf (a shard's task, a progress update) must: the job's own task was created
        before the flow run existed, so its context has neither the flow run nor the settings naming
        the server (Prefect would start an ephemeral API of its own)."""
        context = flow_context.copy()
        return loop.create_task(context.run(call), context=context)

    async def shard_task(shard: Shard, runner: ShardRunner, writer: AsyncWriter | None, done: int) -> object:
        return await in_flow(
            lambda: annotate_shard(  # type: ignore[call-overload]
                shard.index, quote(shard), quote(runner), quote(writer), None, done
            )
        )

    def follow(started: StartedShard) -> asyncio.Task[Any]:
        shard, runner = started.shard, job.runner
        return in_flow(
            lambda: annotate_shard(  # type: ignore[call-overload]
                shard.index, quote(shard), quote(runner), None, None, started.skipped_before, quote(started)
            )
        )

    progress = Progress(plan.work_items, f"work items done → {job.config.out}")

    async def advance(shard: Shard) -> None:
        if not temporary_server_lost():  # in the flow run's context: the API is the flow run's
            await in_flow(lambda: progress.advance(shard.num_items))

    followers = [follow(started) for started in handover.take_over(shard_task, advance)]
    progress.done = handover.items_done  # what finished before; later shards advance it
    try:
        await progress.start()
        result = await early.run
    finally:
        # a follower only records its shard's outcome; the job's result or error is the run's
        await asyncio.gather(*followers, return_exceptions=True)
    return await _finish(job, result, progress, early.answers)
