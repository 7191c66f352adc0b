"""The date a scheduled run annotates, read from Prefect: the day before its scheduled start."""

from __future__ import annotations

from prefect.client.orchestration import get_client
from prefect.runtime import deployment, flow_run

from tasks.partitions import day_before


async def scheduled_date() -> str | None:
    """For a flow run of a deployment: the day before its scheduled start in the schedule's timezone
    (the first schedule with a timezone; UTC otherwise). ``None`` outside a deployment run."""
    deployment_id = deployment.id
    if deployment_id is None:
        return None
    timezone = None
    async with get_client() as client:
        found = await client.read_deployment(deployment_id)
    for item in found.schedules or []:
        timezone = getattr(item.schedule, "timezone", None)
        if timezone:
            break
    return day_before(flow_run.scheduled_start_time, timezone).isoformat()
