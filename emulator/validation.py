"""Validation of a chat completions request body, with vLLM's statuses and messages.

Everything checked here needs no image decoding; images are checked by :mod:`emulator.images` and the
context length by :func:`check_context` once the image sizes are known. Unknown fields are ignored.

Conversations: system messages first, then user/assistant alternating, starting and ending with user
(a final assistant only with ``continue_final_message``). The answer is to the last user message; the
images of every message count toward ``max_images_per_prompt``, as in vLLM, where the whole
conversation is one multimodal prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from emulator.errors import ApiError
from emulator.settings import EmulatorSettings
from emulator.structured import OutputFormat, chat_output_format

ROLES = frozenset({"system", "user", "assistant"})
ALTERNATION = "Conversation roles must alternate user/assistant/user/assistant/..."


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
    _check_flags(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list of messages.", param="messages")
    continue_final = body.get("continue_final_message") is True
    _check_roles(messages, continue_final)
    images: list[str] = []
    text_chars = 0
    prompt = ""
    previous: str | None = None
    for message in messages:
        texts, urls = _content_parts(message)
        images.extend(urls)
        text_chars += sum(len(text) for text in texts)
        if message["role"] == "user":
            prompt = " ".join(texts)
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


def _check_flags(body: dict[str, Any]) -> None:
    if body.get("add_generation_prompt") is True and body.get("continue_final_message") is True:
        raise ApiError(400, "Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
    if body.get("tools") == []:
        raise ApiError(400, "`tools` must not be an empty list; omit it instead.", param="tools")
    if body.get("stream_options") is not None and body.get("stream") is not True:
        raise ApiError(400, "Stream options can only be defined when `stream=True`.", param="stream_options")


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
    if not rest or not alternates or (rest[-1] != "user" and not continue_final):
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
