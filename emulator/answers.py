"""The emulated model's answer: deterministic text from what was received, reasoning, usage, body.

The content names each image's size, dominant colour and fingerprint, then echoes the last user
prompt. Token counts are estimates (4 characters a token; per image ceil(w*h/2304) capped at 280).
When the budget runs out, the reasoning is spent first, then the content, as on a real server: if the
reasoning alone uses the budget up, ``content`` is ``null`` (vLLM's reasoning parser does the same).
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emulator.images import ImageInfo
from emulator.validation import ChatRequest

CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Answer:
    content: str | None
    reasoning: str | None  # None: no reasoning was generated
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def prompt_tokens(request: ChatRequest, images: Sequence[ImageInfo]) -> int:
    return _tokens(request.text_chars) + sum(info.tokens for info in images)


def caption(prompt: str, images: Sequence[ImageInfo]) -> str:
    """``A 803×602 image, mostly orange (a1b2c3d4). Prompt: "..."``, one clause per image."""
    if not images:
        return f'No image. Prompt: "{prompt}"'
    clauses = " ".join(
        f"A {info.width}×{info.height} image, mostly {info.colour} ({info.fingerprint})." for info in images
    )
    return f'{clauses} Prompt: "{prompt}"'


def reasoning_text(prompt: str, images: Sequence[ImageInfo]) -> str:
    seen = [f"a {info.width}×{info.height} image that is mostly {info.colour}" for info in images]
    if not seen:
        sight = "There is no image."
    elif len(seen) == 1:
        sight = f"I see {seen[0]}."
    else:
        sight = f"I see {len(seen)} images: " + ", then ".join(seen) + "."
    return f'The user asks: "{prompt}". {sight}'


def answer(request: ChatRequest, images: Sequence[ImageInfo], budget: int, prompt_count: int) -> Answer:
    """The answer within ``budget`` completion tokens (reasoning first, then content)."""
    text = caption(request.prompt, images)
    content: str | None = text
    reasoning = reasoning_text(request.prompt, images) if request.thinking else None
    finish = "stop"
    reasoning_tokens = _tokens(len(reasoning)) if reasoning else 0
    if reasoning is not None and reasoning_tokens >= budget:  # the content is never empty
        reasoning, content, finish = reasoning[: budget * CHARS_PER_TOKEN], None, "length"
        reasoning_tokens = _tokens(len(reasoning))
    elif reasoning_tokens + _tokens(len(text)) > budget:
        content, finish = text[: (budget - reasoning_tokens) * CHARS_PER_TOKEN], "length"
    completion = reasoning_tokens + _tokens(len(content or ""))
    return Answer(content, reasoning, finish, prompt_count, completion)


def completion_body(
    model: str, result: Answer, *, reasoning_field: str, include_reasoning: bool
) -> dict[str, Any]:
    """A chat completion object shaped like vLLM's."""
    message: dict[str, Any] = {"role": "assistant", "content": result.content, "tool_calls": []}
    if result.reasoning is not None and include_reasoning:
        if reasoning_field in ("reasoning", "both"):
            message["reasoning"] = result.reasoning
        if reasoning_field in ("reasoning_content", "both"):
            message["reasoning_content"] = result.reasoning
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
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


def _tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN)
