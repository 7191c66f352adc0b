"""Parse the endpoint's answers — Chat Completions, streamed chunks, Responses — into one Answer.

Anything unparseable is a transient ``invalid_response`` (retried); an error event inside a 200
stream is a transient ``server_error``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tasks.errors import RequestFailure


@dataclass(slots=True)
class Answer:
    text: str | None
    reasoning: str | None
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str | None
    http_status: int
    latency_ms: float


def _unparseable(content: bytes | str, status: int, exc: Exception) -> RequestFailure:
    text = content if isinstance(content, str) else content[:200].decode("utf-8", "replace")
    return RequestFailure(
        "invalid_response",
        f"unparseable answer from the endpoint ({type(exc).__name__}): {text[:200]!r}",
        http_status=status,
    )


def parse_chat_answer(content: bytes, *, status: int, latency_ms: float) -> Answer:
    """Parse a Chat Completions body; anything unparseable is a transient invalid_response."""
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        message = choice["message"]
        usage = data.get("usage") or {}
        return Answer(
            text=message.get("content"),
            reasoning=message.get("reasoning") or message.get("reasoning_content"),
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            model=data.get("model"),
            http_status=status,
            latency_ms=latency_ms,
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _unparseable(content, status, exc) from None


def parse_responses_answer(content: bytes, *, status: int, latency_ms: float) -> Answer:
    """Parse a Responses API body: output_text parts, reasoning items, status and usage."""
    try:
        data = json.loads(content)
        texts: list[str] = []
        reasoning: list[str] = []
        for item in data["output"]:
            if item.get("type") == "message":
                texts += [c["text"] for c in item.get("content") or [] if c.get("type") == "output_text"]
            elif item.get("type") == "reasoning":
                parts = item.get("content") or item.get("summary") or []
                reasoning += [c["text"] for c in parts if c.get("text") is not None]
        if data.get("status") == "failed":
            error = data.get("error") or {}
            raise RequestFailure(
                "server_error", f"the response failed: {error.get('message', error)}", http_status=status
            )
        incomplete = (data.get("incomplete_details") or {}).get("reason")
        finish = "stop" if data.get("status") == "completed" else incomplete or data.get("status")
        usage = data.get("usage") or {}
        return Answer(
            text="".join(texts) if texts else None,
            reasoning="".join(reasoning) if reasoning else None,
            finish_reason="length" if finish == "max_output_tokens" else finish,
            prompt_tokens=usage.get("input_tokens"),
            completion_tokens=usage.get("output_tokens"),
            model=data.get("model"),
            http_status=status,
            latency_ms=latency_ms,
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _unparseable(content, status, exc) from None


class StreamAggregator:
    """Joins the ``data:`` events of a Chat Completions stream into one Answer."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.reasoning: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.model: str | None = None
        self.done = False

    def feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return  # blank separators, comments, "event:" lines
        payload = line[5:].strip()
        if payload == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(payload)
        except ValueError as exc:
            raise _unparseable(payload, 200, exc) from None
        if isinstance(chunk, dict) and chunk.get("error") is not None:
            error = chunk["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise RequestFailure(
                "server_error", f"the stream failed after it started: {message}", http_status=200
            )
        self.model = chunk.get("model") or self.model
        self.usage = chunk.get("usage") or self.usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if delta.get("content"):
                self.text.append(delta["content"])
            thought = delta.get("reasoning") or delta.get("reasoning_content")
            if thought:
                self.reasoning.append(thought)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def answer(self, *, status: int, latency_ms: float) -> Answer:
        if not self.done and self.finish_reason is None:
            raise RequestFailure(
                "invalid_response", "the stream ended before it was complete", http_status=status
            )
        return Answer(
            text="".join(self.text) if self.text else None,
            reasoning="".join(self.reasoning) if self.reasoning else None,
            finish_reason=self.finish_reason,
            prompt_tokens=self.usage.get("prompt_tokens"),
            completion_tokens=self.usage.get("completion_tokens"),
            model=self.model,
            http_status=status,
            latency_ms=latency_ms,
        )
