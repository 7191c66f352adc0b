import json

from tasks.config import build_config
from tasks.manifests import Prompt
from tasks.requests import build_chat_request, request_key

CFG = build_config({"images": "i", "out": "o"}, environ={})
P = Prompt("cap", "Describe.", "caption", system="Be brief.")


def cfg(**flags):
    return build_config({"images": "i", "out": "o", **flags}, environ={})


def test_chat_body_shape() -> None:
    req = build_chat_request(
        P, "data:image/jpeg;base64,AAAA", "abc", cfg(temperature=0.2, seed=3, reasoning=True)
    )
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
    req = build_chat_request(Prompt("q", "Count.", "qa", max_tokens=7, json_schema=schema), "u", "h", CFG)
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
