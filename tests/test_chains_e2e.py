"""Multi-turn chains (parent_prompt_id) through the real CLI against the emulator.

The emulator quotes the start of the previous assistant turn in its answer (``After: "..."``), so a
child's text shows which parent answer its conversation carried; it also answers 400 to any
conversation whose roles do not alternate.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from emulator import EmulatorServer
from emulator.answers import PREVIOUS_QUOTED
from tests.builders import images_manifest, prompts_manifest
from tests.cli import rows, vlmbatch

CHAIN = [
    {"prompt_id": "describe", "prompt": "Describe the image."},
    {"prompt_id": "colour", "prompt": "What colour dominates?", "parent_prompt_id": "describe"},
    {"prompt_id": "why", "prompt": "Why do you say so?", "parent_prompt_id": "colour"},
]


def _after(parent_text: str) -> str:
    return f'After: "{parent_text[:PREVIOUS_QUOTED]}"'


def _by_item(out: Path) -> dict[tuple[str | None, str], dict]:
    return {(r["image_id"], r["prompt_id"]): r for r in rows(out)}


def _args(tmp_path: Path, emulator: EmulatorServer, prompts: Path, *more: object) -> list[object]:
    images = images_manifest(tmp_path, {"a": ((30, 10), "red"), "b": ((40, 10), "blue")})
    return [
        "run",
        images,
        "--prompts",
        prompts,
        "--out",
        tmp_path / "out",
        "--base-url",
        emulator.base_url,
        *more,
    ]


@pytest.mark.parametrize("api", ["chat", "responses"])
def test_a_chain_is_asked_turn_by_turn_with_the_conversation(
    tmp_path: Path, emulator: EmulatorServer, api: str
) -> None:
    prompts = prompts_manifest(tmp_path, CHAIN)
    res = vlmbatch(*_args(tmp_path, emulator, prompts, "--api", api))
    assert res.code == 0, res.err
    got = _by_item(tmp_path / "out")
    assert len(got) == 6 and all(r["status"] == "ok" for r in got.values())
    assert emulator.stats()["requests_total"] == 6
    for image_id, look in (("a", "30×10 image, mostly red"), ("b", "40×10 image, mostly blue")):
        describe, colour, why = (got[(image_id, p)] for p in ("describe", "colour", "why"))
        assert look in describe["text"] and "After:" not in describe["text"]
        # each follow-up saw the image of the first turn and the answer of the turn before it
        assert look in colour["text"] and _after(describe["text"]) in colour["text"]
        assert 'Prompt: "What colour dominates?"' in colour["text"]
        assert look in why["text"] and _after(colour["text"]) in why["text"]
        assert (describe["task"], colour["task"], why["task"]) == ("caption", "qa", "qa")
        assert len({describe["request_key"], colour["request_key"], why["request_key"]}) == 3


def test_a_rerun_reads_done_parents_answers_back_from_out(tmp_path: Path, emulator: EmulatorServer) -> None:
    prompts = prompts_manifest(tmp_path, CHAIN)
    args = _args(tmp_path, emulator, prompts)
    assert vlmbatch(*args).code == 0
    first = _by_item(tmp_path / "out")
    emulator.reset()
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 0  # a finished chain sends nothing

    changed = [*CHAIN[:2], {**CHAIN[2], "prompt": "Are you sure?"}]
    prompts_manifest(tmp_path, changed)
    emulator.reset()
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 2  # only the changed last turn, once per image
    again = _by_item(tmp_path / "out")
    for image_id in ("a", "b"):
        why = again[(image_id, "why")]
        # its conversation carried the parent's answer as stored in OUT by the first run
        assert _after(first[(image_id, "colour")]["text"]) in why["text"] and "Are you sure?" in why["text"]
        assert again[(image_id, "describe")] == first[(image_id, "describe")]
    assert len(again) == 6

    prompts_manifest(tmp_path, [{**CHAIN[0], "prompt": "Describe it briefly."}, *changed[1:]])
    emulator.reset()
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 6  # a new root answer means new conversations below it
    final = _by_item(tmp_path / "out")
    assert all(_after(final[(i, "describe")]["text"]) in final[(i, "colour")]["text"] for i in "ab")


def test_a_parent_answered_again_as_before_keeps_its_done_children(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    prompts = prompts_manifest(tmp_path, CHAIN)
    args = _args(tmp_path, emulator, prompts)
    assert vlmbatch(*args).code == 0
    first = _by_item(tmp_path / "out")
    for part in (tmp_path / "out").glob("part-*.parquet"):  # the roots' rows marked failed, children kept
        table = pq.read_table(part)
        roots = pc.equal(table["prompt_id"], "describe")
        status = pc.if_else(roots, pa.scalar("failed"), table["status"])
        pq.write_table(table.set_column(table.schema.get_field_index("status"), "status", status), part)
    emulator.reset()
    assert vlmbatch(*args).code == 0
    # the roots are asked again; their (deterministic) answers are the stored ones, so the children's
    # conversations, and keys, are unchanged and they are not sent again
    assert emulator.stats()["requests_total"] == 2
    again = _by_item(tmp_path / "out")
    assert len(again) == 6 and all(r["status"] == "ok" for r in again.values())
    assert all(again[(i, "colour")] == first[(i, "colour")] for i in "ab")


def test_a_failed_parent_fails_its_children_unsent(tmp_path: Path, emulator: EmulatorServer) -> None:
    prompts = prompts_manifest(tmp_path, CHAIN)
    emulator.configure(fault_script=["500"])  # the first request, one image's "describe", fails
    args = _args(tmp_path, emulator, prompts, "--concurrency", 1, "--max-retries", 0)
    res = vlmbatch(*args)
    assert res.code == 2
    got = _by_item(tmp_path / "out")
    failed = [key for key, r in got.items() if r["prompt_id"] == "describe" and r["status"] == "failed"]
    assert len(failed) == 1 and got[failed[0]]["error_type"] == "server_error"
    image = failed[0][0]
    for child in ("colour", "why"):
        row = got[(image, child)]
        assert (row["status"], row["error_type"], row["attempts"]) == ("failed", "parent_failed", 0)
        assert row["request_key"] is None
    for child in ("colour", "why"):  # each names the prompt that failed
        expected = "prompt 'describe', earlier in the chain, failed (server_error); not sent"
        assert got[(image, child)]["error_message"] == expected
    other = "b" if image == "a" else "a"
    assert all(got[(other, p)]["status"] == "ok" for p in ("describe", "colour", "why"))
    assert emulator.stats()["requests_total"] == 4  # the failed parent's children were never sent

    emulator.configure(fault_script=[])
    emulator.reset()
    assert vlmbatch(*args).code == 0  # the rerun retries the parent, then asks its children
    assert emulator.stats()["requests_total"] == 3
    assert all(r["status"] == "ok" for r in rows(tmp_path / "out")) and len(rows(tmp_path / "out")) == 6


def test_chains_of_text_only_prompts_and_image_specific_children(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    prompts = prompts_manifest(
        tmp_path,
        [
            {"prompt_id": "story", "prompt": "Tell a story."},
            {"prompt_id": "title", "prompt": "Give it a title.", "parent_prompt_id": "story"},
        ],
    )
    out = tmp_path / "text"
    res = vlmbatch("run", "--prompts", prompts, "--out", out, "--base-url", emulator.base_url)
    assert res.code == 0, res.err
    got = _by_item(out)
    assert _after(got[(None, "story")]["text"]) in got[(None, "title")]["text"]

    # a child naming one image narrows a parent asked of every image
    narrowed = prompts_manifest(
        tmp_path,
        [
            CHAIN[0],
            {"prompt_id": "more", "prompt": "Say more.", "parent_prompt_id": "describe", "image_id": "b"},
        ],
        "narrow.parquet",
    )
    emulator.reset()
    assert vlmbatch(*_args(tmp_path, emulator, narrowed)).code == 0
    assert sorted(_by_item(tmp_path / "out")) == [("a", "describe"), ("b", "describe"), ("b", "more")]
    assert emulator.stats()["requests_total"] == 3


def test_dry_run_and_limit_keep_parents_with_their_children(tmp_path: Path, emulator: EmulatorServer) -> None:
    prompts = prompts_manifest(tmp_path, CHAIN)
    args = _args(tmp_path, emulator, prompts)
    res = vlmbatch(*args, "--dry-run")
    assert res.code == 0, res.err
    assert emulator.stats()["requests_total"] == 0
    assert vlmbatch(*args, "--limit", 2).code == 0
    got = _by_item(tmp_path / "out")
    assert sorted(got) == [("a", "colour"), ("a", "describe")]  # the first two items: a parent and its child


@pytest.mark.parametrize(
    ("rows_", "message"),
    [
        (
            [CHAIN[0], {**CHAIN[1], "parent_prompt_id": "nope"}],
            "column 'parent_prompt_id' names prompts not in the prompts manifest ('nope') in row 1",
        ),
        (
            [{**CHAIN[0], "parent_prompt_id": "why"}, *CHAIN[1:]],
            "column 'parent_prompt_id' forms a cycle ('describe' → 'why' → 'colour' → 'describe') "
            "in rows 0, 1, 2",
        ),
        (
            [{**CHAIN[0], "image_id": "a"}, {**CHAIN[1], "image_id": "b"}],
            "row 1 (prompt 'colour') names image 'b' but its parent 'describe' is asked of image 'a' only",
        ),
    ],
)
def test_bad_chains_stop_before_anything_is_sent(
    tmp_path: Path, emulator: EmulatorServer, rows_: list[dict], message: str
) -> None:
    prompts = prompts_manifest(tmp_path, rows_)
    res = vlmbatch(*_args(tmp_path, emulator, prompts))
    assert res.code == 1 and message in res.err, res.err
    assert emulator.stats()["requests_total"] == 0 and not (tmp_path / "out").exists()
