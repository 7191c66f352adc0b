"""``vlmbatch serve``: the deployments of prefect.yaml, served from this process without a work pool.

The schedules, parameters, descriptions and tags are read from prefect.yaml (its anchors resolved),
so the nightly cron and its timezone live in one place. The scheduler runs in a Prefect server with its
services, not in the temporary one a run starts (``--no-services``, flows/prefect_server.py): serving
needs ``prefect server start`` and ``PREFECT_API_URL``.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, cast

import yaml
from prefect import serve
from prefect.client.orchestration import get_client
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.flows import Flow
from prefect.schedules import Cron, Interval, RRule, Schedule

from tasks.errors import ConfigError

PREFECT_YAML = Path(__file__).resolve().parent.parent / "prefect.yaml"


def load_project(path: Path = PREFECT_YAML) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("deployments"), list):
        raise ConfigError(f"{path} has no deployments list")
    return data


def import_flow(entrypoint: str) -> Flow[Any, Any]:
    """``flows/annotate.py:annotate`` → the flow object, imported as a module of this package."""
    file, _, name = entrypoint.partition(":")
    module = importlib.import_module(file.removesuffix(".py").replace("/", "."))
    found = getattr(module, name, None)
    if not isinstance(found, Flow):
        raise ConfigError(f"entrypoint {entrypoint} is not a flow")
    return found


def schedule_of(spec: dict[str, Any]) -> Schedule:
    common = {"timezone": spec.get("timezone"), "active": spec.get("active", True)}
    if "cron" in spec:
        return Cron(spec["cron"], day_or=spec.get("day_or", True), **common)
    if "interval" in spec:
        return Interval(spec["interval"], anchor_date=spec.get("anchor_date"), **common)
    if "rrule" in spec:
        return RRule(spec["rrule"], **common)
    raise ConfigError(f"schedule {spec!r}: expected cron, interval or rrule")


def build_deployments(path: Path = PREFECT_YAML, only: list[str] | None = None) -> list[RunnerDeployment]:
    """RunnerDeployments for the deployments of ``path`` (all, or those named in ``only``)."""
    specs = load_project(path)["deployments"]
    names = [spec.get("name") for spec in specs]
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(
            f"{path} has no deployment {', '.join(unknown)} (has: {', '.join(map(str, names))})"
        )
    deployments = []
    for spec in specs:
        if only and spec.get("name") not in only:
            continue
        flow = import_flow(spec["entrypoint"])
        deployment = flow.to_deployment(  # synchronous here: a RunnerDeployment
            name=spec["name"],
            schedules=[schedule_of(s) for s in spec.get("schedules") or []],
            parameters=spec.get("parameters") or {},
            description=spec.get("description"),
            tags=spec.get("tags"),
        )
        deployments.append(cast("RunnerDeployment", deployment))
    return deployments


def serve_project(path: Path = PREFECT_YAML, only: list[str] | None = None, limit: int | None = None) -> None:
    """Serve until interrupted; runs start in the directory of ``path`` (relative paths resolve there)."""
    deployments = build_deployments(path, only)
    refuse_pool_bound(deployments)
    os.chdir(path.resolve().parent)
    serve(*deployments, limit=limit)


def refuse_pool_bound(deployments: list[RunnerDeployment]) -> None:
    """Serving a deployment that ``prefect deploy`` bound to a work pool keeps that binding on the
    server (with no pull steps): a worker of the pool then takes its runs and crashes. Refuse, saying
    how to switch."""
    bound: dict[str, str] = {}  # deployment: its work pool
    with get_client(sync_client=True) as client:
        for d in deployments:
            name = f"{d.flow_name}/{d.name}"
            try:
                found = client.read_deployment_by_name(name)
            except ObjectNotFound:
                continue
            if found.work_pool_name:
                bound[name] = found.work_pool_name
    if bound:
        raise ConfigError(
            "already deployed to a work pool by `prefect deploy`: "
            + ", ".join(f"{name} (work pool {pool!r})" for name, pool in bound.items())
            + ". A worker of that pool would take the served runs and fail. Keep using the worker, or "
            + "delete them first: "
            + "; ".join(f"prefect deployment delete {name}" for name in bound)
        )
