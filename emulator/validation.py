"""Validation of a chat completions request body, with vLLM's statuses and messages.

Everything checked here needs no image decoding; images are checked by :mod:`emulator.images` and the
context length by :func:`check_context` once the image sizes are known. Unknown fields are ignored.

Conversations: system messages first, then user/assistant alternating, starting and ending with user.
The answer is to the last user message; the images of every message count toward
``max_images_per_prompt``, as in vLLM, where the whole conversation is one multimodal prompt.

Continuing a final assistant message (a prefill): ``"continue_final_message": true`` with
``"add_generation_prompt": false``, the conversation ending in an assistant message (its text is the
prefill; the answer continues it, see :func:`emulator.answers.continuation`). Refused with 400 as vLLM
refuses them: both flags true (``add_generation_prompt`` defaults to true, so ``continue_final_message``
alone is a 400) and ``continue_final_message`` when the last message is not an assistant one; a final
assistant message without ``continue_final_message`` breaks the alternation (400), as before.

Thinking: ``chat_template_kwargs.enable_thinking`` is passed to the template unchecked by vLLM, whose
template tests its truthiness; so here: absent, ``false``, ``null``, ``0`` or ``""`` is off (no reasoning,
no reasoning tokens: Gemma 4's default), any other JSON value on, including the string ``"false"`` (a
client bug the emulator reproduces rather than hides; :attr:`ChatRequest.features` tells them apart).

Tools: ``tools`` and ``tool_choice`` are checked by :mod:`emulator.tools`.

:attr:`ChatRequest.features` names what the request used, for the stats: ``with_tools``, ``continued``
(a prefill), ``thinking_on`` and ``thinking_off`` (``enable_thinking`` given and falsy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from emulator.errors import ApiError
from emulator.settings import EmulatorSettings
from emulator.structured import OutputFormat, chat_output_format
from emulator.tools import Tools, parse_tools

ROLES = frozenset({"system", "user", "assistant"})
ALTERNATION = "Conversation roles must alternate user/assistant/user/assistant/..."
BOTH_FLAGS = "Cannot set both `continue_final_message` and `add_generation_prompt` to True."
NOTHING_TO_CONTINUE = (
    "`continue_final_message` continues the final assistant message, but the last message is not from "
    "the assistant."
)


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """What the emulator needs from a valid request."""

    model: str
    image_urls: tuple[str, ...]  # every image of every message, in order
    prompt: str  # the text of the last user message
    text_chars: int  # characters of all text parts of all messages
    max_tokens: int | None  # max_completion_tokens, else max_tokens, else None (the remaining context)
    thinking: bool  # chat_template_kwargs.enable_thinking
    include_reasoning: bool
    output: OutputFormat | None = None  # structured output asked for; None: plain text
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    effort: str = "medium"  # the Responses API's reasoning.effort
    previous_answer: str | None = None  # the last assistant turn's text, in a multi-turn conversation
    prefill: str | None = None  # the final assistant message's text, continued (continue_final_message)
    tools: Tools | None = None  # the functions offered (None: none, or tool_choice "none" without tools)
    features: frozenset[str] = frozenset()  # for the stats: with_tools, continued, thinking_on/_off


def parse_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return body


def validate_chat(body: dict[str, Any], settings: EmulatorSettings) -> ChatRequest:
    """The checks vLLM makes before it touches the images; raises :class:`ApiError`."""
    model = body.get("model")
    if not isinstance(model, str) or model not in settings.models:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")
    continue_final = _check_flags(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of messages.", param="messages")
    _check_roles(messages, continue_final)
    tools = parse_tools(body)
    images: list[str] = []
    text_chars = tools.chars if tools is not None else 0
    prompt = ""
    previous: str | None = None
    prefill: str | None = None
    for position, message in enumerate(messages, 1):
        texts, urls = _content_parts(message)
        images.extend(urls)
        text_chars += sum(len(text) for text in texts)
        if message["role"] == "user":
            prompt = " ".join(texts)
        elif continue_final and position == len(messages):
            prefill = "\n".join(texts)  # vLLM joins text parts with newlines
        elif message["role"] == "assistant":
            previous = " ".join(texts)
    limit = settings.max_images_per_prompt
    if len(images) > limit:
        raise ApiError(400, f"At most {limit} image(s) may be provided in one prompt.")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "`chat_template_kwargs` must be an object.", param="chat_template_kwargs")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, "`stream_options` must be an object.", param="stream_options")
    features = {"with_tools"} if tools is not None else set()
    if prefill is not None:
        features.add("continued")
    if "enable_thinking" in kwargs:
        features.add("thinking_on" if kwargs["enable_thinking"] else "thinking_off")
    return ChatRequest(
        model=model,
        image_urls=tuple(images),
        prompt=prompt,
        text_chars=text_chars,
        max_tokens=_budget(body, settings.max_model_len),
        thinking=bool(kwargs.get("enable_thinking", False)),
        include_reasoning=body.get("include_reasoning", True) is not False,
        output=chat_output_format(body),
        stream=body.get("stream") is True,
        include_usage=stream_options.get("include_usage") is True,
        previous_answer=previous,
        prefill=prefill,
        tools=tools,
        features=frozenset(features),
    )


def check_context(max_tokens: int | None, prompt_tokens: int, max_model_len: int) -> int:
    """The output budget once the prompt is counted, or the 400 vLLM sends when it does not fit."""
    if prompt_tokens >= max_model_len:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_model_len} tokens. However, your request has "
            f"{prompt_tokens} input tokens. Please reduce the length of the input messages.",
        )
    if max_tokens is None:
        return max_model_len - prompt_tokens
    if prompt_tokens + max_tokens > max_model_len:
        raise ApiError(400, _too_large(max_tokens, max_model_len, prompt_tokens))
    return max_tokens


def _too_large(max_tokens: int, max_model_len: int, prompt_tokens: int) -> str:
    return (
        f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
        f"context length is {max_model_len} tokens and your request has {prompt_tokens} input tokens "
        f"({max_tokens} > {max_model_len} - {prompt_tokens})."
    )


def _check_flags(body: dict[str, Any]) -> bool:
    """Checks of the top-level flags; returns ``continue_final_message``."""
    continue_final = _flag(body, "continue_final_message", False)
    generation_prompt = _flag(body, "add_generation_prompt", True)
    if continue_final and generation_prompt:
        raise ApiError(400, BOTH_FLAGS)
    if body.get("tools") == []:
        raise ApiError(400, "`tools` must not be an empty list; omit it instead.", param="tools")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")
    return continue_final


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(400, f"`{name}` must be a boolean, got {value!r}.", param=name)
    return value


def _check_roles(messages: list[Any], continue_final: bool) -> None:
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise ApiError(400, f"Unsupported message role {role!r}; use system, user or assistant.")
    roles = [message["role"] for message in messages]
    start = 0
    while start < len(roles) and roles[start] == "system":
        start += 1
    rest = roles[start:]
    expected = ("user", "assistant")
    alternates = all(role == expected[index % 2] for index, role in enumerate(rest))
    if not rest or not alternates:
        raise ApiError(400, ALTERNATION)
    if continue_final and rest[-1] != "assistant":
        raise ApiError(400, NOTHING_TO_CONTINUE, param="continue_final_message")
    if not continue_final and rest[-1] != "user":
        raise ApiError(400, ALTERNATION)


def _content_parts(message: dict[str, Any]) -> tuple[list[str], list[str]]:
    """The texts and image URLs of one message's content."""
    content = message.get("content")
    if isinstance(content, str):
        return [content], []
    if content is None and message["role"] == "assistant":
        return [], []
    if not isinstance(content, list):
        raise ApiError(400, "Message content must be a string or a list of content parts.")
    texts: list[str] = []
    urls: list[str] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            urls.append(_image_url(part.get("image_url")))
        elif kind == "text":
            raise ApiError(400, "A text content part needs a string `text`.")
        else:
            raise ApiError(400, f"Unknown part type: {kind}")
    return texts, urls


def _image_url(value: Any) -> str:
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise ApiError(400, "An image_url content part needs a URL string.")
    return value


def _budget(body: dict[str, Any], max_model_len: int) -> int | None:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ApiError(400, f"`{name}` must be a positive integer, got {value!r}.", param=name)
    if value > max_model_len:
        raise ApiError(400, _too_large(value, max_model_len, 0), param=name)
    return value
