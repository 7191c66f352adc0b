"""Build the request for a work item — Chat Completions or Responses — and its content-derived key.

The request key is the sha256 of a canonical JSON form of the body that is sent, with a reference to
the image in place of its bytes (``sha256:<hex>`` of the original bytes, or ``url:<url>`` for an image
the server fetches), plus the image preprocessing settings. So it covers the API, model, messages (a
prefill too), generation parameters, JSON schema and tools; not the manifest, the ids, transport
options such as streaming, or the code.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tasks.config import RunConfig
from tasks.endpoint.concurrency import estimate_tokens
from tasks.endpoint.tools import SCHEMA_FUNCTION, chat_tools, responses_tools, schema_tools
from tasks.images.data_url import DataUrl
from tasks.inputs.chains import Turn
from tasks.inputs.prompt import Prompt

KEY_VERSION = 2
REPAIR_PROMPT = (
    "Your answer did not match the required JSON Schema: {error}. "
    "Answer again with only a JSON document that matches the schema."
)


@dataclass(frozen=True, slots=True)
class Request:
    api: str  # "chat" or "responses"
    body: dict[str, Any]  # the JSON body sent
    key: str
    cost: int = 0  # estimated tokens, for --tpm
    keep_reasoning: bool = False  # reasoning on and not hidden: its text is kept (README, "Output")
    json_schema: str | None = None  # the answer must be JSON valid against it (sent however)
    tools: str | None = None  # the prompt's function tools: calls are checked against their parameters
    prefill: str | None = None  # the answer's opening, continued: the row's text starts with it


def image_ref(sha256: str) -> str:
    return f"sha256:{sha256}"


def _thinking(prompt: Prompt, config: RunConfig) -> bool | None:
    """On, off, or None: not said (nothing is sent, the server's default holds)."""
    return prompt.reasoning if prompt.reasoning is not None else config.generation.reasoning


def _sampling(config: RunConfig) -> dict[str, Any]:
    gen = config.generation
    return {
        name: getattr(gen, name)
        for name in ("temperature", "top_p", "seed")
        if getattr(gen, name) is not None
    }


Image = str | DataUrl  # an http(s) URL, a prepared image's data URL, or (for keys) a reference
Images = Image | Sequence[Image] | None  # one image, several (in order), or none
History = Sequence[Turn]  # a chained prompt's earlier turns, oldest first


def _images(images: Images) -> list[Image]:
    return [] if images is None else [images] if isinstance(images, str | DataUrl) else list(images)


def _system(prompt: Prompt, history: History) -> str | None:
    """The prompt's own system prompt, else its nearest ancestor's."""
    for p in (prompt, *(turn.prompt for turn in reversed(history))):
        if p.system:
            return p.system
    return None


def _first_prompt(prompt: Prompt, history: History) -> Prompt:
    return history[0].prompt if history else prompt


def _later_turns(prompt: Prompt, history: History) -> list[tuple[str, str]]:
    """(answer, next prompt's text) for each earlier turn: the assistant/user pairs after the first user."""
    if not history:
        return []
    nexts = [turn.prompt for turn in history[1:]] + [prompt]
    return [(turn.answer, nxt.prompt) for turn, nxt in zip(history, nexts, strict=True)]


def _chat_body(prompt: Prompt, image_url: Images, config: RunConfig, history: History = ()) -> dict[str, Any]:
    gen = config.generation
    messages: list[dict[str, Any]] = []
    system = _system(prompt, history)
    if system:
        messages.append({"role": "system", "content": system})
    content: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": u}} for u in _images(image_url)
    ]
    content.append({"type": "text", "text": _first_prompt(prompt, history).prompt})
    messages.append({"role": "user", "content": content})
    for answer, text in _later_turns(prompt, history):
        messages.append({"role": "assistant", "content": answer})
        messages.append({"role": "user", "content": [{"type": "text", "text": text}]})
    body: dict[str, Any] = {
        "model": config.endpoint.model,
        "messages": messages,
        "max_completion_tokens": prompt.max_tokens or gen.max_tokens,
        **_sampling(config),
    }
    thinking = _thinking(prompt, config)
    if thinking is not None:  # False too: "off" said explicitly, not left to the server's default
        body["chat_template_kwargs"] = {"enable_thinking": thinking}
        if thinking and gen.hide_reasoning:
            body["include_reasoning"] = False
    if prompt.json_schema is not None:
        schema = json.loads(prompt.json_schema)
        if gen.structured_output == "vllm":
            body["structured_outputs"] = {"json": schema}
        elif gen.structured_output == "tools":
            body.update(chat_tools(schema_tools(prompt.json_schema), SCHEMA_FUNCTION))
        else:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": schema, "strict": True},
            }
    if prompt.tools is not None:
        body.update(chat_tools(prompt.tools, prompt.tool_choice))
    if prompt.prefill is not None:  # vLLM continues the final assistant message (README, "Prefill")
        messages.append({"role": "assistant", "content": prompt.prefill})
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
    return body


def _responses_body(
    prompt: Prompt, image_url: Images, config: RunConfig, history: History = ()
) -> dict[str, Any]:
    gen = config.generation
    # detail: required by the types vLLM validates Responses input with (openai's ResponseInputImageParam)
    content: list[dict[str, Any]] = [
        {"type": "input_image", "image_url": u, "detail": "auto"} for u in _images(image_url)
    ]
    content.append({"type": "input_text", "text": _first_prompt(prompt, history).prompt})
    items: list[dict[str, Any]] = [{"role": "user", "content": content}]
    for answer, text in _later_turns(prompt, history):
        items.append({"role": "assistant", "content": answer})  # output_text parts need an output item's id
        items.append({"role": "user", "content": [{"type": "input_text", "text": text}]})
    body: dict[str, Any] = {
        "model": config.endpoint.model,
        "input": items,
        "max_output_tokens": prompt.max_tokens or gen.max_tokens,
        **_sampling(config),
    }
    system = _system(prompt, history)
    if system:
        body["instructions"] = system
    if _thinking(prompt, config):  # off: no reasoning, this API's only switch (vLLM takes no template kwargs)
        body["reasoning"] = {"effort": gen.reasoning_effort}
    if prompt.json_schema is not None and gen.structured_output == "tools":
        body.update(responses_tools(schema_tools(prompt.json_schema), SCHEMA_FUNCTION))
    elif prompt.json_schema is not None:
        schema = json.loads(prompt.json_schema)
        body["text"] = {"format": {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}}
    if prompt.tools is not None:
        body.update(responses_tools(prompt.tools, prompt.tool_choice))
    if prompt.prefill is not None:  # the run plan refuses it (tasks/run/plan.py): never sent without it
        raise ValueError(f"prompt {prompt.prompt_id!r}: the Responses API cannot continue a prefill")
    return body


def _body(prompt: Prompt, image_url: Images, config: RunConfig, history: History) -> dict[str, Any]:
    if config.endpoint.api == "responses":
        return _responses_body(prompt, image_url, config, history)
    return _chat_body(prompt, image_url, config, history)


def request_key(prompt: Prompt, image: Images, config: RunConfig, history: History = ()) -> str:
    """``image``: the image's reference (``image_ref(sha256)`` or ``url:<url>``), several, or None.

    ``history``: a chained prompt's earlier turns, whose answers the key covers too.
    """
    return hashlib.sha256(_canonical(prompt, image, config, history).encode()).hexdigest()


def _canonical(prompt: Prompt, image: Images, config: RunConfig, history: History) -> str:
    image_settings = {"max_pixels": config.image.max_pixels, "jpeg_quality": config.image.jpeg_quality}
    canonical = {
        "v": KEY_VERSION,
        "api": config.endpoint.api,
        "body": _body(prompt, image, config, history),
        "preprocessing": image_settings if _images(image) else None,
    }
    return json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


_SLOT = "\x00image\x00"  # stands for the image reference in a key template (no reference holds a NUL)


class RequestKeys:
    """``request_key`` for many items of a run, fast: a prompt's canonical JSON is built once, and each
    item's key hashes that text with its image reference spliced in — the very same text, so the very
    same key (tests/test_requests.py checks), at a tenth of the cost. Chained prompts and several
    images take the plain path.
    """

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self._templates: dict[tuple[Prompt, bool], tuple[bytes, bytes] | str] = {}

    def key(self, prompt: Prompt, image: Images, history: History = ()) -> str:
        if history or not (image is None or isinstance(image, str)) or "\x00" in (image or ""):
            return request_key(prompt, image, self.config, history)
        template = self._templates.get((prompt, image is None))
        if template is None:
            template = self._templates[(prompt, image is None)] = self._template(prompt, image is None)
        if isinstance(template, str):  # no image: one key per prompt
            return template
        before, after = template
        digest = hashlib.sha256(before)
        digest.update(json.dumps(image, ensure_ascii=False).encode())
        digest.update(after)
        return digest.hexdigest()

    def _template(self, prompt: Prompt, text_only: bool) -> tuple[bytes, bytes] | str:
        if text_only:
            return request_key(prompt, None, self.config)
        text = _canonical(prompt, _SLOT, self.config, ())
        before, after = text.split(json.dumps(_SLOT, ensure_ascii=False))
        return before.encode(), after.encode()


def build_request(
    prompt: Prompt,
    image_url: Images,
    image: Images,
    config: RunConfig,
    history: History = (),
    keys: RequestKeys | None = None,
) -> Request:
    """``image_url`` is what is sent (a data URL or an http(s) URL); ``image`` its reference for the key.

    ``history``: a chained prompt's earlier turns (tasks/inputs/chains.py), sent before it. ``keys``: the
    run's ``RequestKeys``, which computes the same key faster.
    """
    body = _body(prompt, image_url, config, history)
    if config.endpoint.stream and config.endpoint.api == "chat":
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    budget = prompt.max_tokens or config.generation.max_tokens
    text = (_system(prompt, history) or "") + prompt.prompt + (prompt.tools or "") + (prompt.prefill or "")
    text += "".join(turn.prompt.prompt + turn.answer for turn in history)
    cost = estimate_tokens(text, len(_images(image_url)), config.image.max_soft_tokens, budget)
    key = request_key(prompt, image, config, history) if keys is None else keys.key(prompt, image, history)
    keep = bool(_thinking(prompt, config)) and not config.generation.hide_reasoning
    return Request(
        config.endpoint.api,
        body,
        key,
        cost,
        keep,
        json_schema=prompt.json_schema,
        tools=prompt.tools,
        prefill=prompt.prefill,
    )


def repair_request(
    request: Request, answer: str | None, error: str, feedback: str = REPAIR_PROMPT
) -> Request:
    """The same request, continued with the invalid answer (a prefill's included, or a function call as
    text) and what was wrong with it (``feedback`` with the ``error``): one retry. With a prefill the
    conversation ends with it again, so the retry is continued from the same opening."""
    body = dict(request.body)
    feedback = feedback.format(error=error)
    if request.api == "responses":
        body["input"] = [
            *body["input"],
            {"role": "assistant", "content": answer or ""},
            {"role": "user", "content": [{"type": "input_text", "text": feedback}]},
        ]
    else:
        messages = body["messages"][:-1] if request.prefill is not None else body["messages"]
        body["messages"] = [
            *messages,
            {"role": "assistant", "content": answer or ""},
            {"role": "user", "content": [{"type": "text", "text": feedback}]},
            *body["messages"][len(messages) :],  # the prefill, continued again
        ]
    cost = request.cost + len(answer or "") // 4 + len(feedback) // 4
    return dataclasses.replace(request, body=body, cost=cost)
