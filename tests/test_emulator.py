"""The endpoint emulator over real HTTP on loopback: answers, validation, faults, stats and control."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.server
import io
import json
import math
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from emulator import (
    DEFAULT_MODEL,
    EmulatorServer,
    EmulatorSettings,
    describe_bytes,
    rate_fault,
    settings_from_args,
)
from emulator.images import ImageLoader

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Describe the image."
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


# ---------------------------------------------------------------- helpers


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def call(
    url: str, body: Any = None, *, headers: dict[str, str] | None = None, timeout: float = 10.0
) -> Reply:
    """GET (no body) or POST (JSON or raw bytes) ``url``; HTTP errors are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url,
        data=data,
        method="GET" if data is None else "POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with OPENER.open(request, timeout=timeout) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, error.read())


def encode(size: tuple[int, int], colour: tuple[int, ...], fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, fmt)
    return buffer.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def chat_body(prompt: str = PROMPT, images: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return {"model": DEFAULT_MODEL, "messages": [{"role": "user", "content": content}], **extra}


def chat(server: EmulatorServer, body: Any, **kwargs: Any) -> Reply:
    return call(f"{server.base_url}/chat/completions", body, **kwargs)


def control(server: EmulatorServer, route: str, body: Any = None) -> Reply:
    return call(f"http://127.0.0.1:{server.port}/_emulator/{route}", body)


def message(reply: Reply) -> dict[str, Any]:
    assert reply.status == 200, reply.body
    got: dict[str, Any] = reply.json()["choices"][0]["message"]
    return got


def fingerprint(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:8]


ORANGE_PNG = encode((803, 602), (255, 128, 0))
BLUE_JPEG = encode((320, 200), (0, 0, 255), "JPEG")
GREEN_GIF = encode((64, 48), (0, 200, 0), "GIF")


@pytest.fixture
def make_server() -> Iterator[Callable[..., EmulatorServer]]:
    servers: list[EmulatorServer] = []

    def make(**changes: Any) -> EmulatorServer:
        server = EmulatorServer(EmulatorSettings(**{"latency": 0.0, **changes})).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., EmulatorServer]) -> EmulatorServer:
    return make_server()


@pytest.fixture
def image_host() -> Iterator[str]:
    """A tiny image server: /orange.png, /slow.png (1 s), anything else 404."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path in ("/orange.png", "/slow.png"):
                if self.path == "/slow.png":
                    time.sleep(1.0)
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(ORANGE_PNG)))
                self.end_headers()
                self.wfile.write(ORANGE_PNG)
            else:
                self.send_error(404)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    host.daemon_threads = True
    thread = threading.Thread(target=host.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{host.server_address[1]}"
    host.shutdown()
    host.server_close()


# ---------------------------------------------------------------- routes and answers


def test_models_and_health(server: EmulatorServer) -> None:
    models = call(f"{server.base_url}/models")
    assert models.status == 200
    body = models.json()
    assert body["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["max_model_len"]) for m in body["data"]] == [
        (DEFAULT_MODEL, "model", "vlmbatch-emulator", 131072)
    ]
    for route in ("ready", "live"):
        health = call(f"{server.base_url}/health/{route}")
        assert health.status == 200
        assert health.json() == {"object": "health.response", "message": "Service is ready."}
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"


def test_caption_names_size_colour_fingerprint_and_prompt(server: EmulatorServer) -> None:
    urls = [data_url(ORANGE_PNG), data_url(BLUE_JPEG, "image/jpeg"), data_url(GREEN_GIF, "image/gif")]
    reply = chat(server, chat_body(images=urls, max_tokens=500))
    body = reply.json()
    assert reply.headers["Content-Type"].startswith("application/json")
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == DEFAULT_MODEL
    choice = body["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] is None and choice["logprobs"] is None
    assert choice["message"] == {
        "role": "assistant",
        "content": f"A 803×602 image, mostly orange ({fingerprint(ORANGE_PNG)}). "
        f"A 320×200 image, mostly blue ({fingerprint(BLUE_JPEG)}). "
        f"A 64×48 image, mostly green ({fingerprint(GREEN_GIF)}). "
        f'Prompt: "{PROMPT}"',
        "tool_calls": [],
    }


def test_caption_echoes_last_user_message_and_plain_image_url(server: EmulatorServer) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "First question"},
            {"role": "assistant", "content": "First answer"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What colour"},
                    {"type": "image_url", "image_url": data_url(ORANGE_PNG)},
                    {"type": "text", "text": "is it?"},
                ],
            },
        ],
        "temperature": 0.2,
        "guided_json": {"type": "object"},  # removed in vLLM 0.12: silently ignored
        "some_future_field": [1, 2, 3],
    }
    content = message(chat(server, body))["content"]
    assert content.endswith('Prompt: "What colour is it?"')
    assert "803×602" in content and "You are terse" not in content
    assert message(chat(server, chat_body("Hello?")))["content"] == 'No image. Prompt: "Hello?"'


@pytest.mark.parametrize(
    ("field", "extra", "present"),
    [
        ("reasoning", {}, set()),
        ("reasoning", {"chat_template_kwargs": {"enable_thinking": True}}, {"reasoning"}),
        ("reasoning_content", {"chat_template_kwargs": {"enable_thinking": True}}, {"reasoning_content"}),
        ("both", {"chat_template_kwargs": {"enable_thinking": True}}, {"reasoning", "reasoning_content"}),
        ("reasoning", {"chat_template_kwargs": {"enable_thinking": True}, "include_reasoning": False}, set()),
    ],
)
def test_reasoning_field_variants(
    make_server: Callable[..., EmulatorServer], field: str, extra: dict[str, Any], present: set[str]
) -> None:
    server = make_server(reasoning_field=field)
    reply = chat(server, chat_body(images=[data_url(ORANGE_PNG)], max_tokens=500, **extra))
    got = message(reply)
    assert {"reasoning", "reasoning_content"} & set(got) == present
    expected = f'The user asks: "{PROMPT}". I see a 803×602 image that is mostly orange.'
    for name in present:
        assert got[name] == expected
    content_tokens = math.ceil(len(got["content"]) / 4)
    thinking = extra.get("chat_template_kwargs", {}).get("enable_thinking", False)
    reasoning_tokens = math.ceil(len(expected) / 4) if thinking else 0  # hidden reasoning still counts
    assert reply.json()["usage"]["completion_tokens"] == content_tokens + reasoning_tokens


def test_usage_counts_text_and_image_tokens(server: EmulatorServer) -> None:
    big = encode((2000, 1500), (200, 0, 0), "JPEG")
    reply = chat(server, chat_body(images=[data_url(ORANGE_PNG), data_url(big)], max_tokens=500))
    usage = reply.json()["usage"]
    image_tokens = math.ceil(803 * 602 / 2304) + 280  # the 3 MP image is capped at 280
    assert usage["prompt_tokens"] == math.ceil(len(PROMPT) / 4) + image_tokens
    content = message(reply)["content"]
    assert usage["completion_tokens"] == math.ceil(len(content) / 4)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_budget_truncates_with_finish_reason_length(server: EmulatorServer) -> None:
    full = message(chat(server, chat_body(images=[data_url(ORANGE_PNG)], max_tokens=500)))["content"]
    # max_completion_tokens wins over max_tokens
    reply = chat(server, chat_body(images=[data_url(ORANGE_PNG)], max_tokens=500, max_completion_tokens=5))
    body = reply.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["message"]["content"] == full[:20]
    assert body["usage"]["completion_tokens"] == 5
    # reasoning spends the budget first: nothing is left for the content
    thinking = chat(server, chat_body(max_tokens=3, chat_template_kwargs={"enable_thinking": True}))
    got = message(thinking)
    assert got["content"] is None and len(got["reasoning"]) == 12
    assert thinking.json()["choices"][0]["finish_reason"] == "length"
    # neither field: the budget is the remaining context
    assert chat(server, chat_body()).json()["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- validation


def _messages(*roles: str) -> list[dict[str, str]]:
    return [{"role": role, "content": f"{role} text"} for role in roles]


def _too_many_images() -> dict[str, Any]:
    return chat_body(images=[data_url(encode((8 + i, 8), (i, 0, 0))) for i in range(5)])


VALIDATION_CASES: list[tuple[str, Any, int, str]] = [
    ("bad json", b"{not json", 400, "Invalid JSON"),
    ("unknown model", {**chat_body(), "model": "gpt-9"}, 404, "The model `gpt-9` does not exist."),
    ("missing model", {"messages": _messages("user")}, 404, "does not exist"),
    ("no messages", {**chat_body(), "messages": []}, 400, "messages"),
    ("user twice", {**chat_body(), "messages": _messages("user", "user")}, 400, "must alternate"),
    ("ends with assistant", {**chat_body(), "messages": _messages("user", "assistant")}, 400, "alternate"),
    (
        "starts with assistant",
        {**chat_body(), "messages": _messages("system", "assistant", "user")},
        400,
        "alt",
    ),
    ("bad role", {**chat_body(), "messages": _messages("tool")}, 400, "role"),
    (
        "both prompt flags",
        chat_body(add_generation_prompt=True, continue_final_message=True),
        400,
        "continue_final_message",
    ),
    ("empty tools", chat_body(tools=[]), 400, "tools"),
    ("stream options alone", chat_body(stream_options={"include_usage": True}), 400, "stream=True"),
    ("stream options not an object", chat_body(stream=True, stream_options=[1]), 400, "stream_options"),
    ("too many images", _too_many_images(), 400, "At most 4 image(s) may be provided in one prompt."),
    ("undecodable", chat_body(images=[data_url(b"not an image")]), 400, "cannot identify image file"),
    ("webp", chat_body(images=[data_url(encode((8, 8), (1, 2, 3), "WEBP"))]), 400, "WEBP"),
    ("bmp", chat_body(images=[data_url(encode((8, 8), (1, 2, 3), "BMP"))]), 400, "BMP"),
    ("bad base64", chat_body(images=["data:image/png;base64,@@@"]), 400, "base64"),
    ("not base64", chat_body(images=["data:image/png,rawbytes"]), 501, "Only base64 data URLs"),
    ("file scheme", chat_body(images=["file:///etc/passwd"]), 400, "Unsupported image URL"),
    ("zero max_tokens", chat_body(max_tokens=0), 400, "max_tokens"),
    ("huge max_tokens", chat_body(max_tokens=10**6), 400, "is too large"),
    ("budget over context", chat_body(max_completion_tokens=131070), 400, "is too large"),
    ("unknown part", {**chat_body(), "messages": [{"role": "user", "content": [{"type": "x"}]}]}, 400, "x"),
]


@pytest.mark.parametrize(
    ("body", "status", "text"), [case[1:] for case in VALIDATION_CASES], ids=[c[0] for c in VALIDATION_CASES]
)
def test_validation_errors(server: EmulatorServer, body: Any, status: int, text: str) -> None:
    reply = chat(server, body)
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert text in error["message"]
    assert error["code"] == status
    expected_type = {400: "BadRequestError", 404: "NotFoundError", 501: "NotImplementedError"}[status]
    assert error["type"] == expected_type
    if status == 404:
        assert error["param"] == "model"


def test_continue_final_message_allows_a_final_assistant(server: EmulatorServer) -> None:
    """Continuing a final assistant message needs add_generation_prompt false (vLLM refuses both true,
    and it defaults to true); the reply is the continuation alone."""
    messages = _messages("user", "assistant")
    body = {**chat_body(), "messages": messages, "continue_final_message": True}
    assert chat(server, body).status == 400
    body["add_generation_prompt"] = False
    assert message(chat(server, body))["content"] == ' No image. Prompt: "user text"'


def test_http_image_urls_are_fetched(make_server: Callable[..., EmulatorServer], image_host: str) -> None:
    server = make_server(image_fetch_timeout=0.3)
    assert (
        "803×602 image, mostly orange"
        in message(chat(server, chat_body(images=[f"{image_host}/orange.png"])))["content"]
    )
    assert chat(server, chat_body(images=[f"{image_host}/gone.png"])).status == 422
    slow = chat(server, chat_body(images=[f"{image_host}/slow.png"]))
    assert slow.status == 500 and "Timed out" in slow.json()["error"]["message"]
    with socket.socket() as probe:  # a port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    assert chat(server, chat_body(images=[f"http://127.0.0.1:{closed}/none.png"])).status == 500


def test_auth_required_on_v1_routes(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(api_key="sekrit")
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        reply = chat(server, chat_body(), headers=headers)
        assert (reply.status, reply.json()) == (401, {"error": "Unauthorized"})
    assert call(f"{server.base_url}/models").status == 401
    assert call(f"{server.base_url}/health/ready").status == 401
    assert chat(server, chat_body(), headers={"Authorization": "Bearer sekrit"}).status == 200
    assert control(server, "stats").status == 200  # control routes need no key
    assert server.stats()["by_status"] == {"401": 2, "200": 1}


def test_flat_error_bodies(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(flat_errors=True)
    reply = chat(server, {**chat_body(), "model": "nope"})
    assert reply.status == 404
    assert reply.json() == {
        "object": "error",
        "message": "The model `nope` does not exist.",
        "type": "NotFoundError",
        "param": "model",
        "code": 404,
    }


# ---------------------------------------------------------------- faults


@pytest.mark.parametrize(("kind", "status"), [("429", 429), ("500", 500), ("503", 503)])
def test_http_faults(make_server: Callable[..., EmulatorServer], kind: str, status: int) -> None:
    server = make_server(fault_script=[kind], retry_after_ms=1500)
    reply = chat(server, chat_body())
    assert reply.status == status
    assert reply.json()["error"]["code"] == status
    if status == 500:
        assert reply.headers.get("Retry-After") is None
    else:
        assert (reply.headers["Retry-After"], reply.headers["retry-after-ms"]) == ("1", "1500")
    assert chat(server, chat_body()).status == 200
    assert server.stats()["faults"] == {kind: 1}


def test_gateway_faults_come_before_validation(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["429"], retry_after=None)
    reply = chat(server, b"not even json")
    assert reply.status == 429 and "Retry-After" not in reply.headers
    server.configure(retry_after=2.5)
    server.reset()
    assert chat(server, b"{}").headers["Retry-After"] == "2.5"


def test_hang_fires_the_client_timeout(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["hang"], hang_seconds=30)
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        chat(server, chat_body(), timeout=0.3)
    deadline = time.monotonic() + 5
    while server.stats()["in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    stats = server.stats()
    assert stats["in_flight"] == 0  # the handler was freed when the client went away
    assert stats["log"][-1]["status"] == "cancelled" and stats["log"][-1]["fault"] == "hang"


def test_short_hang_then_answers(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["hang"], hang_seconds=0.3)
    started = time.monotonic()
    assert chat(server, chat_body()).status == 200
    assert time.monotonic() - started >= 0.3


def test_reset_drops_the_connection(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["reset"])
    with pytest.raises((ConnectionError, urllib.error.URLError)):
        chat(server, chat_body())
    assert chat(server, chat_body()).status == 200
    assert [entry["status"] for entry in server.stats()["log"]] == ["reset", 200]


def test_malformed_is_a_200_with_truncated_json(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["malformed"])
    reply = chat(server, chat_body())
    assert reply.status == 200 and reply.headers["Content-Type"] == "application/json"
    assert reply.body.startswith(b'{"id":"chatcmpl-')
    with pytest.raises(json.JSONDecodeError):
        reply.json()


def test_down_resets_v1_but_not_control_routes(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(down=True)
    for url in (f"{server.base_url}/models", f"{server.base_url}/chat/completions"):
        with pytest.raises((ConnectionError, urllib.error.URLError)):
            call(url, chat_body() if url.endswith("completions") else None)
    assert control(server, "stats").json()["by_status"] == {"reset": 1}
    assert control(server, "config", {"down": False}).json()["down"] is False
    assert chat(server, chat_body()).status == 200


def test_first_attempt_mode_lets_retries_succeed(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_rate=1.0, fault_kinds=["503"], fault_mode="first_attempt")
    statuses = [chat(server, chat_body(), headers={"X-Request-Id": item}).status for item in "aab"]
    assert statuses == [503, 200, 503]
    server.configure(fault_mode="any")
    assert chat(server, chat_body(), headers={"X-Request-Id": "a"}).status == 503


def test_fault_script_applies_in_arrival_order(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["429", "ok", "500"], fault_rate=1.0)
    assert [chat(server, chat_body()).status for _ in range(5)] == [429, 200, 500, 200, 200]
    server.reset()  # rewinds the script
    assert chat(server, chat_body()).status == 429


def test_fault_rate_is_deterministic_per_item_and_attempt(make_server: Callable[..., EmulatorServer]) -> None:
    kinds = ("429", "500")
    server = make_server(fault_rate=0.5, fault_kinds=kinds, seed=7)
    items = [f"item-{i}" for i in range(40)]
    expected = {
        item: {None: 200, "429": 429, "500": 500}[rate_fault(7, item, 1, 0.5, kinds)] for item in items
    }
    assert {200, 429, 500} <= set(expected.values())

    def send(item: str) -> int:
        return chat(server, chat_body(), headers={"X-Request-Id": item}).status

    with ThreadPoolExecutor(8) as pool:
        concurrent = dict(zip(items, pool.map(send, items), strict=True))
    server.reset()
    sequential = {item: send(item) for item in reversed(items)}
    assert concurrent == sequential == expected
    other_seed = [rate_fault(8, item, 1, 0.5, kinds) for item in items]
    assert other_seed != [rate_fault(7, item, 1, 0.5, kinds) for item in items]


# ---------------------------------------------------------------- concurrency, stats, control


def test_concurrency_cap_queues_requests(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(max_concurrency=2, latency=0.2)
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(lambda _: chat(server, chat_body()).status, range(6)))
    elapsed = time.monotonic() - started
    stats = server.stats()
    assert statuses == [200] * 6
    assert stats["max_processing"] == 2
    assert stats["max_in_flight"] > 2  # the others were queued inside the server
    assert elapsed >= 0.6  # three waves of two; a lower bound only


def test_stats_count_per_item(server: EmulatorServer) -> None:
    body = chat_body("no id")
    for item in ("a", "a", "b", "c0ffee-0a1b2c3d-1", "c0ffee-9f8e7d6c-2"):  # the last two: vlmbatch's form
        chat(server, body, headers={"X-Request-Id": item})
    chat(server, body)
    chat(server, body)  # no header: the body's hash is the work item
    stats = control(server, "stats").json()
    body_id = hashlib.sha256(json.dumps(body).encode()).hexdigest()
    assert stats["per_item"] == {"a": 2, "b": 1, "c0ffee": 2, body_id: 2}
    assert stats["requests_total"] == 7 and stats["by_status"] == {"200": 7}
    assert stats["in_flight"] == 0 and stats["max_in_flight"] >= 1
    assert [entry["item"] for entry in stats["log"]] == ["a", "a", "b", "c0ffee", "c0ffee", body_id, body_id]
    assert all(entry["fault"] is None and entry["t"] >= 0 for entry in stats["log"])


def test_runtime_config_and_reset(server: EmulatorServer) -> None:
    changed = control(server, "config", {"fault_script": ["503"], "latency": 0.01, "api_key": "k"})
    assert changed.status == 200
    assert changed.json()["fault_script"] == ["503"] and changed.json()["api_key"] == "***"
    assert chat(server, chat_body(), headers={"Authorization": "Bearer k"}).status == 503
    for bad in ({"nope": 1}, {"port": 1234}, {"fault_rate": 2}, {"fault_kinds": ["boom"]}, [1]):
        assert control(server, "config", bad).status == 400
    assert server.configure(api_key=None).api_key is None
    assert control(server, "reset", {}).json() == {"reset": True}
    stats = server.stats()
    assert (stats["requests_total"], stats["by_status"], stats["per_item"], stats["log"]) == (0, {}, {}, [])


def test_image_cache_skips_decoding() -> None:
    loader = ImageLoader(cache_size=2)
    url = data_url(ORANGE_PNG)

    async def twice() -> list[Any]:
        return [await loader.load(url, None, 1.0), await loader.load(url, None, 1.0)]

    first, second = asyncio.run(twice())
    assert first is second and (loader.hits, loader.misses) == (1, 1)
    transparent = describe_bytes(encode((10, 10), (255, 0, 0, 0), mode="RGBA"))
    assert transparent.colour == "white"  # alpha flattened onto white


def test_settings_validation_and_flags() -> None:
    with pytest.raises(ValueError, match="fault kinds"):
        EmulatorSettings(fault_kinds=("boom",))
    with pytest.raises(ValueError, match="fault_rate"):
        EmulatorSettings(fault_rate=1.5)
    with pytest.raises(ValueError, match="unknown settings"):
        EmulatorSettings().with_changes(colour="red")
    settings = settings_from_args(
        ["--model", "a", "--model", "b", "--fault-kinds", "429,reset", "--retry-after", "none", "--down"]
    )
    assert settings.models == ("a", "b") and settings.fault_kinds == ("429", "reset")
    assert settings.retry_after is None and settings.down is True and settings.latency == 0.05


def test_python_dash_m_emulator_serves(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "emulator", "--port", "0", "--latency", "0", "--fault-script", "429"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    try:
        ready, _, _ = select.select([process.stdout], [], [], 20)
        assert ready
        line = process.stdout.readline().strip()
        assert line.startswith("emulator listening on http://127.0.0.1:") and line.endswith("/v1")
        base = line.removeprefix("emulator listening on ")
        assert call(f"{base}/chat/completions", chat_body()).status == 429
        assert (
            message(call(f"{base}/chat/completions", chat_body("Hi")))["content"] == 'No image. Prompt: "Hi"'
        )
    finally:
        process.terminate()
        out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err
    assert out == ""  # exactly one line was printed
