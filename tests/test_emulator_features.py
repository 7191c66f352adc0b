"""The emulator's endpoint features: structured output, streaming, the Responses API, Azure ML gateway
behaviour, multi-turn conversations and the optional health route, over real HTTP on loopback."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from typing import Any

import httpx2
import jsonschema
import openai
import pytest

from emulator import DEFAULT_MODEL, EmulatorServer, settings_from_args
from tests.test_emulator import (
    BLUE_JPEG,
    GREEN_GIF,
    ORANGE_PNG,
    PROMPT,
    Reply,
    call,
    chat,
    chat_body,
    data_url,
    encode,
    fingerprint,
    message,
)
from tests.test_emulator import make_server as make_server  # the fixture

ORANGE = data_url(ORANGE_PNG)
THINK: dict[str, Any] = {"chat_template_kwargs": {"enable_thinking": True}}
AZURE_HEADER = "ms-azureml-model-error-statuscode"


def responses(server: EmulatorServer, body: Any, **kwargs: Any) -> Reply:
    return call(f"{server.base_url}/responses", body, **kwargs)


def with_schema(schema: dict[str, Any], **extra: Any) -> dict[str, Any]:
    response_format = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema, "strict": True},
    }
    return chat_body(
        images=[ORANGE, data_url(BLUE_JPEG, "image/jpeg")], response_format=response_format, **extra
    )


def document(reply: Reply) -> Any:
    return json.loads(message(reply)["content"])


@pytest.fixture
def server(make_server: Callable[..., EmulatorServer]) -> EmulatorServer:
    return make_server()


# ---------------------------------------------------------------- structured output

CAPTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "caption": {"type": "string", "minLength": 5, "maxLength": 60},
        "tags": {
            "type": "array",
            "items": {"type": "string"},
            "minItems": 3,
            "maxItems": 5,
            "uniqueItems": True,
        },
        "indoor": {"type": "boolean"},
        "colour": {"enum": ["red", "orange", "blue"]},
        "width": {"type": "integer", "minimum": 1},
        "height": {"type": "integer"},
        "aspect": {"type": "number", "exclusiveMinimum": 0},
        "scene": {
            "type": "object",
            "properties": {
                "objects": {"type": "integer", "minimum": 2, "maximum": 9},
                "lit": {"type": "boolean"},
            },
            "required": ["objects", "lit"],
            "additionalProperties": False,
        },
    },
    "required": ["caption", "tags", "indoor", "colour", "scene"],
    "additionalProperties": False,
}
DEFS_SCHEMA: dict[str, Any] = {  # what pydantic emits for nested models, optionals and unions
    "$defs": {
        "Box": {
            "type": "object",
            "title": "Box",
            "properties": {
                "x": {"type": "integer", "minimum": 0, "maximum": 100},
                "label": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": None},
            },
            "required": ["x", "label"],
        },
        "Kind": {"enum": ["animal", "plant", "thing"], "type": "string"},
    },
    "type": "object",
    "properties": {
        "boxes": {"type": "array", "items": {"$ref": "#/$defs/Box"}, "minItems": 2},
        "kind": {"$ref": "#/$defs/Kind"},
        "main": {"allOf": [{"$ref": "#/$defs/Box"}], "description": "the biggest"},
        "either": {"oneOf": [{"type": "integer", "multipleOf": 7}, {"type": "string"}]},
    },
    "required": ["boxes", "kind", "main", "either"],
    "additionalProperties": False,
}
KEYWORDS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "version": {"const": 2},
        "maybe": {"type": ["null", "string"], "maxLength": 3},
        "when": {"type": "string", "format": "date"},
        "link": {"type": "string", "format": "uri"},
        "code": {"type": "string", "pattern": "^[a-z]+$"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False},
        "matrix": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 2}},
        "nothing": {"type": "null"},
    },
    "required": ["version", "maybe", "when", "link", "code", "score", "pair", "matrix", "nothing"],
}
ARRAY_SCHEMA: dict[str, Any] = {
    "type": "array",
    "items": {"type": "string", "enum": ["x", "y"]},
    "minItems": 4,
}


@pytest.mark.parametrize("schema", [CAPTION_SCHEMA, DEFS_SCHEMA, KEYWORDS_SCHEMA, ARRAY_SCHEMA])
def test_json_schema_output_validates_and_is_deterministic(
    server: EmulatorServer, schema: dict[str, Any]
) -> None:
    first = document(chat(server, with_schema(schema, max_tokens=2000)))
    jsonschema.validate(first, schema)
    assert document(chat(server, with_schema(schema, max_tokens=2000))) == first
    native = chat_body(
        images=[ORANGE, data_url(BLUE_JPEG, "image/jpeg")], structured_outputs={"json": schema}
    )
    assert document(chat(server, native)) == first  # vLLM's own field: the same answer
    as_text = {**native, "structured_outputs": {"json": json.dumps(schema)}}
    assert document(chat(server, as_text)) == first


def test_json_values_come_from_what_was_received(server: EmulatorServer) -> None:
    got = document(chat(server, with_schema(CAPTION_SCHEMA)))
    full = f"A 803×602 image, mostly orange ({fingerprint(ORANGE_PNG)}). A 320×200 image, mostly blue"
    assert got["caption"] == full[:60]  # the caption, cut to maxLength
    assert got["tags"][:2] == ["orange", "blue"]  # the colours, then the prompt's words
    assert got["colour"] == "orange"  # an enum member that names the dominant colour
    assert (got["width"], got["height"], got["aspect"]) == (803, 602, round(803 / 602, 3))
    assert 2 <= got["scene"]["objects"] <= 9
    other = document(
        chat(
            server,
            chat_body(
                images=[data_url(GREEN_GIF, "image/gif")],
                response_format={
                    "type": "json_schema",
                    "json_schema": {"name": "a", "schema": CAPTION_SCHEMA},
                },
            ),
        )
    )
    assert (other["width"], other["height"], other["tags"][0]) == (64, 48, "green")


def test_json_object_mode_and_choice(server: EmulatorServer) -> None:
    got = document(chat(server, chat_body(images=[ORANGE], response_format={"type": "json_object"})))
    assert isinstance(got, dict) and got["colours"] == ["orange"] and got["width"] == 803
    assert document(chat(server, chat_body(structured_outputs={"json_object": True}))) == {
        "caption": f'No image. Prompt: "{PROMPT}"',
        "colours": [],
        "width": 0,
    }
    choice = chat(server, chat_body(images=[ORANGE], structured_outputs={"choice": ["cat", "Orange", "dog"]}))
    assert message(choice)["content"] == "Orange"
    plain = chat(server, chat_body(images=[ORANGE], response_format={"type": "text"}))
    assert message(plain)["content"].startswith("A 803×602 image")


def test_guided_json_is_silently_ignored(server: EmulatorServer) -> None:
    reply = chat(server, chat_body(guided_json=CAPTION_SCHEMA, guided_decoding_backend="xgrammar"))
    assert message(reply)["content"] == f'No image. Prompt: "{PROMPT}"'


def test_structured_output_with_reasoning(server: EmulatorServer) -> None:
    got = message(chat(server, with_schema(CAPTION_SCHEMA, **THINK)))
    assert got["reasoning"].startswith(f'The user asks: "{PROMPT}"')
    jsonschema.validate(json.loads(got["content"]), CAPTION_SCHEMA)


SCHEMA_ERRORS: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown type",
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "a", "schema": {"type": "nope"}},
            }
        },
        "grammar",
    ),
    ("required not a list", {"structured_outputs": {"json": {"type": "object", "required": "x"}}}, "grammar"),
    ("remote $ref", {"structured_outputs": {"json": {"$ref": "https://example.com/s.json"}}}, "local $ref"),
    ("dangling $ref", {"structured_outputs": {"json": {"$ref": "#/$defs/Gone"}}}, "points to nothing"),
    (
        "impossible pattern",
        {"structured_outputs": {"json": {"type": "string", "pattern": "^Q{9}$"}}},
        "pattern",
    ),
    ("not JSON", {"structured_outputs": {"json": "{nope"}}, "Invalid JSON grammar specification."),
    ("two kinds", {"structured_outputs": {"json": {}, "choice": ["a"]}}, "only use one kind"),
    (
        "json_schema and json_object",
        {"response_format": {"type": "json_object"}, "structured_outputs": {"json": {}}},
        "only use one kind",
    ),
    ("regex", {"structured_outputs": {"regex": "a+"}}, "not supported by this emulator"),
    ("no name", {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}}, "name"),
    ("no json_schema", {"response_format": {"type": "json_schema"}}, "json_schema"),
    ("unknown format type", {"response_format": {"type": "xml"}}, "Unsupported format type"),
]


@pytest.mark.parametrize(("extra", "text"), [c[1:] for c in SCHEMA_ERRORS], ids=[c[0] for c in SCHEMA_ERRORS])
def test_invalid_or_unsupported_schemas_are_400(
    server: EmulatorServer, extra: dict[str, Any], text: str
) -> None:
    reply = chat(server, chat_body(**extra))
    assert reply.status == 400, reply.body
    assert text in reply.json()["error"]["message"]


def test_bad_json_fault_breaks_validation_then_recovers(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["bad_json", "bad_json"])
    bad = document(chat(server, with_schema(CAPTION_SCHEMA)))  # a 200 with JSON that does not validate
    assert "caption" not in bad  # the first required property is missing
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, CAPTION_SCHEMA)
    plain = chat(server, chat_body())  # no schema asked for: unaffected, no fault recorded
    assert message(plain)["content"] == f'No image. Prompt: "{PROMPT}"'
    jsonschema.validate(document(chat(server, with_schema(CAPTION_SCHEMA))), CAPTION_SCHEMA)
    assert server.stats()["faults"] == {"bad_json": 1}
    server.configure(fault_script=["bad_json"])
    server.reset()
    broken = message(chat(server, chat_body(response_format={"type": "json_object"})))["content"]
    with pytest.raises(json.JSONDecodeError):
        json.loads(broken)


def test_bad_json_first_attempt_then_the_repair_validates(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_rate=1.0, fault_kinds=["bad_json"], fault_mode="first_attempt")
    headers = {"X-Request-Id": "item-1"}
    first = with_schema(CAPTION_SCHEMA)
    bad = message(chat(server, first, headers=headers))["content"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(bad), CAPTION_SCHEMA)
    repair = {
        **first,
        "messages": [
            *first["messages"],
            {"role": "assistant", "content": bad},
            {"role": "user", "content": "That JSON misses 'caption'. Answer again."},
        ],
    }
    jsonschema.validate(document(chat(server, repair, headers=headers)), CAPTION_SCHEMA)
    assert [entry["fault"] for entry in server.stats()["log"]] == ["bad_json", None]


# ---------------------------------------------------------------- streaming


def stream_events(reply: Reply) -> list[Any]:
    """The ``data:`` payloads of an event stream: parsed JSON, or the raw text when not JSON."""
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    blocks = reply.body.decode().split("\n\n")
    assert blocks[-1] == ""
    out: list[Any] = []
    for block in blocks[:-1]:
        assert block.startswith("data: ")
        payload = block.removeprefix("data: ")
        try:
            out.append(json.loads(payload))
        except json.JSONDecodeError:
            out.append(payload)
    return out


def joined(events: list[Any], field: str) -> str:
    return "".join(
        e["choices"][0]["delta"].get(field, "") for e in events if isinstance(e, dict) and e.get("choices")
    )


@pytest.mark.parametrize(
    ("reasoning_field", "include_reasoning", "fields"),
    [
        ("reasoning", True, {"reasoning"}),
        ("reasoning_content", True, {"reasoning_content"}),
        ("both", True, {"reasoning", "reasoning_content"}),
        ("reasoning", False, set()),
    ],
)
def test_stream_joins_to_the_non_streamed_answer(
    make_server: Callable[..., EmulatorServer],
    reasoning_field: str,
    include_reasoning: bool,
    fields: set[str],
) -> None:
    server = make_server(reasoning_field=reasoning_field)
    body = chat_body(images=[ORANGE], include_reasoning=include_reasoning, max_tokens=500, **THINK)
    plain = chat(server, body).json()
    events = stream_events(chat(server, {**body, "stream": True}))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert {e["object"] for e in chunks} == {"chat.completion.chunk"} and len({e["id"] for e in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all("usage" not in e for e in chunks)  # no include_usage: no usage chunk
    content_chunks = [e for e in chunks if e["choices"][0]["delta"].get("content")]
    assert len(content_chunks) >= 3
    assert joined(chunks, "content") == plain["choices"][0]["message"]["content"]
    for field in ("reasoning", "reasoning_content"):
        expected = plain["choices"][0]["message"].get(field, "")
        assert joined(chunks, field) == expected and bool(expected) == (field in fields)
    assert [e["choices"][0]["finish_reason"] for e in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1]["choices"][0]["delta"] == {}


def test_stream_usage_chunk_only_with_include_usage(server: EmulatorServer) -> None:
    body = chat_body(images=[ORANGE], max_tokens=10, stream=True, stream_options={"include_usage": True})
    events = stream_events(chat(server, body))
    assert events[-1] == "[DONE]"
    usage_chunk, finish = events[-2], events[-3]
    assert usage_chunk["choices"] == []
    assert finish["choices"][0]["finish_reason"] == "length"  # truncated to max_tokens like chat
    assert (
        usage_chunk["usage"]
        == chat(server, {**body, "stream": False, "stream_options": None}).json()["usage"]
    )
    assert len(joined(events, "content")) == 40
    options_only = chat(server, chat_body(stream_options={"include_usage": True}))
    assert options_only.status == 400  # stream_options without stream
    assert server.stats()["streamed"] == 1


def test_stream_error_after_a_few_chunks(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["stream_error", "stream_error", "malformed"])
    events = stream_events(chat(server, chat_body(images=[ORANGE], stream=True)))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [e["choices"][0]["delta"].keys() for e in events[1:-1]] == [{"content"}, {"content"}]
    assert events[-1] == {
        "error": {
            "message": events[-1]["error"]["message"],
            "type": "InternalServerError",
            "param": None,
            "code": 500,
        }
    }
    assert "[DONE]" not in events
    not_streamed = chat(server, chat_body())  # the same fault without streaming: a plain 500
    assert not_streamed.status == 500
    garbled = stream_events(chat(server, chat_body(images=[ORANGE], stream=True)))
    assert sum(isinstance(e, str) for e in garbled) == 2 and garbled[-1] == "[DONE]"  # one cut event
    stats = server.stats()
    assert stats["faults"] == {"stream_error": 2, "malformed": 1}
    assert stats["by_status"] == {"200": 2, "500": 1} and stats["streamed"] == 2


def test_stream_through_the_openai_sdk(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(fault_script=["ok", "stream_error"])
    with httpx2.Client(trust_env=False) as http:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, http_client=http)
        stream = client.chat.completions.create(
            model=DEFAULT_MODEL,
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
            extra_body=THINK,
        )
        chunks = list(stream)
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == 'No image. Prompt: "Hi"'
        )
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
        with pytest.raises(openai.APIError, match="injected fault"):
            list(
                client.chat.completions.create(
                    model=DEFAULT_MODEL, messages=[{"role": "user", "content": "Hi"}], stream=True
                )
            )


# ---------------------------------------------------------------- Responses API


def test_responses_text_input(server: EmulatorServer) -> None:
    reply = responses(server, {"model": DEFAULT_MODEL, "input": "Hello there", "max_output_tokens": 100})
    body = reply.json()
    assert reply.status == 200 and body["id"].startswith("resp_") and body["object"] == "response"
    assert (body["status"], body["incomplete_details"], body["model"]) == ("completed", None, DEFAULT_MODEL)
    assert "output_text" not in body
    (item,) = body["output"]
    assert item["type"] == "message" and item["role"] == "assistant" and item["status"] == "completed"
    assert item["id"].startswith("msg_")
    assert item["content"] == [
        {"type": "output_text", "text": 'No image. Prompt: "Hello there"', "annotations": []}
    ]
    usage = body["usage"]
    assert usage["input_tokens"] == math.ceil(len("Hello there") / 4)
    assert usage["output_tokens"] == math.ceil(len(item["content"][0]["text"]) / 4)
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


def test_responses_images_instructions_and_reasoning_effort(server: EmulatorServer) -> None:
    lengths = []
    for effort in ("low", "medium", "high"):
        body = {
            "model": DEFAULT_MODEL,
            "instructions": "Be terse.",
            "input": [
                {
                    "type": "message",
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is it?"},
                        {"type": "input_image", "image_url": ORANGE, "detail": "auto"},
                    ],
                }
            ],
            "reasoning": {"effort": effort},
            "max_output_tokens": 500,
        }
        got = responses(server, body).json()
        reasoning, answer = got["output"]
        assert reasoning["type"] == "reasoning" and reasoning["summary"] == []
        assert reasoning["id"].startswith("rs_")
        (part,) = reasoning["content"]
        assert part["type"] == "reasoning_text" and "803×602" in part["text"]
        lengths.append(len(part["text"]))
        assert answer["content"][0]["text"].endswith('Prompt: "What is it?"')
        assert "803×602 image, mostly orange" in answer["content"][0]["text"]
        assert got["usage"]["output_tokens_details"]["reasoning_tokens"] == math.ceil(len(part["text"]) / 4)
    assert lengths[0] < lengths[1] < lengths[2]


def test_responses_json_format_and_incomplete(server: EmulatorServer) -> None:
    fmt = {"type": "json_schema", "name": "caption", "schema": CAPTION_SCHEMA, "strict": True}
    body = {
        "model": DEFAULT_MODEL,
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_image", "image_url": ORANGE, "detail": "auto"},
                    {"type": "input_text", "text": "Describe."},
                ],
            }
        ],
        "text": {"format": fmt},
    }
    got = responses(server, body).json()
    jsonschema.validate(json.loads(got["output"][0]["content"][0]["text"]), CAPTION_SCHEMA)
    short = responses(server, {**body, "max_output_tokens": 5}).json()
    assert (short["status"], short["incomplete_details"]) == ("incomplete", {"reason": "max_output_tokens"})
    assert len(short["output"][0]["content"][0]["text"]) == 20 and short["usage"]["output_tokens"] == 5
    thinking = responses(server, {**body, "max_output_tokens": 3, "reasoning": {"effort": "medium"}}).json()
    assert [item["type"] for item in thinking["output"]] == ["reasoning"]  # no room left for the message
    assert thinking["status"] == "incomplete"


def test_responses_multi_turn_and_sdk(server: EmulatorServer) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Look."},
                    {"type": "input_image", "image_url": ORANGE, "detail": "auto"},
                ],
            },
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "An orange thing."}],
            },
            {"role": "user", "content": "And its colour?"},
        ],
    }
    text = responses(server, body).json()["output"][0]["content"][0]["text"]
    assert text.startswith("A 803×602 image") and text.endswith('Prompt: "And its colour?"')
    with httpx2.Client(trust_env=False) as http:
        client = openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, http_client=http)
        result = client.responses.create(model=DEFAULT_MODEL, input="Hi", reasoning={"effort": "low"})
        assert result.output_text == 'No image. Prompt: "Hi"' and result.usage is not None
    assert server.stats()["by_route"] == {"/v1/responses": 2}


RESPONSES_ERRORS: list[tuple[str, dict[str, Any], int, str]] = [
    ("stream", {"input": "x", "stream": True}, 400, "not supported by this emulator"),
    ("unknown model", {"input": "x", "model": "nope"}, 404, "does not exist"),
    ("no input", {}, 400, "input"),
    ("item type", {"input": [{"type": "function_call", "name": "f"}]}, 400, "Unsupported input item"),
    ("part type", {"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, 400, "input_file"),
    (
        "image without url",
        {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
        400,
        "image_url",
    ),
    (
        "image without detail",
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": ORANGE}]}]},
        400,
        "input_image.detail: Field required",
    ),
    (
        "output_text in an input message",
        {
            "input": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "b"}]},
                {"role": "user", "content": "c"},
            ]
        },
        400,
        "belongs to an output message item",
    ),
    ("effort", {"input": "x", "reasoning": {"effort": "max"}}, 400, "effort"),
    ("budget", {"input": "x", "max_output_tokens": 0}, 400, "max_output_tokens"),
    ("previous response", {"input": "x", "previous_response_id": "resp_1"}, 404, "not found"),
    (
        "ends with assistant",
        {"input": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        400,
        "alternate",
    ),
    (
        "bad schema",
        {"input": "x", "text": {"format": {"type": "json_schema", "name": "a", "schema": {"type": 3}}}},
        400,
        "grammar",
    ),
    (
        "too many images",
        {
            "input": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "input_image",
                            "image_url": data_url(encode((8 + i, 8), (i, 0, 0))),
                            "detail": "low",
                        }
                        for i in range(5)
                    ],
                }
            ]
        },
        400,
        "At most 4",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "text"), [c[1:] for c in RESPONSES_ERRORS], ids=[c[0] for c in RESPONSES_ERRORS]
)
def test_responses_errors(server: EmulatorServer, body: dict[str, Any], status: int, text: str) -> None:
    reply = responses(server, {"model": DEFAULT_MODEL, **body})
    assert reply.status == status, reply.body
    assert text in reply.json()["error"]["message"]


def test_responses_auth_faults_and_stats(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(api_key="k", fault_script=["429", "500"])
    body = {"model": DEFAULT_MODEL, "input": "x"}
    assert responses(server, body).status == 401
    key = {"Authorization": "Bearer k", "X-Request-Id": "r1"}
    assert [responses(server, body, headers=key).status for _ in range(3)] == [429, 500, 200]
    assert chat(server, chat_body(), headers={**key, "X-Request-Id": "c1"}).status == 200
    stats = server.stats()
    assert stats["by_route"] == {"/v1/responses": 4, "/v1/chat/completions": 1}
    assert stats["per_item"]["r1"] == 3 and stats["by_status"] == {"401": 1, "429": 1, "500": 1, "200": 2}
    assert {entry["route"] for entry in stats["log"]} == {"/v1/responses", "/v1/chat/completions"}


# ---------------------------------------------------------------- Azure ML gateway


def test_azure_wraps_container_errors_in_424(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(azure_gateway=True, api_key="k", fault_script=["ok", "500", "429"])
    key = {"Authorization": "Bearer k"}
    invalid = chat(server, chat_body(max_tokens=0), headers=key)  # a vLLM 400
    assert (invalid.status, invalid.headers[AZURE_HEADER]) == (424, "400")
    assert invalid.json()["error"]["code"] == 400 and "max_tokens" in invalid.json()["error"]["message"]
    engine = chat(server, chat_body(), headers=key)  # an injected engine 500
    assert (engine.status, engine.headers[AZURE_HEADER], engine.json()["error"]["code"]) == (424, "500", 500)
    throttled = chat(server, chat_body(), headers=key)  # the gateway's own 429: not wrapped
    assert throttled.status == 429 and AZURE_HEADER not in throttled.headers
    unauthorized = chat(server, chat_body())
    assert unauthorized.status == 401 and AZURE_HEADER not in unauthorized.headers
    missing = responses(server, {"model": "nope", "input": "x"}, headers=key)
    assert (missing.status, missing.headers[AZURE_HEADER]) == (424, "404")
    assert chat(server, chat_body(), headers=key).status == 200
    assert server.stats()["by_status"] == {"424": 3, "429": 1, "401": 1, "200": 1}


def test_gateway_timeout_408_unless_streaming(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(azure_gateway=True, gateway_timeout=0.3, latency=0.05, token_seconds=0.01)
    body = chat_body("x" * 200, max_tokens=500)  # about 55 output tokens: ~0.55 s of decoding
    started = time.monotonic()
    slow = chat(server, body)
    elapsed = time.monotonic() - started
    assert slow.status == 408 and AZURE_HEADER not in slow.headers  # the gateway's own answer
    assert 0.3 <= elapsed < 1.0 and "timed out" in slow.json()["error"]["message"]
    started = time.monotonic()
    streamed = stream_events(chat(server, {**body, "stream": True}))
    assert time.monotonic() - started > 0.3 and streamed[-1] == "[DONE]"  # longer, but never cut
    assert chat(server, chat_body("Hi")).status == 200  # a short answer comes in time
    server.configure(fault_script=["hang", "408"], hang_seconds=30)
    assert chat(server, chat_body()).status == 408  # a hang is cut at the gateway timeout
    direct = chat(server, chat_body())
    assert direct.status == 408 and "Retry-After" not in direct.headers  # fault kind 408
    assert server.stats()["faults"] == {"hang": 1, "408": 1}


# ---------------------------------------------------------------- multi-turn


def test_multi_turn_answers_the_last_user_message(server: EmulatorServer) -> None:
    body = {
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "system", "content": "You describe images."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": ORANGE}},
                ],
            },
            {"role": "assistant", "content": "An orange square."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare with this one."},
                    {"type": "image_url", "image_url": {"url": data_url(BLUE_JPEG)}},
                ],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "The second is blue."}]},
            {"role": "user", "content": "Which is bigger?"},
        ],
    }
    reply = chat(server, body)
    content = message(reply)["content"]
    assert content.startswith("A 803×602 image, mostly orange") and "A 320×200 image, mostly blue" in content
    assert content.endswith('Prompt: "Which is bigger?"')
    system_and_turns = sum(
        len(t)
        for t in (
            "You describe images.",
            "What is this?",
            "An orange square.",
            "Compare with this one.",
            "The second is blue.",
            "Which is bigger?",
        )
    )
    image_tokens = math.ceil(803 * 602 / 2304) + math.ceil(320 * 200 / 2304)
    assert reply.json()["usage"]["prompt_tokens"] == math.ceil(system_and_turns / 4) + image_tokens


def test_images_of_every_turn_count_toward_the_limit(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(max_images_per_prompt=2)
    turn = [{"type": "text", "text": "this"}, {"type": "image_url", "image_url": {"url": ORANGE}}]
    body = {
        "model": DEFAULT_MODEL,
        "messages": [
            {"role": "user", "content": turn},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": turn},
        ],
    }
    assert chat(server, body).status == 200
    three = {
        **body,
        "messages": [
            *body["messages"],
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": turn},
        ],
    }
    reply = chat(server, three)
    assert reply.status == 400 and "At most 2 image(s)" in reply.json()["error"]["message"]


@pytest.mark.parametrize(
    "roles",
    [
        ("user", "system", "user"),
        ("system", "user", "assistant", "assistant", "user"),
        ("system",),
        ("assistant", "user"),
    ],
)
def test_conversation_shape_errors(server: EmulatorServer, roles: tuple[str, ...]) -> None:
    body = {"model": DEFAULT_MODEL, "messages": [{"role": role, "content": role} for role in roles]}
    reply = chat(server, body)
    assert reply.status == 400 and "must alternate" in reply.json()["error"]["message"]


def test_several_system_messages_then_a_conversation(server: EmulatorServer) -> None:
    roles = ("system", "system", "user", "assistant", "user")
    body = {
        "model": DEFAULT_MODEL,
        "messages": [{"role": r, "content": f"{r} {i}"} for i, r in enumerate(roles)],
    }
    assert message(chat(server, body))["content"] == 'No image. After: "assistant 3". Prompt: "user 4"'


# ---------------------------------------------------------------- health route, settings


def test_health_route_can_be_switched_off(make_server: Callable[..., EmulatorServer]) -> None:
    server = make_server(health_route=False)
    for route in ("ready", "live"):
        reply = call(f"{server.base_url}/health/{route}")
        assert (reply.status, reply.json()) == (404, {"detail": "Not Found"})
    assert call(f"{server.base_url}/models").status == 200
    server.configure(azure_gateway=True)
    wrapped = call(f"{server.base_url}/health/ready")
    assert (wrapped.status, wrapped.headers[AZURE_HEADER]) == (424, "404")
    server.configure(health_route=True)
    assert call(f"{server.base_url}/health/ready").status == 200


def test_new_flags_and_settings() -> None:
    settings = settings_from_args(
        [
            "--azure-gateway",
            "--gateway-timeout",
            "5",
            "--no-health-route",
            "--token-seconds",
            "0.02",
            "--fault-script",
            "bad_json,stream_error,408",
        ]
    )
    assert (settings.azure_gateway, settings.gateway_timeout, settings.health_route) == (True, 5.0, False)
    assert settings.token_seconds == 0.02 and settings.fault_script == ("bad_json", "stream_error", "408")
    defaults = settings_from_args([])
    assert (defaults.azure_gateway, defaults.gateway_timeout, defaults.health_route) == (False, None, True)
    assert settings_from_args(["--gateway-timeout", "none"]).gateway_timeout is None
    with pytest.raises(ValueError, match="gateway_timeout"):
        defaults.with_changes(gateway_timeout=0)


def test_a_loading_server_answers_503_on_its_model_routes_and_readiness_until_loaded(
    make_server: Callable[..., EmulatorServer],
) -> None:
    """NIM answers 503 while its model loads; liveness and the model list answer meanwhile. The loading
    time counts from when it is set: at start, or at runtime (a replica reloading its model)."""
    server = make_server(loading_seconds=30, retry_after=2)
    reply = chat(server, chat_body())
    assert (reply.status, reply.headers["Retry-After"]) == (503, "2")
    assert "loading" in reply.json()["error"]["message"]
    assert call(f"{server.base_url}/health/ready").status == 503
    assert call(f"{server.base_url}/health/live").status == 200
    assert call(f"{server.base_url}/models").status == 200
    assert server.stats()["faults"] == {"loading": 1}
    server.configure(loading_seconds=0)
    assert call(f"{server.base_url}/health/ready").status == 200
    message(chat(server, chat_body()))
    server.configure(loading_seconds=0.3)
    assert chat(server, chat_body()).status == 503
    time.sleep(0.4)
    message(chat(server, chat_body()))
    assert settings_from_args(["--loading-seconds", "5"]).loading_seconds == 5.0
    with pytest.raises(ValueError, match="loading_seconds"):
        server.settings.with_changes(loading_seconds=-1)
    server.stop()
    assert server.stats()["requests_total"] == 4  # what it saw stays readable once stopped


def test_a_killed_emulator_resets_the_requests_it_was_answering(
    make_server: Callable[..., EmulatorServer],
) -> None:
    """As a killed process or a lost node: no answer, the connection reset, the port closed."""
    import threading

    server = make_server(latency=5.0)
    replies: list[object] = []

    def ask() -> None:
        try:
            replies.append(chat(server, chat_body(), timeout=10))
        except OSError as exc:  # urllib's wrapper of the reset included
            replies.append(exc)

    caller = threading.Thread(target=ask)
    caller.start()
    while server.stats()["in_flight"] < 1:
        time.sleep(0.01)
    started = time.monotonic()
    server.kill()
    caller.join()
    assert time.monotonic() - started < 2 and not isinstance(replies[0], Reply)  # reset, never answered
    assert server.stats()["by_status"] == {"cancelled": 1}


def test_stats_without_the_log_and_on_the_shared_monotonic_clock(
    make_server: Callable[..., EmulatorServer],
) -> None:
    """Benchmarks poll several emulators cheaply and put their arrivals on one clock."""
    server = make_server()
    before = time.monotonic()
    message(chat(server, chat_body()))
    brief = call(f"http://127.0.0.1:{server.port}/_emulator/stats?log=0").json()
    assert "log" not in brief and brief["requests_total"] == 1
    full = server.stats()
    assert (
        full["monotonic_start"] <= before < full["monotonic_start"] + full["log"][0]["t"] <= time.monotonic()
    )
