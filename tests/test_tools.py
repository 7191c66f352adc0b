"""Function tools, prefill and thinking off in requests and answers, without a server: the checked form of
a manifest's tools, both APIs' bodies, the keys, calls parsed (plain, streamed, Responses) and checked."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from tasks.config import build_config
from tasks.endpoint.answers import StreamAggregator, ToolCall, parse_chat_answer, parse_responses_answer
from tasks.endpoint.requests import RequestKeys, build_request, repair_request, request_key
from tasks.endpoint.tools import CALL_REPAIR_PROMPT, calls_text, checked_calls
from tasks.errors import RequestFailure
from tasks.inputs.prompt import Prompt
from tasks.inputs.tools import check_tool_choice, check_tools

PARAMETERS = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
TOOLS = check_tools(json.dumps([{"function": {"name": "count", "parameters": PARAMETERS}}]))
P = Prompt("p", "Count them.", "qa", tools=TOOLS, tool_choice="count")


def cfg(**flags: object):  # type: ignore[no-untyped-def]
    return build_config({"images": "i", "out": "o", **flags}, environ={})


def test_checked_tools_are_in_one_form_and_a_choice_must_name_one() -> None:
    (tool,) = json.loads(TOOLS)
    assert tool == {"type": "function", "function": {"name": "count", "parameters": PARAMETERS}}  # type added
    check_tool_choice("count", TOOLS)
    check_tool_choice("required", TOOLS)
    with pytest.raises(ValueError, match="'other' names no tool of the prompt \\(its functions: count"):
        check_tool_choice("other", TOOLS)


def test_chat_and_responses_bodies_carry_the_tools() -> None:
    chat = build_request(P, "u", "h", cfg()).body
    assert chat["tools"] == json.loads(TOOLS)
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "count"}}
    responses = build_request(P, "u", "h", cfg(api="responses")).body
    assert responses["tools"] == [{"type": "function", "name": "count", "parameters": PARAMETERS}]
    assert responses["tool_choice"] == {"type": "function", "name": "count"}
    auto = build_request(dataclasses.replace(P, tool_choice=None), "u", "h", cfg()).body
    assert "tool_choice" not in auto  # the server's default: auto
    assert (
        build_request(dataclasses.replace(P, tool_choice="none"), "u", "h", cfg()).body["tool_choice"]
        == "none"
    )


def test_a_json_schema_is_sent_as_one_forced_function_with_structured_output_tools() -> None:
    prompt = Prompt("q", "Count.", "qa", json_schema=json.dumps(PARAMETERS))
    chat = build_request(prompt, "u", "h", cfg(structured_output="tools")).body
    assert "response_format" not in chat
    assert chat["tools"][0]["function"]["name"] == "answer"
    assert chat["tools"][0]["function"]["parameters"] == PARAMETERS
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "answer"}}
    responses = build_request(prompt, "u", "h", cfg(structured_output="tools", api="responses")).body
    assert "text" not in responses and responses["tool_choice"] == {"type": "function", "name": "answer"}


def test_tools_tool_choice_and_prefill_are_in_the_key_and_the_fast_keys_agree() -> None:
    base = request_key(P, "sha256:a", cfg())
    others = [
        request_key(dataclasses.replace(P, tool_choice="required"), "sha256:a", cfg()),
        request_key(dataclasses.replace(P, tools=None, tool_choice=None), "sha256:a", cfg()),
        request_key(dataclasses.replace(P, tools=None, tool_choice=None, prefill="So:"), "sha256:a", cfg()),
        request_key(P, "sha256:a", cfg(reasoning=False)),
    ]
    assert len({base, *others}) == 5
    for config in (cfg(), cfg(api="responses"), cfg(reasoning=False)):
        keys = RequestKeys(config)
        for prompt in (P, dataclasses.replace(P, tools=None, tool_choice=None, prefill='{"a": ')):
            if prompt.prefill and config.endpoint.api == "responses":
                continue
            assert keys.key(prompt, "sha256:a") == request_key(prompt, "sha256:a", config)


def _message(**message: object) -> bytes:
    return json.dumps({"choices": [{"message": message, "finish_reason": "stop"}], "usage": {}}).encode()


def test_calls_are_read_from_every_answer_shape() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "count", "arguments": '{"n": 2}'}}
    answer = parse_chat_answer(_message(content="", tool_calls=[call]), status=200, latency_ms=1)
    assert answer.tool_calls == (ToolCall("count", '{"n": 2}'),) and answer.finish_reason == "stop"
    as_object = {"function": {"name": "count", "arguments": {"n": 2}}}  # some servers send an object
    assert (
        parse_chat_answer(_message(tool_calls=[as_object]), status=200, latency_ms=1).tool_calls[0].arguments
        == '{"n": 2}'
    )
    assert parse_chat_answer(_message(content="hi", tool_calls=[]), status=200, latency_ms=1).tool_calls == ()
    with pytest.raises(RequestFailure, match="a function call's name is int"):
        parse_chat_answer(_message(tool_calls=[{"function": {"name": 3}}]), status=200, latency_ms=1)

    stream = StreamAggregator()
    pieces = [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "count", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"n"'}},
        {"index": 0, "function": {"arguments": ": 2}"}},
    ]
    for piece in pieces:
        stream.feed("data: " + json.dumps({"choices": [{"delta": {"tool_calls": [piece]}}]}))
    stream.feed("data: " + json.dumps({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}))
    assert stream.answer(status=200, latency_ms=1).tool_calls == (ToolCall("count", '{"n": 2}'),)

    two = StreamAggregator()  # several calls, told apart by their index, in index order
    for piece in (
        {"index": 1, "function": {"name": "skip", "arguments": "{}"}},
        {"index": 0, "function": {"name": "count", "arguments": '{"n": 2}'}},
    ):
        two.feed("data: " + json.dumps({"choices": [{"delta": {"tool_calls": [piece]}}]}))
    two.feed("data: " + json.dumps({"choices": [{"delta": {}, "finish_reason": "tool_calls"}]}))
    assert two.answer(status=200, latency_ms=1).tool_calls == (
        ToolCall("count", '{"n": 2}'),
        ToolCall("skip", "{}"),
    )

    item = {"type": "function_call", "call_id": "call_1", "name": "count", "arguments": '{"n": 2}'}
    body = json.dumps({"status": "completed", "output": [item], "usage": {}}).encode()
    assert parse_responses_answer(body, status=200, latency_ms=1).tool_calls == (
        ToolCall("count", '{"n": 2}'),
    )


@pytest.mark.parametrize(
    "second",
    [
        {"index": None, "function": {"arguments": "2}"}},
        {"function": {"arguments": "2}"}},
        {"index": "0", "function": {"arguments": "2}"}},
        {"index": True, "function": {"arguments": "2}"}},
        {"index": -1, "function": {"arguments": "2}"}},
        "2}",
    ],
)
def test_a_streamed_call_piece_without_its_index_is_an_invalid_response(second: object) -> None:
    """Malformed like any other unparseable answer: a transient invalid_response, never a crash."""
    stream = StreamAggregator()
    first = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "count", "arguments": '{"n":'},
    }
    chunks = [
        {"choices": [{"delta": {"tool_calls": [first]}}]},
        {"choices": [{"delta": {"tool_calls": [second]}}]},
        {"choices": [{"delta": {}, "finish_reason": "tool_calls"}]},
    ]
    with pytest.raises(RequestFailure) as caught:
        for chunk in chunks:
            stream.feed("data: " + json.dumps(chunk))
        stream.answer(status=200, latency_ms=1)
    got = caught.value
    assert (got.error_type, got.retryable, got.http_status) == ("invalid_response", True, 200)
    assert "unparseable answer from the endpoint" in got.message


def test_calls_are_checked_against_their_functions_parameters() -> None:
    assert json.loads(checked_calls([ToolCall("count", ' {"n": 2} ')], TOOLS)) == [
        {"name": "count", "arguments": {"n": 2}}
    ]
    bare = check_tools(json.dumps([{"type": "function", "function": {"name": "skip"}}]))
    assert json.loads(checked_calls([ToolCall("skip", "")], bare)) == [{"name": "skip", "arguments": {}}]
    for call, message in (
        (
            ToolCall("count", '{"n": "2"}'),
            "the call of 'count' does not match its parameters at n: '2' is not",
        ),
        (ToolCall("count", '{"n": '), "the call of 'count' is not JSON"),
        (
            ToolCall("other", "{}"),
            "the answer calls 'other', which is not one of the prompt's functions (count)",
        ),
    ):
        with pytest.raises(RequestFailure, match=re.escape(message)) as caught:
            checked_calls([call], TOOLS)
        assert caught.value.error_type == "invalid_json"
    given = calls_text([ToolCall("count", '{"n": "2"}')])
    fixed = repair_request(
        build_request(P, "u", "h", cfg()), given, "the call of 'count' ...", CALL_REPAIR_PROMPT
    )
    assert fixed.body["messages"][-2] == {
        "role": "assistant",
        "content": 'count({"n": "2"})',
    }  # text, no tool turn
    assert (
        "Your function call was not valid: the call of 'count'"
        in fixed.body["messages"][-1]["content"][0]["text"]
    )
    assert fixed.body["tool_choice"] == {"type": "function", "function": {"name": "count"}}
