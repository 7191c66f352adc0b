"""Before a run sends any work: is the endpoint there, ready, and serving the model?

``GET {base}/models`` (is the model listed? name the ones that are) and ``GET {base}/health/ready``
where the server has it (NIM does; a 404 means it doesn't, which is fine). An endpoint that cannot be
reached, rejects the credentials or lacks the model stops the run with exit 3 before anything is sent.
"""

from __future__ import annotations

import json
from typing import Any

from tasks.config import EndpointConfig
from tasks.endpoint import EndpointClient
from tasks.errors import RequestFailure


class PreflightFailed(Exception):
    """The endpoint is unusable; nothing was sent."""


async def preflight(config: EndpointConfig, key: str | None = None) -> list[str]:
    """Check the endpoint; returns the models it serves (empty if it has no model list)."""
    client = EndpointClient(config, key)
    try:
        models = await _models(client, config)
        await _ready(client, config)
    finally:
        await client.aclose()
    if models and config.model not in models:
        raise PreflightFailed(
            f"{config.base_url} does not serve the model {config.model!r}; it serves: {', '.join(models)}"
        )
    return models


async def _models(client: EndpointClient, config: EndpointConfig) -> list[str]:
    try:
        content = await client.get_json("/models")
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


async def _ready(client: EndpointClient, config: EndpointConfig) -> None:
    try:
        await client.get_json("/health/ready")
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
