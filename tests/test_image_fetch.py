"""Tests for tasks.images.fetch against a local aiohttp server on 127.0.0.1 (never any other address)."""

from __future__ import annotations

import asyncio
import io
import ipaddress
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from PIL import Image

from tasks.config import ImageConfig
from tasks.errors import ImageFailure
from tasks.images.fetch import ImageFetcher, display_url, is_public_address
from tasks.images.prepare import prepare_image
from tasks.retry import RetryPolicy

LOOPBACK = "127.0.0.1"
HUGE = 256 * 1024 * 1024  # what the huge endpoint would send if nobody stopped reading
SMALL_CAP = ImageConfig(max_image_bytes=100_000)


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").resize((64, 48)).convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


JPEG = _jpeg()


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every socket connect in these tests goes to 127.0.0.1; anything else is stopped and recorded."""
    refused: list[Any] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex

    def check(address: Any) -> None:
        if not (isinstance(address, tuple) and address[0] == LOOPBACK):
            refused.append(address)
            raise PermissionError(f"test guard: no connection to {address!r}")

    def connect(self: socket.socket, address: Any) -> None:
        check(address)
        real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> int:
        check(address)
        return real_connect_ex(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield refused
    assert refused == [], "a connection to a non-loopback address was attempted"


@dataclass
class Server:
    port: int = 0
    hits: Counter[str] = field(default_factory=Counter)
    written: dict[str, int] = field(default_factory=dict)
    finished: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str, host: str = LOOPBACK) -> str:
        return f"http://{host}:{self.port}{path}"


def _app(server: Server) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        path = request.path
        server.hits[path] += 1
        hits = server.hits[path]
        if path == "/good.jpg":
            return web.Response(body=JPEG, content_type="image/jpeg")
        if path == "/slow":
            await asyncio.sleep(5)
            return web.Response(body=JPEG, content_type="image/jpeg")
        if path.startswith("/chain/"):
            left = int(path.rsplit("/", 1)[1])
            if left == 0:
                return web.Response(body=JPEG, content_type="image/jpeg")
            raise web.HTTPFound(str(left - 1))  # relative: resolved against the current URL
        if path in ("/loop/a", "/loop/b"):
            raise web.HTTPFound("/loop/b" if path == "/loop/a" else "/loop/a")
        if path == "/redirect":
            raise web.HTTPFound(request.query["to"])
        if path == "/flaky" and hits == 1:
            return web.Response(status=503, headers={"Retry-After": "0"})
        if path == "/busy" and hits == 1:
            return web.Response(status=429, headers={"Retry-After": "2"})
        if path in ("/flaky", "/busy"):
            return web.Response(body=JPEG, content_type="image/jpeg")
        if path == "/down":
            return web.Response(status=503, text="overloaded")
        if path in ("/gone", "/forbidden"):
            return web.Response(status=410 if path == "/gone" else 403)
        if path == "/html":
            return web.Response(text="<html><body>not an image</body></html>", content_type="text/html")
        if path == "/empty":
            return web.Response(body=b"", content_type="image/jpeg")
        if path == "/huge":
            return await _huge(request, server)
        return web.Response(status=404, text="no such image")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    return app


async def _huge(request: web.Request, server: Server) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
    if request.query.get("length"):
        response.content_length = HUGE
    written = 0
    chunk = b"\xff" * (256 * 1024)
    try:
        await response.prepare(request)
        while written < HUGE:
            await response.write(chunk)
            written += len(chunk)
    except (ConnectionError, asyncio.CancelledError):
        pass  # the client hung up, as it should
    finally:
        server.written["/huge"] = written
        server.finished.set()
    return response


@asynccontextmanager
async def serve() -> AsyncIterator[Server]:
    server = Server()
    runner = web.AppRunner(_app(server), handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, LOOPBACK, 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


class FakeSleep:
    def __init__(self) -> None:
        self.calls: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


Scenario = Callable[[Server, ImageFetcher], Awaitable[None]]


def run(scenario: Scenario, config: ImageConfig = SMALL_CAP, **kwargs: Any) -> None:
    """Start the server and a fetcher (loopback allowed unless told otherwise), then run ``scenario``."""
    kwargs.setdefault("allow_private", True)
    kwargs.setdefault("retry", RetryPolicy(max_retries=2, sleep=FakeSleep()))

    async def main() -> None:
        async with serve() as server, ImageFetcher(config, **kwargs) as fetcher:
            await scenario(server, fetcher)

    asyncio.run(main())


async def fails(fetcher: ImageFetcher, url: str, error_type: str = "bad_image") -> str:
    with pytest.raises(ImageFailure) as excinfo:
        await fetcher.fetch(url)
    assert excinfo.value.error_type == error_type, excinfo.value.message
    return excinfo.value.message


def test_good_jpeg_is_returned_byte_for_byte() -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        data = await fetcher.fetch(server.url("/good.jpg"))
        assert data == JPEG
        assert prepare_image(data, SMALL_CAP).sent_width == 64
        assert server.hits["/good.jpg"] == 1

    run(scenario)


def test_slow_server_times_out_each_attempt_then_bad_image() -> None:
    sleep = FakeSleep()

    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        started = time.monotonic()
        message = await fails(fetcher, server.url("/slow"))
        assert time.monotonic() - started < 3
        assert "failed after 3 attempts" in message and "timed out after 0.3 s" in message
        assert server.hits["/slow"] == 3 and len(sleep.calls) == 2

    run(scenario, timeout=0.3, retry=RetryPolicy(max_retries=2, sleep=sleep))


def test_redirect_loop_is_bad_image() -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(fetcher, server.url("/loop/a"))
        assert "redirect loop" in message
        assert server.hits == {"/loop/a": 1, "/loop/b": 1}  # not retried

    run(scenario)


def test_redirect_chain_within_the_limit_and_over_it() -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        assert await fetcher.fetch(server.url("/chain/5")) == JPEG
        assert sum(server.hits.values()) == 6
        message = await fails(fetcher, server.url("/chain/6"))
        assert "too many redirects (more than 5)" in message
        assert server.hits["/chain/0"] == 1  # the 7th hop was never requested

    run(scenario, max_redirects=5)


@pytest.mark.parametrize(
    ("path", "error_type", "text"),
    [("/missing", "missing_image", "HTTP 404"), ("/gone", "missing_image", "HTTP 410"),
     ("/forbidden", "bad_image", "HTTP 403")],
)  # fmt: skip
def test_client_errors_are_final(path: str, error_type: str, text: str) -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(fetcher, server.url(path), error_type)
        assert text in message and server.url(path) in message
        assert server.hits[path] == 1

    run(scenario)


def test_503_then_200_is_retried_and_succeeds() -> None:
    sleep = FakeSleep()

    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        assert await fetcher.fetch(server.url("/flaky")) == JPEG
        assert server.hits["/flaky"] == 2
        assert len(sleep.calls) == 1 and 0.5 <= sleep.calls[0] <= 1.0  # Retry-After: 0 gets the backoff

    run(scenario, retry=RetryPolicy(max_retries=3, sleep=sleep))


def test_429_waits_as_long_as_retry_after_says() -> None:
    sleep = FakeSleep()

    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        assert await fetcher.fetch(server.url("/busy")) == JPEG
        assert server.hits["/busy"] == 2
        assert len(sleep.calls) == 1 and 2.0 <= sleep.calls[0] < 2.5

    run(scenario, retry=RetryPolicy(max_retries=3, sleep=sleep))


def test_5xx_until_retries_run_out_is_bad_image() -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(fetcher, server.url("/down"))
        assert (
            message == f"fetching {server.url('/down')} failed after 4 attempts: HTTP 503 Service Unavailable"
        )
        assert server.hits["/down"] == 4

    run(scenario, retry=RetryPolicy(max_retries=3, sleep=FakeSleep()))


def test_connection_refused_is_retried_then_bad_image() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind((LOOPBACK, 0))
        port = probe.getsockname()[1]

    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(fetcher, f"http://{LOOPBACK}:{port}/x.jpg")
        assert "failed after 3 attempts: connection failed" in message

    run(scenario)


@pytest.mark.parametrize("with_length", [True, False], ids=["content-length", "chunked"])
def test_huge_body_is_cut_off_at_the_cap(with_length: bool) -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(fetcher, server.url("/huge?length=1" if with_length else "/huge"))
        assert "over the cap of 100,000 bytes (max_image_bytes)" in message
        assert ("Content-Length" in message) is with_length
        await asyncio.wait_for(server.finished.wait(), 10)
        assert server.written["/huge"] < HUGE // 4  # the client hung up long before the end
        assert server.hits["/huge"] == 1

    run(scenario)


def test_non_image_body_is_returned_and_fails_to_decode() -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        data = await fetcher.fetch(server.url("/html"))
        assert data.startswith(b"<html>")
        with pytest.raises(ImageFailure) as excinfo:
            prepare_image(data, SMALL_CAP)
        assert excinfo.value.error_type == "bad_image" and "cannot identify image" in excinfo.value.message

    run(scenario)


def test_empty_body_is_bad_image() -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        assert "empty" in await fails(fetcher, server.url("/empty"))

    run(scenario)


def test_redirect_to_another_scheme_is_refused() -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(fetcher, server.url("/redirect?to=file:///etc/passwd"))
        assert "unsupported URL scheme file://" in message

    run(scenario)


def test_messages_hide_user_info_and_query() -> None:
    assert (
        display_url("https://user:secret@host.test/a.jpg?X-Amz-Signature=abc#x")
        == "https://host.test/a.jpg?…"
    )

    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(
            fetcher, f"http://user:secret@{LOOPBACK}:{server.port}/missing?sig=abc", "missing_image"
        )
        assert "secret" not in message and "abc" not in message

    run(scenario)


# --- SSRF: with allow_private=False nothing private is ever connected to ---------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/good.jpg",
        "http://localhost:{port}/good.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://10.0.0.1/",
        "http://[::ffff:127.0.0.1]:{port}/good.jpg",
        "http://0.0.0.0:{port}/good.jpg",
        "https://[fd00::1]/",
    ],
)
def test_private_addresses_are_refused_before_connecting(url: str) -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(fetcher, url.format(port=server.port))
        assert message.startswith("refusing to fetch") and "resolves to a private address" in message
        assert "(use --allow-private-urls)" in message
        assert not server.hits

    run(scenario, allow_private=False)


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f.0.0.1"])
def test_non_canonical_ip_hosts_are_refused(host: str) -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        message = await fails(fetcher, f"http://{host}:{server.port}/good.jpg")
        assert "refusing" in message or "not a canonical IP address" in message
        assert not server.hits

    run(scenario, allow_private=False)


class FakeDNS(AbstractResolver):
    """'Public' names for the test: public.test is the local server; the others are private."""

    NAMES: ClassVar[dict[str, list[str]]] = {
        "public.test": [LOOPBACK],
        "internal.test": ["10.0.0.1"],
        "mixed.test": ["8.8.8.8", "192.168.1.1"],
        "mapped.test": ["::ffff:169.254.169.254"],
    }

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host, host=address, port=port, proto=0, flags=0,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
            )
            for address in self.NAMES[host]
        ]  # fmt: skip

    async def close(self) -> None:
        pass


def only_the_test_server_is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return ip == ipaddress.IPv4Address(LOOPBACK) or is_public_address(ip)


@pytest.mark.parametrize(
    "target",
    [
        "http://internal.test:{port}/good.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:{port}/good.jpg",
        "http://mixed.test/good.jpg",
        "http://mapped.test/",
    ],
)
def test_redirect_from_a_public_host_to_a_private_one_is_refused(target: str) -> None:
    async def scenario(server: Server, fetcher: ImageFetcher) -> None:
        assert await fetcher.fetch(server.url("/good.jpg", host="public.test")) == JPEG
        url = server.url("/redirect?to=" + target.format(port=server.port), host="public.test")
        message = await fails(fetcher, url)
        assert message.startswith(
            f"refusing to fetch http://public.test:{server.port}/redirect?… (redirected"
        )
        assert "resolves to a private address" in message
        assert server.hits == {"/good.jpg": 1, "/redirect": 1}

    run(scenario, allow_private=False, resolver=FakeDNS(), address_filter=only_the_test_server_is_public)


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True), ("2606:4700:4700::1111", True), ("127.0.0.1", False), ("127.9.9.9", False),
        ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.0.1", False), ("169.254.169.254", False),
        ("100.64.0.1", False), ("0.0.0.0", False), ("224.0.0.1", False), ("240.0.0.1", False),
        ("255.255.255.255", False), ("::1", False), ("::", False), ("fe80::1", False), ("fc00::1", False),
        ("fd12:3456::1", False), ("fec0::1", False), ("ff02::1", False), ("::ffff:10.0.0.1", False),
        ("::ffff:8.8.8.8", True), ("2002:7f00:1::", False), ("64:ff9b::a9fe:a9fe", False),
        ("2001:0:4136:e378:8000:63bf:f5ff:fffe", False),  # Teredo for 10.0.0.1
    ],
)  # fmt: skip
def test_is_public_address(address: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(address)) is public
