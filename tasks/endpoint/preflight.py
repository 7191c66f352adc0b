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
from tasks.endpoint.client import EndpointClient
from tasks.errors import RequestFailure
from tasks.retry import RetryPolicy
from tasks.stopping import StopSwitch

log = logging.getLogger(__name__)


class PreflightFailed(Exception):
    """The endpoint is unusable; nothing was sent."""


class PreflightStopped(Exception):
    """A signal came while the preflight waited for the endpoint; nothing was sent."""


async def preflight(
    config: EndpointConfig,
    key: str | None = None,
    policy: RetryPolicy | None = None,
    stop: StopSwitch | None = None,
) -> list[str]:
    """Check the endpoint; returns the models it serves (empty if it has no model list). ``stop``: a
    set switch ends the waiting (PreflightStopped)."""
    if policy is None:
        policy = RetryPolicy() if stop is None else RetryPolicy(sleep=stop.sleep)
    getter = _Getter(EndpointClient(config, key), policy, stop)
    try:
        models = await _models(getter, config)
        await _ready(getter, config)
    finally:
        await getter.client.aclose()
    if models and config.model not in models:
        raise PreflightFailed(
            f"{config.base_url} does not serve the model {config.model!r}; it serves: {', '.join(models)}"
        )
    return models


class _Getter:
    """The preflight's GETs: transient failures retried until one deadline for all of them,
    ``--outage-window`` seconds after the first; a warning the first time it waits."""

    def __init__(self, client: EndpointClient, policy: RetryPolicy, stop: StopSwitch | None) -> None:
        self.client, self.policy, self.stop = client, policy, stop
        self.window = client.config.outage_window
        self.started = time.monotonic()
        self.told = False

    async def get(self, path: str) -> object:
        def waiting(state: RetryCallState) -> None:
            if not self.told and state.outcome is not None:
                self.told = True
                log.warning(
                    "preflight: %s%s: %s; trying again for up to %g s (--outage-window)",
                    self.client.config.base_url,
                    path,
                    state.outcome.exception(),
                    self.window,
                )

        async def attempt() -> object:
            if self.stop is not None and self.stop.is_set:
                raise PreflightStopped
            return await self.client.get_json(path)

        left = max(0.0, self.started + self.window - time.monotonic())
        try:
            return await self.policy.call_within(left, attempt, waiting)
        except RequestFailure as failure:
            if self.told:
                failure.message += f" (after {time.monotonic() - self.started:.0f} s of trying)"
            raise


async def _models(getter: _Getter, config: EndpointConfig) -> list[str]:
    try:
        content = await getter.get("/models")
    except RequestFailure as failure:
        if failure.error_type != "not_found":
            raise PreflightFailed(_describe(config, "/models", failure)) from None
        if await _answers_under_v1(getter.client, config):
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


async def _ready(getter: _Getter, config: EndpointConfig) -> None:
    try:
        await getter.get("/health/ready")
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
