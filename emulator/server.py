"""The emulator's HTTP app: OpenAI-compatible routes plus ``/_emulator/*`` control routes.

The model routes, ``POST /v1/chat/completions`` and ``POST /v1/responses``, share one path
(:mod:`emulator.pipeline`); in order:

1. Read the body; the work item is the ``X-Request-Id`` header, else the sha256 of the body. Count the
   arrival (per route too), which gives the attempt number of that work item. With
   ``gateway_timeout`` set, its clock starts now.
2. ``down``: drop the connection (TCP reset, no response).
3. ``api_key`` set and no matching ``Authorization: Bearer`` header: 401 ``{"error":"Unauthorized"}``.
   Still ``loading_seconds`` since that was set: 503 (with Retry-After), as NIM while its model loads.
4. Decide the fault (script, else rate). Gateway faults are answered now, before validation:
   ``429`` and ``503`` (with Retry-After / retry-after-ms), ``408`` and ``reset``.
5. Validate the body (the Responses API's is first turned into a chat request), read the images
   (cache first), check the context, build the content (structured output: JSON for the schema; a
   function call: its arguments; ``bad_json``/``broken_json`` spoil either; a prefill: only its
   continuation): 400/404/422/500/501 errors.
6. Engine faults, for valid requests only: ``500`` is answered now (so is ``stream_error`` when the
   request does not stream); ``hang`` waits ``hang_seconds`` (without holding a concurrency slot) and
   then goes on normally.
7. Queue for a concurrency slot and hold it for ``latency`` + jitter (+ ``token_seconds`` per output
   token when not streaming).
8. Answer 200; a ``malformed`` fault cuts the JSON body in half. A stream (``stream: true``) sends
   its first event now and the rest spread out, still holding the slot; ``stream_error`` ends it with
   an error event, ``malformed`` garbles one event (see :mod:`emulator.streaming`).

``gateway_timeout``: when steps 5-7 are not done (for a stream: the first event not sent) that many
seconds after arrival, the answer is a 408 at that moment; a started stream is never cut.
``azure_gateway``: the errors of steps 5-6 (the container's) reach the client as 424 with
``ms-azureml-model-error-statuscode``; 401, 408, 429 and 503 come from the gateway and stay as they are.

Every other ``/v1`` route goes through steps 2 and 3 only (``/v1/health/ready`` also answers 503
while loading; ``/v1/models`` and ``/v1/health/live`` do not); ``health_route=False`` makes
``/v1/health/*`` a 404 (vLLM has only ``/health``). Control routes never see auth or faults.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from emulator.answers import Answer, completion_body
from emulator.errors import from_container, json_response
from emulator.gateway import drop_connection, gate, loading_error
from emulator.pipeline import Api, handle
from emulator.responses_api import response_body, validate_responses
from emulator.settings import EmulatorSettings
from emulator.state import STATE, EmulatorState
from emulator.validation import ChatRequest, validate_chat

__all__ = ["STATE", "create_app", "drop_connection"]
MAX_BODY_BYTES = 256 * 1024 * 1024  # base64 images make large bodies; vLLM has no small limit


def _chat_body(chat: ChatRequest, result: Answer, body: dict[str, Any], settings: EmulatorSettings) -> Any:
    return completion_body(
        chat.model, result, reasoning_field=settings.reasoning_field, include_reasoning=chat.include_reasoning
    )


def _responses_body(chat: ChatRequest, result: Answer, body: dict[str, Any], _: EmulatorSettings) -> Any:
    return response_body(chat, result, body)


CHAT = Api("/v1/chat/completions", validate_chat, _chat_body)
RESPONSES = Api("/v1/responses", validate_responses, _responses_body)


def create_app(settings: EmulatorSettings) -> web.Application:
    """A fresh app with its own :class:`EmulatorState` (``app[STATE]``)."""
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app[STATE] = EmulatorState(settings)
    app.cleanup_ctx.append(_client_session)
    app.router.add_post(CHAT.route, chat_completions)
    app.router.add_post(RESPONSES.route, responses)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/health/ready", ready)
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
    return await handle(request, CHAT)


async def responses(request: web.Request) -> web.StreamResponse:
    return await handle(request, RESPONSES)


async def list_models(request: web.Request) -> web.StreamResponse:
    settings = request.app[STATE].settings
    if (refusal := gate(request, settings)) is not None:
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
    """Liveness: the server is up."""
    settings = request.app[STATE].settings
    if (refusal := gate(request, settings)) is not None:
        return refusal
    return _healthy(settings)


async def ready(request: web.Request) -> web.StreamResponse:
    """Readiness: like liveness, but 503 while the model loads (NIM)."""
    state = request.app[STATE]
    settings = state.settings
    if (refusal := gate(request, settings)) is not None:
        return refusal
    if settings.health_route and state.loading():
        return loading_error(settings)
    return _healthy(settings)


def _healthy(settings: EmulatorSettings) -> web.StreamResponse:
    if not settings.health_route:  # FastAPI's body for an unknown route, as vLLM sends it
        return from_container(
            json_response({"detail": "Not Found"}, status=404), azure=settings.azure_gateway
        )
    return json_response({"object": "health.response", "message": "Service is ready."})


async def get_stats(request: web.Request) -> web.StreamResponse:
    """The counters; ``?log=0`` leaves out the log of requests (cheap enough to poll)."""
    log = request.query.get("log", "1").lower() not in ("0", "false", "no")
    return json_response(request.app[STATE].stats.snapshot(log=log))


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
