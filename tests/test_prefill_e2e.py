"""Prefill (a final assistant message continued) through the real CLI against the emulator: the row's
text is the whole answer, prefill included; chains; and what stops a run (a prefill with a json_schema
among it).

The emulator answers a continued message with the continuation only, as vLLM does, and refuses with 400
a continue_final_message without add_generation_prompt false, or when the last message is not the
assistant's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from emulator import EmulatorServer
from emulator.answers import PREVIOUS_QUOTED
from tests.builders import TAGS_SCHEMA, images_manifest, prompts_manifest
from tests.cli import rows, vlmbatch

CAPTION = {"prompt_id": "cap", "prompt": "Describe the photo.", "prefill": "Caption:"}


def _run(tmp_path: Path, emulator: EmulatorServer, prompts: list[dict[str, Any]], *more: object) -> Any:
    images = images_manifest(tmp_path, {"a": ((30, 10), "red"), "b": ((40, 10), "blue")})
    manifest = prompts_manifest(tmp_path, prompts)
    args = ["run", images, "--prompts", manifest, "--base-url", emulator.base_url]
    return vlmbatch(*args, "--out", tmp_path / "out", *more)


def test_the_text_is_the_prefill_and_its_continuation(tmp_path: Path, emulator: EmulatorServer) -> None:
    plain = {**CAPTION, "prompt_id": "plain", "prefill": None}
    res = _run(tmp_path, emulator, [CAPTION, plain])
    assert res.code == 0, res.err
    got = {(r["image_id"], r["prompt_id"]): r for r in rows(tmp_path / "out")}
    for image_id, look in (("a", "30×10 image, mostly red"), ("b", "40×10 image, mostly blue")):
        prefilled, unprefilled = got[(image_id, "cap")], got[(image_id, "plain")]
        assert prefilled["text"] == "Caption: " + unprefilled["text"] and look in prefilled["text"]
        assert prefilled["request_key"] != unprefilled["request_key"]  # the prefill is in the key
    assert emulator.stats()["continued"] == 2

    emulator.reset()
    assert _run(tmp_path, emulator, [CAPTION, plain]).code == 0
    assert emulator.stats()["requests_total"] == 0  # unchanged: nothing sent
    assert _run(tmp_path, emulator, [{**CAPTION, "prefill": "Answer: "}, plain]).code == 0
    assert emulator.stats()["requests_total"] == 2  # a new prefill: asked again
    assert all(r["text"].startswith("Answer: A ") for r in rows(tmp_path / "out") if r["prompt_id"] == "cap")


def test_a_brace_prefill_without_a_schema_is_text_that_starts_with_it(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    prompts = [{"prompt_id": "meta", "prompt": "Tag it.", "prefill": "{"}]
    res = _run(tmp_path, emulator, prompts)
    assert res.code == 0, res.err
    got = rows(tmp_path / "out")
    assert len(got) == 2 and all(r["text"].startswith("{ ") and r["json"] is None for r in got)
    assert emulator.stats()["continued"] == 2


def test_a_chained_prompt_after_a_prefill_sees_the_whole_answer(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    prompts = [
        CAPTION,
        {"prompt_id": "why", "prompt": "Why?", "parent_prompt_id": "cap", "prefill": "Because"},
    ]
    res = _run(tmp_path, emulator, prompts)
    assert res.code == 0, res.err
    got = {(r["image_id"], r["prompt_id"]): r for r in rows(tmp_path / "out")}
    for image_id in ("a", "b"):
        parent, child = got[(image_id, "cap")], got[(image_id, "why")]
        assert parent["text"].startswith("Caption: ") and child["text"].startswith("Because ")
        assert f'After: "{parent["text"][:PREVIOUS_QUOTED]}"' in child["text"]  # prefill included
    emulator.reset()
    assert _run(tmp_path, emulator, prompts).code == 0
    assert emulator.stats()["requests_total"] == 0  # the parent's stored text gives the same child key


def test_what_a_prefill_cannot_go_with_stops_the_run_before_anything_is_sent(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    res = _run(tmp_path, emulator, [CAPTION], "--api", "responses")
    assert res.code == 1
    assert "column 'prefill' is set for prompts 'cap', but --api responses cannot continue" in res.err
    schema = {
        "prompt_id": "meta",
        "prompt": "Tag it.",
        "json_schema": json.dumps(TAGS_SCHEMA),
        "prefill": "{",
    }
    for mode in ("openai", "vllm", "tools"):
        res = _run(tmp_path, emulator, [schema], "--structured-output", mode)
        assert res.code == 1 and "has both 'prefill' and 'json_schema'" in res.err
    res = _run(tmp_path, emulator, [{**CAPTION, "prefill": ""}])
    assert res.code == 1 and "column 'prefill' is empty in row 0 (prompt 'cap')" in res.err
    assert emulator.stats()["requests_total"] == 0
    assert not (tmp_path / "out").exists()
