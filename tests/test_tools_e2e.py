"""Function calling through the real CLI against the emulator: the manifest's tools and tool_choice, the
tool_calls column, the repair of a bad call, --structured-output tools, and bad definitions (exit 1).

The emulator calls a function deterministically (emulator/tools.py): a named choice always; "required"
the first function the prompt mentions, else the first; "auto" the first mentioned, or the first when
the prompt says "call"; else it answers in text.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pyarrow.parquet as pq
import pytest

from emulator import EmulatorServer
from tests.builders import TAGS_SCHEMA, images_manifest, prompts_manifest
from tests.cli import rows, vlmbatch

CAPTION = {
    "type": "object",
    "properties": {"caption": {"type": "string"}, "colour": {"type": "string"}},
    "required": ["caption", "colour"],
    "additionalProperties": False,
}
REASON = {"type": "object", "properties": {"reason": {"type": "string"}}, "required": ["reason"]}
RECORD = {"type": "function", "function": {"name": "record_caption", "parameters": CAPTION}}
FLAG = {
    "type": "function",
    "function": {"name": "flag_image", "description": "Flag it.", "parameters": REASON},
}
TOOLS = json.dumps([RECORD, FLAG])
PARAMETERS = {"record_caption": CAPTION, "flag_image": REASON}

PROMPTS: list[dict[str, Any]] = [
    {"prompt_id": "named", "prompt": "Describe the photo.", "tools": TOOLS, "tool_choice": "record_caption"},
    {
        "prompt_id": "required",
        "prompt": "Is it blurry? flag_image if so.",
        "tools": TOOLS,
        "tool_choice": "required",
    },
    {"prompt_id": "auto_call", "prompt": "Describe it, then call a function.", "tools": TOOLS},
    {"prompt_id": "auto_text", "prompt": "Describe the photo.", "tools": TOOLS, "tool_choice": "auto"},
    {"prompt_id": "none", "prompt": "Please call flag_image.", "tools": TOOLS, "tool_choice": "none"},
    {"prompt_id": "plain", "prompt": "Describe the photo."},
]
CALLED = {"named": "record_caption", "required": "flag_image", "auto_call": "record_caption"}


def _run(tmp_path: Path, emulator: EmulatorServer, prompts: list[dict[str, Any]], *more: object) -> Any:
    images = images_manifest(tmp_path, {"a": ((30, 10), "red"), "b": ((40, 10), "blue")})
    manifest = prompts_manifest(tmp_path, prompts)
    args = ["run", images, "--prompts", manifest, "--base-url", emulator.base_url]
    return vlmbatch(*args, "--out", tmp_path / "out", *more)


def _calls(row: dict[str, Any]) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = json.loads(row["tool_calls"])
    for call in calls:
        jsonschema.validate(call["arguments"], PARAMETERS[call["name"]])
    return calls


@pytest.mark.parametrize("mode", ["plain", "stream", "responses"])
def test_tool_calls_land_parsed_and_validated(tmp_path: Path, emulator: EmulatorServer, mode: str) -> None:
    more = {"plain": [], "stream": ["--stream"], "responses": ["--api", "responses"]}[mode]
    res = _run(tmp_path, emulator, PROMPTS, *more)
    assert res.code == 0, res.err
    got = rows(tmp_path / "out")
    assert len(got) == 12 and all(r["status"] == "ok" for r in got)
    for row in got:
        if row["prompt_id"] in CALLED:
            (call,) = _calls(row)
            assert call["name"] == CALLED[row["prompt_id"]]
            assert row["text"] is None and row["json"] is None
            if mode != "responses":  # the Responses API says "completed": finish_reason stop
                assert row["finish_reason"] == "tool_calls"  # as the server said
        else:
            assert row["tool_calls"] is None and row["text"] and row["finish_reason"] == "stop"
    named = {r["image_id"]: _calls(r)[0]["arguments"] for r in got if r["prompt_id"] == "named"}
    assert named["a"]["caption"].startswith("A 30×10 image, mostly red")  # each image's own call
    stats = emulator.stats()
    assert (stats["with_tools"], stats["tool_calls"]) == (10, 6)  # "plain" offers none
    if mode == "stream":
        assert stats["streamed"] == 12


def test_a_bad_call_gets_one_repair_then_is_invalid_json(tmp_path: Path, emulator: EmulatorServer) -> None:
    one = [PROMPTS[0]]
    emulator.configure(fault_script=["bad_json"])  # the first answer's call breaks the schema
    res = _run(tmp_path, emulator, one)
    assert res.code == 0, res.err
    got = rows(tmp_path / "out")
    assert sorted(r["attempts"] for r in got) == [1, 2]  # the one whose call broke was repaired
    assert all(r["status"] == "ok" and _calls(r)[0]["name"] == "record_caption" for r in got)
    assert emulator.stats()["requests_total"] == 3

    for fault, message in (
        ("bad_json", "the call of 'record_caption' does not match its parameters at (root): 'caption'"),
        ("broken_json", "the call of 'record_caption' is not JSON"),
    ):
        emulator.configure(fault_script=[fault] * 4)  # both answers of both items
        emulator.reset()
        res = _run(tmp_path, emulator, one, "--force")
        assert res.code == 2
        for row in rows(tmp_path / "out"):
            assert (row["status"], row["error_type"], row["attempts"]) == ("failed", "invalid_json", 2)
            assert row["tool_calls"] is None and row["http_status"] == 200
            assert message in row["error_message"]
        # the repair gave the call back as the assistant's text and asked again: no tool-result turn (a 400)
        assert emulator.stats()["by_status"] == {"200": 4}


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_structured_output_tools_fills_json_like_the_other_modes(
    tmp_path: Path, emulator: EmulatorServer, api: str
) -> None:
    prompts = [{"prompt_id": "meta", "prompt": "Tag it.", "json_schema": json.dumps(TAGS_SCHEMA)}]
    res = _run(tmp_path, emulator, prompts, "--structured-output", "tools", "--api", api)
    assert res.code == 0, res.err
    tooled = rows(tmp_path / "out")
    assert emulator.stats()["tool_calls"] == 2  # answered by calling the schema's function
    for row in tooled:
        jsonschema.validate(json.loads(row["json"]), TAGS_SCHEMA)
        assert json.loads(row["text"]) == json.loads(row["json"]) and row["tool_calls"] is None
    res = _run(tmp_path, emulator, prompts, "--api", api, "--force")  # openai's response_format
    assert res.code == 0, res.err
    plain = rows(tmp_path / "out")
    same = ("image_id", "prompt_id", "status", "json")
    assert [{k: r[k] for k in same} for r in plain] == [{k: r[k] for k in same} for r in tooled]

    emulator.configure(fault_script=["bad_json"])  # repaired like a JSON answer
    res = _run(tmp_path, emulator, prompts, "--structured-output", "tools", "--concurrency", 1, "--force")
    assert res.code == 0, res.err
    assert sorted(r["attempts"] for r in rows(tmp_path / "out")) == [1, 2]


def test_tools_and_tool_choice_are_part_of_the_request_key(tmp_path: Path, emulator: EmulatorServer) -> None:
    prompts = PROMPTS[:2]
    assert _run(tmp_path, emulator, prompts).code == 0
    keys = {(r["image_id"], r["prompt_id"]): r["request_key"] for r in rows(tmp_path / "out")}
    emulator.reset()
    assert _run(tmp_path, emulator, prompts).code == 0
    assert emulator.stats()["requests_total"] == 0  # unchanged: nothing sent
    changed = [
        {**prompts[0], "tool_choice": "flag_image"},
        {**prompts[1], "tools": json.dumps([FLAG, RECORD])},
    ]
    assert _run(tmp_path, emulator, changed).code == 0
    assert emulator.stats()["requests_total"] == 4
    again = {(r["image_id"], r["prompt_id"]): r["request_key"] for r in rows(tmp_path / "out")}
    assert all(again[item] != key for item, key in keys.items())


def _tool(name: object = "f", **function: object) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"tools": "{not json"}, "column 'tools' in row 0 (prompt 'p'): not JSON"),
        ({"tools": json.dumps(_tool())}, "must be a JSON list of function tools, not dict"),
        ({"tools": "[]"}, "an empty list"),
        ({"tools": json.dumps([{"type": "web_search"}])}, "only function tools are supported"),
        ({"tools": json.dumps([{"type": "function", "name": "f"}])}, 'has no "function" object'),
        ({"tools": json.dumps([_tool(None)])}, "tools[0]: the function has no name"),
        ({"tools": json.dumps([_tool(), _tool()])}, "a second function named 'f'"),
        (
            {"tools": json.dumps([_tool(parameters={"type": "objet"})])},
            "the parameters of 'f' are not a valid JSON Schema",
        ),
        ({"tools": json.dumps([_tool(parameters=[1])])}, "must be a JSON object"),
        (
            {"tools": json.dumps([_tool(parameters={"$ref": "https://example.com/args.json"})])},
            "the parameters of 'f' are not a valid JSON Schema: $ref 'https://example.com/args.json' "
            "is not a local JSON pointer",
        ),
        (
            {"tools": json.dumps([_tool()]), "tool_choice": "g"},
            "column 'tool_choice' in row 0 (prompt 'p'): 'g' names no tool",
        ),
        ({"tool_choice": "auto"}, "'auto' is set but the prompt has no tools"),
        (
            {"tools": json.dumps([_tool()]), "json_schema": json.dumps(TAGS_SCHEMA)},
            "both 'tools' and 'json_schema'",
        ),
        ({"tools": json.dumps([_tool()]), "prefill": "Caption:"}, "both 'prefill' and 'tools'"),
    ],
)
def test_bad_tool_definitions_stop_the_run_before_anything_is_sent(
    tmp_path: Path, emulator: EmulatorServer, columns: dict[str, Any], message: str
) -> None:
    res = _run(tmp_path, emulator, [{"prompt_id": "p", "prompt": "Describe.", **columns}])
    assert res.code == 1
    assert message in res.err and "prompts.parquet" in res.err
    assert emulator.stats()["requests_total"] == 0
    assert not (tmp_path / "out").exists()


def test_a_prompt_with_tools_cannot_have_chained_children(tmp_path: Path, emulator: EmulatorServer) -> None:
    prompts = [PROMPTS[0], {"prompt_id": "next", "prompt": "And then?", "parent_prompt_id": "named"}]
    res = _run(tmp_path, emulator, prompts)
    assert res.code == 1
    assert (
        "a prompt with tools cannot have chained prompts after it" in res.err
        and "'named' in row 0" in res.err
    )
    assert emulator.stats()["requests_total"] == 0
    # a chained child may have tools: its conversation so far is text
    prompts = [{"prompt_id": "first", "prompt": "Describe."}, {**PROMPTS[0], "parent_prompt_id": "first"}]
    assert _run(tmp_path, emulator, prompts).code == 0
    child = [r for r in rows(tmp_path / "out") if r["prompt_id"] == "named"]
    assert all(_calls(r)[0]["name"] == "record_caption" for r in child)


def test_an_out_written_before_tool_calls_keeps_its_columns_until_tools_are_used(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """README, "Output": files of both ages never stay side by side, so pyarrow.dataset(OUT) reads one
    schema: a rerun without tools keeps OUT's columns; the first with tools adds tool_calls (null) to
    the older files, which keep their modification times (the index orders files by them)."""
    out = tmp_path / "out"
    plain = [PROMPTS[5]]
    assert _run(tmp_path, emulator, plain).code == 0
    for part in out.glob("part-*.parquet"):  # as the version before tool_calls wrote them
        pq.write_table(pq.read_table(part).drop_columns(["tool_calls"]), part)
    old_files = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}

    emulator.reset()
    more = [*plain, {"prompt_id": "colour", "prompt": "Which colour?"}]
    res = _run(tmp_path, emulator, more)  # a new prompt: new rows, the old columns
    assert res.code == 0, res.err
    assert emulator.stats()["requests_total"] == 2  # the old rows were skipped
    assert all("tool_calls" not in pq.read_schema(p).names for p in out.glob("part-*.parquet"))
    assert len(rows(out)) == 4

    res = _run(tmp_path, emulator, [*more, PROMPTS[0]])
    assert res.code == 0, res.err
    assert emulator.stats()["requests_total"] == 4  # only the tools prompt was sent
    assert all(pq.read_schema(p).names.index("tool_calls") == 7 for p in out.glob("part-*.parquet"))
    assert {p: p.stat().st_mtime_ns for p in old_files} == old_files
    got = rows(out)  # pyarrow.dataset(OUT), whichever file it reads first
    assert len(got) == 6 and sum(r["tool_calls"] is not None for r in got) == 2
    assert vlmbatch("inspect", out).code == 0
    assert vlmbatch("export", out, tmp_path / "all.parquet").code == 0
    assert pq.read_table(tmp_path / "all.parquet").num_rows == 6


def test_inspect_and_export_read_an_out_with_files_of_both_ages(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """A run stopped while it added tool_calls leaves files of both ages: inspect and export still read
    them (null where a file lacks it), and the next run finishes the job."""
    out = tmp_path / "out"
    assert _run(tmp_path, emulator, PROMPTS[:1], "--shard-size", 1).code == 0
    older = sorted(out.glob("part-*.parquet"))[0]
    pq.write_table(pq.read_table(older).drop_columns(["tool_calls"]), older)
    res = vlmbatch("inspect", out)
    assert res.code == 0 and "2" in res.out
    assert vlmbatch("export", out, tmp_path / "all.parquet").code == 0
    exported = pq.read_table(tmp_path / "all.parquet")
    assert exported.schema.names.index("tool_calls") == 7
    assert sorted(v is None for v in exported["tool_calls"].to_pylist()) == [False, True]
    emulator.reset()
    assert _run(tmp_path, emulator, PROMPTS[5:], "--shard-size", 1).code == 0  # no tools, yet it heals
    assert all("tool_calls" in pq.read_schema(p).names for p in out.glob("part-*.parquet"))
