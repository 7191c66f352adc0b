"""Chat completions as a server-sent event stream (``stream: true``), shaped like vLLM's.

Events, each ``data: <json>\\n\\n``: a first chunk whose delta has the role (and empty content); the
reasoning in pieces (when thinking is on and not hidden; in ``reasoning``, ``reasoning_content`` or
both, as ``reasoning_field`` says); the content in pieces of :data:`PIECE_CHARS` characters; a chunk
with an empty delta and the ``finish_reason``; with ``stream_options.include_usage`` a last chunk with
``choices: []`` and ``usage``; then ``data: [DONE]``. Joined, the pieces are the non-streamed texts.

A function call, as vLLM streams one, replaces the content pieces: a chunk whose delta is
``{"tool_calls": [{"index": 0, "id", "type": "function", "function": {"name", "arguments": ""}}]}``,
then the arguments in pieces, ``{"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}``;
the finish chunk says ``"tool_calls"``.

Faults: ``stream_error`` sends at most two content pieces, then ``data: {"error": {...}}`` (a 500
InternalServerError, as vLLM reports an engine failure after the 200) and ends without ``[DONE]``;
``malformed`` cuts the JSON of one event in the middle of the stream in half.

Timing: the first event goes out after the latency (the caller's), the rest follow
``token_seconds`` per token of their piece apart, or, with no decode time set, briefly spread
(at most :data:`BRIEF_GAP` seconds apart).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from emulator.answers import CHARS_PER_TOKEN, Answer, reasoning_fields, usage
from emulator.errors import ApiError, error_body

SSE_HEADERS: dict[str, str] = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
}
PIECE_CHARS = 16  # about four tokens a chunk
BRIEF_GAP = 0.002
DONE = b"data: [DONE]\n\n"
STREAM_ERROR = "The engine failed while streaming the response (injected fault)."


def events(
    model: str,
    result: Answer,
    *,
    reasoning_field: str,
    include_reasoning: bool,
    include_usage: bool,
    fault: str | None,
    flat_errors: bool,
) -> list[bytes]:
    """Every event of the stream, in order."""
    head: dict[str, Any] = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk"}
    head.update(created=int(time.time()), model=model)

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if finish is not None:
            choice["stop_reason"] = None
        return _event({**head, "choices": [choice]})

    out = [chunk({"role": "assistant", "content": ""})]
    if result.reasoning is not None and include_reasoning:
        out += [chunk(reasoning_fields(piece, reasoning_field)) for piece in pieces(result.reasoning)]
    call = result.tool_call
    if call is not None:
        opening = {"index": 0, "id": call.id, "type": "function"}
        content = [chunk({"tool_calls": [{**opening, "function": {"name": call.name, "arguments": ""}}]})]
        content += [
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            for piece in pieces(call.arguments)
        ]
    else:
        content = [chunk({"content": piece}) for piece in pieces(result.content or "")]
    if fault == "stream_error":
        error = error_body(ApiError(500, STREAM_ERROR), flat=flat_errors)
        return [*out, *content[:2], _event(error if not flat_errors else {"error": error})]
    out += content
    out.append(chunk({}, result.finish_reason))
    if include_usage:
        out.append(_event({**head, "choices": [], "usage": usage(result)}))
    if fault == "malformed":
        middle = len(out) // 2
        out[middle] = out[middle][: len(out[middle]) // 2] + b"\n\n"
    out.append(DONE)
    return out


def pieces(text: str) -> list[str]:
    return [text[start : start + PIECE_CHARS] for start in range(0, len(text), PIECE_CHARS)]


async def send(
    request: web.Request,
    stream: list[bytes],
    *,
    token_seconds: float,
    latency: float,
    ending: Callable[[], None],
) -> web.StreamResponse:
    """Write ``stream`` as a 200 event stream; ``ending()`` just before its last event goes out.

    (So whatever ``ending`` records is there by the time a client has read the whole stream.)
    """
    response = web.StreamResponse(headers=SSE_HEADERS)
    piece_tokens = PIECE_CHARS // CHARS_PER_TOKEN
    gap = token_seconds * piece_tokens if token_seconds > 0 else min(BRIEF_GAP, latency / len(stream))
    try:
        await response.prepare(request)
        await response.write(stream[0])
        for index, event in enumerate(stream[1:], 2):
            if gap > 0:
                await asyncio.sleep(gap)
            if index == len(stream):
                ending()
            await response.write(event)
        await response.write_eof()
    except ConnectionResetError:  # the client went away: nothing more to send
        pass
    return response


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"
