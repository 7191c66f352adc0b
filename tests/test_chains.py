"""Chains: ordering and checks when the manifest is read, and the conversation each turn sends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import build_config
from tasks.endpoint.requests import build_request, request_key
from tasks.errors import ManifestError
from tasks.inputs.chains import Turn, children_of, descendants, group_by_root, order_chains
from tasks.inputs.prompt import Prompt
from tasks.inputs.work_items import iter_text_jobs, limit_items

CFG = build_config({"images": "i", "out": "o"}, environ={})
ROOT = Prompt("root", "Describe.", "caption", system="Be brief.")
MID = Prompt("mid", "Colour?", "qa", parent_prompt_id="root")
LEAF = Prompt("leaf", "Why?", "qa", parent_prompt_id="mid", system="Explain.")
URL = "data:image/png;base64,AAAA"


def test_children_come_after_their_parents_whatever_the_manifest_order() -> None:
    other = Prompt("other", "Other.", "caption")
    ordered = order_chains([LEAF, other, MID, ROOT], "p.parquet")
    assert [p.prompt_id for p in ordered] == ["root", "mid", "leaf", "other"]
    assert [[p.prompt_id for p in g] for g in group_by_root(ordered)] == [["root", "mid", "leaf"], ["other"]]
    kids = children_of(ordered)
    assert [p.prompt_id for p in descendants(ROOT, kids)] == ["mid", "leaf"]


def test_a_child_inherits_its_parents_image() -> None:
    ordered = order_chains(
        [Prompt("r", "?", "qa", image_id="a"), Prompt("c", "?", "qa", parent_prompt_id="r")], "p"
    )
    assert ordered[1].image_id == "a"


def test_multi_image_prompts_cannot_be_chained() -> None:
    multi = Prompt("m", "?", "qa", image_ids=("a", "b"))
    with pytest.raises(
        ManifestError, match=r"multi-image prompt \(image_ids\) cannot be part of a chain; see row 0"
    ):
        order_chains([multi, Prompt("c", "?", "qa", parent_prompt_id="m")], Path("p.parquet"))


def test_a_chained_turn_sends_the_conversation_with_strict_alternation() -> None:
    history = (Turn(ROOT, "A red square."), Turn(MID, "Red."))
    body = build_request(LEAF, URL, "sha256:x", CFG, history).body
    roles = [m["role"] for m in body["messages"]]
    assert roles == ["system", "user", "assistant", "user", "assistant", "user"]
    assert body["messages"][0]["content"] == "Explain."  # its own system prompt wins over the root's
    first = body["messages"][1]["content"]
    assert first[0] == {"type": "image_url", "image_url": {"url": URL}} and first[1]["text"] == "Describe."
    assert [m["content"] for m in body["messages"][2::2]] == ["A red square.", "Red."]
    assert body["messages"][-1]["content"] == [{"type": "text", "text": "Why?"}]
    assert build_request(MID, URL, "sha256:x", CFG, history[:1]).body["messages"][0]["content"] == "Be brief."


def test_the_responses_api_gets_the_same_conversation() -> None:
    cfg = build_config({"images": "i", "out": "o", "api": "responses"}, environ={})
    body = build_request(MID, URL, "sha256:x", cfg, (Turn(ROOT, "A red square."),)).body
    assert body["instructions"] == "Be brief."
    assert [item["role"] for item in body["input"]] == ["user", "assistant", "user"]
    assert body["input"][1]["content"] == "A red square."  # vLLM takes output_text only in output items
    assert body["input"][0]["content"][0] == {"type": "input_image", "image_url": URL, "detail": "auto"}


def test_a_childs_key_covers_its_parents_answer() -> None:
    one = request_key(MID, "sha256:x", CFG, (Turn(ROOT, "A red square."),))
    two = request_key(MID, "sha256:x", CFG, (Turn(ROOT, "A blue square."),))
    assert one != two
    assert request_key(ROOT, "sha256:x", CFG) == request_key(ROOT, "sha256:x", CFG, ())


def test_limit_never_keeps_a_child_without_its_parent() -> None:
    jobs = list(limit_items(iter_text_jobs(order_chains([LEAF, MID, ROOT], "p")), 2))
    assert [[p.prompt_id for p in job.prompts] for job in jobs] == [["root", "mid"]]
