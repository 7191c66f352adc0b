"""The path every model request takes (chat completions, responses); the order is in :mod:`emulator.server`.

An :class:`Api` says how a route's body becomes a :class:`ChatRequest` and how an answer becomes its
response body; arrival counting, auth, faults, image reading, the gateway timeout, the Azure 424
wrapping, latency, the concurrency cap, streaming and the stats are shared.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from emulator import streaming, tools
from emulator.answers import Answer, answer, caption, continuation, prompt_tokens
from emulator.errors import JSON_HEADERS, ApiError, container_error, unauthorized_response
from emulator.faults import GATEWAY_FAULTS
from emulator.gateway import authorized, drop_connection, gateway_error, loading_error, timeout_error
from emulator.schema_output import Facts
from emulator.settings import EmulatorSettings
from emulator.state import STATE, EmulatorState
from emulator.structured import JSON_FAULTS, render
from emulator.validation import ChatRequest, check_context, parse_body

ENGINE_ERROR = "The engine failed while generating the response (injected fault)."


@dataclass(frozen=True, slots=True)
class Api:
    """One model route: its path (for the stats), its validation and its response body."""

    route: str
    validate: Callable[[dict[str, Any], EmulatorSettings], ChatRequest]
    render: Callable[[ChatRequest, Answer, dict[str, Any], EmulatorSettings], dict[str, Any]]


class _Outcome:
    """What the stats record of one request (once); ``cancelled`` unless an answer is reached."""

    __slots__ = ("arrived", "fault", "features", "item", "recorded", "route", "state", "status", "streamed")

    def __init__(self, state: EmulatorState, item: str, route: str, arrived: float) -> None:
        self.state, self.item, self.route, self.arrived = state, item, route, arrived
        self.status: int | str = "cancelled"
        self.fault: str | None = None
        self.streamed = False
        self.features: set[str] = set()  # once the body is valid: what it used, "tool_calls" if answered so
        self.recorded = False

    def record(self) -> None:
        if not self.recorded:
            self.recorded = True
            self.state.stats.finish(
                self.item,
                self.status,
                self.arrived,
                self.fault,
                route=self.route,
                streamed=self.streamed,
                features=self.features,
            )


_ATTEMPT_ID = re.compile(r"(\w+)-[0-9a-f]{8}-\d+")  # vlmbatch's X-Request-Id: item-run-attempt


def work_item(request_id: str | None) -> str | None:
    """The work item an X-Request-Id names: vlmbatch's ``<item>-<run>-<attempt>`` counts as its item,
    so attempts are numbered per item (faults are drawn per item and attempt); any other id as is."""
    if request_id is None:
        return None
    found = _ATTEMPT_ID.fullmatch(request_id)
    return found.group(1) if found else request_id


async def handle(request: web.Request, api: Api) -> web.StreamResponse:
    state = request.app[STATE]
    settings = state.settings
    timeout = settings.gateway_timeout
    deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
    raw = await request.read()
    item = work_item(request.headers.get("X-Request-Id")) or hashlib.sha256(raw).hexdigest()
    outcome = _Outcome(state, item, api.route, state.stats.now())
    attempt = state.stats.arrive(item, api.route)
    transport = request.transport
    if transport is not None:
        state.answering.add(transport)
    try:
        return await _respond(request, api, state, settings, raw, item, attempt, deadline, outcome)
    finally:
        if transport is not None:
            state.answering.discard(transport)
        outcome.record()


async def _respond(
    request: web.Request,
    api: Api,
    state: EmulatorState,
    settings: EmulatorSettings,
    raw: bytes,
    item: str,
    attempt: int,
    deadline: float | None,
    outcome: _Outcome,
) -> web.StreamResponse:
    if settings.down:
        outcome.status, outcome.fault = "reset", "down"
        return drop_connection(request)
    if not authorized(request, settings):
        outcome.status = 401
        return unauthorized_response()
    if state.loading():  # a NIM loading its model
        outcome.status, outcome.fault = 503, "loading"
        return loading_error(settings)
    if settings.reject_over_capacity and state.at_capacity():  # a gateway in front of a full server
        outcome.fault, outcome.status = "capacity", 429
        return gateway_error("429", settings)
    planned = state.faults.decide(settings, item, attempt)
    if planned in GATEWAY_FAULTS:
        outcome.fault = planned
        outcome.status = "reset" if planned == "reset" else int(planned)
        return drop_connection(request) if planned == "reset" else gateway_error(planned, settings)
    try:
        async with asyncio.timeout_at(deadline) as timer:
            body, chat, result = await _generate(state, settings, raw, api, planned, outcome)
            if chat.stream:
                return await _stream(request, state, settings, chat, result, planned, outcome, timer)
            await state.process(settings, settings.token_seconds * result.completion_tokens)
    except ApiError as error:
        response = container_error(error, flat=settings.flat_errors, azure=settings.azure_gateway)
        outcome.status = response.status  # what the client gets: 424 behind an Azure gateway
        return response
    except TimeoutError:
        if not timer.expired():  # not the gateway's clock: a bug, not a 408
            raise
        outcome.status = 408
        return timeout_error(settings)
    payload = json.dumps(api.render(chat, result, body, settings), ensure_ascii=False, separators=(",", ":"))
    data = payload.encode()
    outcome.status = 200
    if planned == "malformed":
        outcome.fault = planned
        data = data[: len(data) // 2]
    return web.Response(body=data, headers=JSON_HEADERS)


async def _generate(
    state: EmulatorState,
    settings: EmulatorSettings,
    raw: bytes,
    api: Api,
    planned: str | None,
    outcome: _Outcome,
) -> tuple[dict[str, Any], ChatRequest, Answer]:
    """Validate, read the images, check the context, answer; then the engine faults (ApiError)."""
    body = parse_body(raw)
    chat = api.validate(body, settings)
    outcome.features.update(chat.features)
    infos = [
        await state.images.load(url, state.session, settings.image_fetch_timeout) for url in chat.image_urls
    ]
    prompt_count = prompt_tokens(chat, infos)
    budget = check_context(chat.max_tokens, prompt_count, settings.max_model_len)
    json_fault = planned if planned in JSON_FAULTS else None
    plain = caption(chat.prompt, infos, chat.previous_answer)
    text, call = None, None
    function = tools.called(chat.tools, chat.prompt, continuing=chat.prefill is not None)
    if function is not None:
        call = tools.make_call(function, Facts.of(plain, chat.prompt, infos), fault=json_fault)
    elif chat.output is not None:
        text = render(chat.output, plain, chat.prompt, infos, fault=json_fault)
    if json_fault is not None and (call is not None or chat.output is not None):
        outcome.fault = json_fault
    if chat.prefill is not None and call is None:
        text = continuation(chat.prefill, plain if text is None else text, structured=chat.output is not None)
    result = answer(chat, infos, budget, prompt_count, text, call)
    if planned == "500" or (planned == "stream_error" and not chat.stream):
        outcome.fault = planned
        raise ApiError(500, ENGINE_ERROR)
    if result.tool_call is not None:
        outcome.features.add("tool_calls")
    if planned == "hang":
        outcome.fault = planned
        await asyncio.sleep(settings.hang_seconds)
    return body, chat, result


async def _stream(
    request: web.Request,
    state: EmulatorState,
    settings: EmulatorSettings,
    chat: ChatRequest,
    result: Answer,
    planned: str | None,
    outcome: _Outcome,
    timer: asyncio.Timeout,
) -> web.StreamResponse:
    """Hold a slot for the latency, then stream; the gateway timeout no longer applies once it starts."""
    fault = planned if planned in ("stream_error", "malformed") else None
    events = streaming.events(
        chat.model,
        result,
        reasoning_field=settings.reasoning_field,
        include_reasoning=chat.include_reasoning,
        include_usage=chat.include_usage,
        fault=fault,
        flat_errors=settings.flat_errors,
    )
    async with state.slot():
        delay = state.delay(settings)
        if delay > 0:
            await asyncio.sleep(delay)
        timer.reschedule(None)
        outcome.streamed = True
        outcome.fault = fault or outcome.fault

        def ending() -> None:
            outcome.status = 200
            outcome.record()

        return await streaming.send(
            request, events, token_seconds=settings.token_seconds, latency=settings.latency, ending=ending
        )
