"""The emulator's function calling, final-message continuation (prefill) and explicit thinking off, over
real HTTP on loopback: answers, streaming, the scripted bad call, the Responses API, 400s and stats."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import httpx2
import jsonschema
import openai
import pytest

from emulator import DEFAULT_MODEL, EmulatorServer
from tests.test_emulator import ORANGE_PNG, PROMPT, Reply, call, chat, chat_body, data_url, message
from tests.test_emulator import make_server as make_server  # the fixture
from tests.test_emulator_features import CAPTION_SCHEMA, joined, stream_events

ORANGE = data_url(ORANGE_PNG)
CAPTION_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "minLength": 5},
        "colour": {"enum": ["red", "orange", "blue"]},
        "width": {"type": "integer", "minimum": 1},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    },
    "required": ["caption", "colour", "width"],
    "additionalProperties": False,
}
FLAG_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"reason": {"type": "string"}},
    "required": ["reason"],
}
RECORD = {
    "type": "function",
    "function": {
        "name": "record_caption",
        "description": "Store a caption.",
        "parameters": CAPTION_PARAMETERS,
    },
}
FLAG = {"type": "function", "function": {"name": "flag_image", "parameters": FLAG_PARAMETERS}}
SKIP = {"type": "function", "function": {"name": "skip_image"}}  # no parameters
TOOLS = [RECORD, FLAG, SKIP]
PARAMETERS = {"record_caption": CAPTION_PARAMETERS, "flag_image": FLAG_PARAMETERS, "skip_image": {}}


def named(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name}}


def tool_body(prompt: str = PROMPT, choice: Any = None, **extra: Any) -> dict[str, Any]:
    body = chat_body(prompt, [ORANGE], **{"tools": TOOLS, "max_tokens": 500, **extra})
    if choice is not None:
        body["tool_choice"] = choice
    return body


def called(reply: Reply) -> tuple[str, dict[str, Any]]:
    """The one function call of a reply (checked for shape), as (name, parsed arguments)."""
    assert reply.status == 200, reply.body
    choice = reply.json()["choices"][0]
    got = choice["message"]
    assert got["content"] is None and choice["finish_reason"] == "tool_calls"
    (tool_call,) = got["tool_calls"]
    assert tool_call["id"].startswith("call_") and len(tool_call["id"]) > 5
    assert tool_call["type"] == "function" and set(tool_call["function"]) == {"name", "arguments"}
    name, arguments = tool_call["function"]["name"], json.loads(tool_call["function"]["arguments"])
    jsonschema.validate(arguments, PARAMETERS[name])
    return name, arguments


def texted(reply: Reply) -> str:
    """The text answer of a reply that calls no function."""
    choice = reply.json()["choices"][0]
    assert reply.status == 200 and choice["finish_reason"] == "stop", reply.body
    assert choice["message"]["tool_calls"] == []
    content: str = choice["message"]["content"]
    return content


def error(reply: Reply) -> str:
    assert reply.status == 400, reply.body
    text: str = reply.json()["error"]["message"]
    return text


@pytest.fixture
def server(make_server: Callable[..., EmulatorServer]) -> EmulatorServer:
    return make_server()


# ---------------------------------------------------------------- function calling


def test_named_tool_choice_calls_it_with_valid_deterministic_arguments(server: EmulatorServer) -> None:
    body = tool_body(choice=named("record_caption"))
    reply = chat(server, body)
    name, arguments = called(reply)
    assert name == "record_caption"
    assert (arguments["colour"], arguments["width"], arguments["tags"]) == ("orange", 803, ["orange"])
    assert arguments["caption"].startswith("A 803×602 image, mostly orange")
    again = chat(server, body).json()["choices"][0]["message"]["tool_calls"][0]
    first = reply.json()["choices"][0]["message"]["tool_calls"][0]
    assert again["function"] == first["function"]  # the same request: the same call
    text = first["function"]["arguments"]
    usage = reply.json()["usage"]
    assert usage["completion_tokens"] == math.ceil(len(text) / 4)
    tools_chars = len(json.dumps(TOOLS, ensure_ascii=False))
    image_tokens = math.ceil(803 * 602 / 2304)
    assert usage["prompt_tokens"] == math.ceil((len(PROMPT) + tools_chars) / 4) + image_tokens
    assert called(chat(server, tool_body(choice=named("skip_image")))) == ("skip_image", {})


@pytest.mark.parametrize(
    ("prompt", "choice", "expected"),
    [
        ("Describe the image.", "required", "record_caption"),  # nothing mentioned: the first
        ("Use FLAG_IMAGE if it is blurry.", "required", "flag_image"),  # mentioned (any case)
        ("Describe it, then flag_image.", "auto", "flag_image"),
        ("Describe it, then flag_image.", None, "flag_image"),  # tools without a choice: auto
        ("Please call a function.", "auto", "record_caption"),
        ("Use the tool for this one.", "auto", "record_caption"),
        ("Describe it and use flag_image.", named("skip_image"), "skip_image"),  # named wins
    ],
)
def test_which_function_is_called(server: EmulatorServer, prompt: str, choice: Any, expected: str) -> None:
    assert called(chat(server, tool_body(prompt, choice)))[0] == expected


@pytest.mark.parametrize(
    ("prompt", "choice"),
    [
        ("Describe the image.", "auto"),  # auto, nothing mentioned, no call asked for
        ("A recall of the image, please.", "auto"),  # "call" only as a whole word
        ("Please call flag_image.", "none"),
    ],
)
def test_text_answers_despite_tools(server: EmulatorServer, prompt: str, choice: str) -> None:
    content = texted(chat(server, tool_body(prompt, choice)))
    assert content.startswith("A 803×602 image, mostly orange") and content.endswith(f'Prompt: "{prompt}"')


def test_tool_choice_none_without_tools_is_plain_text(server: EmulatorServer) -> None:
    assert texted(chat(server, chat_body(tool_choice="none"))) == f'No image. Prompt: "{PROMPT}"'


TOOL_ERRORS = [
    ("empty tools", {"tools": []}, "`tools` must not be an empty list"),
    ("tools not a list", {"tools": RECORD}, "must be a list"),
    ("tool of another type", {"tools": [{**RECORD, "type": "retrieval"}]}, "Input should be 'function'"),
    ("tool without function", {"tools": [{"type": "function"}]}, "tools[0].function"),
    (
        "function without a name",
        {"tools": [RECORD, {"type": "function", "function": {"parameters": FLAG_PARAMETERS}}]},
        "tools[1].function.name",
    ),
    (
        "parameters not an object",
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
        "parameters",
    ),
    ("auto without tools", {"tool_choice": "auto"}, "`tools` must be set"),
    ("required without tools", {"tool_choice": "required"}, "`tools` must be set"),
    ("named without tools", {"tool_choice": named("flag_image")}, "`tools` must be set"),
    ("unknown choice", {"tools": TOOLS, "tool_choice": "always"}, "Invalid value for `tool_choice`"),
    (
        "named, no function",
        {"tools": TOOLS, "tool_choice": {"type": "function"}},
        "Invalid value for `function`",
    ),
    ("named, unknown tool", {"tools": TOOLS, "tool_choice": named("crop")}, "does not match any"),
    (
        "named, invalid schema",
        {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
            "tool_choice": named("f"),
        },
        "Failed to transform json schema into a grammar",
    ),
]


@pytest.mark.parametrize(("extra", "text"), [c[1:] for c in TOOL_ERRORS], ids=[c[0] for c in TOOL_ERRORS])
def test_tool_errors_are_400(server: EmulatorServer, extra: dict[str, Any], text: str) -> None:
    assert text in error(chat(server, chat_body(**extra)))


def test_a_tool_without_type_is_a_function_as_in_vllm(server: EmulatorServer) -> None:
    body = chat_body(tools=[{"function": FLAG["function"]}], tool_choice="required")
    assert called(chat(server, body)) == ("flag_image", {"reason": f'No image. Prompt: "{PROMPT}"'})


def test_streamed_tool_call_reassembles_to_the_answer(server: EmulatorServer) -> None:
    body = tool_body(choice=named("record_caption"))
    plain = chat(server, body).json()
    events = stream_events(chat(server, {**body, "stream": True, "stream_options": {"include_usage": True}}))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [
        c["choices"][0]["delta"]["tool_calls"] for c in chunks if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert all(len(d) == 1 and d[0]["index"] == 0 for d in deltas) and len(deltas) >= 3
    opening = deltas[0][0]
    assert opening["id"].startswith("call_") and opening["type"] == "function"
    assert opening["function"] == {"name": "record_caption", "arguments": ""}
    assert all(
        set(d[0]) == {"index", "function"} and set(d[0]["function"]) == {"arguments"} for d in deltas[1:]
    )
    arguments = "".join(d[0]["function"]["arguments"] for d in deltas)
    expected = plain["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert arguments == expected
    assert joined(chunks, "content") == ""
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "tool_calls"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]


def test_budget_cuts_the_arguments(server: EmulatorServer) -> None:
    body = tool_body(choice=named("record_caption"), max_tokens=5)
    got = chat(server, body).json()["choices"][0]
    assert got["finish_reason"] == "length" and got["message"]["content"] is None
    assert len(got["message"]["tool_calls"][0]["function"]["arguments"]) == 20


def test_thinking_then_a_call(server: EmulatorServer) -> None:
    body = tool_body(choice="required", chat_template_kwargs={"enable_thinking": True})
    reply = chat(server, body)
    assert called(reply)[0] == "record_caption"
    got = reply.json()
    reasoning = got["choices"][0]["message"]["reasoning"]
    arguments = got["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    assert reasoning.startswith("The user asks")
    assert got["usage"]["completion_tokens"] == math.ceil(len(reasoning) / 4) + math.ceil(len(arguments) / 4)


# ---------------------------------------------------------------- the scripted bad call


def repair(body: dict[str, Any], reply: Reply, note: str) -> dict[str, Any]:
    """The client's repair request: the bad call given back, then what was wrong."""
    bad = reply.json()["choices"][0]["message"]
    given_back = {"role": "assistant", "content": None, "tool_calls": bad["tool_calls"]}
    return {**body, "messages": [*body["messages"], given_back, {"role": "user", "content": note}]}


def arguments_of(reply: Reply) -> str:
    text: str = reply.json()["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    return text


def test_bad_json_call_then_the_repair_succeeds(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["bad_json"])
    body = tool_body(choice=named("record_caption"))
    first = chat(server, body)
    assert first.json()["choices"][0]["finish_reason"] == "tool_calls"
    bad = json.loads(arguments_of(first))  # valid JSON that breaks the schema: a required property missing
    assert "caption" not in bad and bad["colour"] == "orange"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CAPTION_PARAMETERS)
    second = chat(server, repair(body, first, "The arguments miss 'caption'. Call record_caption again."))
    assert called(second)[0] == "record_caption"
    stats = server.stats()
    assert stats["faults"] == {"bad_json": 1} and [e["fault"] for e in stats["log"]] == ["bad_json", None]


def test_bad_json_twice_the_repair_fails_too(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["bad_json", "bad_json"])
    body = tool_body(choice="required")
    first = chat(server, body)
    second = chat(server, repair(body, first, "Invalid arguments; try again."))
    for reply in (first, second):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(json.loads(arguments_of(reply)), CAPTION_PARAMETERS)
    assert server.stats()["faults"] == {"bad_json": 2}


def test_broken_json_call_is_not_json(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["broken_json", "bad_json", "broken_json"])
    first = chat(server, tool_body(choice=named("flag_image")))
    with pytest.raises(json.JSONDecodeError):
        json.loads(arguments_of(first))
    no_params = json.loads(arguments_of(chat(server, tool_body(choice=named("skip_image")))))
    assert not isinstance(no_params, dict)  # bad_json, but any object is valid: not an object
    events = stream_events(chat(server, {**tool_body(choice=named("flag_image")), "stream": True}))
    streamed = "".join(
        d["function"]["arguments"]
        for e in events[:-1]
        for d in e["choices"][0]["delta"].get("tool_calls", [])
    )
    with pytest.raises(json.JSONDecodeError):
        json.loads(streamed)
    assert server.stats()["faults"] == {"broken_json": 2, "bad_json": 1}


def test_bad_json_by_rate_on_first_attempts_only(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_rate=1.0, fault_kinds=["bad_json"], fault_mode="first_attempt")
    body, headers = tool_body(choice="required"), {"X-Request-Id": "item-7"}
    first = chat(server, body, headers=headers)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(arguments_of(first)), CAPTION_PARAMETERS)
    assert called(chat(server, repair(body, first, "Again."), headers=headers))[0] == "record_caption"


# ---------------------------------------------------------------- through the openai SDK


def test_tool_calls_through_the_openai_sdk(server: EmulatorServer) -> None:
    with httpx2.Client(trust_env=False) as http:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, http_client=http)
        kwargs: dict[str, Any] = {
            "model": DEFAULT_MODEL,
            "messages": [{"role": "user", "content": "Caption this."}],
            "tools": TOOLS,
            "tool_choice": named("flag_image"),
            "max_completion_tokens": 300,
        }
        completion = client.chat.completions.create(**kwargs)
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        tool_call = choice.message.tool_calls[0]  # type: ignore[index]
        assert tool_call.function.name == "flag_image"  # type: ignore[union-attr]
        arguments = json.loads(tool_call.function.arguments)  # type: ignore[union-attr]
        assert arguments == {"reason": 'No image. Prompt: "Caption this."'}
        pieces: list[str] = []
        for chunk in client.chat.completions.create(**kwargs, stream=True):
            for delta in chunk.choices[0].delta.tool_calls or []:
                pieces.append(delta.function.arguments or "")  # type: ignore[union-attr]
        assert json.loads("".join(pieces)) == arguments


# ---------------------------------------------------------------- Responses API


def responses(server: EmulatorServer, body: Any) -> Reply:
    return call(f"{server.base_url}/responses", body)


def flat(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", **tool["function"]}


def test_responses_function_call(server: EmulatorServer) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "input": "Describe it, then flag_image.",
        "tools": [flat(t) for t in TOOLS],
        "max_output_tokens": 300,
    }
    reply = responses(server, body)
    got = reply.json()
    assert reply.status == 200 and got["status"] == "completed"
    (item,) = got["output"]
    assert item["type"] == "function_call" and item["name"] == "flag_image" and item["status"] == "completed"
    assert item["call_id"].startswith("call_") and item["id"].startswith("fc_")
    jsonschema.validate(json.loads(item["arguments"]), FLAG_PARAMETERS)
    assert got["usage"]["output_tokens"] == math.ceil(len(item["arguments"]) / 4)
    forced = responses(server, {**body, "tool_choice": {"type": "function", "name": "record_caption"}})
    assert [i["name"] for i in forced.json()["output"]] == ["record_caption"]
    none = responses(server, {**body, "tool_choice": "none"}).json()
    assert [i["type"] for i in none["output"]] == ["message"]
    thinking = responses(server, {**body, "reasoning": {"effort": "low"}}).json()
    assert [i["type"] for i in thinking["output"]] == ["reasoning", "function_call"]
    stats = server.stats()
    assert (stats["with_tools"], stats["tool_calls"], stats["thinking_on"]) == (4, 3, 1)


@pytest.mark.parametrize(
    ("extra", "text"),
    [
        ({"tools": [{"type": "web_search"}]}, "Unsupported tool type 'web_search'"),
        ({"tools": [{"type": "function", "parameters": FLAG_PARAMETERS}]}, "function.name"),
        ({"tools": [flat(FLAG)], "tool_choice": {"type": "function", "name": "crop"}}, "does not match any"),
        ({"tools": [flat(FLAG)], "tool_choice": {"type": "mcp"}}, "named `tool_choice`"),
        ({"tool_choice": "required"}, "`tools` must be set"),
    ],
)
def test_responses_tool_errors(server: EmulatorServer, extra: dict[str, Any], text: str) -> None:
    assert text in error(responses(server, {"model": DEFAULT_MODEL, "input": "Hi", **extra}))


# ---------------------------------------------------------------- continuing a final assistant message


def continuing(prefill: Any, *turns: dict[str, Any], prompt: str = PROMPT, **extra: Any) -> dict[str, Any]:
    """A conversation ending in the assistant message ``prefill``, to be continued."""
    body = chat_body(prompt, [ORANGE], **extra)
    final = {"role": "assistant", "content": prefill}
    return {
        **body,
        "messages": [*body["messages"], *turns, final],
        "continue_final_message": True,
        "add_generation_prompt": False,
    }


SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": CAPTION_SCHEMA}}


@pytest.mark.parametrize("prefill", ["{", "{\n  ", '{"caption": ', '{"summary": '])
def test_json_prefill_gets_a_whole_document_of_its_own(server: EmulatorServer, prefill: str) -> None:
    """As vLLM's grammar, which holds only the new tokens to the schema: the reply is the whole
    document a request without the prefill gets, not the rest of the prefill's."""
    reply = chat(server, continuing(prefill, response_format=SCHEMA_FORMAT))
    content = texted(reply)
    document = json.loads(content)
    jsonschema.validate(document, CAPTION_SCHEMA)
    unprefilled = chat(server, chat_body(images=[ORANGE], response_format=SCHEMA_FORMAT))
    assert document == json.loads(texted(unprefilled))
    with pytest.raises(json.JSONDecodeError):
        json.loads(prefill + content)  # prefill and answer are not one document
    assert reply.json()["usage"]["completion_tokens"] == math.ceil(len(content) / 4)


def test_bad_json_with_a_prefill_is_bad_on_its_own(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["bad_json", "broken_json"])
    bad = texted(chat(server, continuing("{", response_format=SCHEMA_FORMAT)))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(bad), CAPTION_SCHEMA)
    broken = texted(chat(server, continuing("{", response_format=SCHEMA_FORMAT)))
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken)


def test_text_prefill_is_continued(server: EmulatorServer) -> None:
    plain = texted(chat(server, chat_body(images=[ORANGE])))
    reply = chat(server, continuing("Caption:"))
    content = texted(reply)
    assert content == " " + plain  # " A 803×602 image, mostly orange (...). Prompt: ..."
    assert reply.json()["usage"]["completion_tokens"] == math.ceil(len(content) / 4)
    assert texted(chat(server, continuing([{"type": "text", "text": "Caption: "}]))) == plain
    assert texted(chat(server, continuing(""))) == plain


def test_prefill_after_earlier_turns_quotes_the_earlier_answer(server: EmulatorServer) -> None:
    turns = [{"role": "assistant", "content": "First answer."}, {"role": "user", "content": "Shorter?"}]
    content = texted(chat(server, continuing("Sure:", *turns)))
    assert content.startswith(" A 803×602 image") and content.endswith(
        'After: "First answer.". Prompt: "Shorter?"'
    )


def test_prefill_streams_thinks_not_and_calls_no_tool_on_auto(server: EmulatorServer) -> None:
    body = continuing("Caption:", chat_template_kwargs={"enable_thinking": True})
    plain = chat(server, body).json()
    got = plain["choices"][0]["message"]
    assert "reasoning" not in got and got["content"].startswith(" A 803×602 image")
    events = stream_events(chat(server, {**body, "stream": True}))
    assert joined(events, "content") == got["content"] and joined(events, "reasoning") == ""
    auto = continuing("Caption:", prompt="Please call flag_image.", tools=TOOLS, tool_choice="auto")
    assert texted(chat(server, auto)).startswith(" A 803×602 image")


@pytest.mark.parametrize(
    ("change", "text"),
    [
        ({"add_generation_prompt": None}, "Cannot set both"),  # the default is true
        ({"add_generation_prompt": True}, "Cannot set both"),
        ({"continue_final_message": "yes"}, "must be a boolean"),
        ({"continue_final_message": False}, "must alternate"),  # a final assistant without continuing
        ({"continue_final_message": None}, "must alternate"),
    ],
)
def test_prefill_flag_errors(server: EmulatorServer, change: dict[str, Any], text: str) -> None:
    body = {**continuing("Caption:"), **change}
    body = {key: value for key, value in body.items() if value is not None}
    assert text in error(chat(server, body))


def test_continue_final_message_needs_a_final_assistant(server: EmulatorServer) -> None:
    body = chat_body(continue_final_message=True, add_generation_prompt=False)
    assert "not from the assistant" in error(chat(server, body))
    assert "Cannot set both" in error(chat(server, chat_body(continue_final_message=True)))
    broken = continuing("x", {"role": "assistant", "content": "again"})  # two assistants in a row
    assert "must alternate" in error(chat(server, broken))


# ---------------------------------------------------------------- thinking explicitly off


@pytest.mark.parametrize("stream", [False, True])
def test_enable_thinking_false_is_no_reasoning(server: EmulatorServer, stream: bool) -> None:
    absent = chat(server, chat_body(images=[ORANGE], max_tokens=500)).json()
    body = chat_body(images=[ORANGE], max_tokens=500, chat_template_kwargs={"enable_thinking": False})
    off = chat(server, body).json()
    assert off["choices"][0]["message"] == absent["choices"][0]["message"]
    assert "reasoning" not in off["choices"][0]["message"] and off["usage"] == absent["usage"]
    assert off["usage"]["completion_tokens"] == math.ceil(len(off["choices"][0]["message"]["content"]) / 4)
    if stream:
        events = stream_events(chat(server, {**body, "stream": True}))
        assert joined(events, "reasoning") == "" and joined(events, "reasoning_content") == ""
        assert joined(events, "content") == off["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    ("value", "thinks"), [(False, False), (None, False), (0, False), (True, True), ("false", True)]
)
def test_enable_thinking_is_tested_for_truthiness_like_the_template(
    server: EmulatorServer, value: Any, thinks: bool
) -> None:
    got = message(chat(server, chat_body(chat_template_kwargs={"enable_thinking": value})))
    assert ("reasoning" in got) is thinks


# ---------------------------------------------------------------- stats


def test_stats_count_what_the_requests_used(server: EmulatorServer) -> None:
    think_off: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": False}}
    chat(server, tool_body(choice="required", **think_off))  # tools, a call, thinking off
    chat(server, tool_body(choice="none"))  # tools, no call
    chat(server, continuing("Caption:", **think_off))  # continued, thinking off
    chat(server, chat_body(chat_template_kwargs={"enable_thinking": True}))  # thinking on
    chat(server, chat_body())  # nothing
    chat(server, chat_body(continue_final_message=True))  # a 400: not counted
    stats = server.stats()
    assert {
        key: stats[key] for key in ("with_tools", "tool_calls", "continued", "thinking_on", "thinking_off")
    } == {
        "with_tools": 2,
        "tool_calls": 1,
        "continued": 1,
        "thinking_on": 1,
        "thinking_off": 2,
    }
    assert [entry["features"] for entry in stats["log"]] == [
        ["with_tools", "tool_calls", "thinking_off"],
        ["with_tools"],
        ["continued", "thinking_off"],
        ["thinking_on"],
        [],
        [],
    ]
    server.reset()
    assert server.stats()["with_tools"] == 0
