"""The endpoint's wire: one shared ``aiohttp.ClientSession``, bare JSON POSTs and GETs, no SDK in between.

One session per client, created on first use inside the running event loop, with a keep-alive
connection pool sized to the run's concurrency (a request slot always finds a pooled connection). The
body is encoded by orjson (tasks/endpoint/json_body.py: C, UTF-8, about ten times faster than ``json``) and
written in pieces, a large image's bytes as one of them, never joined into a copy; the answer comes
back as bytes for tasks.endpoint.answers to parse. This module never interprets a
status and never retries: tasks/endpoint/client.py classifies, tasks.retry retries.

The API key lives only in the session's default ``Authorization`` header (sent only when a key is set)
and is never part of a repr, a message or a log line; nor is a base URL's ``user:password@``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson
from multidict import CIMultiDictProxy
from yarl import URL

from tasks.config import public_url
from tasks.endpoint.json_body import encode_body

USER_AGENT = "vlmbatch"
GET_TIMEOUT = 30.0  # seconds, for preflight's small GETs


def json_payload(body: Mapping[str, Any], headers: dict[str, str]) -> bytes | AsyncIterator[bytes]:
    """``body`` as the ``data`` of a POST: its bytes, or its pieces (tasks/endpoint/json_body.py) with their
    total in ``headers`` as Content-Length, so that aiohttp writes them one after another as they are."""
    pieces = encode_body(body)
    if len(pieces) == 1:
        return pieces[0]
    headers["Content-Length"] = str(sum(len(piece) for piece in pieces))
    return _one_by_one(pieces)


async def _one_by_one(pieces: Iterable[bytes]) -> AsyncIterator[bytes]:
    for piece in pieces:
        yield piece


def decode_error_body(content: bytes) -> object:
    """An error response's body: its JSON when it parses, else its text (None when empty)."""
    if not content.strip():
        return None
    try:
        return orjson.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")


def _loopback(host: str | None) -> bool:
    if host is None or host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
        return f"HttpTransport({public_url(self.base_url)!r}, {key}, {self._connections} connections)"

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
                connector=connector,
                headers=headers,
                timeout=self._timeout,
                raise_for_status=False,
                # HTTP(S)_PROXY / NO_PROXY as the openai SDK takes them, but never for a loopback
                # endpoint (an emulator, an SSH tunnel), which no proxy can reach
                trust_env=not _loopback(URL(self.base_url).host),
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
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        data = json_payload(body, headers)
        async with self.session().post(
            self.url(path), data=data, headers=headers, allow_redirects=False
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
        data = json_payload(body, headers)
        async with self.session().post(
            self.url(path), data=data, headers=headers, allow_redirects=False
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
