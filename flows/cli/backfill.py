"""``vlmbatch backfill``: the annotate flow over a range of date partitions, here or on a deployment.

``backfill`` takes every option of ``run`` (the same names, environment variables and TOML keys; its
signature is copied from ``run``, so the two never drift apart) plus the date range.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from flows.cli.common import EXIT_CRASHED, EXIT_SIGINT, fail, prepare_prefect
from flows.cli.run import run
from flows.prefect_server import (
    ServerFailed,
    prefect_api,
    server_url,
    start_temporary_server,
    stop_temporary_server,
)
from tasks.config import SECTIONS, RunConfig, build_config
from tasks.errors import ConfigError, UsageError
from tasks.partitions import parse_date, select_partitions

if TYPE_CHECKING:
    from flows.backfill import PartitionOutcome

Opt = typer.Option
BACKFILL_OPTIONS: dict[str, tuple[Any, Any]] = {  # name: (annotation, default); ... = required
    "start": (Annotated[str, Opt(help="First date partition, YYYY-MM-DD.")], ...),
    "end": (Annotated[str, Opt(help="Last date partition, YYYY-MM-DD (included).")], ...),
    "max_parallel": (
        Annotated[
            int | None,
            Opt(help="Partitions running at once [default: 2; with --deployment, the deployment's]."),
        ],
        None,
    ),
    "deployment": (
        Annotated[
            str | None,
            Opt(help="Submit to this backfill deployment on the server (e.g. backfill/backfill)."),
        ],
        None,
    ),
    "watch": (Annotated[bool, Opt("--watch", help="With --deployment: wait and print the outcome.")], False),
}


def register(app: typer.Typer) -> None:
    app.command(
        name="backfill",
        help="Run the annotate flow for every date partition from --start to --end ({date} in IMAGES, "
        "--prompts and --out), --max-parallel at a time: complete partitions are skipped (unless --force), "
        "partial ones resumed, missing inputs reported. Takes every option of `run`. With --deployment, "
        "submits the backfill to a Prefect server instead. Exit status: 0 every partition ok, skipped or "
        "missing its input; 2 some partition has failed rows or an error; 3 the endpoint was unusable; "
        "1 usage error; 130/143 interrupted.",
    )(_backfill_command(run))


def _backfill_command(run: Any) -> Any:
    """A function with ``run``'s parameters (minus --date) plus the backfill's, for typer."""
    params = [p for p in inspect.signature(run, eval_str=True).parameters.values() if p.name != "date"]
    keyword = inspect.Parameter.KEYWORD_ONLY
    own = [
        inspect.Parameter(name, keyword, annotation=annotation, default=default)
        for name, (annotation, default) in BACKFILL_OPTIONS.items()
        if default is ...
    ]
    own_defaults = [
        inspect.Parameter(name, keyword, annotation=annotation, default=default)
        for name, (annotation, default) in BACKFILL_OPTIONS.items()
        if default is not ...
    ]
    rest = [p.replace(kind=keyword) for p in params[1:]]

    def backfill(**kwargs: Any) -> None:
        extra = {name: kwargs.pop(name) for name in BACKFILL_OPTIONS}
        config_file, verbose = kwargs.pop("config"), kwargs.pop("verbose")
        raise typer.Exit(execute_backfill(kwargs, config_file=config_file, verbose=verbose, **extra))

    backfill.__signature__ = inspect.Signature([params[0], *own, *rest, *own_defaults])  # type: ignore[attr-defined]
    return backfill


def execute_backfill(
    flags: dict[str, Any],
    *,
    start: str,
    end: str,
    max_parallel: int | None = None,
    deployment: str | None = None,
    watch: bool = False,
    config_file: Path | None = None,
    verbose: bool = False,
) -> int:
    prepare_prefect(log_level="INFO" if verbose else None)
    # Prefect's temporary server first (when none is configured): it comes up while the rest is checked
    server = start_temporary_server() if deployment is None else None
    try:
        cfg = build_config(flags, config_file=config_file)
        if cfg.slices is not None and deployment is None:
            stop_temporary_server()  # the slices run on the configured server's work pool
            server = None
            if server_url() is None:
                raise UsageError(
                    "--slices runs each partition's slices on a Prefect work pool: set PREFECT_API_URL to "
                    "the server its workers poll (e.g. http://127.0.0.1:4200/api)"
                )
        if max_parallel is not None and max_parallel < 1:
            raise UsageError(f"--max-parallel must be at least 1 (got {max_parallel})")
        select_partitions(cfg, start, end)  # fail fast on dates and paths (exit 1)
        parallel = {} if max_parallel is None else {"max_parallel": max_parallel}  # else the flow's default
        if deployment is not None:
            return asyncio.run(submit(deployment, cfg, start, end, max_parallel, watch))
        # the backfill flow's modules import Prefect (a second or more): only when a flow runs here
        from flows.backfill import BackfillIncomplete, backfill, exit_code
        from flows.cli.quiet_stops import hide_expected_stops

        if not verbose:
            hide_expected_stops(BackfillIncomplete)  # the table of partitions below says what happened
        try:
            with prefect_api(server):
                outcomes = asyncio.run(
                    backfill(cfg, parse_date(start, "--start"), parse_date(end, "--end"), **parallel)
                )
        except BackfillIncomplete as exc:
            outcomes = exc.outcomes
    except UsageError as exc:
        stop_temporary_server()  # unless a flow already ran against it
        raise fail(str(exc)) from None
    except ServerFailed as exc:
        raise fail(str(exc), EXIT_CRASHED) from None
    except KeyboardInterrupt:  # Ctrl-C before the backfill took over the signals (waiting for Prefect)
        raise fail(
            "interrupted by SIGINT; what was done is written, a rerun continues", EXIT_SIGINT
        ) from None
    print_outcomes(outcomes)
    if outcomes and all(o.outcome == "missing input" for o in outcomes):
        typer.echo("warning: no date had its input: check the manifest path's {date} template", err=True)
    return exit_code(outcomes)


def deployment_config(deployed: Any, cfg: RunConfig) -> dict[str, Any]:
    """The ``config`` of a backfill submitted to a deployment: the deployment's own (``deployed``, from
    prefect.yaml's ``definitions.config``) with the settings this command was given (flags, environment,
    ``--config`` file) on top, their local paths made absolute (``{date}`` kept) for a worker that
    starts in another directory. Settings left at their defaults do not replace the deployment's, and
    the deployment's own relative paths stay relative to the worker's directory."""

    given = cfg.model_dump(mode="json", exclude_unset=True)
    for key in ("images", "prompts", "out"):
        if key in given:
            given[key] = _absolute(given[key])
    if "image_root" in given.get("image", {}):
        given["image"]["image_root"] = _absolute(given["image"]["image_root"])
    merged = {
        key: dict(value) if isinstance(value, dict) else value
        for key, value in (deployed.items() if isinstance(deployed, dict) else ())
    }
    for key, value in given.items():
        if key in SECTIONS and isinstance(merged.get(key), dict):
            merged[key].update(value)
        else:
            merged[key] = value
    try:
        RunConfig.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"config.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_input=False)
        )
        raise ConfigError(f"the deployment's config with this command's settings: {problems}") from None
    return merged


def _absolute(path: Any) -> Any:
    return path if not isinstance(path, str) or "://" in path else os.path.abspath(path)


def _describe(exc: Exception) -> str:
    text = str(exc)
    return text if text and text != "None" else type(exc).__name__


async def submit(
    name: str, cfg: RunConfig, start: str, end: str, max_parallel: int | None, watch: bool
) -> int:
    """Create a flow run of the backfill deployment ``name`` on the server; with ``watch``, wait for it."""
    # Prefect's client and the backfill flow's modules (a second or more to import): only here
    from prefect.client.orchestration import get_client
    from prefect.deployments import arun_deployment
    from prefect.exceptions import ObjectNotFound

    from flows.backfill import PartitionOutcome, exit_code

    if server_url() is None:
        raise UsageError(
            "--deployment needs a Prefect server: set PREFECT_API_URL (e.g. http://127.0.0.1:4200/api)"
        )
    try:
        async with get_client() as client:
            deployed = await client.read_deployment_by_name(name)
    except ObjectNotFound:
        raise UsageError(
            f"no deployment {name!r} on the server at {server_url()} (`prefect deployment ls` lists them)"
        ) from None
    except Exception as exc:  # server unreachable, malformed name
        raise UsageError(f"could not read deployment {name!r}: {_describe(exc)}") from None
    parameters: dict[str, Any] = {
        "config": deployment_config(deployed.parameters.get("config"), cfg),
        "start": start,
        "end": end,
    }
    if max_parallel is not None:
        parameters["max_parallel"] = max_parallel
    try:
        run = await arun_deployment(
            deployed.id, parameters=parameters, timeout=None if watch else 0, as_subflow=False
        )
    except Exception as exc:  # server unreachable, rejected parameters
        raise UsageError(f"could not submit to deployment {name!r}: {_describe(exc)}") from None
    typer.echo(f"submitted flow run {run.name} ({run.id}) of {name}")
    if not watch:
        return 0
    state = run.state
    typer.echo(f"{run.name}: {state.name if state else 'unknown state'}")
    rows = await read_outcomes(run.id)
    outcomes = [PartitionOutcome.model_validate(row) for row in rows]
    print_outcomes(outcomes)
    if outcomes:
        return exit_code(outcomes)
    return 0 if state is not None and state.is_completed() else 1


async def read_outcomes(flow_run_id: Any) -> list[dict[str, Any]]:
    """The rows of a backfill flow run's ``backfill-partitions`` table artifact (empty if none)."""
    from flows.artifacts import read_artifacts  # Prefect's client: only when reading a flow run's outcome

    found = await read_artifacts(key="backfill-partitions", flow_run_ids=[flow_run_id])
    if not found:
        return []
    data = found[0].data
    return list(json.loads(data) if isinstance(data, str) else data or [])


def print_outcomes(outcomes: list[PartitionOutcome]) -> None:
    table = Table(title="backfill", title_justify="left")
    for column in ("partition", "outcome"):
        table.add_column(column, no_wrap=True)
    for column in ("work items", "ok", "failed", "skipped"):
        table.add_column(column, justify="right")
    table.add_column("detail", overflow="fold")
    for o in outcomes:
        table.add_row(
            o.partition, o.outcome, str(o.work_items), str(o.ok), str(o.failed), str(o.skipped), o.detail
        )
    Console(highlight=False, soft_wrap=True).print(table)
