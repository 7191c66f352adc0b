import dataclasses
import json

import pytest

from tasks.config import build_config
from tasks.endpoint.requests import build_request, repair_request, request_key
from tasks.inputs.prompt import Prompt

CFG = build_config({"images": "i", "out": "o"}, environ={})
P = Prompt("cap", "Describe.", "caption", system="Be brief.")


def cfg(**flags):
    return build_config({"images": "i", "out": "o", **flags}, environ={})


def test_chat_body_shape() -> None:
    req = build_request(P, "data:image/jpeg;base64,AAAA", "abc", cfg(temperature=0.2, seed=3, reasoning=True))
    body = req.body
    assert body["model"] == "google/gemma-4-31b-it"
    assert body["messages"][0] == {"role": "system", "content": "Be brief."}
    user = body["messages"][1]
    assert user["role"] == "user"
    assert user["content"][0] == {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,AAAA"}}
    assert user["content"][1] == {"type": "text", "text": "Describe."}
    assert body["max_completion_tokens"] == 1024
    assert body["temperature"] == 0.2 and body["seed"] == 3
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert "top_p" not in body


def test_prompt_max_tokens_and_json_schema() -> None:
    schema = '{"type": "object", "properties": {"n": {"type": "integer"}}}'
    req = build_request(Prompt("q", "Count.", "qa", max_tokens=7, json_schema=schema), "u", "h", CFG)
    assert req.body["max_completion_tokens"] == 7
    assert req.body["response_format"]["json_schema"]["schema"] == json.loads(schema)


def test_request_key_depends_on_what_determines_the_answer() -> None:
    base = request_key(P, "sha-1", CFG)
    assert base == request_key(P, "sha-1", CFG)
    assert len(base) == 64
    changed = [
        request_key(P, "sha-2", CFG),
        request_key(Prompt("cap", "Describe!", "caption", system="Be brief."), "sha-1", CFG),
        request_key(Prompt("cap", "Describe.", "caption", system="Be long."), "sha-1", CFG),
        request_key(Prompt("cap", "Describe.", "caption", system="Be brief.", max_tokens=5), "sha-1", CFG),
        request_key(P, "sha-1", cfg(model="other")),
        request_key(P, "sha-1", cfg(temperature=0.5)),
        request_key(P, "sha-1", cfg(reasoning=True)),
        request_key(P, "sha-1", cfg(max_soft_tokens=560)),
        request_key(P, "sha-1", cfg(jpeg_quality=80)),
    ]
    assert base not in changed
    assert len(set(changed)) == len(changed)


def test_request_key_ignores_identity_and_transport() -> None:
    other_id = Prompt("another-id", "Describe.", "qa", system="Be brief.")
    assert request_key(other_id, "sha-1", CFG) == request_key(P, "sha-1", CFG)
    assert request_key(P, "sha-1", cfg(concurrency=3, base_url="http://x:1/v1", shard_size=5)) == request_key(
        P, "sha-1", CFG
    )


def test_responses_body_stream_and_repair() -> None:
    schema = '{"type": "object"}'
    prompt = Prompt("q", "Count.", "qa", system="Be exact.", json_schema=schema)
    req = build_request(
        prompt, "data:x", "sha256:h", cfg(api="responses", reasoning=True, reasoning_effort="high")
    )
    body = req.body
    assert body["input"] == [
        {
            "role": "user",
            "content": [
                {"type": "input_image", "image_url": "data:x", "detail": "auto"},
                {"type": "input_text", "text": "Count."},
            ],
        }
    ]
    assert body["instructions"] == "Be exact." and body["max_output_tokens"] == 1024
    assert body["reasoning"] == {"effort": "high"}
    assert body["text"]["format"]["type"] == "json_schema"
    assert (
        req.key != build_request(prompt, "data:x", "sha256:h", cfg(reasoning=True)).key
    )  # the API is in the key

    streamed = build_request(P, "data:x", "sha256:h", cfg(stream=True))
    assert streamed.body["stream"] is True and streamed.body["stream_options"] == {"include_usage": True}
    assert streamed.key == build_request(P, "data:x", "sha256:h", CFG).key  # transport, not content
    vllm = build_request(prompt, "u", "h", cfg(structured_output="vllm"))
    assert (
        vllm.body["structured_outputs"] == {"json": {"type": "object"}} and "response_format" not in vllm.body
    )

    fixed = repair_request(build_request(prompt, "u", "h", CFG), "{oops", "not JSON")
    assert [m["role"] for m in fixed.body["messages"]] == ["system", "user", "assistant", "user"]
    assert "not JSON" in fixed.body["messages"][-1]["content"][0]["text"]
    fixed = repair_request(req, "{oops", "not JSON")
    assert [m["role"] for m in fixed.body["input"]] == ["user", "assistant", "user"]


def test_request_keys_from_templates_equal_the_plain_keys() -> None:
    from tasks.endpoint.requests import RequestKeys
    from tasks.inputs.chains import Turn

    prompt = Prompt("p", 'Say "hi" ☃\n', "qa", system="sys", json_schema='{"type": "object"}', max_tokens=7)
    refs = [None, "sha256:" + "ab" * 32, 'url:https://x.test/a "b"\\c?d=☃&e=\t', "url:https://x.test/\x00"]
    for config in (CFG, cfg(api="responses", reasoning=True, temperature=0.5)):
        keys = RequestKeys(config)
        for ref in refs:
            assert keys.key(prompt, ref) == request_key(prompt, ref, config), ref
            assert keys.key(prompt, ref) == request_key(prompt, ref, config)  # from the cached template
        history = (Turn(P, "an answer"),)
        assert keys.key(prompt, refs[1], history) == request_key(prompt, refs[1], config, history)
        several = [refs[1], "sha256:" + "cd" * 32]
        assert keys.key(prompt, several) == request_key(prompt, several, config)


def test_reasoning_text_is_kept_only_where_reasoning_is_on_and_not_hidden() -> None:
    """The prompt's own ``reasoning`` column wins over --reasoning; --hide-reasoning asks for no text."""
    import dataclasses

    thinking = dataclasses.replace(P, reasoning=True)
    quiet = dataclasses.replace(P, reasoning=False)
    assert build_request(P, "data:x", "sha256:h", cfg(reasoning=True)).keep_reasoning
    assert not build_request(P, "data:x", "sha256:h", CFG).keep_reasoning
    assert build_request(thinking, "data:x", "sha256:h", CFG).keep_reasoning
    assert not build_request(quiet, "data:x", "sha256:h", cfg(reasoning=True)).keep_reasoning
    hidden = build_request(P, "data:x", "sha256:h", cfg(reasoning=True, hide_reasoning=True))
    assert not hidden.keep_reasoning and hidden.body["include_reasoning"] is False
    kept = build_request(P, "data:x", "sha256:h", cfg(api="responses", reasoning=True))
    assert kept.keep_reasoning and repair_request(kept, "{", "not JSON").keep_reasoning


def test_thinking_off_is_sent_only_when_said() -> None:
    plain = Prompt("c", "Describe.", "caption")
    assert "chat_template_kwargs" not in build_request(plain, "u", "h", cfg()).body
    off = build_request(plain, "u", "h", cfg(reasoning=False))
    assert off.body["chat_template_kwargs"] == {"enable_thinking": False} and not off.keep_reasoning
    hidden = build_request(plain, "u", "h", cfg(reasoning=False, hide_reasoning=True)).body
    assert "include_reasoning" not in hidden  # nothing to hide
    said = build_request(dataclasses.replace(plain, reasoning=False), "u", "h", cfg(reasoning=True)).body
    assert said["chat_template_kwargs"] == {"enable_thinking": False}
    assert "reasoning" not in build_request(plain, "u", "h", cfg(api="responses", reasoning=False)).body


def test_a_prefill_ends_the_conversation_and_is_continued() -> None:
    prompt = Prompt("c", "Describe.", "caption", prefill="Caption:")
    req = build_request(prompt, "u", "h", cfg())
    assert req.body["messages"][-1] == {"role": "assistant", "content": "Caption:"}
    assert (req.body["continue_final_message"], req.body["add_generation_prompt"]) == (True, False)
    assert req.prefill == "Caption:"
    fixed = repair_request(req, "Caption: no", "bad")
    roles = [m["role"] for m in fixed.body["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]  # the prefill last again
    assert (
        fixed.body["messages"][1]["content"] == "Caption: no"
        and fixed.body["messages"][-1]["content"] == "Caption:"
    )
    with pytest.raises(ValueError, match="cannot continue a prefill"):
        build_request(prompt, "u", "h", cfg(api="responses"))
