"""Parse the endpoint's answers — Chat Completions, streamed chunks, Responses — into one Answer.

Anything unparseable is a transient ``invalid_response`` (retried); an error event inside a 200
stream is a transient ``server_error``. Function calls are read from ``tool_calls`` (Chat, streamed as
pieces) or ``function_call`` output items (Responses), never inferred from ``finish_reason``: vLLM
answers a named ``tool_choice`` with ``finish_reason`` ``stop``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tasks.errors import RequestFailure


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A function call of an answer, its arguments as the server sent them (JSON text, unchecked)."""

    name: str
    arguments: str


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
    tool_calls: tuple[ToolCall, ...] = ()


_TOKENS_MAX = 2**31 - 1  # the token columns are int32


class _Malformed(TypeError):
    """A field of the answer has a type no row column can hold."""


def _unparseable(content: bytes | str, status: int, exc: Exception) -> RequestFailure:
    text = content if isinstance(content, str) else content[:200].decode("utf-8", "replace")
    why = str(exc) if isinstance(exc, _Malformed) else type(exc).__name__
    return RequestFailure(
        "invalid_response",
        f"unparseable answer from the endpoint ({why}): {text[:200]!r}",
        http_status=status,
    )


def _text(value: Any, what: str) -> str | None:
    """A text field: a string, or a list of text parts (joined); anything else is malformed."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise _Malformed(f"{what} is {type(value).__name__}, not text")


def _call(name: Any, arguments: Any) -> ToolCall:
    """A function call: a string name; arguments as JSON text (an object some servers send is encoded)."""
    if not isinstance(name, str):
        raise _Malformed(f"a function call's name is {type(name).__name__}, not text")
    if isinstance(arguments, dict):
        arguments = json.dumps(arguments, ensure_ascii=False)
    if arguments is not None and not isinstance(arguments, str):
        raise _Malformed(f"a function call's arguments are {type(arguments).__name__}, not JSON text")
    return ToolCall(name, arguments or "")


def _chat_calls(message: dict[str, Any]) -> tuple[ToolCall, ...]:
    calls = message.get("tool_calls") or []
    return tuple(_call(c["function"].get("name"), c["function"].get("arguments")) for c in calls)


def _label(value: Any) -> str | None:
    """finish_reason, model: a string, else nothing (a label of another type is not worth failing on)."""
    return value if isinstance(value, str) else None


def _tokens(value: Any) -> int | None:
    """A token count, if it is one an int32 column holds; else nothing."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _TOKENS_MAX:
        return value
    return None


ABORTED = frozenset({"abort", "error"})  # vLLM's finish reasons for a generation it gave up on


def _answer(
    text: str | list[str] | None,
    reasoning: str | list[str] | None,
    finish_reason: str | None,
    usage: dict[str, Any],
    model: str | None,
    *,
    status: int,
    latency_ms: float,
    token_keys: tuple[str, str] = ("prompt_tokens", "completion_tokens"),
    tool_calls: tuple[ToolCall, ...] = (),
) -> Answer:
    """The Answer (text and reasoning joined from their pieces, token counts from ``usage``'s
    ``token_keys``), unless the server gave up on the generation: then a transient failure (retried)."""
    if finish_reason in ABORTED:
        raise RequestFailure(
            "server_error",
            f"the endpoint stopped the generation (finish_reason {finish_reason!r})",
            http_status=status,
        )
    return Answer(
        text=_joined(text),
        reasoning=_joined(reasoning),
        finish_reason=finish_reason,
        prompt_tokens=_tokens(usage.get(token_keys[0])),
        completion_tokens=_tokens(usage.get(token_keys[1])),
        model=model,
        http_status=status,
        latency_ms=latency_ms,
        tool_calls=tool_calls,
    )


def _joined(pieces: str | list[str] | None) -> str | None:
    return ("".join(pieces) or None) if isinstance(pieces, list) else pieces


def _usage(data: dict[str, Any]) -> dict[str, Any]:
    usage = data.get("usage")
    return usage if isinstance(usage, dict) else {}


def parse_chat_answer(content: bytes, *, status: int, latency_ms: float) -> Answer:
    """Parse a Chat Completions body; anything unparseable is a transient invalid_response."""
    try:
        data = json.loads(content)
        choice = data["choices"][0]
        message = choice["message"]
        return _answer(
            _text(message.get("content"), "the message content"),
            _text(message.get("reasoning") or message.get("reasoning_content"), "the reasoning"),
            _label(choice.get("finish_reason")),
            _usage(data),
            _label(data.get("model")),
            status=status,
            latency_ms=latency_ms,
            tool_calls=_chat_calls(message),
        )
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        raise _unparseable(content, status, exc) from None


def parse_responses_answer(content: bytes, *, status: int, latency_ms: float) -> Answer:
    """Parse a Responses API body: output_text parts, reasoning items, status and usage."""
    try:
        data = json.loads(content)
        texts: list[str] = []
        reasoning: list[str] = []
        calls: list[ToolCall] = []
        for item in data["output"]:
            if item.get("type") == "message":
                parts = item.get("content") or []
                texts += [
                    _text(c["text"], "an output_text") or "" for c in parts if c.get("type") == "output_text"
                ]
            elif item.get("type") == "reasoning":
                parts = item.get("content") or item.get("summary") or []
                reasoning += [
                    _text(c["text"], "a reasoning text") or "" for c in parts if c.get("text") is not None
                ]
            elif item.get("type") == "function_call":
                calls.append(_call(item.get("name"), item.get("arguments")))
        if data.get("status") == "failed":
            error = data.get("error") or {}
            raise RequestFailure(
                "server_error", f"the response failed: {error.get('message', error)}", http_status=status
            )
        incomplete = (data.get("incomplete_details") or {}).get("reason")
        finish = _label("stop" if data.get("status") == "completed" else incomplete or data.get("status"))
        return _answer(
            texts,
            reasoning,
            "length" if finish == "max_output_tokens" else finish,
            _usage(data),
            _label(data.get("model")),
            status=status,
            latency_ms=latency_ms,
            token_keys=("input_tokens", "output_tokens"),
            tool_calls=tuple(calls),
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
        self.calls: dict[int, tuple[str, list[str]]] = {}  # by index: the name, the argument pieces

    def feed(self, line: str) -> None:
        if not line.startswith("data:"):
            return  # blank separators, comments, "event:" lines
        payload = line[5:].strip()
        if payload == "[DONE]":
            return  # the end; complete only if a chunk had a finish_reason
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
        try:
            self._take(chunk)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise _unparseable(payload, 200, exc) from None

    def _take(self, chunk: dict[str, Any]) -> None:
        self.model = _label(chunk.get("model")) or self.model
        self.usage = _usage(chunk) or self.usage
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            if content := _text(delta.get("content"), "a content delta"):
                self.text.append(content)
            if thought := _text(
                delta.get("reasoning") or delta.get("reasoning_content"), "a reasoning delta"
            ):
                self.reasoning.append(thought)
            for piece in delta.get("tool_calls") or []:
                self._call_piece(piece)
            self.finish_reason = _label(choice.get("finish_reason")) or self.finish_reason

    def _call_piece(self, piece: dict[str, Any]) -> None:
        """A streamed call arrives in pieces under its ``index``: the name first, then argument text.

        The index is required (OpenAI's chunk format; vLLM always sends it): without it the pieces of
        several calls could not be told apart, so a piece without a whole-number index is malformed."""
        index = piece.get("index")
        if not isinstance(index, int) or isinstance(index, bool) or index < 0:
            raise _Malformed(f"a streamed function call's index is {index!r}, not a whole number")
        function = piece.get("function") or {}
        name, arguments = self.calls.setdefault(index, ("", []))
        if isinstance(function.get("name"), str):
            self.calls[index] = (name + function["name"], arguments)
        if function.get("arguments") is not None:
            arguments.append(_call("", function["arguments"]).arguments)

    def answer(self, *, status: int, latency_ms: float) -> Answer:
        if self.finish_reason is None:  # [DONE] or not: without a finish_reason the answer may be cut
            raise RequestFailure(
                "invalid_response", "the stream ended before it was complete", http_status=status
            )
        return _answer(
            self.text,
            self.reasoning,
            self.finish_reason,
            self.usage,
            self.model,
            status=status,
            latency_ms=latency_ms,
            tool_calls=tuple(_call(name, "".join(parts)) for _, (name, parts) in sorted(self.calls.items())),
        )
