"""Before a run sends any work: is the endpoint there, ready, and serving the model?

``GET {base}/models`` (is the model listed? name the ones that are) and ``GET {base}/health/ready``
where the server has it (NIM does; a 404 means it doesn't, which is fine). An endpoint that rejects
the credentials or lacks the model stops the run with exit 3 before anything is sent; so does one that
stays unreachable or busy (refused, timed out, 408, 429, 5xx: NIM answers 503 while its model loads)
for ``--outage-window`` seconds, retried meanwhile as the run itself would: a nightly run that starts
during a restart or a gateway's blip goes on.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from tenacity import RetryCallState

from tasks.config import EndpointConfig
from tasks.endpoint import EndpointClient
from tasks.errors import RequestFailure
from tasks.retry import RetryPolicy

log = logging.getLogger(__name__)


class PreflightFailed(Exception):
    """The endpoint is unusable; nothing was sent."""


async def preflight(
    config: EndpointConfig, key: str | None = None, policy: RetryPolicy | None = None
) -> list[str]:
    """Check the endpoint; returns the models it serves (empty if it has no model list)."""
    client, policy = EndpointClient(config, key), policy or RetryPolicy()
    try:
        models = await _models(client, config, policy)
        await _ready(client, config, policy)
    finally:
        await client.aclose()
    if models and config.model not in models:
        raise PreflightFailed(
            f"{config.base_url} does not serve the model {config.model!r}; it serves: {', '.join(models)}"
        )
    return models


async def _get(client: EndpointClient, path: str, policy: RetryPolicy) -> object:
    """``client.get_json(path)``, transient failures retried for up to ``--outage-window`` seconds."""
    window, started, told = client.config.outage_window, time.monotonic(), False

    def waiting(state: RetryCallState) -> None:
        nonlocal told
        if not told and state.outcome is not None:
            told = True
            log.warning(
                "preflight: %s%s: %s; trying again for up to %g s (--outage-window)",
                client.config.base_url,
                path,
                state.outcome.exception(),
                window,
            )

    try:
        return await policy.call_within(window, lambda: client.get_json(path), waiting)
    except RequestFailure as failure:
        if told:
            failure.message += f" (after {time.monotonic() - started:.0f} s of trying)"
        raise


async def _models(client: EndpointClient, config: EndpointConfig, policy: RetryPolicy) -> list[str]:
    try:
        content = await _get(client, "/models", policy)
    except RequestFailure as failure:
        if failure.error_type != "not_found":
            raise PreflightFailed(_describe(config, "/models", failure)) from None
        if await _answers_under_v1(client, config):
            raise PreflightFailed(
                f"{config.base_url}/models answered 404, and {config.base_url}/v1/models answers: "
                f"the base URL lacks its /v1; use --base-url {config.base_url}/v1"
            ) from None
        return []  # a gateway without a model list: the first requests will tell
    data: Any = content.get("data") if isinstance(content, dict) else None
    if not isinstance(data, list):
        return []
    return [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")]


async def _answers_under_v1(client: EndpointClient, config: EndpointConfig) -> bool:
    """Whether the model list is one ``/v1`` further down (the commonest base URL mistake)."""
    if config.base_url.rstrip("/").endswith("/v1"):
        return False
    try:
        await client.get_json("/v1/models")
    except RequestFailure:
        return False
    return True


async def _ready(client: EndpointClient, config: EndpointConfig, policy: RetryPolicy) -> None:
    try:
        await _get(client, "/health/ready", policy)
    except RequestFailure as failure:
        if failure.error_type == "not_found":
            return  # the server has no readiness route (vLLM); /models answered, good enough
        raise PreflightFailed(_describe(config, "/health/ready", failure)) from None


def _describe(config: EndpointConfig, route: str, failure: RequestFailure) -> str:
    url = f"{config.base_url}{route}"
    if failure.error_type == "auth":
        return (
            f"{url} rejected the credentials (HTTP {failure.http_status}); check the key in "
            f"${config.api_key_env}: {failure.message}"
        )
    if failure.error_type in ("connection", "timeout"):
        return f"cannot reach the endpoint at {url}: {failure.message}"
    detail = json.dumps(failure.message)[1:-1]
    return f"{url} is not ready (HTTP {failure.http_status}): {detail}"
