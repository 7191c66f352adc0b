"""The annotate flow: manifests → shards → one Prefect task per shard → Parquet in OUT.

Shards, not rows, are orchestrated: each shard task runs its work items concurrently on the flow's
event loop, and a few shards overlap so the endpoint never idles at a shard boundary. Requests in
flight are bounded across the whole run by one ``InFlightLimiter`` (``--concurrency N`` or ``auto``) and
paced by ``--rpm``/``--tpm``, both in the ShardRunner's ItemSender (tasks/endpoint/concurrency.py).
Planning is the engine's (tasks/run/plan.py); this module is the Prefect side: the flow, its tasks,
the artifacts, the Secret block, the scheduled date and the global concurrency limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.utilities.annotations import quote

from flows.api_key import load_api_key
from flows.artifacts import Progress, artifact_key, publish_summary
from flows.endpoint_limit import EndpointLimit, SlotLease
from flows.schedule import scheduled_date
from flows.states import with_failed_rows
from tasks.config import RunConfig
from tasks.endpoint.preflight import PreflightFailed, PreflightStopped, preflight
from tasks.errors import EndpointUnusable, RunInterrupted
from tasks.inputs.work_items import (
    Shard,
)
from tasks.outputs.layout import prepare_out_dir, remove_temporaries
from tasks.outputs.lock import OutLock
from tasks.outputs.store import OutputStore, add_later_columns, read_index, run_tag
from tasks.outputs.summary import RunSummary, SummaryBuilder
from tasks.outputs.writer import AsyncWriter
from tasks.partitions import needs_date
from tasks.row import ResultRow
from tasks.run.plan import plan_run
from tasks.run.shard_runner import ShardRunner
from tasks.stopping import EXIT_CODES, StopSwitch, hard_exit, signals_stop

RowListener = Callable[[ResultRow | None], None]
_row_listeners: list[RowListener] = []  # the CLI's progress bar subscribes here (same process)


def add_row_listener(listener: RowListener) -> Callable[[], None]:
    """Call ``listener`` for every finished row (``None`` for an item skipped as already done) of runs
    in this process; returns an unsubscribe."""
    _row_listeners.append(listener)
    return lambda: _row_listeners.remove(listener)


@dataclass(frozen=True)
class ShardReport:
    index: int
    path: str | None


@task(cache_policy=NO_CACHE, task_run_name="shard-{index}", retries=0)
async def annotate_shard(
    index: int,
    shard: Shard,
    runner: ShardRunner,
    writer: AsyncWriter | None,
    lease: SlotLease | None = None,
    skipped_before: int = 0,
) -> ShardReport:
    """One shard: its work items concurrently, its rows written to OUT as they finish. With a global
    endpoint limit, the run's share of its slots is held while the shard's requests run.

    The caller passes its arguments inside ``quote``: Prefect would otherwise walk every work item of
    the shard (and the runner) looking for futures, twice per task, about 0.2 ms per item.
    """
    started = time.perf_counter()
    async with lease.hold() if lease is not None else contextlib.nullcontext():
        skipped = await runner.run(shard)
    path = await writer.finish(shard.index) if writer is not None else None
    get_run_logger().info(
        "shard %d: %d work items (%d skipped as done) in %.1f s%s",
        shard.index,
        shard.num_items + skipped_before,
        skipped + skipped_before,
        time.perf_counter() - started,
        f" → {path.name}" if path else "",
    )
    return ShardReport(shard.index, str(path) if path else None)


def shards_in_flight(config: RunConfig) -> int:
    """Enough overlapping shards to keep every request slot busy across shard boundaries."""
    return max(2, min(64, math.ceil(2 * config.endpoint.in_flight_cap / config.shard_size)))


@flow(name="annotate", description="Caption and Q&A over an images manifest, written to Parquet.")
async def annotate(config: RunConfig) -> RunSummary:
    started = time.perf_counter()
    logger = get_run_logger()
    if config.date is None and needs_date(config):  # a scheduled run: the day before, by default
        config = config.model_copy(update={"date": await scheduled_date()})
    plan = plan_run(config)
    config = plan.config  # paths resolved
    run_id = str(flow_run.id or uuid.uuid4())
    logger.info(
        "%d work items over %d images from %s → %s",
        plan.work_items,
        plan.num_images,
        config.images,
        config.out,
    )
    key = None if config.dry_run else await load_api_key(config.endpoint)  # held in memory only
    stop = StopSwitch()
    if config.endpoint.preflight and not config.dry_run:
        with signals_stop(stop, on_second=hard_exit):  # it may wait up to --outage-window
            try:
                await preflight(config.endpoint, key, stop=stop)
            except PreflightFailed as exc:
                raise EndpointUnusable(f"preflight: {exc}", None) from None
            except PreflightStopped:
                reason = stop.reason or "SIGINT"
                message = f"interrupted by {reason} during the preflight; nothing was sent"
                raise RunInterrupted(message, None, EXIT_CODES[reason]) from None
    summary = SummaryBuilder()
    limit = None if config.dry_run else await EndpointLimit.connect(config)
    lease = None if limit is None else SlotLease(limit.hold)
    if limit is not None:
        logger.info(
            "endpoint limit %r (%d slots): the run holds %d while its shards run",
            limit.name,
            limit.slots,
            limit.share,
        )
    progress = Progress(plan.work_items, f"work items done → {config.out}")
    await progress.start()

    def on_row(row: ResultRow | None) -> None:
        if row is not None:
            summary.add(row)
        for listener in _row_listeners:
            listener(row)

    out = Path(config.out)
    with signals_stop(stop, on_second=hard_exit), contextlib.ExitStack() as cleanup:
        store = writer = None
        if config.dry_run:
            index, hashes = read_index(out)
        else:
            prepare_out_dir(out)
            lock = OutLock(out, run_id)
            lock.acquire()
            cleanup.callback(lock.release)
            remove_temporaries(out)
            if added := add_later_columns(out, plan.output_schema):
                logger.info("added the tool_calls column (null) to %d files written before it", added)
            index, hashes = read_index(out)
            store = OutputStore(out, plan.output_schema, run_tag(run_id), index)
            if healed := store.heal_duplicates():
                logger.warning("removed %d duplicate rows left by an interrupted run", healed)
                index = store.index
        if len(index) and not config.force:
            logger.info(
                "%s already holds %d rows: items ok with the same request key are skipped", out, len(index)
            )
        runner = ShardRunner(
            config if limit is None else limit.bound(config),
            image_root=plan.image_root,
            manifest_dir=plan.base_dir,
            run_id=run_id,
            stop=stop,
            store=store,
            index=index,
            hashes=hashes,
            on_row=on_row,
            api_key=key,
        )
        try:
            async with contextlib.AsyncExitStack() as flushing:
                if store is not None:
                    writer = await flushing.enter_async_context(AsyncWriter(store))

                async def run_shard(shard: Shard) -> ShardReport:
                    left, done = await runner.drop_done(shard)  # resuming: a finished shard needs no task
                    report = ShardReport(shard.index, None)
                    if left.jobs:
                        # quoted: Prefect unwraps them for the task without walking their contents
                        report = await annotate_shard(  # type: ignore[call-overload]
                            shard.index, quote(left), quote(runner), quote(writer), quote(lease), done
                        )
                    await progress.advance(shard.num_items)
                    return report

                with _long_lived_objects_frozen():
                    await _run_shards(plan.shards(), run_shard, shards_in_flight(config), stop)
            if store is not None:
                store.keep_columns()
        finally:
            await runner.aclose()
    await progress.publish()  # where the run got to (updates come at most once a second)
    result = summary.build(
        work_items=plan.work_items,
        skipped=runner.skipped,
        elapsed_s=time.perf_counter() - started,
        out=None if config.dry_run else str(config.out),
        dry_run=config.dry_run,
    )
    logger.info(
        "done: %d ok, %d failed, %d skipped %s", result.ok, result.failed, result.skipped, result.errors or ""
    )
    title = f"annotate {config.date}" if config.date else "annotate"
    await publish_summary(result, key=artifact_key("annotate-summary", config.date), title=title)
    if stop.reason == "outage":
        raise EndpointUnusable(f"aborted: {stop.message}", result)
    if stop.reason is None and runner.sender and (verdict := runner.sender.detector.final_verdict()):
        raise EndpointUnusable(f"aborted: {verdict}", result)
    if stop.reason in EXIT_CODES:
        raise RunInterrupted(
            f"interrupted by {stop.reason}; rerun to continue", result, EXIT_CODES[stop.reason]
        )
    if result.exit_code == 2 and not config.dry_run:  # the CLI's exit 2, where a deployment's run shows it
        message = (
            f"{result.failed} of {result.work_items} rows failed ({result.errors_text}); a rerun retries them"
        )
        return with_failed_rows(result, message)
    return result


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Keep the garbage collector's full passes off the request path while shards run.

    Prefect, pyarrow and friends leave a few hundred thousand long-lived objects; each full collection
    walks them all, stalling the event loop 0.2–0.3 s a few times a minute at hundreds of requests a
    second (measured at C=256: no request is sent or answered meanwhile). Frozen, they are skipped;
    young garbage is still collected as usual. No collection first (it would cost a full pass, about
    0.15 s, per run): whatever cyclic garbage exists right now is simply kept, once.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _run_shards(
    shards: Iterator[Shard], start: Callable[[Shard], Awaitable[object]], limit: int, stop: StopSwitch
) -> None:
    """Run shard tasks with at most ``limit`` at once, reading the manifest off the event loop."""
    pending: set[asyncio.Future[object]] = set()
    try:
        while not stop.is_set:
            shard = await asyncio.to_thread(next, shards, None)
            if shard is None:
                break
            while len(pending) >= limit:
                finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for fut in finished:
                    fut.result()  # a bug in a shard stops the run
            pending.add(asyncio.ensure_future(start(shard)))
        for fut in asyncio.as_completed(pending):
            await fut
    except BaseException:
        for fut in pending:
            fut.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        raise
