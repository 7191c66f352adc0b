"""``vlmbatch run``: validate, run the annotate flow in this process, print the summary.

Its options are the config model's (tasks/config.py); ``backfill`` takes the same ones (its signature
is copied from ``run``'s, so the two never drift apart).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from flows.cli.common import EXIT_CRASHED, EXIT_SIGINT, Opt, fail, prepare_prefect
from flows.cli.progress import progress_bar
from flows.cli.summary_table import print_summary
from flows.prefect_server import (
    ServerFailed,
    TemporaryServer,
    no_server_anywhere,
    prefect_api,
    server_url,
    start_temporary_server,
    stop_temporary_server,
    warm_up,
)
from tasks.config import RunConfig, build_config
from tasks.errors import RunStopped, UsageError
from tasks.outputs.summary import AnswerSample, RunSummary
from tasks.partitions import needs_date
from tasks.row import ResultRow
from tasks.run.job import Job, ShardHandover, add_row_listener, freeze_late_arrivals
from tasks.run.plan import RunPlan, plan_run
from tasks.stopping import EXIT_CODES, forget_signals, signal_received

DRY_RUN_SHOWN = 20  # failures a dry run lists


def run(
    images: Annotated[
        str | None,
        typer.Argument(
            help="Images manifest: a Parquet file or a directory of them (omit for text-only prompts)."
        ),
    ] = None,
    out: Annotated[str | None, Opt(help="Output dataset directory (required).")] = None,
    prompts: Annotated[str | None, Opt(help="Prompts manifest (default: one caption prompt).")] = None,
    config: Annotated[Path | None, Opt("--config", help="TOML file of options (flag > env > file).")] = None,
    base_url: Annotated[
        list[str] | None,
        Opt(
            help="Endpoint base URL; repeat it for replicas of the model (balanced, health-checked)."
            "  [default: http://localhost:8000/v1]"
        ),
    ] = None,
    model: Annotated[str | None, Opt(help="Model name.  [default: google/gemma-4-31b-it]")] = None,
    api_key_env: Annotated[
        list[str] | None,
        Opt(
            help="Name of the variable holding the API key; repeat it (one per --base-url, in order) for "
            "replicas behind different gateways.  [default: VLMBATCH_API_KEY]"
        ),
    ] = None,
    api_key_secret: Annotated[
        str | None, Opt(help="Name of a Prefect Secret block holding the API key (wins over --api-key-env).")
    ] = None,
    api: Annotated[
        str | None, Opt(help="chat (Chat Completions) or responses (Responses API).  [default: chat]")
    ] = None,
    stream: Annotated[
        bool | None, Opt("--stream", help="Stream Chat Completions answers (gateways with timeouts).")
    ] = None,
    reasoning_effort: Annotated[
        str | None, Opt(help="low|medium|high: reasoning.effort with --api responses.  [default: medium]")
    ] = None,
    structured_output: Annotated[
        str | None,
        Opt(
            help="openai (response_format), vllm (structured_outputs) or tools (one function to call) for "
            "json_schema prompts.  [default: openai]"
        ),
    ] = None,
    concurrency: Annotated[
        str | None,
        Opt(help="Requests in flight per replica, or auto: find each one's limit (AIMD).  [default: 32]"),
    ] = None,
    max_concurrency: Annotated[
        int | None, Opt(help="With --concurrency auto: the most per replica.  [default: 256]")
    ] = None,
    rpm: Annotated[
        float | None, Opt(help="Requests per minute at most (a gateway's published limit).")
    ] = None,
    tpm: Annotated[
        float | None, Opt(help="Tokens per minute at most (image budget + prompt/4 + output budget).")
    ] = None,
    max_images_per_prompt: Annotated[
        int | None, Opt(help="The server's per-prompt image limit (NIM_MAX_IMAGES_PER_PROMPT).  [default: 4]")
    ] = None,
    concurrency_limit: Annotated[
        str | None, Opt(help="Limit shared by runs on a Prefect server.  [default: vlmbatch-endpoint]")
    ] = None,
    concurrency_limit_slots: Annotated[
        int | None, Opt(help="Slots of that limit when it is created.  [default: 64]")
    ] = None,
    max_tokens: Annotated[int | None, Opt(help="Output token budget per answer.  [default: 1024]")] = None,
    temperature: Annotated[float | None, Opt(help="Sampling temperature (model default if unset).")] = None,
    top_p: Annotated[float | None, Opt(help="Nucleus sampling (model default if unset).")] = None,
    seed: Annotated[int | None, Opt(help="Sampling seed.")] = None,
    reasoning: Annotated[
        bool | None,
        Opt(
            "--reasoning/--no-reasoning",
            help="Gemma 4 thinking on or off (enable_thinking true/false).  [default: unset, the server's]",
        ),
    ] = None,
    hide_reasoning: Annotated[
        bool | None, Opt("--hide-reasoning", help="With --reasoning: ask the server not to return it.")
    ] = None,
    preflight: Annotated[
        bool | None, Opt("--preflight/--no-preflight", help="Check /models and /health/ready first.")
    ] = None,
    max_retries: Annotated[int | None, Opt(help="Retries per request after the first.  [default: 6]")] = None,
    request_timeout: Annotated[float | None, Opt(help="Seconds per attempt.  [default: 300]")] = None,
    max_soft_tokens: Annotated[
        int | None, Opt(help="Visual token budget per image; images downscale to 2304×N px².  [default: 280]")
    ] = None,
    shard_size: Annotated[int | None, Opt(help="Work items per Prefect task.  [default: 1000]")] = None,
    limit: Annotated[int | None, Opt(help="Only the first N work items.")] = None,
    slice: Annotated[
        str | None,
        Opt(
            "--slice",
            help="K/N: only the K-th of N disjoint parts of the job (by a stable hash of the image id); "
            "N such runs, started anywhere, write one OUT together.",
        ),
    ] = None,
    slices: Annotated[
        int | None,
        Opt(
            help="Run the job as N slices on the Prefect work pool (deployment annotate/annotate-slice; "
            "needs PREFECT_API_URL): every worker of the pool takes slices."
        ),
    ] = None,
    dry_run: Annotated[
        bool | None, Opt("--dry-run", help="Validate and load every image; send nothing.")
    ] = None,
    force: Annotated[bool | None, Opt("--force", help="Re-run items already ok in OUT.")] = None,
    json_columns: Annotated[
        bool | None, Opt("--json-columns", help="Also write JSON Schema properties as typed columns.")
    ] = None,
    date: Annotated[str | None, Opt(help="Date partition YYYY-MM-DD: fills {date} in paths.")] = None,
    outage_window: Annotated[
        float | None, Opt(help="Seconds the endpoint may be unreachable before exit 3.  [default: 60]")
    ] = None,
    carry: Annotated[
        list[str] | None, Opt(help="Images-manifest column to copy to the output (repeatable).")
    ] = None,
    image_root: Annotated[
        str | None, Opt(help="Local image paths must resolve inside it.  [default: the manifest's folder]")
    ] = None,
    image_urls: Annotated[
        str | None, Opt(help="fetch|pass: how http(s) images reach the server.  [default: fetch]")
    ] = None,
    allow_private_urls: Annotated[
        bool | None, Opt("--allow-private-urls", help="Let fetched URLs reach loopback/private addresses.")
    ] = None,
    id_column: Annotated[str | None, Opt(help="Images-manifest id column.  [default: image_id]")] = None,
    image_column: Annotated[str | None, Opt(help="Images-manifest image column.  [default: image]")] = None,
    jpeg_quality: Annotated[int | None, Opt(help="Quality of re-encoded JPEGs.  [default: 90]")] = None,
    max_image_bytes: Annotated[
        int | None, Opt(help="Larger image files fail as bad_image.  [default: 67108864 (64 MiB)]")
    ] = None,
    max_image_pixels: Annotated[
        int | None, Opt(help="Larger decoded images fail as bad_image.  [default: 150000000]")
    ] = None,
    verbose: Annotated[
        bool, Opt("--verbose", "-v", help="Show Prefect's logs (one line per shard).")
    ] = False,
) -> None:
    """Annotate every work item of IMAGES (× PROMPTS) and write the rows to OUT.

    Every option can also be set by an environment variable VLMBATCH_<OPTION> (e.g.
    VLMBATCH_BASE_URL) or a key in the --config TOML file; precedence: flag > env > file > default.
    Exit status: 0 every row ok, 1 usage/config/manifest error (nothing sent), 2 some rows failed,
    3 endpoint unusable (rerun continues), 130/143 interrupted (rerun continues).
    """
    flags = {k: v for k, v in locals().items() if k not in ("config", "verbose")}
    raise typer.Exit(execute(flags, config_file=config, verbose=verbose))


def execute(flags: dict[str, Any], *, config_file: Path | None = None, verbose: bool = False) -> int:
    """Validate, run the annotate flow in-process (a dry run: the job alone, no Prefect), print the
    summary; returns the exit status."""
    prepare_prefect(log_level="INFO" if verbose else None)
    try:
        cfg = build_config(flags, config_file=config_file)
    except UsageError as exc:
        raise fail(str(exc)) from None
    # First of all, Prefect's temporary server (when no server is configured): it comes up on the other
    # core while this process plans the run and imports the flow.
    if cfg.dry_run or cfg.slices is not None:
        stop_temporary_server()  # started on a guess: a dry run needs none, --slices the configured one
    server = None if cfg.dry_run or cfg.slices is not None else start_temporary_server()
    try:
        plan = plan_run(cfg)  # fail fast (exit 1) before a flow run even starts
    except UsageError as exc:
        stop_temporary_server()  # nothing will run against it
        raise fail(str(exc)) from None

    images = f" over {plan.num_images} images" if plan.images is not None else " (text only)"
    if cfg.slices is not None:
        if server_url() is None:
            raise fail(
                "--slices runs the job's slices on a Prefect work pool: set PREFECT_API_URL to the server "
                "its workers poll (e.g. http://127.0.0.1:4200/api), or run slices yourself with --slice K/N"
            )
        typer.echo(
            f"{plan.work_items} work items{images}; submitting {cfg.slices} slices to the work pool",
            err=True,
        )
    elif cfg.dry_run:
        typer.echo(
            f"dry run: {plan.work_items} work items{images}; loading every image, sending nothing", err=True
        )
    else:
        typer.echo(f"{plan.work_items} work items{images}; starting the annotate flow", err=True)

    would_fail: list[Any] = []  # a dry run writes no rows: its first failures are listed instead

    def keep_failure(row: Any) -> None:
        if row is not None and row.status == "failed" and len(would_fail) < DRY_RUN_SHOWN:
            would_fail.append(row)

    stop_listening = add_row_listener(keep_failure) if cfg.dry_run else lambda: None
    forget_signals()
    try:
        with progress_bar(plan.work_items, enabled=sys.stderr.isatty()):
            summary = _dry_run(plan) if cfg.dry_run else _run_flow(cfg, plan, server, verbose)
    except KeyboardInterrupt:  # Ctrl-C before the run took over the signals (e.g. waiting for Prefect)
        typer.echo("error: interrupted by SIGINT; what was done is written, a rerun continues", err=True)
        return EXIT_SIGINT
    except ServerFailed as exc:
        typer.echo(f"error: {exc}", err=True)
        return EXIT_CRASHED
    except UsageError as exc:
        raise fail(str(exc)) from None
    except RunStopped as stopped:
        if stopped.summary is not None:
            print_summary(stopped.summary)  # type: ignore[arg-type]
        typer.echo(f"error: {stopped}", err=True)
        return stopped.exit_code
    except Exception as exc:  # a bug: not exit 1, which promises that nothing was sent or written
        if (interrupted := _interruption(exc)) is not None:
            typer.echo(f"error: {interrupted}", err=True)
            return EXIT_CODES[signal_received() or "SIGINT"]
        traceback.print_exc()
        typer.echo(
            f"error: vlmbatch crashed ({type(exc).__name__}: {exc}); the rows written so far are kept, "
            "and a rerun continues from them",
            err=True,
        )
        return EXIT_CRASHED
    finally:
        stop_listening()
    print_summary(summary)
    for row in would_fail:
        where = f"image {row.image_id!r}, prompt {row.prompt_id!r}"
        typer.echo(f"would fail: {where}: {row.error_type}: {row.error_message}")
    if cfg.dry_run and summary.failed > len(would_fail):
        typer.echo(f"... and {summary.failed - len(would_fail)} more")
    return summary.exit_code


def register(app: typer.Typer) -> None:
    app.command()(run)


def _run_flow(cfg: RunConfig, plan: RunPlan, server: TemporaryServer | None, verbose: bool) -> RunSummary:
    if server is not None and _starts_early(cfg):
        return asyncio.run(_early_run(cfg, plan, server, verbose))
    # The flow's modules import Prefect (a second or more): only a run that starts a flow loads them.
    from flows.annotate import annotate
    from flows.cli.quiet_stops import hide_expected_stops
    from flows.slices import annotate_slices

    if not verbose:
        hide_expected_stops()  # an expected stop gets its one error line, not a traceback
    with prefect_api(server):
        if cfg.slices is not None:
            return asyncio.run(annotate_slices(cfg))
        return asyncio.run(annotate(cfg))


def _starts_early(cfg: RunConfig) -> bool:
    """Whether the job can start before its flow run: it needs nothing of Prefect to send (no Secret
    block for the key, no scheduled date to read, surely no server whose global concurrency limit must
    be held first)."""
    if cfg.endpoint.api_key_secret is not None or (cfg.date is None and needs_date(cfg)):
        return False
    return no_server_anywhere()


async def _early_run(cfg: RunConfig, plan: RunPlan, server: TemporaryServer, verbose: bool) -> RunSummary:
    """The job starts now, with no Prefect (it sends while the temporary server comes up and Prefect
    is imported on a thread); once both are there, the annotate flow run takes it over (flows/annotate.py
    ``_adopt``) and the run goes on as a flow run. If the server does not come up, the job finishes
    without one (a warning says so); a signal before the flow run ends the job with no flow run, as
    does a usage error (another run writes OUT: nothing was sent)."""
    loop = asyncio.get_running_loop()
    flows = _in_background(_load_flows)
    answers = AnswerSample()  # the summary artifact's few answers, as the flow keeps them

    def on_row(row: ResultRow | None) -> None:
        if row is not None:
            answers.add(row)

    # Its own run id: the flow run (and so its id) does not exist yet. Rows and part files carry this
    # one; the flow run is named after it.
    job = Job(plan, run_id=str(uuid.uuid4()), on_row=on_row)
    handover = ShardHandover()

    async def work() -> RunSummary:
        await job.preflight()
        return await job.run(handover, on_shard_done=handover.shard_done)

    running = loop.create_task(work(), name="vlmbatch-job")
    while not (server.settled and flows.done()):
        if running.done() and (job.stop.reason in EXIT_CODES or _refused(running)):
            # a signal, or another run writes OUT (nothing sent): out now, with no flow run; Prefect's
            # import finishes first (the exit would wait for it anyway, and cut short it complains)
            stop_temporary_server()
            await asyncio.wait({flows})
            return _outcome(job, await running)
        await asyncio.wait({running}, timeout=0.05)
    # Prefect's modules came after the job froze the long-lived objects (tasks/run/job.py): frozen too,
    # or each full collection would walk them with the requests waiting
    freeze_late_arrivals()
    if server.failure is not None or flows.exception() is not None:
        typer.echo(
            f"warning: the run goes on without Prefect, and no flow run records it: "
            f"{server.failure or flows.exception()}",
            err=True,
        )
        return _outcome(job, await running)
    from flows.annotate import EarlyJob, annotate, offer, withdraw  # loaded on the thread by now
    from flows.cli.quiet_stops import hide_expected_stops

    if not verbose:
        hide_expected_stops()
    early = EarlyJob(cfg, plan, job, handover, answers, running)
    offer(early)
    try:
        with prefect_api(server):
            return await annotate.with_options(flow_run_name=job.run_id)(cfg)
    except Exception as exc:
        if handover.taken_over or not withdraw(early):
            raise
        # the flow run never started (its server was lost on the way): the job finishes without it
        typer.echo(f"warning: the run goes on without Prefect, and no flow run records it: {exc}", err=True)
        return _outcome(job, await running)


def _refused(running: asyncio.Task[RunSummary]) -> bool:
    """Whether the job stopped on a usage error before sending (another run writes OUT)."""
    return not running.cancelled() and isinstance(running.exception(), UsageError)


def _outcome(job: Job, result: RunSummary) -> RunSummary:
    job.raise_if_stopped(result)
    return result


def _load_flows() -> None:
    """What the flow run needs of Prefect, imported (on a thread, while the job runs)."""
    import flows.annotate
    import flows.cli.quiet_stops  # noqa: F401

    warm_up()


def _in_background(load: Callable[[], None]) -> asyncio.Future[None]:
    """``load()`` on a thread; the future says when it is done. Not a daemon: a run that ends before it
    is done (a signal) waits for it at exit, a second or two; a daemon thread stopped at exit inside a
    native extension's import aborts the process (SIGABRT, "exception not rethrown")."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def report(error: BaseException | None) -> None:
        if not done.done():
            done.set_result(None) if error is None else done.set_exception(error)

    def target() -> None:
        error: BaseException | None = None
        try:
            load()
        except BaseException as exc:  # reported to the loop, which decides
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: the run ended without waiting
            loop.call_soon_threadsafe(report, error)

    threading.Thread(target=target, name="vlmbatch-prefect-import").start()
    return done


def _dry_run(plan: RunPlan) -> RunSummary:
    """Every image loaded and every request built, nothing sent, nothing written: the job alone, with
    no Prefect flow (nothing is orchestrated), so a dry run takes about a second plus its images."""

    async def dry() -> RunSummary:
        job = Job(plan, run_id=str(uuid.uuid4()))
        result = await job.run()
        job.raise_if_stopped(result)
        return result

    return asyncio.run(dry())


def _interruption(exc: BaseException) -> str | None:
    """What to say when the run failed because it was being interrupted: a signal reached the run
    (and, sent to every process, Prefect's temporary server too, so the flow run's end could not be
    recorded), or a Ctrl-C came while Prefect was importing and a library wrapped it. None for a crash."""
    if (name := signal_received()) is not None:
        return (
            f"interrupted by {name}; what was done is written, a rerun continues "
            f"(then: {type(exc).__name__}: {exc})"
        )
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return "interrupted by SIGINT; what was done is written, a rerun continues"
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None
