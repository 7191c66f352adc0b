"""The endpoint's wire (tasks.endpoint.transport) and EndpointClient on it, against an in-process server.

Each test starts an ``aiohttp.test_utils.TestServer`` on loopback with handlers that answer what the test
scripts and record what they received; nothing else (no emulator, no Prefect).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tasks.config import EndpointConfig, RunConfig
from tasks.endpoint.client import MAX_MESSAGE, EndpointClient, redact
from tasks.endpoint.json_body import SPLICE_MIN, encode_body
from tasks.endpoint.requests import Request
from tasks.endpoint.sender import ItemSender
from tasks.endpoint.transport import decode_error_body, lines
from tasks.errors import RequestFailure
from tasks.images.data_url import DataUrl
from tasks.inputs.work_items import item_id
from tasks.retry import RetryPolicy
from tasks.row import ResultRow
from tasks.stopping import StopSwitch


def encode(body: dict) -> bytes:
    """The body as it goes on the wire: its pieces, joined."""
    return b"".join(encode_body(body))


KEY = "sk-transport-secret-123"
CHAT_OK = {
    "id": "c1",
    "model": "m",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "a cat"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2},
}
RESPONSES_OK = {
    "model": "m",
    "status": "completed",
    "output": [{"type": "message", "content": [{"type": "output_text", "text": "a dog"}]}],
    "usage": {"input_tokens": 4, "output_tokens": 2},
}
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Recorder:
    """The requests the server saw: method, path, headers, JSON body, client port."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    def middleware(self) -> Any:
        @web.middleware
        async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
            raw = await request.read()
            peer = request.transport.get_extra_info("peername") if request.transport else None
            self.seen.append(
                {
                    "method": request.method,
                    "path": request.path,
                    "headers": CIMultiDict(request.headers),
                    "body": json.loads(raw) if raw else None,
                    "port": peer[1] if peer else None,
                }
            )
            return await handler(request)

        return record


def run_with_server(
    routes: dict[str, Handler],
    test: Callable[[str, Recorder], Awaitable[None]],
) -> Recorder:
    """Start a server with ``routes`` (path → handler, any method), run ``test(base_url, recorder)``."""
    recorder = Recorder()

    async def main() -> None:
        app = web.Application(middlewares=[recorder.middleware()])
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        try:
            await test(str(server.make_url("/v1")), recorder)
        finally:
            await server.close()

    asyncio.run(main())
    return recorder


def config(base_url: str, **changes: Any) -> EndpointConfig:
    return EndpointConfig(base_url=base_url, model="m", **changes)


def chat_request(**extra: Any) -> Request:
    body = {"model": "m", "messages": [{"role": "user", "content": "Describe. é ü 日本"}], **extra}
    return Request("chat", body, "key")


def json_handler(status: int, body: object, headers: dict[str, str] | None = None) -> Handler:
    async def handle(_: web.Request) -> web.StreamResponse:
        text = body if isinstance(body, str) else json.dumps(body)
        return web.Response(status=status, text=text, headers=headers, content_type="application/json")

    return handle


async def send(base_url: str, request: Request, key: str | None = None, **changes: Any) -> Any:
    client = EndpointClient(config(base_url, **changes), key)
    try:
        return await client.send(request, request_id="img1/cap")
    finally:
        await client.aclose()


async def failure(base_url: str, request: Request | None = None, key: str | None = None, **changes: Any):
    with pytest.raises(RequestFailure) as err:
        await send(base_url, request or chat_request(), key, **changes)
    return err.value


# --- what goes on the wire ---------------------------------------------------------------------------


def test_a_chat_request_is_the_body_as_built_with_its_headers() -> None:
    async def test(base_url: str, _: Recorder) -> None:
        answer = await send(base_url, chat_request(max_tokens=9), key=KEY)
        assert (answer.text, answer.finish_reason, answer.prompt_tokens, answer.http_status) == (
            "a cat",
            "stop",
            3,
            200,
        )
        assert answer.latency_ms > 0

    rec = run_with_server({"/v1/chat/completions": json_handler(200, CHAT_OK)}, test)
    (seen,) = rec.seen
    assert (seen["method"], seen["path"]) == ("POST", "/v1/chat/completions")
    assert seen["body"] == chat_request(max_tokens=9).body  # byte-for-byte the built body, UTF-8 intact
    assert seen["headers"]["X-Request-Id"] == "img1/cap"
    assert seen["headers"]["Authorization"] == f"Bearer {KEY}"
    assert seen["headers"]["Content-Type"] == "application/json"


def test_no_key_means_no_authorization_header_and_a_trailing_slash_is_fine() -> None:
    async def test(base_url: str, _: Recorder) -> None:
        await send(base_url + "/", chat_request())

    rec = run_with_server({"/v1/chat/completions": json_handler(200, CHAT_OK)}, test)
    assert "Authorization" not in rec.seen[0]["headers"]
    assert rec.seen[0]["path"] == "/v1/chat/completions"


def test_the_responses_api_goes_to_responses() -> None:
    async def test(base_url: str, _: Recorder) -> None:
        answer = await send(base_url, Request("responses", {"model": "m", "input": "hi"}, "k"))
        assert (answer.text, answer.finish_reason, answer.prompt_tokens) == ("a dog", "stop", 4)

    rec = run_with_server({"/v1/responses": json_handler(200, RESPONSES_OK)}, test)
    assert rec.seen[0]["path"] == "/v1/responses" and rec.seen[0]["body"] == {"model": "m", "input": "hi"}


def image_request(stream: bool = False) -> tuple[Request, list[str]]:
    """A chat request holding a large and a small prepared image, and their data URLs as text."""
    large = DataUrl.encode("image/jpeg", bytes(range(256)) * (SPLICE_MIN // 256 + 7))
    small = DataUrl.encode("image/png", b"\x89PNG tiny")
    content = [{"type": "image_url", "image_url": {"url": u}} for u in (large, small)]
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": [*content, "é"]}]}
    if stream:
        body["stream"] = True
    return Request("chat", body, "key"), [str(large), str(small)]


@pytest.mark.parametrize("stream", [False, True])
def test_a_large_image_is_written_as_it_is_held_with_its_length_declared(stream: bool) -> None:
    """The body goes out in pieces (a large image's bytes not copied into it): the server still gets one
    JSON body of the declared length, not chunked, with the images' data URLs in place and in order."""
    request, urls = image_request(stream)

    async def test(base_url: str, _: Recorder) -> None:
        answer = await send(base_url, request)
        assert answer.text == ("Hello ✓" if stream else "a cat")
        await send(base_url, request)  # a second attempt of the same request sends the same bytes

    handler = sse(*CHUNKS) if stream else json_handler(200, CHAT_OK)
    rec = run_with_server({"/v1/chat/completions": handler}, test)
    assert len(rec.seen) == 2
    for seen in rec.seen:
        content = seen["body"]["messages"][0]["content"]
        assert [part["image_url"]["url"] for part in content[:2]] == urls and content[2] == "é"
        assert int(seen["headers"]["Content-Length"]) == len(encode(request.body))
        assert "Transfer-Encoding" not in seen["headers"]
        assert seen["headers"]["Content-Type"] == "application/json"


def test_one_pooled_connection_per_slot_kept_alive() -> None:
    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.02)
        return web.json_response(CHAT_OK)

    async def test(base_url: str, _: Recorder) -> None:
        client = EndpointClient(config(base_url, concurrency=4))
        try:
            for _round in range(3):
                await asyncio.gather(*(client.send(chat_request(), request_id=str(i)) for i in range(8)))
        finally:
            await client.aclose()

    rec = run_with_server({"/v1/chat/completions": slow}, test)
    assert len(rec.seen) == 24
    assert len({s["port"] for s in rec.seen}) == 4  # the pool holds 4 connections and reuses them


# --- failures, classified once -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "body", "headers", "expected"),
    [
        (400, {"error": {"message": "too many images", "code": 400}}, {}, ("bad_request", False, None)),
        (400, {"object": "error", "message": "flat body", "code": 400}, {}, ("bad_request", False, None)),
        (401, {"error": "Unauthorized"}, {}, ("auth", False, None)),
        (403, {"error": {"message": "forbidden"}}, {}, ("auth", False, None)),
        (404, {"error": {"message": "no such model", "param": "model"}}, {}, ("not_found", False, None)),
        (408, "request timeout", {}, ("timeout", True, None)),
        (429, {"error": {"message": "slow down"}}, {"Retry-After": "2"}, ("rate_limited", True, 2.0)),
        (429, {"error": {"message": "slow"}}, {"retry-after-ms": "250"}, ("rate_limited", True, 0.25)),
        (500, {"error": {"message": "engine"}}, {}, ("server_error", True, None)),
        (503, "", {"Retry-After": "1"}, ("server_error", True, 1.0)),
        (
            424,
            {"message": "bad image"},
            {"ms-azureml-model-error-statuscode": "400"},
            ("bad_request", False, None),
        ),
        (424, {"message": "oom"}, {"ms-azureml-model-error-statuscode": "503"}, ("server_error", True, None)),
    ],
)
def test_http_errors_are_classified(
    status: int, body: object, headers: dict[str, str], expected: tuple[str, bool, float | None]
) -> None:
    async def test(base_url: str, _: Recorder) -> None:
        got = await failure(base_url)
        assert (got.error_type, got.retryable, got.retry_after) == expected
        assert got.http_status == status
        if isinstance(body, dict):
            inner = body.get("error", body)
            assert (inner.get("message") if isinstance(inner, dict) else inner) in got.message
        elif body:
            assert body in got.message
        else:
            assert got.message == f"HTTP {status}"

    run_with_server({"/v1/chat/completions": json_handler(status, body, headers)}, test)


@pytest.mark.parametrize("content", ['{"id": "x", "choices": [', "{}", "<html>oops</html>"])
def test_a_malformed_200_is_a_transient_invalid_response(content: str) -> None:
    async def test(base_url: str, _: Recorder) -> None:
        got = await failure(base_url)
        assert (got.error_type, got.retryable, got.http_status) == ("invalid_response", True, 200)

    run_with_server({"/v1/chat/completions": json_handler(200, content)}, test)


def test_the_request_timeout_is_a_transient_timeout() -> None:
    async def hang(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.json_response(CHAT_OK)

    async def test(base_url: str, _: Recorder) -> None:
        started = asyncio.get_running_loop().time()
        got = await failure(base_url, request_timeout=0.3)
        assert (got.error_type, got.retryable) == ("timeout", True)
        assert asyncio.get_running_loop().time() - started < 3

    run_with_server({"/v1/chat/completions": hang}, test)


def test_a_reset_connection_is_a_transient_connection_failure() -> None:
    async def reset(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.abort()
        return web.Response()

    async def test(base_url: str, _: Recorder) -> None:
        got = await failure(base_url)
        assert (got.error_type, got.retryable, got.http_status) == ("connection", True, None)

    run_with_server({"/v1/chat/completions": reset}, test)


def test_a_body_cut_short_is_a_transient_failure() -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": "1000", "Content-Type": "application/json"})
        await response.prepare(request)
        await response.write(b'{"choices": [')
        assert request.transport is not None
        request.transport.abort()
        return response

    async def test(base_url: str, _: Recorder) -> None:
        got = await failure(base_url)
        assert got.retryable and got.error_type == "connection"

    run_with_server({"/v1/chat/completions": cut}, test)


def test_an_unreachable_endpoint_is_a_connection_failure() -> None:
    async def test(base_url: str, _: Recorder) -> None:
        pass

    async def main() -> None:
        server = TestServer(web.Application(), host="127.0.0.1")
        await server.start_server()
        base_url = str(server.make_url("/v1"))
        await server.close()  # nothing listens there now
        got = await failure(base_url)
        assert (got.error_type, got.retryable) == ("connection", True)
        assert got.message.startswith("could not reach the endpoint: ")

    asyncio.run(main())


def test_the_key_is_redacted_from_an_unparseable_answer_and_when_cut_short() -> None:
    async def echo_ok(request: web.Request) -> web.StreamResponse:  # a 200 that is no answer, quoting the key
        return web.Response(text=f"<html>hello {request.headers.get('Authorization')}</html>")

    async def echo_long(request: web.Request) -> web.StreamResponse:  # the key where the message is cut
        pad = "x" * (MAX_MESSAGE - len("Bearer ") - 10)
        return web.json_response({"error": {"message": pad + request.headers["Authorization"]}}, status=400)

    async def echo_cut(request: web.Request) -> web.StreamResponse:  # the quote of the body cuts the key
        return web.Response(text="x" * 170 + " " + request.headers["Authorization"])

    async def test(base_url: str, _: Recorder) -> None:
        got = await failure(base_url, key=KEY, max_retries=0)
        assert got.error_type == "invalid_response" and "***" in got.message
        assert KEY not in got.message and KEY[:8] not in got.message
        quoted = await failure(base_url.replace("/v1", "/quoted"), key=KEY, max_retries=0)
        assert quoted.error_type == "invalid_response" and quoted.message.endswith("Bearer ***'")
        assert KEY[:4] not in quoted.message
        cut = await failure(base_url.replace("/v1", "/long"), key=KEY)
        assert cut.error_type == "bad_request" and cut.message.endswith("Bearer ***")
        assert KEY[:4] not in cut.message

    routes = {"/v1/chat/completions": echo_ok, "/long/chat/completions": echo_long}
    run_with_server({**routes, "/quoted/chat/completions": echo_cut}, test)


@pytest.mark.parametrize(
    ("message", "redacted"),
    [
        ("token sk-abc123 rejected", "token *** rejected"),
        ("cut at sk-ab", "cut at ***"),
        ("ends in sk-", "ends in sk-"),  # 3 characters: too short to be taken for the key
        ("nothing here", "nothing here"),
        ("quoted and cut: 'Bearer sk-abc12'", "quoted and cut: 'Bearer ***'"),  # a body cut, then !r
        ("cut (sk-abc…)", "cut (***…)"),
        ("a key of another: sk-abd999", "a key of another: sk-abd999"),
    ],
)
def test_redact(message: str, redacted: str) -> None:
    assert redact(message, "sk-abc123") == redacted
    assert redact(message, None) == message


@pytest.mark.parametrize(
    ("message", "redacted"),
    [
        ("'xx Bearer sk-SECRETKEY-012345678' (HTTP 200)", "'xx Bearer ***' (HTTP 200)"),  # cut inside
        ("twice sk-SECRETKEY-01 and sk-SECRETKEY-0123456789abcdef!", "twice *** and ***!"),
        ("prefix only sk-SECR then text", "prefix only sk-SECR then text"),  # 7 characters, not at the end
    ],
)
def test_redact_a_key_quoted_and_cut_inside_a_message(message: str, redacted: str) -> None:
    assert redact(message, "sk-SECRETKEY-0123456789abcdef") == redacted


def test_the_key_never_appears_in_a_message_or_repr() -> None:
    async def echo(request: web.Request) -> web.StreamResponse:
        return web.json_response(
            {"error": {"message": f"bad token {request.headers.get('Authorization')}"}}, status=401
        )

    async def test(base_url: str, _: Recorder) -> None:
        got = await failure(base_url, key=KEY)
        assert got.error_type == "auth" and KEY not in got.message and "***" in got.message
        client = EndpointClient(config(base_url), KEY)
        assert KEY not in repr(client) and KEY not in repr(client._http)
        with pytest.raises(RequestFailure) as err:
            await client.get_json("/models")
        assert KEY not in str(err.value) and KEY not in repr(client._http.session())
        await client.aclose()

    run_with_server({"/v1/chat/completions": echo, "/v1/models": echo}, test)


# --- streaming -------------------------------------------------------------------------------------------


def sse(*events: object, end: bytes = b"\r\n\r\n", done: bool = True) -> Handler:
    async def handle(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            data = event if isinstance(event, bytes) else json.dumps(event).encode()
            await response.write(b"data: " + data + end)
        if done:
            await response.write(b"data: [DONE]" + end)
        await response.write_eof()
        return response

    return handle


CHUNKS = [
    {"model": "m", "choices": [{"delta": {"role": "assistant", "content": ""}}]},
    {"choices": [{"delta": {"reasoning": "hm "}}]},
    {"choices": [{"delta": {"content": "Hel"}}]},
    {"choices": [{"delta": {"content": "lo ✓"}, "finish_reason": "stop"}]},
    {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}},
]


@pytest.mark.parametrize("end", [b"\n\n", b"\r\n\r\n"])
def test_a_stream_is_joined_into_one_answer(end: bytes) -> None:
    async def test(base_url: str, _: Recorder) -> None:
        answer = await send(base_url, chat_request(stream=True, stream_options={"include_usage": True}))
        assert (answer.text, answer.reasoning, answer.finish_reason, answer.prompt_tokens) == (
            "Hello ✓",
            "hm ",
            "stop",
            4,
        )

    rec = run_with_server({"/v1/chat/completions": sse(*CHUNKS, end=end)}, test)
    assert rec.seen[0]["body"]["stream"] is True and rec.seen[0]["body"]["stream_options"]
    assert rec.seen[0]["headers"]["Accept"] == "text/event-stream"


def test_stream_failures_are_transient() -> None:
    async def test(base_url: str, _: Recorder) -> None:
        request = chat_request(stream=True)
        got = await failure(base_url.replace("/v1", "/error/v1"), request)
        assert (got.error_type, got.retryable, got.http_status) == ("server_error", True, 200)
        got = await failure(base_url.replace("/v1", "/short/v1"), request)
        assert (got.error_type, got.retryable) == ("invalid_response", True)
        got = await failure(base_url.replace("/v1", "/no-index/v1"), request)
        assert (got.error_type, got.retryable, got.http_status) == ("invalid_response", True, 200)
        assert "index is None" in got.message
        got = await failure(base_url.replace("/v1", "/429/v1"), request)
        assert (got.error_type, got.retry_after, got.http_status) == ("rate_limited", 3.0, 429)

    routes = {
        "/error/v1/chat/completions": sse(CHUNKS[2], {"error": {"message": "engine died"}}, done=False),
        "/short/v1/chat/completions": sse(CHUNKS[2], done=False),
        "/no-index/v1/chat/completions": sse(
            {
                "choices": [
                    {"delta": {"tool_calls": [{"index": 0, "function": {"name": "f", "arguments": ""}}]}}
                ]
            },
            {"choices": [{"delta": {"tool_calls": [{"index": None, "function": {"arguments": "{}"}}]}}]},
            {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
        ),
        "/429/v1/chat/completions": json_handler(429, {"error": {"message": "busy"}}, {"Retry-After": "3"}),
    }
    run_with_server(routes, test)


class _Content:
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks

    async def iter_any(self) -> AsyncIterator[bytes]:
        for chunk in self.chunks:
            yield chunk


class _Response:
    def __init__(self, chunks: list[bytes]) -> None:
        self.content = _Content(chunks)


@pytest.mark.parametrize(
    "chunks",
    [
        [b"data: a\n\ndata: b\n\n"],
        [b"data: a\r", b"\n\r\ndata: ", b"b\r\n\r\n"],
        [b"data: a\r\rdata: b"],
        [b"da", b"ta: a\n", b"\n", b"data: b\r\n"],
    ],
)
def test_lines_split_on_any_line_end_across_chunks(chunks: list[bytes]) -> None:
    async def collect() -> list[str]:
        return [line async for line in lines(_Response(chunks))]  # type: ignore[arg-type]

    assert [line for line in asyncio.run(collect()) if line] == ["data: a", "data: b"]


# --- preflight's GETs and the codecs ----------------------------------------------------------------------


def test_get_json() -> None:
    async def test(base_url: str, _: Recorder) -> None:
        client = EndpointClient(config(base_url), KEY)
        try:
            assert await client.get_json("/models") == {"data": [{"id": "m"}]}
            assert await client.get_json("/health/ready") == "ready"  # not JSON: the text
            with pytest.raises(RequestFailure) as err:
                await client.get_json("/nothing")
            assert (err.value.error_type, err.value.http_status) == ("not_found", 404)
        finally:
            await client.aclose()

    async def ready(_: web.Request) -> web.StreamResponse:
        return web.Response(text="ready")

    rec = run_with_server(
        {"/v1/models": json_handler(200, {"data": [{"id": "m"}]}), "/v1/health/ready": ready}, test
    )
    assert [s["method"] for s in rec.seen] == ["GET", "GET", "GET"]
    assert rec.seen[0]["headers"]["Authorization"] == f"Bearer {KEY}"


def test_preflight_waits_out_a_busy_or_loading_endpoint_within_the_outage_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway's 429 (Retry-After honoured), a proxy's 502 and NIM's 503 while its model loads are
    retried; an endpoint still busy after --outage-window fails the preflight, saying for how long."""
    from tasks.endpoint.preflight import PreflightFailed, preflight

    answers = {"/v1/models": [429, 502, 200], "/v1/health/ready": [503, 200], "/busy/models": [503] * 99}
    slept: list[float] = []

    def scripted(path: str) -> Handler:
        async def handle(_: web.Request) -> web.StreamResponse:
            status = answers[path].pop(0)
            if status == 200:
                return web.json_response({"data": [{"id": "m"}]})
            return web.json_response(
                {"error": {"message": "busy"}}, status=status, headers={"Retry-After": "1"}
            )

        return handle

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def test(base_url: str, rec: Recorder) -> None:
        policy = RetryPolicy(sleep=fake_sleep)
        assert await preflight(config(base_url), None, policy) == ["m"]
        assert len(rec.seen) == 5 and len(slept) == 3 and 1.0 <= slept[0] <= 1.2  # Retry-After: 1
        assert caplog.text.count("trying again for up to 60 s (--outage-window)") == 1  # once a preflight
        busy = config(base_url.replace("/v1", "/busy")).model_copy(update={"outage_window": 0.5})
        with pytest.raises(PreflightFailed, match=r"/busy/models is not ready \(HTTP 503\)"):
            await preflight(busy, None, policy)  # the 1 s Retry-After would end past the window: no wait

    run_with_server({path: scripted(path) for path in answers}, test)


def test_preflight_stops_waiting_when_the_run_is_stopped_and_its_window_spans_every_route() -> None:
    from tasks.endpoint.preflight import PreflightFailed, PreflightStopped, preflight

    async def test(base_url: str, rec: Recorder) -> None:
        stop = StopSwitch()
        asyncio.get_running_loop().call_later(0.3, stop.set, "SIGTERM", "test")
        started = time.monotonic()
        with pytest.raises(PreflightStopped):
            await preflight(config(base_url, outage_window=60), stop=stop)
        assert time.monotonic() - started < 5  # not the 60 s window
        # one window for the preflight, not one per route: /models took it all, /health/ready gets none
        slow = config(base_url.replace("/v1", "/half"), outage_window=1.5)
        started = time.monotonic()
        with pytest.raises(PreflightFailed, match="/half/health/ready is not ready"):
            await preflight(slow)
        assert time.monotonic() - started < 3

    models_calls = []

    async def models_then_ok(_: web.Request) -> web.StreamResponse:
        models_calls.append(1)
        status = 503 if len(models_calls) < 2 else 200
        return web.json_response({"data": [{"id": "m"}]}, status=status)

    routes = {
        "/v1/models": json_handler(503, {"error": {"message": "loading"}}),
        "/half/models": models_then_ok,
        "/half/health/ready": json_handler(503, {"error": {"message": "loading"}}),
    }
    run_with_server(routes, test)


def test_codecs() -> None:
    assert json.loads(encode({"a": "é", "n": 1})) == {"a": "é", "n": 1}
    assert json.loads(encode({"big": 2**70})) == {"big": 2**70}  # beyond orjson: json takes it
    assert decode_error_body(b'{"error": "x"}') == {"error": "x"}
    assert decode_error_body(b"plain") == "plain"
    assert decode_error_body(b"  ") is None


def test_each_attempt_has_its_own_request_id_naming_its_item() -> None:
    """vLLM takes X-Request-Id as the engine's request id and refuses one still running: a retry (or
    another run) must not reuse it. The item stays readable in front, for the server's logs."""
    calls = []

    async def flaky(request: web.Request) -> web.StreamResponse:
        calls.append(request.headers["X-Request-Id"])
        if len(calls) == 1:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        return web.json_response(CHAT_OK)

    async def test(base_url: str, _: Recorder) -> None:
        run = RunConfig(out="o", endpoint={"base_url": base_url, "model": "m"})
        senders = [
            ItemSender(run, StopSwitch(), RetryPolicy(max_retries=2, sleep=no_sleep), None) for _ in "ab"
        ]
        for sender in senders:
            row = ResultRow("img1", "cap", "caption", "ok")
            assert await sender.fill(row, chat_request()) and row.status == "ok"
            await sender.aclose()

    async def no_sleep(_: float) -> None:
        return None

    run_with_server({"/v1/chat/completions": flaky}, test)
    first, second, other_run = calls
    item = item_id("img1", "cap")
    assert [c.rsplit("-", 2)[0] for c in calls] == [item] * 3
    assert (first[-2:], second[-2:], other_run[-2:]) == ("-1", "-2", "-1")
    assert len(set(calls)) == 3  # attempts differ, and so do two runs' first attempts


def _answer(content: str | None, reasoning: str | None, finish: str = "stop") -> dict[str, Any]:
    message = {"role": "assistant", "content": content, "reasoning": reasoning}
    return {**CHAT_OK, "choices": [{"index": 0, "message": message, "finish_reason": finish}]}


@pytest.mark.parametrize("content", ["", "  \n"])
def test_an_empty_answer_is_no_answer_not_an_ok_row(content: str) -> None:
    """Gateways send "" where vLLM sends null when the budget went to reasoning: not an ok row either."""

    async def test(base_url: str, rec: Recorder) -> None:
        run = RunConfig(
            out="o", endpoint={"base_url": base_url, "model": "m"}, generation={"reasoning": True}
        )
        sender = ItemSender(run, StopSwitch(), RetryPolicy(max_retries=2), None)
        row = ResultRow("img1", "cap", "caption", "ok")
        assert await sender.fill(row, chat_request())
        await sender.aclose()
        assert (row.status, row.error_type, row.text) == ("failed", "no_answer", None)
        assert row.error_message is not None and "output budget ran out" in row.error_message
        assert len(rec.seen) == 1  # the same budget gives the same answer: not retried

    run_with_server({"/v1/chat/completions": json_handler(200, _answer(content, "hmm", "length"))}, test)


@pytest.mark.parametrize(("keep", "stored"), [(True, "thoughts"), (False, None)])
def test_reasoning_is_stored_only_when_it_was_asked_for(keep: bool, stored: str | None) -> None:
    """README.md, "Output": the reasoning text when reasoning was on (and not hidden), else null, whatever the
    server sends (tasks/endpoint/requests.py decides ``keep_reasoning`` per prompt)."""

    async def test(base_url: str, _: Recorder) -> None:
        run = RunConfig(out="o", endpoint={"base_url": base_url, "model": "m"})
        sender = ItemSender(run, StopSwitch(), RetryPolicy(max_retries=0), None)
        row = ResultRow("img1", "cap", "caption", "ok")
        request = dataclasses.replace(chat_request(), keep_reasoning=keep)
        assert await sender.fill(row, request)
        await sender.aclose()
        assert (row.status, row.text, row.reasoning) == ("ok", "a cat", stored)

    run_with_server({"/v1/chat/completions": json_handler(200, _answer("a cat", "thoughts"))}, test)


def test_the_environments_http_proxy_is_used_except_for_a_loopback_endpoint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As the openai SDK does: an endpoint behind a corporate proxy is reached through HTTP_PROXY. A
    loopback endpoint never goes through one (no proxy could reach it)."""
    through_proxy: list[str] = []

    async def proxy(request: web.Request) -> web.StreamResponse:  # answers as the endpoint behind it
        through_proxy.append(request.raw_path)  # absolute-form (http://host/...) only through a proxy
        return web.json_response(CHAT_OK)

    async def test(base_url: str, _: Recorder) -> None:
        monkeypatch.setenv("HTTP_PROXY", base_url.removesuffix("/v1"))
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        far = EndpointClient(config("http://gpu-box.invalid:8000/v1"))  # no such host: only the proxy knows
        near = EndpointClient(config(base_url))
        try:
            assert (await far.send(chat_request(), request_id="r1")).text == "a cat"
            assert (await near.send(chat_request(), request_id="r2")).text == "a cat"
        finally:
            await far.aclose()
            await near.aclose()

    rec = run_with_server({"/v1/chat/completions": proxy}, test)
    assert through_proxy == ["http://gpu-box.invalid:8000/v1/chat/completions", "/v1/chat/completions"]
    assert len(rec.seen) == 2  # the second came direct


def test_a_failed_row_has_the_latency_of_its_last_attempt() -> None:
    async def slow_503(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        return web.json_response({"error": {"message": "busy"}}, status=503)

    async def test(base_url: str, _: Recorder) -> None:
        run = RunConfig(out="o", endpoint={"base_url": base_url, "model": "m"})
        sender = ItemSender(run, StopSwitch(), RetryPolicy(max_retries=0), None)
        row = ResultRow("img1", "cap", "caption", "ok")
        assert await sender.fill(row, chat_request())
        await sender.aclose()
        assert (row.status, row.http_status, row.attempts) == ("failed", 503, 1)
        assert row.latency_ms is not None and 50 <= row.latency_ms < 5000

    run_with_server({"/v1/chat/completions": slow_503}, test)


def test_a_repaired_json_answer_counts_the_tokens_of_both_requests() -> None:
    answers = [
        ("not json", {"prompt_tokens": 10, "completion_tokens": 5}),
        ('{"a": 1}', {"prompt_tokens": 30, "completion_tokens": 7}),
    ]

    async def scripted(_: web.Request) -> web.StreamResponse:
        content, usage = answers.pop(0)
        body = {**_answer(content, None), "usage": usage}
        return web.json_response(body)

    async def test(base_url: str, rec: Recorder) -> None:
        run = RunConfig(out="o", endpoint={"base_url": base_url, "model": "m"})
        sender = ItemSender(run, StopSwitch(), RetryPolicy(max_retries=0), None)
        row = ResultRow("img1", "meta", "qa", "ok")
        assert await sender.fill(row, dataclasses.replace(chat_request(), json_schema='{"type": "object"}'))
        await sender.aclose()
        assert (row.status, row.json, row.attempts) == ("ok", '{"a":1}', 2)
        assert (row.prompt_tokens, row.completion_tokens) == (40, 12)

    run_with_server({"/v1/chat/completions": scripted}, test)
