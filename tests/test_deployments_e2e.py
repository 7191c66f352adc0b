"""prefect.yaml and `vlmbatch serve`'s reading of it (fast), then the real thing (slow, ~1 min):
`prefect server start` on a free port with a temporary PREFECT_HOME, `prefect deploy --all` from the
repository root, a process worker, the nightly deployment run for a past scheduled time (its date
derived from the schedule) and `vlmbatch backfill --deployment` over two partitions, both against the
emulator and sharing one global concurrency limit; outputs and artifacts checked through the client.
Every process started here is stopped (its whole process group and descendants), even on failure.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import yaml

from emulator import EmulatorServer
from flows.serve import PREFECT_YAML, build_deployments
from tasks.config import RunConfig
from tests.builders import images_manifest
from tests.cli import rows
from tests.prefect_processes import Processes
from tests.prefect_processes import prefect_server as start_prefect_server

REPO = PREFECT_YAML.parent
PROJECT = yaml.safe_load(PREFECT_YAML.read_text())
D1, D2 = "2024-05-01", "2024-05-02"


def _deployment(name: str) -> dict[str, Any]:
    return next(d for d in PROJECT["deployments"] if d["name"] == name)


def test_prefect_yaml_shares_settings_through_anchors() -> None:
    nightly, backfill = _deployment("annotate-nightly"), _deployment("backfill")
    assert nightly["entrypoint"] == "flows/annotate.py:annotate"
    assert backfill["entrypoint"] == "flows/backfill.py:backfill"
    assert nightly["work_pool"] == backfill["work_pool"] == PROJECT["definitions"]["work_pool"]
    assert nightly["parameters"]["config"] == backfill["parameters"]["config"]
    sliced = _deployment("annotate-slice")
    assert sliced["entrypoint"] == nightly["entrypoint"] and sliced["work_pool"] == nightly["work_pool"]
    assert sliced["parameters"] == nightly["parameters"] and not sliced["schedules"]
    config = nightly["parameters"]["config"]
    assert "{date}" in config["images"] and "{date}" in config["out"]
    assert RunConfig.model_validate(config).date is None  # a valid parameter; the schedule gives the date
    (schedule,) = nightly["schedules"]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"]
    assert not backfill.get("schedules")
    assert PROJECT["build"] is None and PROJECT["push"] is None
    assert list(PROJECT["pull"][0]) == ["prefect.deployments.steps.set_working_directory"]


def test_serve_builds_the_same_deployments_from_prefect_yaml() -> None:
    built = {d.name: d for d in build_deployments(PREFECT_YAML)}
    assert set(built) == {"annotate-nightly", "annotate-slice", "backfill"}
    assert not built["annotate-slice"].schedules  # submitted by a run of all slices (flows/slices.py)
    (schedule,) = built["annotate-nightly"].schedules
    spec = _deployment("annotate-nightly")["schedules"][0]
    assert schedule.schedule.cron == spec["cron"] and schedule.schedule.timezone == spec["timezone"]
    assert built["annotate-nightly"].parameters == _deployment("annotate-nightly")["parameters"]
    assert not built["backfill"].schedules
    assert built["backfill"].parameters["max_parallel"] == 2


# --- the real thing ---------------------------------------------------------------------------------


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[tuple[str, Processes]]:
    with start_prefect_server(tmp_path / "prefect-home", tmp_path / "logs") as found:
        yield found


async def _client_checks(url: str, nightly_config: dict[str, Any], scheduled: datetime) -> Any:
    from prefect.deployments import arun_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        return await arun_deployment(
            "annotate/annotate-nightly",
            parameters={"config": nightly_config},
            scheduled_time=scheduled,
            timeout=0,
            as_subflow=False,
        )


async def _scheduled_runs(client: Any, deployment_id: Any) -> list[Any]:
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs = await client.read_flow_runs(
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
    )
    return [r for r in runs if r.state_name == "Scheduled" and r.expected_start_time > datetime.now(UTC)]


async def _wait_and_read(url: str, flow_run_id: Any) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.artifacts import read_artifacts

    with temporary_settings(updates={PREFECT_API_URL: url}):
        async with get_client() as client:
            deadline = time.monotonic() + 120
            while not (run := await client.read_flow_run(flow_run_id)).state.is_final():  # type: ignore[union-attr]
                assert time.monotonic() < deadline, f"nightly run still {run.state}"
                await asyncio.sleep(1)
            nightly = await client.read_deployment_by_name("annotate/annotate-nightly")
            limit = await client.read_global_concurrency_limit_by_name("vlmbatch-endpoint")
            deadline = time.monotonic() + 60  # the server's scheduler fills in the cron's next runs
            while not (scheduled := await _scheduled_runs(client, nightly.id)):
                assert time.monotonic() < deadline, "the scheduler created no run of the nightly deployment"
                await asyncio.sleep(2)
        return {
            "nightly_run": run,
            "nightly": nightly,
            "scheduled": scheduled,
            "limit": limit,
            "table": await read_artifacts(key="backfill-partitions"),
            "summaries": {d: await read_artifacts(key=f"annotate-summary-{d}") for d in (D1, D2)},
            "progress": await read_artifacts(kind="progress"),
        }


def test_deploy_worker_nightly_and_backfill_deployment(
    tmp_path: Path, prefect_server: tuple[str, Processes], emulator: EmulatorServer
) -> None:
    url, procs = prefect_server
    emulator.configure(latency=0.1)
    for day in (D1, D2):
        images_manifest(
            tmp_path / "m" / f"date={day}", {f"{day}-{k}": ((16 + k, 12), "green") for k in range(8)}
        )
    images = str(tmp_path / "m" / "date={date}" / "images.parquet")
    # shards of 3: each partition's three shards overlap, all inside the run's one hold of 4 slots
    run_options = ["--base-url", emulator.base_url, "--concurrency", 4, "--concurrency-limit-slots", 4]
    run_options += ["--shard-size", 3]

    pool = PROJECT["definitions"]["work_pool"]["name"]
    procs.run("prefect", "work-pool", "create", pool, "--type", "process")
    # as in a terminal, where prefect deploy asks about whatever prefect.yaml leaves open: nothing here
    deployed = procs.run("prefect", "deploy", "--all", env={**procs.env, "PREFECT_CLI_PROMPT": "true"})
    assert "annotate/annotate-nightly" in deployed and "backfill/backfill" in deployed
    serve = subprocess.run(
        [sys.executable, "-m", "flows.cli", "serve"],
        cwd=REPO, env=procs.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert serve.returncode == 1  # serving them now would leave the pool's worker crashing their runs
    assert "already deployed to a work pool by `prefect deploy`: annotate/annotate-nightly" in serve.stderr
    assert "prefect deployment delete backfill/backfill" in serve.stderr
    procs.start("worker", "prefect", "worker", "start", "--pool", pool, cwd=tmp_path)

    # the nightly run of 2024-05-02 02:30 in Berlin annotates the 1st (no date given)
    nightly_config = {
        "images": images,
        "out": str(tmp_path / "nightly" / "date={date}"),
        "endpoint": {"base_url": emulator.base_url, "concurrency": 4, "concurrency_limit_slots": 4},
    }
    nightly_run = asyncio.run(_client_checks(url, nightly_config, datetime(2024, 5, 2, 0, 30, tzinfo=UTC)))

    # the backfill deployment, submitted by the CLI, over two partitions at once
    out = tmp_path / "out" / "date={date}"
    args = ["flows.cli", "backfill", images, "--out", out, *run_options, "--start", D1, "--end", D2]
    cli = procs.run(*args, "--deployment", "backfill/backfill", "--watch", timeout=180)
    assert "submitted flow run" in cli and "Completed" in cli, cli
    unknown = subprocess.run(
        [sys.executable, "-m", *map(str, args), "--deployment", "backfill/nope"],
        cwd=REPO, env=procs.env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert unknown.returncode == 1 and "no deployment 'backfill/nope' on the server" in unknown.stderr

    found = asyncio.run(_wait_and_read(url, nightly_run.id))
    assert found["nightly_run"].state.is_completed(), found["nightly_run"].state
    for day in (D1, D2):
        got = rows(tmp_path / "out" / f"date={day}")
        assert len(got) == 8 and {r["status"] for r in got} == {"ok"}
    assert len(rows(tmp_path / "nightly" / f"date={D1}")) == 8  # the day before the scheduled time
    assert not (tmp_path / "nightly" / f"date={D2}").exists()

    # one global limit, created by the first run with the given size, capped every run together
    assert found["limit"].limit == 4
    assert emulator.stats()["max_in_flight"] <= 4

    # artifacts: the backfill's table, a summary per partition, progress per run at 100 %
    outcomes = {row["partition"]: row for row in json.loads(found["table"][0].data)}
    assert {d: outcomes[d]["outcome"] for d in (D1, D2)} == {D1: "ok", D2: "ok"}
    assert outcomes[D1]["ok"] == outcomes[D2]["ok"] == 8
    for day in (D1, D2):
        text = found["summaries"][day][0].data
        assert "| ok | 8 |" in text and f"date={day}" in text and "rows per second" in text
    assert len(found["progress"]) >= 3 and all(float(a.data) == 100.0 for a in found["progress"])

    # the nightly deployment carries the schedule of prefect.yaml, and the server schedules it
    (schedule,) = found["nightly"].schedules
    spec = _deployment("annotate-nightly")["schedules"][0]
    assert schedule.schedule.cron == spec["cron"] and schedule.schedule.timezone == spec["timezone"]
    for run in found["scheduled"]:
        local = run.expected_start_time.astimezone(ZoneInfo(spec["timezone"]))
        assert (local.hour, local.minute) == (2, 0)
