"""The endpoint's wire: one shared ``aiohttp.ClientSession``, bare JSON POSTs and GETs, no SDK in between.

One session per client, created on first use inside the running event loop, with a keep-alive
connection pool sized to the run's concurrency (a request slot always finds a pooled connection). The
body is encoded once, by orjson (C, UTF-8, about ten times faster than ``json`` on bodies holding base64
images); the answer comes back as bytes for tasks.answers to parse. This module never interprets a
status and never retries: tasks.endpoint classifies, tasks.retry retries.

The API key lives only in the session's default ``Authorization`` header (sent only when a key is set)
and is never part of a repr, a message or a log line.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

USER_AGENT = "vlmbatch"
GET_TIMEOUT = 30.0  # seconds, for preflight's small GETs


def encode_json(body: Mapping[str, Any]) -> bytes:
    """The request body as UTF-8 JSON (orjson; ``json`` for what orjson refuses, e.g. ints over 64 bits)."""
    try:
        return orjson.dumps(body)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return json.dumps(body, ensure_ascii=False).encode()


def decode_error_body(content: bytes) -> object:
    """An error response's body: its JSON when it parses, else its text (None when empty)."""
    if not content.strip():
        return None
    try:
        return orjson.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")


class HttpTransport:
    """Bare HTTP to ``base_url``: ``post`` (read in full), ``stream`` (SSE lines) and ``get``."""

    def __init__(self, base_url: str, *, key: str | None, timeout: float, connections: int) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = key
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._get_timeout = aiohttp.ClientTimeout(total=min(timeout, GET_TIMEOUT))
        self._connections = max(1, connections)
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, URL] = {}

    def __repr__(self) -> str:
        key = "a key" if self._key else "no key"
        return f"HttpTransport({self.base_url!r}, {key}, {self._connections} connections)"

    def url(self, path: str) -> URL:
        """``base_url`` + ``path`` (``/chat/completions``), parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = URL(self.base_url + "/" + path.lstrip("/"))
        return url

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
            if self._key:
                headers["Authorization"] = f"Bearer {self._key}"
            connector = aiohttp.TCPConnector(limit=self._connections, limit_per_host=0)
            self._session = aiohttp.ClientSession(
                connector=connector, headers=headers, timeout=self._timeout, raise_for_status=False
            )
        return self._session

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, path: str, body: Mapping[str, Any], request_id: str
    ) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """POST ``body`` as JSON; the status, headers and the whole response body."""
        async with self.session().post(
            self.url(path),
            data=encode_json(body),
            headers={"Content-Type": "application/json", "X-Request-Id": request_id},
            allow_redirects=False,
        ) as response:
            return response.status, response.headers, await response.read()

    @asynccontextmanager
    async def stream(
        self, path: str, body: Mapping[str, Any], request_id: str
    ) -> AsyncIterator[aiohttp.ClientResponse]:
        """POST ``body`` as JSON for a server-sent event stream; read it with ``lines(response)``."""
        headers = {
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            "X-Request-Id": request_id,
        }
        async with self.session().post(
            self.url(path), data=encode_json(body), headers=headers, allow_redirects=False
        ) as response:
            yield response

    async def get(self, path: str) -> tuple[int, CIMultiDictProxy[str], bytes]:
        """GET ``path`` under the base URL (a shorter timeout: these are preflight's small routes)."""
        async with self.session().get(
            self.url(path), timeout=self._get_timeout, allow_redirects=False
        ) as response:
            return response.status, response.headers, await response.read()


async def lines(response: aiohttp.ClientResponse) -> AsyncIterator[str]:
    """The lines of a streamed body, decoded, without their ``\\n``, ``\\r\\n`` or ``\\r`` ends."""
    pending = b""
    async for chunk in response.content.iter_any():
        pending += chunk
        if b"\r" in pending:
            # a CR ending a chunk may be the first half of a CRLF: keep it for the next chunk
            keep = pending.endswith(b"\r")
            pending = pending.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if keep:
                pending = pending[:-1] + b"\r"
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode("utf-8", "replace")
    if pending:
        yield pending.rstrip(b"\r").decode("utf-8", "replace")
