"""A run of a plan, without any orchestrator: OUT locked and indexed, shards run a few at once, rows written.

The annotate flow (flows/annotate.py) drives a ``Job`` with each shard inside a Prefect task; a dry run
drives it directly, with no Prefect at all (``vlmbatch run --dry-run`` starts in a second). Either way
the job is the same: the manifest is read off the event loop in shards, a few shards overlap so the
endpoint never idles at a shard boundary, every finished row goes to the output store (and to
``on_row``), and a stop — a signal, an outage — ends it cleanly with what was done written.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from tasks.config import RunConfig
from tasks.endpoint.client import api_keys
from tasks.endpoint.preflight import PreflightFailed, PreflightResult, PreflightStopped, preflight_replicas
from tasks.errors import EndpointUnusable, OutLost, RunInterrupted
from tasks.inputs.work_items import Shard
from tasks.outputs.index import HashCache
from tasks.outputs.layout import prepare_out_dir, remove_temporaries
from tasks.outputs.lease import Lease
from tasks.outputs.lock import OutLock, live_scopes, writer_lock, writers_gate
from tasks.outputs.object_path import LeaseLost, ObjectPath, OutPath, out_path
from tasks.outputs.store import OutputStore, add_later_columns, read_index, run_tag
from tasks.outputs.summary import RunSummary, SummaryBuilder
from tasks.outputs.writer import AsyncWriter
from tasks.row import LATER_COLUMNS, ResultRow
from tasks.run.plan import RunPlan
from tasks.run.shard_runner import ShardRunner
from tasks.stopping import EXIT_CODES, StopSwitch, hard_exit, signals_stop

log = logging.getLogger("vlmbatch")

RowListener = Callable[[ResultRow | None], None]
_row_listeners: list[RowListener] = []  # the CLI's progress bar subscribes here (same process)


def add_row_listener(listener: RowListener) -> Callable[[], None]:
    """Call ``listener`` for every finished row (``None`` for an item skipped as already done) of runs
    in this process; returns an unsubscribe."""
    _row_listeners.append(listener)
    return lambda: _row_listeners.remove(listener)


# How one shard is run: the runner's rows for it, then its file finished. The flow wraps this in a
# Prefect task; ``skipped_before`` counts its items found done before the shard started.
ShardCall = Callable[[Shard, ShardRunner, "AsyncWriter | None", int], Awaitable[object]]


async def run_shard(
    shard: Shard,
    runner: ShardRunner,
    writer: AsyncWriter | None,
    skipped_before: int,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] = log,
) -> OutPath | None:
    """One shard: its work items concurrently, its rows written to OUT as they finish; returns its file."""
    started = time.perf_counter()
    skipped = await runner.run(shard)
    path = await writer.finish(shard.index) if writer is not None else None
    logger.info(
        "shard %d: %d work items (%d skipped as done) in %.1f s%s",
        shard.index,
        shard.num_items + skipped_before,
        skipped + skipped_before,
        time.perf_counter() - started,
        f" → {path.name}" if path else "",
    )
    return path


@dataclass(eq=False)
class StartedShard:
    """A shard a ``ShardHandover`` ran before an orchestrator took over: ``finished`` holds its file
    (or None) and the error that ended it, if one did, once it is done."""

    shard: Shard
    skipped_before: int
    finished: asyncio.Future[tuple[OutPath | None, BaseException | None]]

    async def wait(self) -> OutPath | None:
        """Until the shard is done: its file, or the error that ended it raised here."""
        path, error = await asyncio.shield(self.finished)
        if error is not None:
            raise error
        return path


class ShardHandover:
    """How a job's shards run when the orchestrator comes after the job started (``vlmbatch run``: the
    job starts at once; Prefect's flow run, once its server is up, takes over).

    Until ``take_over``, a shard runs bare (``run_shard``) and is remembered as a ``StartedShard``; from
    then on, every shard goes through the orchestrator's ``call`` (its Prefect task), and ``take_over``
    returns the shards already started, so the orchestrator can record them too (a task run that
    follows each one to its end). Finished shards are counted (``items_done``) for a progress display
    that starts late; ``on_shard_done`` is told of each shard once the orchestrator has taken over.
    """

    def __init__(self) -> None:
        self.started: list[StartedShard] = []
        self.items_done = 0
        self._call: ShardCall | None = None
        self._on_done: Callable[[Shard], Awaitable[None]] | None = None

    @property
    def taken_over(self) -> bool:
        return self._call is not None

    def take_over(
        self, call: ShardCall, on_shard_done: Callable[[Shard], Awaitable[None]] | None = None
    ) -> list[StartedShard]:
        """From now on shards go through ``call``; returns the shards started before (done or not)."""
        self._call, self._on_done = call, on_shard_done
        return list(self.started)

    async def __call__(
        self, shard: Shard, runner: ShardRunner, writer: AsyncWriter | None, skipped_before: int
    ) -> object:
        if self._call is not None:
            return await self._call(shard, runner, writer, skipped_before)
        started = StartedShard(shard, skipped_before, asyncio.get_running_loop().create_future())
        self.started.append(started)
        try:
            path = await run_shard(shard, runner, writer, skipped_before)
        except BaseException as exc:
            started.finished.set_result((None, exc))
            raise
        started.finished.set_result((path, None))
        return path

    async def shard_done(self, shard: Shard) -> None:
        """The job's ``on_shard_done``."""
        self.items_done += shard.num_items
        if self._on_done is not None:
            await self._on_done(shard)


def shards_in_flight(config: RunConfig) -> int:
    """Enough overlapping shards to keep every request slot busy across shard boundaries."""
    return max(2, min(64, math.ceil(2 * config.endpoint.total_in_flight / config.shard_size)))


class Job:
    """One run of ``plan`` in this event loop (create it inside the loop that runs it)."""

    def __init__(
        self,
        plan: RunPlan,
        *,
        run_id: str,
        api_key: str | None = None,
        config: RunConfig | None = None,
        on_row: RowListener | None = None,
        logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
        started: float | None = None,
        lock: OutLock | Lease | None = None,
    ) -> None:
        self.plan = plan
        self.lock = lock  # OUT's lock or lease (of the plan's scope), when the caller took it already
        self.config = config or plan.config  # the flow's may be bound to a share of a global limit
        self.run_id = run_id
        self.api_key = api_key  # held in memory only
        self.stop = StopSwitch()
        self.summary = SummaryBuilder()
        self.on_row = on_row
        self.log = logger or log
        self.started = started if started is not None else time.perf_counter()  # the run's elapsed time
        self.runner: ShardRunner | None = None
        self.checked: PreflightResult | None = None  # each replica's preflight, when there was one

    async def preflight(self) -> None:
        """Check the endpoint (every replica) before anything is sent (``--preflight``; not in a dry run)."""
        config = self.config
        if not config.endpoint.preflight or config.dry_run:
            return
        with signals_stop(self.stop, on_second=hard_exit):  # it may wait up to --outage-window
            try:
                keys = api_keys(config.endpoint, self.api_key)
                self.checked = await preflight_replicas(config.endpoint, keys, stop=self.stop)
            except PreflightFailed as exc:
                raise EndpointUnusable(f"preflight: {exc}", None) from None
            except PreflightStopped:
                reason = self.stop.reason or "SIGINT"
                message = f"interrupted by {reason} during the preflight; nothing was sent"
                raise RunInterrupted(message, None, EXIT_CODES[reason]) from None

    def _row(self, row: ResultRow | None) -> None:
        if row is not None:
            self.summary.add(row)
        if self.on_row is not None:
            self.on_row(row)
        for listener in _row_listeners:
            listener(row)

    async def run(
        self,
        call: ShardCall = run_shard,
        on_shard_done: Callable[[Shard], Awaitable[None]] | None = None,
    ) -> RunSummary:
        """Every shard through ``call``; returns the run's summary (``raise_if_stopped`` says whether the
        run ended early)."""
        config, plan = self.config, self.plan
        out = out_path(config.out)
        with signals_stop(self.stop, on_second=hard_exit), contextlib.ExitStack() as cleanup:
            store = None
            if config.dry_run:  # a slice: its own part of OUT
                index, hashes = read_index(out, plan.scope, plan.row_filter())
            else:
                try:
                    out, store, hashes = self._open_out(out, cleanup)
                except LeaseLost as exc:  # lapsed or taken over before the first request
                    raise OutLost(
                        f"stopped: {exc}; nothing was sent, rerun to continue", self._summary_so_far()
                    ) from None
                index = store.index
            if len(index) and not config.force:
                self.log.info(
                    "%s already holds %d rows: items ok with the same request key are skipped",
                    out,
                    len(index),
                )
            runner = self.runner = ShardRunner(
                config,
                image_root=plan.image_root,
                manifest_dir=plan.base_dir,
                run_id=self.run_id,
                stop=self.stop,
                store=store,
                index=index,
                hashes=hashes,
                on_row=self._row,
                api_key=self.api_key,
                checked=self.checked,
            )
            try:
                async with contextlib.AsyncExitStack() as flushing:
                    writer = None if store is None else await flushing.enter_async_context(AsyncWriter(store))

                    async def one(shard: Shard) -> None:
                        left, done = await runner.drop_done(shard)  # resuming: a finished shard needs no call
                        if left.jobs:
                            await call(left, runner, writer, done)
                        if on_shard_done is not None:
                            await on_shard_done(shard)

                    with _long_lived_objects_frozen():
                        await _run_shards(plan.shards(), one, shards_in_flight(config), self.stop)
                if store is not None:
                    store.keep_columns()
            finally:
                await runner.aclose()
        router = runner.sender.router if runner.sender is not None else None
        return self.summary.build(
            work_items=plan.work_items,
            skipped=runner.skipped,
            elapsed_s=time.perf_counter() - self.started,
            out=None if config.dry_run else str(config.out),
            dry_run=config.dry_run,
            replicas=router.replicas if router is not None and router.several else (),
        )

    def _open_out(
        self, out: OutPath, cleanup: contextlib.ExitStack
    ) -> tuple[OutPath, OutputStore, HashCache]:
        """Take OUT (its lock or lease, released by ``cleanup``), clean up after killed writers and
        read back what is done: the store this run writes through. LeaseLost if the lease is lost
        meanwhile."""
        plan = self.plan
        scope, keep = plan.scope, plan.row_filter()
        out = prepare_out_dir(out)
        lost = self._on_lost(asyncio.get_running_loop())
        lock = self.lock or writer_lock(out, self.run_id, scope)
        if isinstance(lock, Lease):
            lock.on_lost = lost
        if not lock.held:
            lock.acquire()
        cleanup.callback(lock.release)
        if isinstance(lock, Lease) and isinstance(out, ObjectPath):
            lock.check()  # taken early (before the flow run): lost before anyone was told?
            out = out.fenced(lock.check)  # no write once the lease has lapsed
        with writers_gate(out):  # no other writer starts meanwhile; those running are left alone
            live = live_scopes(out) - {scope}
            remove_temporaries(out, live)
            if added := add_later_columns(out, plan.output_schema, scope, live):
                later = ", ".join(n for n in LATER_COLUMNS if n in plan.output_schema.names)
                self.log.info(
                    "added the later columns (%s, null) to %d files written before them", later, added
                )
        index, hashes = read_index(out, scope, keep)
        shared = contextlib.nullcontext if plan.part is None else functools.partial(writers_gate, out)
        store = OutputStore(
            out, plan.output_schema, run_tag(self.run_id), index, scope=scope, shared=shared, on_lost=lost
        )
        if index.shadowed_rows():
            with shared():
                healed = store.heal_duplicates(keep)
            if healed:
                self.log.warning("removed %d duplicate rows left by an interrupted run", healed)
        return out, store, hashes

    def _summary_so_far(self) -> RunSummary:
        return self.summary.build(
            work_items=self.plan.work_items,
            skipped=0,
            elapsed_s=time.perf_counter() - self.started,
            out=str(self.config.out),
            dry_run=self.config.dry_run,
        )

    def _on_lost(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        """What stops the run when its lease on OUT is lost (called from the lease's or the writer's
        thread)."""

        def lost(reason: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the run is over anyway
                loop.call_soon_threadsafe(self.stop.set, "lease", reason)

        return lost

    def raise_if_stopped(self, result: RunSummary) -> None:
        """RunStopped when the run ended early: exit 3 for an outage, 4 for OUT's lease lost, 130/143
        for a signal."""
        stop, runner = self.stop, self.runner
        if stop.reason == "outage":
            raise EndpointUnusable(f"aborted: {stop.message}", result)
        if stop.reason == "lease":
            raise OutLost(f"stopped: {stop.message}; what was written is kept, rerun to continue", result)
        sender = runner.sender if runner is not None else None
        if stop.reason is None and sender and (verdict := sender.detector.final_verdict()):
            raise EndpointUnusable(f"aborted: {verdict}", result)
        if stop.reason in EXIT_CODES:
            raise RunInterrupted(
                f"interrupted by {stop.reason}; rerun to continue", result, EXIT_CODES[stop.reason]
            )


@contextlib.contextmanager
def _long_lived_objects_frozen() -> Iterator[None]:
    """Keep the garbage collector's full passes off the request path while shards run.

    Prefect, pyarrow and friends leave a few hundred thousand long-lived objects; each full collection
    walks them all, stalling the event loop 0.2–0.3 s a few times a minute at hundreds of requests a
    second (measured at C=256: no request is sent or answered meanwhile). Frozen, they are skipped;
    young garbage is still collected as usual. No collection first (it would cost a full pass, about
    0.15 s, per run): whatever cyclic garbage exists right now is simply kept, once.
    """
    global _frozen_runs
    gc.freeze()
    _frozen_runs += 1
    try:
        yield
    finally:
        _frozen_runs -= 1
        gc.unfreeze()


_frozen_runs = 0  # runs of this process inside _long_lived_objects_frozen


def freeze_late_arrivals() -> None:
    """Freeze the objects made since a running job froze the long-lived ones (a library imported
    while it runs: Prefect, when the flow run takes over a job that started first); they are let go
    with the rest when the job ends. Nothing when no job is inside its shards: a freeze then would
    outlive every run."""
    if _frozen_runs:
        gc.freeze()


async def _run_shards(
    shards: Iterator[Shard], start: Callable[[Shard], Awaitable[object]], limit: int, stop: StopSwitch
) -> None:
    """Run shards with at most ``limit`` at once, reading the manifest off the event loop."""
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
