"""Before a run sends any work: is the endpoint there, ready, and serving the model?

``GET {base}/models`` (is the model listed? name the ones that are) and ``GET {base}/health/ready``
where the server has it (NIM does; a 404 means it doesn't, which is fine). An endpoint that rejects
the credentials or lacks the model stops the run with exit 3 before anything is sent; so does one that
stays unreachable or busy (refused, timed out, 408, 429, 5xx: NIM answers 503 while its model loads)
for ``--outage-window`` seconds, retried meanwhile as the run itself would: a nightly run that starts
during a restart or a gateway's blip goes on.

With several replicas (``preflight_replicas``) every one is checked at once. One that rejects the
credentials, lacks the model or the route is dropped with a warning naming it; one still unreachable or
busy when another is ready does not hold the run up: it starts set aside, and the router
(tasks/endpoint/replicas.py) checks it again in the background and sends to it once it answers. Only
when no replica is usable does the run stop (exit 3), naming each one and why.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tenacity import RetryCallState

from tasks.config import EndpointConfig, public_url
from tasks.endpoint.client import EndpointClient
from tasks.errors import RequestFailure
from tasks.retry import RetryPolicy
from tasks.stopping import StopSwitch

log = logging.getLogger(__name__)
POLL_S = 0.1  # how often several replicas' checks are looked at while some still wait


class PreflightFailed(Exception):
    """The endpoint (a replica) is unusable; nothing was sent. ``transient``: it was unreachable or busy,
    and may answer later; otherwise it said no (credentials, model, route)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass
class PreflightResult:
    """Where each replica's base URL stands before the run sends anything."""

    ready: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)  # unreachable or busy so far: set aside, probed
    dropped: dict[str, str] = field(default_factory=dict)  # base URL → why it is out of the run


class PreflightStopped(Exception):
    """A signal came while the preflight waited for the endpoint; nothing was sent."""


async def preflight(
    config: EndpointConfig,
    key: str | None = None,
    policy: RetryPolicy | None = None,
    stop: StopSwitch | None = None,
    *,
    base_url: str | None = None,
    window: float | None = None,
    on_wait: Callable[[], None] | None = None,
) -> list[str]:
    """Check the endpoint (or the replica at ``base_url``); returns the models it serves (empty if it
    has no model list). ``stop``: a set switch ends the waiting (PreflightStopped). ``window``: how long
    to keep trying (default ``--outage-window``; 0: once); ``on_wait`` is called when it first waits."""
    if policy is None:
        policy = RetryPolicy() if stop is None else RetryPolicy(sleep=stop.sleep)
    client = EndpointClient(config, key, base_url=base_url)
    getter = _Getter(client, policy, stop, config.outage_window if window is None else window, on_wait)
    try:
        models = await _models(getter, config)
        await _ready(getter, config)
    finally:
        await getter.client.aclose()
    if models and config.model not in models:
        raise PreflightFailed(
            f"{getter.url} does not serve the model {config.model!r}; it serves: {', '.join(models)}"
        )
    return models


async def preflight_replicas(
    config: EndpointConfig,
    keys: Sequence[str | None],
    stop: StopSwitch | None = None,
    policy: RetryPolicy | None = None,
) -> PreflightResult:
    """Check every replica at once (keys aligned with ``config.base_urls``). The run may start once one
    is ready and each other one has either answered or been found unreachable or busy (those wait,
    set aside); PreflightFailed when none is usable."""
    urls = config.base_urls
    if len(urls) == 1:  # one endpoint: exactly the preflight it always had
        await preflight(config, keys[0], policy, stop)
        return PreflightResult(ready=[urls[0]])
    waited: set[str] = set()
    checks = {
        asyncio.ensure_future(
            preflight(config, key, policy, stop, base_url=url, on_wait=lambda url=url: waited.add(url))  # type: ignore[misc]
        ): url
        for url, key in zip(urls, keys, strict=True)
    }
    result = PreflightResult()
    unreachable: dict[str, str] = {}
    pending = set(checks)
    try:
        while pending:
            done, pending = await asyncio.wait(pending, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
            for check in done:
                url = checks[check]
                try:
                    check.result()
                except PreflightFailed as exc:
                    if exc.transient:
                        unreachable[url] = str(exc)
                    else:
                        result.dropped[url] = str(exc)
                        log.warning("preflight: replica %s is left out of this run: %s", public_url(url), exc)
                else:
                    result.ready.append(url)
            if result.ready and all(checks[c] in waited for c in pending):
                break  # the run can start: the others are unreachable or busy for now
    finally:
        for check in pending:
            check.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    if not result.ready:
        reasons = {**result.dropped, **unreachable}
        raise PreflightFailed(
            "no replica is usable: "
            + "; ".join(f"{public_url(u)}: {reasons[u]}" for u in urls if u in reasons)
        )
    for url in urls:
        if url in unreachable or any(checks[c] == url for c in pending):
            result.waiting.append(url)
            log.warning(
                "preflight: replica %s is not ready yet: the run starts without it and sends to it once it "
                "answers",
                public_url(url),
            )
    result.ready.sort(key=urls.index)
    return result


class _Getter:
    """The preflight's GETs: transient failures retried until one deadline for all of them, ``window``
    seconds after the first (``--outage-window``); a warning the first time it waits."""

    def __init__(
        self,
        client: EndpointClient,
        policy: RetryPolicy,
        stop: StopSwitch | None,
        window: float,
        on_wait: Callable[[], None] | None = None,
    ) -> None:
        self.client, self.policy, self.stop = client, policy, stop
        self.url = public_url(client.base_url)
        self.window = window
        self.on_wait = on_wait
        self.started = time.monotonic()
        self.told = False

    async def get(self, path: str) -> object:
        def waiting(state: RetryCallState) -> None:
            if not self.told and state.outcome is not None:
                self.told = True
                if self.on_wait is not None:
                    self.on_wait()
                log.warning(
                    "preflight: %s%s: %s; trying again for up to %g s (--outage-window)",
                    self.url,
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
            raise _failed(getter, config, "/models", failure) from None
        if await _answers_under_v1(getter.client):
            raise PreflightFailed(
                f"{getter.url}/models answered 404, and {getter.url}/v1/models answers: "
                f"the base URL lacks its /v1; use --base-url {getter.url}/v1"
            ) from None
        return []  # a gateway without a model list: the first requests will tell
    data: Any = content.get("data") if isinstance(content, dict) else None
    if not isinstance(data, list):
        return []
    return [str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")]


async def _answers_under_v1(client: EndpointClient) -> bool:
    """Whether the model list is one ``/v1`` further down (the commonest base URL mistake)."""
    if client.base_url.rstrip("/").endswith("/v1"):
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
        raise _failed(getter, config, "/health/ready", failure) from None


def _failed(getter: _Getter, config: EndpointConfig, route: str, failure: RequestFailure) -> PreflightFailed:
    return PreflightFailed(_describe(getter, config, route, failure), transient=failure.retryable)


def _describe(getter: _Getter, config: EndpointConfig, route: str, failure: RequestFailure) -> str:
    url = f"{getter.url}{route}"
    if failure.error_type == "auth":
        urls, base = config.base_urls, getter.client.base_url
        variable = config.api_key_envs[urls.index(base) if base in urls else 0]
        return (
            f"{url} rejected the credentials (HTTP {failure.http_status}); check the key in "
            f"${variable}: {failure.message}"
        )
    if failure.error_type in ("connection", "timeout"):
        return f"cannot reach the endpoint at {url}: {failure.message}"
    detail = json.dumps(failure.message)[1:-1]
    return f"{url} is not ready (HTTP {failure.http_status}): {detail}"
