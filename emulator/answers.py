"""The emulated model's answer: deterministic text from what was received, reasoning, usage, body.

The content names each image's size, dominant colour and fingerprint, then echoes the last user
prompt (a request for structured output gets JSON instead, see :mod:`emulator.structured`); the
reasoning says what was asked and seen, shorter or longer with the Responses API's effort. Token
counts are estimates (4 characters a token; per image ceil(w*h/2304) capped at 280).
When the budget runs out, the reasoning is spent first, then the content, as on a real server: if the
reasoning alone uses the budget up, ``content`` is ``null`` (vLLM's reasoning parser does the same).

An answer that calls a function (:mod:`emulator.tools`) has ``content: null``, the call in
``tool_calls`` and ``finish_reason: "tool_calls"``; its arguments count as the content would.

Continuing a final assistant message (``continue_final_message``): the content is only the
continuation, as vLLM returns only the new tokens (:func:`continuation`), and there is no reasoning
(the model is past the point where it would think).
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emulator.images import ImageInfo
from emulator.tools import ToolCall
from emulator.validation import ChatRequest

CHARS_PER_TOKEN = 4
PREVIOUS_QUOTED = 40  # characters of the previous answer a follow-up quotes


@dataclass(frozen=True, slots=True)
class Answer:
    content: str | None
    reasoning: str | None  # None: no reasoning was generated
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    reasoning_tokens: int = 0
    tool_call: ToolCall | None = None  # the function called (content is then None)


def prompt_tokens(request: ChatRequest, images: Sequence[ImageInfo]) -> int:
    return _tokens(request.text_chars) + sum(info.tokens for info in images)


def caption(prompt: str, images: Sequence[ImageInfo], previous: str | None = None) -> str:
    """``A 803×602 image, mostly orange (a1b2c3d4). Prompt: "..."``, one clause per image.

    In a multi-turn conversation, the start of the previous answer is quoted too (``After: "..."``),
    so a test can see which answer a follow-up question was asked after.
    """
    after = f' After: "{previous[:PREVIOUS_QUOTED]}".' if previous else ""
    if not images:
        return f'No image.{after} Prompt: "{prompt}"'
    clauses = " ".join(
        f"A {info.width}×{info.height} image, mostly {info.colour} ({info.fingerprint})." for info in images
    )
    return f'{clauses}{after} Prompt: "{prompt}"'


def reasoning_text(prompt: str, images: Sequence[ImageInfo], effort: str = "medium") -> str:
    """What was asked and seen; ``low`` effort only what was seen, ``high`` checks each image again."""
    seen = [f"a {info.width}×{info.height} image that is mostly {info.colour}" for info in images]
    if not seen:
        sight = "There is no image."
    elif len(seen) == 1:
        sight = f"I see {seen[0]}."
    else:
        sight = f"I see {len(seen)} images: " + ", then ".join(seen) + "."
    if effort == "low":
        return sight
    text = f'The user asks: "{prompt}". {sight}'
    if effort == "high":
        checks = " ".join(
            f"Image {n} has fingerprint {info.fingerprint}." for n, info in enumerate(images, 1)
        )
        text += f" Let me check again. {checks} The answer names the size, the colour and the fingerprint."
    return text


def answer(
    request: ChatRequest,
    images: Sequence[ImageInfo],
    budget: int,
    prompt_count: int,
    text: str | None = None,
    call: ToolCall | None = None,
) -> Answer:
    """The answer within ``budget`` completion tokens: reasoning first, then the ``call``'s arguments,
    else ``text``, else the caption."""
    if call is not None:
        text = call.arguments
    elif text is None:
        text = caption(request.prompt, images, request.previous_answer)
    content: str | None = text
    thinking = request.thinking and request.prefill is None
    reasoning = reasoning_text(request.prompt, images, request.effort) if thinking else None
    finish = "stop"
    reasoning_tokens = _tokens(len(reasoning)) if reasoning else 0
    if reasoning is not None and reasoning_tokens >= budget:  # the content is never empty
        reasoning, content, finish, call = reasoning[: budget * CHARS_PER_TOKEN], None, "length", None
        reasoning_tokens = _tokens(len(reasoning))
    elif reasoning_tokens + _tokens(len(text)) > budget:
        content, finish = text[: (budget - reasoning_tokens) * CHARS_PER_TOKEN], "length"
    completion = reasoning_tokens + _tokens(len(content or ""))
    if call is not None:
        call = dataclasses.replace(call, arguments=content or "")
        content, finish = None, "tool_calls" if finish == "stop" else finish
    return Answer(content, reasoning, finish, prompt_count, completion, reasoning_tokens, call)


def continuation(prefill: str, text: str, *, structured: bool) -> str:
    """What continues ``prefill`` towards ``text`` (the content the request would get without it).

    Structured output: the whole of ``text``, as on vLLM, whose grammar constrains only the new tokens:
    the model starts a document of its own after the prefill (so a ``{`` prefill and the answer do not
    make one JSON document together). Plain text: ``text`` after a space (none when the prefill is
    empty or ends in whitespace).
    """
    if structured:
        return text
    return text if not prefill or prefill[-1].isspace() else " " + text


def completion_body(
    model: str, result: Answer, *, reasoning_field: str, include_reasoning: bool
) -> dict[str, Any]:
    """A chat completion object shaped like vLLM's."""
    calls = [result.tool_call.body()] if result.tool_call is not None else []
    message: dict[str, Any] = {"role": "assistant", "content": result.content, "tool_calls": calls}
    if result.reasoning is not None and include_reasoning:
        message.update(reasoning_fields(result.reasoning, reasoning_field))
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": result.finish_reason,
                "stop_reason": None,
            }
        ],
        "usage": usage(result),
    }


def reasoning_fields(text: str, reasoning_field: str) -> dict[str, str]:
    """``{"reasoning": text}``, ``{"reasoning_content": text}`` or both, as the server version sends."""
    if reasoning_field == "both":
        return {"reasoning": text, "reasoning_content": text}
    return {reasoning_field: text}


def usage(result: Answer) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)
