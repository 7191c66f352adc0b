"""The annotate flow: manifests → shards → one Prefect task per shard → Parquet in OUT.

Shards, not rows, are orchestrated: each shard task runs its work items concurrently on the flow's
event loop, and a few shards overlap so the endpoint never idles at a shard boundary. Requests in
flight are bounded across the whole run by one ``InFlightLimiter`` (``--concurrency N`` or ``auto``) and
paced by ``--rpm``/``--tpm``, both in the ShardRunner's ItemSender (tasks/endpoint/concurrency.py).
The job itself is the engine's (tasks/run/job.py, planned by tasks/run/plan.py); this module is the
Prefect side: the flow and its shard task, the artifacts, the Secret block, the scheduled date, the
global concurrency limit and the final state.
"""

from __future__ import annotations

import contextlib
import time
import uuid

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
from tasks.outputs.lock import OutLock
from tasks.outputs.summary import AnswerSample, RunSummary
from tasks.outputs.writer import AsyncWriter
from tasks.partitions import needs_date, resolve_paths
from tasks.row import ResultRow
from tasks.run.job import Job, run_shard
from tasks.run.plan import plan_run
from tasks.run.shard_runner import ShardRunner


@task(cache_policy=NO_CACHE, task_run_name="shard-{index}", retries=0)
async def annotate_shard(
    index: int,
    shard: Shard,
    runner: ShardRunner,
    writer: AsyncWriter | None,
    lease: SlotLease | None = None,
    skipped_before: int = 0,
) -> str | None:
    """One shard (tasks.run.job.run_shard) as a Prefect task. With a global endpoint limit, the run's
    share of its slots is held while the shard's requests run.

    The caller passes its arguments inside ``quote``: Prefect would otherwise walk every work item of
    the shard (and the runner) looking for futures, twice per task, about 0.2 ms per item.
    """
    async with lease.hold() if lease is not None else contextlib.nullcontext():
        path = await run_shard(shard, runner, writer, skipped_before, logger=get_run_logger())
    return str(path) if path else None


@flow(name="annotate", description="Caption and Q&A over an images manifest, written to Parquet.")
async def annotate(config: RunConfig) -> RunSummary:
    started = time.perf_counter()
    if config.slices is not None:  # the fan-out is a flow of its own (flows/slices.py)
        raise ConfigError("the annotate flow runs one slice (--slice K/N) or the whole job, not --slices")
    if config.date is None and needs_date(config):  # a scheduled run: the day before, by default
        config = config.model_copy(update={"date": await scheduled_date()})
    run_id = str(flow_run.id or uuid.uuid4())
    lock = slice_lock(config, run_id)
    try:
        return await _annotate(config, run_id, lock, started)
    except RunStopped as stopped:  # preflight or run: a slice says how it ended to its parent too
        if config.slice is not None:
            done = stopped.summary if isinstance(stopped.summary, RunSummary) else RunSummary(out=config.out)
            await publish_slice_result(done, stopped.exit_code, str(stopped))
        raise
    finally:
        if lock is not None:
            lock.release()


def slice_lock(config: RunConfig, run_id: str) -> OutLock | None:
    """A slice takes its lock first thing: from then on OUT shows it alive (flows/slices.py watches
    for a slice whose process is gone), before planning or preflight, which may take minutes."""
    part = config.part
    if part is None or config.dry_run:
        return None
    out = prepare_out_dir(resolve_paths(config).out)
    lock = OutLock(out, run_id, part.scope)
    lock.acquire()
    return lock


async def _annotate(config: RunConfig, run_id: str, lock: OutLock | None, started: float) -> RunSummary:
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
    logger.info(
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
