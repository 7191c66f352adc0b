"""The endpoint client: one attempt at a request, its answer parsed, its failure classified once.

One ``AsyncOpenAI`` per run, on the aiohttp transport, with the SDK's own retries off
(``max_retries=0``): tasks.retry is the only retry layer. The API key is read from the environment
variable the config names, handed to the SDK and never stored in config, rows, logs or messages.
"""

from __future__ import annotations

import asyncio
import os
import time
from email.utils import parsedate_to_datetime
from typing import Any

import aiohttp
import openai
from openai import AsyncOpenAI, DefaultAioHttpClient

from tasks.answers import Answer, StreamAggregator, parse_chat_answer, parse_responses_answer
from tasks.config import EndpointConfig
from tasks.errors import ConfigError, RequestFailure
from tasks.requests import Request

NO_KEY = "EMPTY"  # what vLLM's docs send when the server has no key
AZURE_STATUS_HEADER = "ms-azureml-model-error-statuscode"
MAX_MESSAGE = 500


def api_key(config: EndpointConfig) -> str | None:
    return os.environ.get(config.api_key_env) or None


async def load_api_key(config: EndpointConfig) -> str | None:
    """The key: from the Prefect Secret block --api-key-secret names, else from --api-key-env's variable."""
    if config.api_key_secret is None:
        return api_key(config)
    from prefect.blocks.system import Secret

    try:
        block: Secret[str] = await Secret.aload(config.api_key_secret)
    except ValueError as exc:
        raise ConfigError(
            f"--api-key-secret: no Prefect Secret block named {config.api_key_secret!r} ({exc})"
        ) from None
    value = block.get()
    return str(value) if value else None


class EndpointClient:
    """Sends single attempts to the endpoint; create inside the event loop that uses it."""

    def __init__(self, config: EndpointConfig, key: str | None = None) -> None:
        self.config = config
        key = key if key is not None else api_key(config)
        self._secret = key
        self._client = AsyncOpenAI(
            base_url=config.base_url,
            api_key=key or NO_KEY,
            max_retries=0,
            timeout=config.request_timeout,
            http_client=DefaultAioHttpClient(timeout=config.request_timeout),
        )

    async def aclose(self) -> None:
        await self._client.close()

    async def send(self, request: Request, *, request_id: str) -> Answer:
        """One attempt: Chat Completions (streamed or not) or Responses. Raises RequestFailure, classified."""
        fields = dict(request.body)
        model = fields.pop("model")
        headers = {"X-Request-Id": request_id}
        started = time.perf_counter()
        raw: Any
        try:
            async with asyncio.timeout(self.config.request_timeout + 5):
                # The body goes as built, in extra_body: the server, not the SDK, validates it, and the SDK's
                # type-driven transform of typed arguments (which walks every message and base64 image) is
                # skipped: it was half of the client's time per request (bench/README.md).
                if request.api == "responses":
                    raw = await self._client.responses.with_raw_response.create(
                        model=model, input=[], extra_body=fields, extra_headers=headers
                    )
                    parse = parse_responses_answer
                elif fields.get("stream"):
                    return await self._stream(model, fields, headers, started)
                else:
                    raw = await self._client.chat.completions.with_raw_response.create(
                        model=model, messages=[], extra_body=fields, extra_headers=headers
                    )
                    parse = parse_chat_answer
                content = raw.content  # read in full by the transport
        except RequestFailure:
            raise
        except Exception as exc:  # classified once, here
            raise self.classify(exc) from None
        return parse(content, status=raw.status_code, latency_ms=(time.perf_counter() - started) * 1000)

    async def _stream(
        self, model: str, fields: dict[str, Any], headers: dict[str, str], started: float
    ) -> Answer:
        fields.pop("stream", None)
        stream = self._client.chat.completions.with_streaming_response.create(
            model=model,
            messages=[],
            stream=True,
            extra_body=fields,
            extra_headers=headers,
        )
        aggregate = StreamAggregator()
        async with stream as response:
            async for line in response.iter_lines():
                aggregate.feed(line)
            status = response.status_code
        return aggregate.answer(status=status, latency_ms=(time.perf_counter() - started) * 1000)

    async def get_json(self, path: str) -> object:
        """GET a JSON route under the base URL (one attempt, classified failures)."""
        try:
            async with asyncio.timeout(min(self.config.request_timeout, 30) + 5):
                return await self._client.get(path, cast_to=object, options={"timeout": 30})
        except Exception as exc:
            raise self.classify(exc) from None

    def classify(self, exc: BaseException) -> RequestFailure:
        failure = classify(exc)
        if self._secret and self._secret in failure.message:
            failure.message = failure.message.replace(self._secret, "***")
        return failure


def classify(exc: BaseException) -> RequestFailure:
    """Map an exception from one attempt to the contract's error_type (CONTRACT.md §2)."""
    if isinstance(exc, RequestFailure):
        return exc
    if isinstance(exc, openai.APIConnectionError | TimeoutError):
        # The transports wrap and sometimes mislabel (aiohttp's refused connection arrives as a
        # ConnectTimeout): the innermost cause says what happened.
        root = _root_cause(exc)
        if isinstance(root, ConnectionError | aiohttp.ClientConnectionError) and not isinstance(
            root, aiohttp.ServerTimeoutError
        ):
            return RequestFailure("connection", f"could not reach the endpoint: {root}"[:MAX_MESSAGE])
        if isinstance(exc, openai.APITimeoutError | TimeoutError) or isinstance(root, TimeoutError):
            return RequestFailure("timeout", "the request timed out")
        return RequestFailure("connection", f"could not reach the endpoint: {root}"[:MAX_MESSAGE])
    if isinstance(exc, openai.APIStatusError):
        return classify_status(exc.status_code, exc.response.headers, exc.body)
    return RequestFailure("invalid_response", f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE])


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def classify_status(status: int, headers: Any, body: object) -> RequestFailure:
    message = error_message(body) or f"HTTP {status}"
    retry_after = parse_retry_after(headers)
    effective = status
    if status == 424:  # Azure ML: the container answered non-200; the original status is in a header
        try:
            effective = int(headers.get(AZURE_STATUS_HEADER, ""))
            message = f"model container answered {effective} (via the gateway's 424): {message}"
        except ValueError:
            effective = 502
    if effective in (400, 413, 422) or (
        400 <= effective < 500 and effective not in (401, 403, 404, 408, 409, 429)
    ):
        error_type = "bad_request"
    elif effective in (401, 403):
        error_type = "auth"
    elif effective == 404:
        error_type = "not_found"
    elif effective == 408:
        error_type = "timeout"
    elif effective == 429:
        error_type = "rate_limited"
    else:  # 409 and 5xx: the server's trouble, worth another try
        error_type = "server_error"
    return RequestFailure(error_type, message[:MAX_MESSAGE], http_status=status, retry_after=retry_after)


def error_message(body: object) -> str | None:
    """The message of a nested, flat or plain-string error body."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            msg = inner.get("message")
            return str(msg) if msg is not None else None
        return str(inner)
    if isinstance(body, str | bytes):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        return text.strip() or None
    return None


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date)."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(raw).timestamp() - time.time())
    except (TypeError, ValueError, IndexError):
        return None
