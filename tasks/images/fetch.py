"""Fetch ``http(s)://`` images client-side: one shared aiohttp session, bounded in time, size and hops.

Manifests may come from people we don't trust, so every hop (the URL and each redirect) is checked:
unless ``allow_private``, a host whose addresses include any loopback, private, link-local (the
169.254.169.254 metadata service too), unspecified, multicast or reserved address is refused before any
connection. Names are checked inside the connector's resolver, so the addresses checked are the
addresses connected to (no DNS rebinding); IP literals, which aiohttp never resolves, are checked
before each request. Environment proxies are not used (``trust_env=False``) and cookies are not kept.

Transient failures (connection errors, timeouts, 408, 429, 5xx) are retried through the run's
``tasks.retry.RetryPolicy``, honouring Retry-After; when retries run out the image fails as
``bad_image``. 404 and 410 are ``missing_image``; any other status is ``bad_image`` at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Callable
from types import TracebackType
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from tasks.config import ImageConfig
from tasks.errors import ImageFailure, ItemFailure
from tasks.retry import RetryPolicy, parse_retry_after

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
AddressFilter = Callable[[IPAddress], bool]

DEFAULT_TIMEOUT = 30.0  # seconds for one attempt: every hop, headers and body
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to get a connection (TCP and TLS) for one hop
DEFAULT_MAX_REDIRECTS = 5
DEFAULT_RETRY = RetryPolicy(max_retries=3, max_retry_after=60.0)  # a hostile Retry-After waits <= 60 s
CHUNK = 64 * 1024
REDIRECTS = frozenset({301, 302, 303, 307, 308})
HEADERS = {"User-Agent": "vlmbatch image fetch", "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NOT_FOUND_ERRNOS = frozenset(getattr(socket, n) for n in ("EAI_NONAME", "EAI_NODATA") if hasattr(socket, n))


def is_public_address(ip: IPAddress) -> bool:
    """True for a globally routable unicast address; IPv4 embedded in IPv6 is judged as IPv4."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public_address(embedded)
        if ip.is_site_local:
            return False
    flags = (
        ip.is_private,
        ip.is_loopback,
        ip.is_link_local,
        ip.is_unspecified,
        ip.is_multicast,
        ip.is_reserved,
    )
    return ip.is_global and not any(flags)


def display_url(url: str | URL, limit: int = 200) -> str:
    """A URL for messages: without user info, and the query (often a signature) elided."""
    try:
        parsed = url if isinstance(url, URL) else URL(url)
        shown = str(parsed.with_user(None).with_query(None).with_fragment(None))
        shown += "?…" if parsed.raw_query_string else ""
    except (ValueError, TypeError):
        shown = str(url)
    return shown if len(shown) <= limit else shown[:limit] + "…"


class BlockedAddressError(OSError):
    """A host resolved to an address the fetcher may not connect to (raised inside the resolver)."""

    def __init__(self, host: str, address: str) -> None:
        super().__init__(f"{host} resolves to a private address ({address})")
        self.host, self.address = host, address


class CheckingResolver(AbstractResolver):
    """Wraps a resolver and refuses a host if ANY of its addresses fails ``address_filter``."""

    def __init__(self, inner: AbstractResolver, address_filter: AddressFilter) -> None:
        self._inner = inner
        self._allowed = address_filter

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            try:
                allowed = self._allowed(ipaddress.ip_address(result["host"]))
            except ValueError:
                allowed = False  # fail closed on anything unparseable
            if not allowed:
                raise BlockedAddressError(host, result["host"])
        return results

    async def close(self) -> None:
        await self._inner.close()


class _Transient(ItemFailure):
    """One attempt failed in a way worth retrying; never leaves ImageFetcher.fetch."""


class ImageFetcher:
    """Fetches http(s) images for one run. Create it inside the event loop that uses it; ``aclose`` it.

    ``config.max_image_bytes`` caps each body. ``timeout`` bounds one attempt (all hops, headers and
    body), ``connect_timeout`` each connection. ``retry`` is the run's policy (default: 3 retries,
    Retry-After honoured up to 60 s).
    ``allow_private`` turns the address checks off (``--allow-private-urls``). ``resolver`` replaces
    the DNS resolver (default aiohttp's ThreadedResolver, ``loop.getaddrinfo``) and ``address_filter``
    the rule for which addresses may be connected to (default ``is_public_address``).
    """

    def __init__(
        self,
        config: ImageConfig,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        allow_private: bool = False,
        retry: RetryPolicy = DEFAULT_RETRY,
        resolver: AbstractResolver | None = None,
        address_filter: AddressFilter = is_public_address,
        max_connections: int = 64,
    ) -> None:
        self.max_bytes = config.max_image_bytes
        self.timeout = timeout
        self.max_redirects = max_redirects
        self.allow_private = allow_private
        self.retry = retry
        self._allowed = address_filter
        inner = resolver if resolver is not None else aiohttp.ThreadedResolver()
        self._resolver = inner if allow_private else CheckingResolver(inner, address_filter)
        connector = aiohttp.TCPConnector(resolver=self._resolver, limit=max_connections, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout),
            headers=HEADERS,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )

    async def __aenter__(self) -> ImageFetcher:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._session.close()
        await self._resolver.close()

    async def fetch(self, url: str) -> bytes:
        """The body of ``url``; raises ImageFailure (``bad_image`` or ``missing_image``)."""
        attempts = 0

        async def attempt() -> bytes:
            nonlocal attempts
            attempts += 1
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._follow(url)
            except TimeoutError as exc:
                detail = str(exc) if isinstance(exc, aiohttp.ServerTimeoutError) and str(exc) else ""
                raise _Transient("timeout", detail or f"timed out after {self.timeout:g} s") from None

        try:
            return await self.retry.call(attempt)
        except _Transient as exc:
            tries = f"{attempts} attempt{'s' if attempts != 1 else ''}"
            raise ImageFailure(
                "bad_image", f"fetching {display_url(url)} failed after {tries}: {exc.message}"
            ) from None

    async def _follow(self, url: str) -> bytes:
        shown = display_url(url)
        try:
            current = URL(url)
        except (ValueError, TypeError) as exc:
            raise ImageFailure("bad_image", f"invalid image URL {shown}: {exc}") from None
        seen = {current}
        for hop in range(self.max_redirects + 1):
            where = shown if hop == 0 else f"{shown} (redirected to {display_url(current)})"
            self._check_url(current, where)
            try:
                async with self._session.get(current, allow_redirects=False) as response:
                    if response.status not in REDIRECTS:
                        return await self._body(response, where)
                    location = response.headers.get("Location")
            except (ImageFailure, _Transient, TimeoutError):
                raise
            except Exception as exc:  # classified once, here
                raise _classify(exc, where) from None
            if not location:
                raise ImageFailure("bad_image", f"{where}: HTTP {response.status} without a Location header")
            try:
                target = current.join(URL(location))
            except (ValueError, TypeError) as exc:
                raise ImageFailure(
                    "bad_image", f"{where}: invalid redirect Location {location!r}: {exc}"
                ) from None
            if target in seen:
                raise ImageFailure(
                    "bad_image", f"{where}: redirect loop (back to {display_url(target)}, already visited)"
                )
            seen.add(target)
            current = target
        raise ImageFailure("bad_image", f"{shown}: too many redirects (more than {self.max_redirects})")

    def _check_url(self, url: URL, where: str) -> None:
        if url.scheme not in ("http", "https"):
            raise ImageFailure("bad_image", f"{where}: unsupported URL scheme {url.scheme or '(none)'}://")
        host = url.raw_host
        if not host:
            raise ImageFailure("bad_image", f"{where}: the URL has no host")
        if self.allow_private or not (":" in host or host.replace(".", "").isdigit()):
            return  # a name: the resolver checks every address it returns, at connection time
        try:  # aiohttp connects to IP literals without resolving them: check here
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            raise ImageFailure("bad_image", f"{where}: {host} is not a canonical IP address") from None
        if not self._allowed(address):
            raise ImageFailure("bad_image", _refusal(where, f"{host} resolves to a private address"))

    async def _body(self, response: aiohttp.ClientResponse, where: str) -> bytes:
        status = response.status
        if status not in (200, 203):
            raise _status_failure(status, response.reason, response.headers, where)
        cap = self.max_bytes
        declared = response.content_length
        if declared is not None and declared > cap:
            response.close()
            raise ImageFailure(
                "bad_image",
                f"image {where} is {declared:,} bytes (Content-Length), over the cap of {cap:,} bytes "
                "(max_image_bytes)",
            )
        body = bytearray()
        async for chunk in response.content.iter_chunked(CHUNK):
            body += chunk
            if len(body) > cap:
                response.close()  # stop here: the rest is never read
                raise ImageFailure(
                    "bad_image",
                    f"image {where} is over the cap of {cap:,} bytes (max_image_bytes); stopped reading "
                    f"after {len(body):,} bytes",
                )
        if not body:
            raise ImageFailure("bad_image", f"image {where} is empty (HTTP {status} with no body)")
        return bytes(body)


def _refusal(where: str, reason: str) -> str:
    return f"refusing to fetch {where}: {reason} (use --allow-private-urls)"


def _status_failure(status: int, reason: str | None, headers: Any, where: str) -> ItemFailure:
    text = f"HTTP {status}" + (f" {reason}" if reason else "")
    if status in (404, 410):
        return ImageFailure("missing_image", f"image {where} not found: {text}")
    retry_after = parse_retry_after(headers)
    if status == 408:
        return _Transient("timeout", text, http_status=status, retry_after=retry_after)
    if status == 429:
        return _Transient("rate_limited", text, http_status=status, retry_after=retry_after)
    if status >= 500:
        return _Transient("server_error", text, http_status=status, retry_after=retry_after)
    return ImageFailure("bad_image", f"cannot fetch image {where}: {text}")


def _classify(exc: BaseException, where: str) -> ItemFailure:
    """Map an aiohttp/OS failure of one hop to a terminal ImageFailure or a retryable _Transient."""
    chain: list[BaseException] = [exc]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None and nxt not in chain:
        chain.append(nxt)
    for cause in chain:
        if isinstance(cause, BlockedAddressError):
            return ImageFailure("bad_image", _refusal(where, str(cause)))
        if isinstance(cause, socket.gaierror) and cause.errno in _NOT_FOUND_ERRNOS:
            return ImageFailure("bad_image", f"cannot fetch image {where}: host not found ({cause.strerror})")
    detail = f"{type(exc).__name__}: {exc}"[:300]
    if isinstance(exc, aiohttp.InvalidURL | ValueError):
        return ImageFailure("bad_image", f"invalid image URL {where}: {detail}")
    if isinstance(exc, aiohttp.ClientSSLError):  # an invalid certificate does not fix itself
        return ImageFailure("bad_image", f"cannot fetch image {where}: TLS error: {detail}")
    if isinstance(exc, aiohttp.ClientResponseError):
        return _Transient("invalid_response", f"malformed HTTP response: {detail}")
    if isinstance(exc, aiohttp.ClientError | OSError):
        return _Transient("connection", f"connection failed: {detail}")
    return ImageFailure("bad_image", f"cannot fetch image {where}: {detail}")
