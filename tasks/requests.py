"""Build the Chat Completions request for a work item, and its content-derived request key.

The request key is the sha256 of a canonical JSON form of what determines the answer: the API and
model, the messages with a reference to the image in place of its bytes (``sha256:<hex>`` of the
original bytes, or ``url:<url>`` for an image the server fetches), the generation parameters, the JSON
schema and the image preprocessing settings. Not the manifest, not the ids, not the code.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from tasks.config import RunConfig
from tasks.manifests import Prompt

KEY_VERSION = 1


@dataclass(frozen=True, slots=True)
class ChatRequest:
    body: dict[str, Any]  # the JSON body sent to /chat/completions
    key: str


def _messages(prompt: Prompt, image_ref: str | None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    if prompt.system:
        messages.append({"role": "system", "content": prompt.system})
    content: list[dict[str, Any]] = []
    if image_ref is not None:
        content.append({"type": "image_url", "image_url": {"url": image_ref}})
    content.append({"type": "text", "text": prompt.prompt})
    messages.append({"role": "user", "content": content})
    return messages


def _parameters(prompt: Prompt, config: RunConfig) -> dict[str, Any]:
    gen = config.generation
    params: dict[str, Any] = {"max_completion_tokens": prompt.max_tokens or gen.max_tokens}
    for name in ("temperature", "top_p", "seed"):
        value = getattr(gen, name)
        if value is not None:
            params[name] = value
    if prompt.reasoning if prompt.reasoning is not None else gen.reasoning:
        params["chat_template_kwargs"] = {"enable_thinking": True}
        if gen.hide_reasoning:
            params["include_reasoning"] = False
    if prompt.json_schema is not None:
        params["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": json.loads(prompt.json_schema), "strict": True},
        }
    return params


def _preprocessing(config: RunConfig) -> dict[str, Any]:
    image = config.image
    return {"max_pixels": image.max_pixels, "jpeg_quality": image.jpeg_quality}


def image_ref(sha256: str) -> str:
    return f"sha256:{sha256}"


def request_key(prompt: Prompt, image: str | None, config: RunConfig) -> str:
    """``image`` is the image's reference: ``image_ref(sha256)`` or ``url:<url>``; None for no image."""
    canonical = {
        "v": KEY_VERSION,
        "api": config.endpoint.api,
        "model": config.endpoint.model,
        "messages": _messages(prompt, image),
        "params": _parameters(prompt, config),
        "preprocessing": _preprocessing(config) if image is not None else None,
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def build_chat_request(
    prompt: Prompt, image_url: str | None, image: str | None, config: RunConfig
) -> ChatRequest:
    """``image_url`` is what is sent (a data URL or an http(s) URL); ``image`` its reference for the key."""
    body = {
        "model": config.endpoint.model,
        "messages": _messages(prompt, image_url),
        **_parameters(prompt, config),
    }
    return ChatRequest(body=body, key=request_key(prompt, image, config))
