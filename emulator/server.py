"""The emulator's HTTP app: OpenAI-compatible routes plus ``/_emulator/*`` control routes.

Order of ``POST /v1/chat/completions``:

1. Read the body; the work item is the ``X-Request-Id`` header, else the sha256 of the body. Count the
   arrival, which gives the attempt number of that work item.
2. ``down``: drop the connection (TCP reset, no response).
3. ``api_key`` set and no matching ``Authorization: Bearer`` header: 401 ``{"error":"Unauthorized"}``.
4. Decide the fault (script, else rate). Gateway faults are answered now, before validation:
   ``429`` and ``503`` (with Retry-After / retry-after-ms) and ``reset``.
5. Validate the body, read the images (cache first), check the context: 400/404/422/500/501 errors.
6. Engine faults, for valid requests only: ``500`` is answered now; ``hang`` waits ``hang_seconds``
   (without holding a concurrency slot) and then goes on normally.
7. Queue for a concurrency slot and hold it for ``latency`` + jitter.
8. Answer 200; a ``malformed`` fault cuts the JSON body in half.

Every other ``/v1`` route goes through steps 2 and 3 only. Control routes never see auth or faults.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from emulator.answers import answer, completion_body, prompt_tokens
from emulator.errors import JSON_HEADERS, ApiError, error_response, json_response, unauthorized_response
from emulator.faults import GATEWAY_FAULTS
from emulator.settings import EmulatorSettings
from emulator.state import EmulatorState
from emulator.validation import check_context, parse_body, validate_chat

STATE = web.AppKey("emulator_state", EmulatorState)
MAX_BODY_BYTES = 256 * 1024 * 1024  # base64 images make large bodies; vLLM has no small limit
GATEWAY_MESSAGES = {
    "429": "Rate limit exceeded: too many requests in flight. Please retry later.",
    "503": "The service is temporarily unavailable. Please retry later.",
}


def create_app(settings: EmulatorSettings) -> web.Application:
    """A fresh app with its own :class:`EmulatorState` (``app[STATE]``)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = EmulatorState(settings)
    app.cleanup_ctx.append(_client_session)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/health/ready", health)
    app.router.add_get("/v1/health/live", health)
    app.router.add_get("/_emulator/stats", get_stats)
    app.router.add_post("/_emulator/reset", reset_stats)
    app.router.add_post("/_emulator/config", configure)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    state.session = aiohttp.ClientSession()
    yield
    await state.session.close()
    state.session = None


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    settings = state.settings
    raw = await request.read()
    item = request.headers.get("X-Request-Id") or hashlib.sha256(raw).hexdigest()
    arrived = state.stats.now()
    attempt = state.stats.arrive(item)
    status: int | str = "cancelled"  # unless an answer is reached: the client went away
    fault: str | None = None
    try:
        if settings.down:
            status, fault = "reset", "down"
            return drop_connection(request)
        if not _authorized(request, settings):
            status = 401
            return unauthorized_response()
        planned = state.faults.decide(settings, item, attempt)
        if planned in GATEWAY_FAULTS:
            fault = planned
            status = "reset" if planned == "reset" else int(planned)
            return drop_connection(request) if planned == "reset" else _gateway_error(planned, settings)
        try:
            body = await _complete(state, settings, raw)
        except ApiError as error:
            status = error.status
            return error_response(error, flat=settings.flat_errors)
        if planned == "500":
            fault, status = planned, 500
            engine_error = ApiError(500, "The engine failed while generating the response (injected fault).")
            return error_response(engine_error, flat=settings.flat_errors)
        if planned == "hang":
            fault = planned
            await asyncio.sleep(settings.hang_seconds)
        await state.process(settings)
        payload = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        status = 200
        if planned == "malformed":
            fault = planned
            payload = payload[: len(payload) // 2]
        return web.Response(body=payload, headers=JSON_HEADERS)
    finally:
        state.stats.finish(item, status, arrived, fault)


async def _complete(state: EmulatorState, settings: EmulatorSettings, raw: bytes) -> dict[str, Any]:
    """Validate, read the images and build the completion body; raises :class:`ApiError`."""
    chat = validate_chat(parse_body(raw), settings)
    infos = [
        await state.images.load(url, state.session, settings.image_fetch_timeout) for url in chat.image_urls
    ]
    prompt_count = prompt_tokens(chat, infos)
    budget = check_context(chat.max_tokens, prompt_count, settings.max_model_len)
    result = answer(chat, infos, budget, prompt_count)
    return completion_body(
        chat.model,
        result,
        reasoning_field=settings.reasoning_field,
        include_reasoning=chat.include_reasoning,
    )


async def list_models(request: web.Request) -> web.StreamResponse:
    settings = request.app[STATE].settings
    if (refusal := _gate(request, settings)) is not None:
        return refusal
    created = int(time.time())
    data = [
        {
            "id": model,
            "object": "model",
            "created": created,
            "owned_by": "vlmbatch-emulator",
            "max_model_len": settings.max_model_len,
        }
        for model in settings.models
    ]
    return json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.StreamResponse:
    if (refusal := _gate(request, request.app[STATE].settings)) is not None:
        return refusal
    return json_response({"object": "health.response", "message": "Service is ready."})


async def get_stats(request: web.Request) -> web.StreamResponse:
    return json_response(request.app[STATE].stats.snapshot())


async def reset_stats(request: web.Request) -> web.StreamResponse:
    request.app[STATE].reset()
    return json_response({"reset": True})


async def configure(request: web.Request) -> web.StreamResponse:
    try:
        changes = json.loads(await request.read() or b"{}")
        if not isinstance(changes, dict):
            raise ValueError("the body must be a JSON object of settings")
        settings = request.app[STATE].configure(changes)
    except (ValueError, TypeError) as exc:
        return json_response({"error": str(exc)}, status=400)
    return json_response(settings.public_dict())


def drop_connection(request: web.Request) -> web.StreamResponse:
    """Abort the TCP connection with a reset (SO_LINGER 0); the returned response is never written."""
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    return web.Response(status=204)


def _gate(request: web.Request, settings: EmulatorSettings) -> web.StreamResponse | None:
    """Steps 2 and 3 for the /v1 routes other than chat completions."""
    if settings.down:
        return drop_connection(request)
    if not _authorized(request, settings):
        return unauthorized_response()
    return None


def _authorized(request: web.Request, settings: EmulatorSettings) -> bool:
    return settings.api_key is None or request.headers.get("Authorization") == f"Bearer {settings.api_key}"


def _gateway_error(kind: str, settings: EmulatorSettings) -> web.Response:
    headers: dict[str, str] = {}
    if settings.retry_after is not None:
        headers["Retry-After"] = _seconds(settings.retry_after)
    if settings.retry_after_ms is not None:
        headers["retry-after-ms"] = str(settings.retry_after_ms)
    error = ApiError(int(kind), GATEWAY_MESSAGES[kind])
    return error_response(error, flat=settings.flat_errors, headers=headers)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
