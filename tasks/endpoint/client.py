"""The endpoint client: one attempt at a request, its answer parsed, its failure classified once.

The wire is tasks.endpoint.transport: bare aiohttp POSTs of the built body on one shared session (no SDK:
the openai SDK's request building and httpx models cost 1–2 ms of CPU per request, the client's whole
budget; bench/README.md). Nothing here retries: tasks.retry is the only retry layer. The API key is
read from the environment variable the config names (or a Prefect Secret block), handed to the
transport and never stored in config, rows, logs, messages or reprs.
"""

from __future__ import annotations

import html
import os
import re
import time
from typing import Any

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError

from tasks.config import EndpointConfig
from tasks.endpoint.answers import Answer, StreamAggregator, parse_chat_answer, parse_responses_answer
from tasks.endpoint.requests import Request
from tasks.endpoint.transport import HttpTransport, decode_error_body, lines
from tasks.errors import RequestFailure
from tasks.retry import parse_retry_after

AZURE_STATUS_HEADER = "ms-azureml-model-error-statuscode"
MAX_MESSAGE = 500
ROUTES = {"chat": "/chat/completions", "responses": "/responses"}


def api_key(config: EndpointConfig) -> str | None:
    """The key of the (first) replica: from its variable, unset or empty meaning none."""
    return os.environ.get(config.api_key_envs[0]) or None


def api_keys(config: EndpointConfig, key: str | None = None) -> list[str | None]:
    """Each replica's key, aligned with ``config.base_urls``: ``key`` for all of them when given (a
    Prefect Secret block's), else each one's own variable."""
    if key is not None:
        return [key] * len(config.base_urls)
    return [os.environ.get(name) or None for name in config.api_key_envs]


class EndpointClient:
    """Sends single attempts to one base URL (the config's, or a replica's ``base_url``) on one shared
    connection pool (opened on first use). Without ``base_url``, a ``key`` of None means the config's
    variable's; with it, ``key`` is that replica's own (None: no key)."""

    def __init__(
        self, config: EndpointConfig, key: str | None = None, *, base_url: str | None = None
    ) -> None:
        self.config = config
        key = key if key is not None or base_url is not None else api_key(config)
        self._secret = key
        self.base_url = base_url or config.base_urls[0]
        self._http = HttpTransport(
            self.base_url, key=key, timeout=config.request_timeout, connections=config.in_flight_cap
        )

    def __repr__(self) -> str:
        return f"EndpointClient({self._http!r})"

    async def aclose(self) -> None:
        await self._http.aclose()

    async def send(self, request: Request, *, request_id: str) -> Answer:
        """One attempt: Chat Completions (streamed or not) or Responses. Raises RequestFailure, classified,
        with the attempt's ``latency_ms``."""
        started = time.perf_counter()
        try:
            return await self._send(request, request_id, started)
        except RequestFailure as failure:
            failure.latency_ms = (time.perf_counter() - started) * 1000
            raise

    async def _send(self, request: Request, request_id: str, started: float) -> Answer:
        route = ROUTES[request.api]
        try:
            if request.api == "chat" and request.body.get("stream"):
                return await self._stream(route, request.body, request_id, started)
            status, headers, content = await self._http.post(route, request.body, request_id)
        except Exception as exc:  # classified once, here
            raise self.classify(exc) from None
        if not 200 <= status < 300:
            raise self._redact(classify_status(status, headers, decode_error_body(content)))
        parse = parse_responses_answer if request.api == "responses" else parse_chat_answer
        try:
            return parse(content, status=status, latency_ms=(time.perf_counter() - started) * 1000)
        except RequestFailure as failure:  # it quotes the body, which may echo the key
            raise self._redact(failure) from None

    async def _stream(self, route: str, body: dict[str, Any], request_id: str, started: float) -> Answer:
        async with self._http.stream(route, body, request_id) as response:
            status = response.status
            if not 200 <= status < 300:
                content = await response.read()
                raise classify_status(status, response.headers, decode_error_body(content))
            aggregate = StreamAggregator()
            async for line in lines(response):
                aggregate.feed(line)
        return aggregate.answer(status=status, latency_ms=(time.perf_counter() - started) * 1000)

    async def get_json(self, path: str) -> object:
        """GET a JSON route under the base URL (one attempt, classified failures); text if not JSON."""
        try:
            status, headers, content = await self._http.get(path)
        except Exception as exc:
            raise self.classify(exc) from None
        body = decode_error_body(content)
        if not 200 <= status < 300:
            raise self._redact(classify_status(status, headers, body))
        return body

    def classify(self, exc: BaseException) -> RequestFailure:
        return self._redact(classify(exc))

    def _redact(self, failure: RequestFailure) -> RequestFailure:
        failure.message = redact(failure.message, self._secret)
        return failure


PARTIAL_MIN = 4  # a message ending in this many of the key's first characters may be a key cut short
PARTIAL_ANYWHERE = 8  # this many of them anywhere is taken for the key, cut where the quote was cut
CLOSERS = "'\"`)]}>.… \n"  # what may follow a cut: a closing quote (``!r``), bracket or ellipsis


def redact(message: str, secret: str | None) -> str:
    """``message`` without ``secret``: every whole occurrence, every start of it of 8 characters or
    more (a quote of the key cut short inside the message), and a shorter start of it left at the end
    by a message cut to length (closing quotes and brackets after the cut allowed)."""
    if not secret:
        return message
    message = message.replace(secret, "***")
    head = secret[:PARTIAL_ANYWHERE]
    if len(secret) > PARTIAL_ANYWHERE:
        start = message.find(head)
        while start >= 0:
            end = start + len(head)
            while end - start < len(secret) and end < len(message) and message[end] == secret[end - start]:
                end += 1
            message = message[:start] + "***" + message[end:]
            start = message.find(head, start + 3)
    body = message.rstrip(CLOSERS)
    for size in range(min(len(secret) - 1, len(body)), PARTIAL_MIN - 1, -1):
        if body.endswith(secret[:size]):
            return body[:-size] + "***" + message[len(body) :]
    return message


def classify(exc: BaseException) -> RequestFailure:
    """Map an exception from one attempt to the contract's error_type (README.md, "Error types")."""
    if isinstance(exc, RequestFailure):
        return exc
    if isinstance(exc, TimeoutError):  # aiohttp's total, connect and read timeouts are TimeoutErrors
        root = _root_cause(exc)
        if isinstance(root, ConnectionError | aiohttp.ClientConnectionError) and not isinstance(
            root, TimeoutError
        ):
            return RequestFailure("connection", f"could not reach the endpoint: {root}"[:MAX_MESSAGE])
        return RequestFailure("timeout", "the request timed out")
    if isinstance(exc, aiohttp.ClientError | OSError):
        # refused, reset, disconnected, a body cut short, a garbled response: the innermost cause
        # (the OSError under aiohttp's wrapper) says what happened
        root = _root_cause(exc)
        if isinstance(root, HttpProcessingError):  # its str reads "400, message: ..." (aiohttp's own code)
            return RequestFailure(
                "connection", f"the answer was cut short or garbled: {root.message}"[:MAX_MESSAGE]
            )
        return RequestFailure("connection", f"could not reach the endpoint: {root}"[:MAX_MESSAGE])
    return RequestFailure("invalid_response", f"{type(exc).__name__}: {exc}"[:MAX_MESSAGE])


def _root_cause(exc: BaseException) -> BaseException:
    seen = {id(exc)}
    while (nxt := exc.__cause__ or exc.__context__) is not None and id(nxt) not in seen:
        seen.add(id(nxt))
        exc = nxt
    return exc


def classify_status(status: int, headers: Any, body: object) -> RequestFailure:
    message = error_message(body)
    message = (
        f"HTTP {status}"
        if not message
        else message
        if isinstance(body, dict)
        else f"HTTP {status}: {message}"
    )
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
    elif effective < 400:  # a redirect (never followed: it would resend the body and the key elsewhere)
        error_type = "bad_request"
        where = headers.get("Location")
        message = (
            f"HTTP {status} redirect{f' to {where}' if where else ''}: set --base-url to where it points"
        )
    elif effective == 408:
        error_type = "timeout"
    elif effective == 429:
        error_type = "rate_limited"
    else:  # 409 and 5xx: the server's trouble, worth another try
        error_type = "server_error"
    return RequestFailure(error_type, message[:MAX_MESSAGE], http_status=status, retry_after=retry_after)


def error_message(body: object) -> str | None:
    """The message of a nested (OpenAI), flat (old vLLM, gateways), FastAPI (``detail``: a string, or a
    list of field errors), HTML or plain-text error body."""
    if isinstance(body, dict):
        if "error" not in body and "message" not in body and "detail" in body:
            return _detail(body["detail"])
        inner = body.get("error", body)
        if isinstance(inner, dict):
            msg = inner.get("message")
            return str(msg) if msg is not None else None
        return str(inner)
    if isinstance(body, str | bytes):
        text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
        if _HTML.match(text):  # a proxy's error page: its title, or its text without the markup
            title = _TITLE.search(text)
            text = html.unescape(title.group(1) if title else _TAG.sub(" ", text))
        return " ".join(text.split()) or None
    return None


_HTML = re.compile(r"\s*<(!doctype html|html|head|body)\b", re.IGNORECASE)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def _detail(detail: object) -> str | None:
    if isinstance(detail, list):  # FastAPI's validation errors: [{"loc": [...], "msg": ...}, ...]
        parts = [
            f"{'.'.join(map(str, d.get('loc', ())))}: {d.get('msg')}" if isinstance(d, dict) else str(d)
            for d in detail
        ]
        return "; ".join(parts) or None
    return str(detail) if detail is not None else None
