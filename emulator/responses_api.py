"""The Responses API (``POST /v1/responses``, vLLM's): its request turned into a chat request, its body.

Request: ``model``; ``input``, a string or a list of items: messages (``{"role", "content"}``, with or
without ``"type": "message"``; content a string or ``input_text``/``input_image`` parts, ``input_image``
carrying ``image_url`` as a URL or data URL string and a required ``detail``; ``output_text`` parts only
in an output message item given back, with its ``id`` and ``status``), ``reasoning`` items from
earlier turns (skipped); ``instructions`` (a system message first); ``max_output_tokens``;
``reasoning: {"effort": "low"|"medium"|"high"}`` (turns thinking on; the effort sets how long the
reasoning is); ``text: {"format": {"type": "json_schema", "name", "schema", "strict"}}`` or
``json_object``; ``tools``, function tools in the flat form ``{"type": "function", "name",
"description"?, "parameters"?, "strict"?}`` (another type is a 400; ``[]`` is no tools), and
``tool_choice``: ``"auto"`` (the default), ``"required"``, ``"none"`` or ``{"type": "function", "name"}``.
``stream: true`` is a 400 (not supported by this emulator); ``previous_response_id`` is a 404, as on a
vLLM without a response store; ``function_call``/``function_call_output`` input items are a 400. The
converted request is validated like a chat one (tools as in :mod:`emulator.tools`).

Response: ``{"id": "resp_...", "object": "response", "created_at", "model", "status": "completed" |
"incomplete", "incomplete_details": null | {"reason": "max_output_tokens"}, "error": null,
"instructions", "max_output_tokens", "output": [reasoning item?, message item?], "usage":
{"input_tokens", "input_tokens_details": {"cached_tokens": 0}, "output_tokens",
"output_tokens_details": {"reasoning_tokens"}, "total_tokens"}}``; no ``output_text`` (the SDK builds
it). The message item is left out when the budget ran out during the reasoning, as vLLM does. An answer
that calls a function has, instead of the message item, ``{"type": "function_call", "id": "fc_...",
"call_id": "call_...", "name", "arguments": "<JSON text>", "status": "completed"}``.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

from emulator.answers import Answer
from emulator.errors import ApiError
from emulator.settings import EmulatorSettings
from emulator.structured import OutputFormat, parse_format
from emulator.validation import ChatRequest, validate_chat

EFFORTS = ("low", "medium", "high")
TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
OUTPUT_PARTS = frozenset({"output_text", "refusal"})  # only inside an output message item, as vLLM checks
DETAILS = ("low", "high", "auto")  # input_image.detail is required by the types vLLM validates with
ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def validate_responses(body: dict[str, Any], settings: EmulatorSettings) -> ChatRequest:
    """The chat request a Responses body amounts to; raises :class:`ApiError` like vLLM."""
    if body.get("stream") is True:
        raise ApiError(400, "Streaming is not supported by this emulator on /v1/responses.", param="stream")
    if body.get("previous_response_id") is not None:
        shown = body["previous_response_id"]
        raise ApiError(404, f"Response with id '{shown}' not found.", param="previous_response_id")
    messages: list[dict[str, Any]] = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ApiError(400, "`instructions` must be a string.", param="instructions")
        messages.append({"role": "system", "content": instructions})
    messages += _input_messages(body.get("input"))
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    budget = body.get("max_output_tokens")
    if budget is not None:
        if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
            raise ApiError(400, f"`max_output_tokens` must be a positive integer, got {budget!r}.")
        chat["max_completion_tokens"] = budget
    effort = _effort(body.get("reasoning"))
    chat["chat_template_kwargs"] = {"enable_thinking": effort is not None}
    chat.update(_tools(body.get("tools"), body.get("tool_choice")))
    output = _output_format(body.get("text"))
    request = validate_chat(chat, settings)
    features = {"with_tools"} if request.tools is not None else set()
    if effort is not None:
        features.add("thinking_on")
    return dataclasses.replace(
        request, output=output, effort=effort or "medium", features=frozenset(features)
    )


def response_body(request: ChatRequest, result: Answer, body: dict[str, Any]) -> dict[str, Any]:
    """A Responses API response object shaped like vLLM's."""
    output: list[dict[str, Any]] = []
    if result.reasoning is not None:
        output.append(
            {
                "type": "reasoning",
                "id": f"rs_{uuid.uuid4().hex}",
                "content": [{"type": "reasoning_text", "text": result.reasoning}],
                "summary": [],
            }
        )
    if result.tool_call is not None:
        call = result.tool_call
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{uuid.uuid4().hex}",
                "call_id": call.id,
                "name": call.name,
                "arguments": call.arguments,
                "status": "completed",
            }
        )
    if result.content:
        output.append(
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": result.content, "annotations": []}],
            }
        )
    complete = result.finish_reason != "length"
    return {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "model": request.model,
        "status": "completed" if complete else "incomplete",
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "error": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "output": output,
        "usage": {
            "input_tokens": result.prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": result.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": result.reasoning_tokens},
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ApiError(400, "`input` must be a string or a non-empty list of input items.", param="input")
    messages: list[dict[str, Any]] = []
    for item in value:
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "reasoning":  # an earlier turn's reasoning: not part of the prompt
            continue
        if kind != "message" or not isinstance(item, dict):
            raise ApiError(400, f"Unsupported input item type {kind!r}; use message items.", param="input")
        role = item.get("role")
        role = ROLES.get(role, role) if isinstance(role, str) else role
        content = item.get("content")
        if isinstance(content, list):
            output_item = "id" in item and "status" in item  # a ResponseOutputMessage given back
            content = [_part(part, output_item) for part in content]
        messages.append({"role": role, "content": content})
    return messages


def _part(part: Any, output_item: bool) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in OUTPUT_PARTS and not output_item:
        raise ApiError(
            400,
            f"1 validation error for ResponsesRequest: input: a {kind} part belongs to an output message "
            "item (with `id`, `status` and `type`); give an earlier assistant turn as string content",
            param="input",
        )
    if kind in TEXT_PARTS and isinstance(part, dict):
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise ApiError(400, f"A {kind} part needs a string `text`.", param="input")
        return {"type": "text", "text": text}
    if kind == "input_image" and isinstance(part, dict):
        url = part.get("image_url")
        if not isinstance(url, str) or not url:
            raise ApiError(400, "An input_image part needs `image_url` (a URL or data URL).", param="input")
        if part.get("detail") not in DETAILS:
            raise ApiError(
                400,
                "1 validation error for ResponsesRequest: input: input_image.detail: Field required "
                "(one of low, high, auto)",
                param="input",
            )
        return {"type": "image_url", "image_url": {"url": url}}
    raise ApiError(400, f"Unknown content part type: {kind}", param="input")


def _tools(tools: Any, choice: Any) -> dict[str, Any]:
    """The chat completions ``tools`` and ``tool_choice`` for the Responses API's flat function tools."""
    if tools is None or tools == []:
        return {} if choice is None else {"tool_choice": choice}
    if not isinstance(tools, list):
        raise ApiError(400, "`tools` must be a list of function tools.", param="tools")
    converted: list[dict[str, Any]] = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function" or not isinstance(tool, dict):
            raise ApiError(
                400, f"Unsupported tool type {kind!r} in `tools[{index}]`; use function tools.", param="tools"
            )
        keys = ("name", "description", "parameters")
        converted.append({"type": "function", "function": {key: tool[key] for key in keys if key in tool}})
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise ApiError(
                400, 'A named `tool_choice` is `{"type": "function", "name": ...}`.', param="tool_choice"
            )
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    return {"tools": converted} if choice is None else {"tools": converted, "tool_choice": choice}


def _effort(reasoning: Any) -> str | None:
    if reasoning is None:
        return None
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else reasoning
    if effort is None:
        return "medium"
    if effort not in EFFORTS:
        raise ApiError(400, f"`reasoning.effort` must be one of {', '.join(EFFORTS)}.", param="reasoning")
    return str(effort)


def _output_format(text: Any) -> OutputFormat | None:
    if text is None:
        return None
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None and isinstance(text, dict):
        return None
    if not isinstance(fmt, dict):
        raise ApiError(400, "`text.format` must be an object.", param="text")
    return parse_format(fmt, "text.format")
