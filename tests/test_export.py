"""``vlmbatch export``: OUT as one Parquet file, with the JSON answers as typed columns on demand."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emulator import EmulatorServer
from tasks.outputs.export import infer_json_fields
from tests.builders import TAGS_TEXT_SCHEMA, images_manifest, prompts_manifest, write_parquet
from tests.cli import rows, vlmbatch


@pytest.fixture
def plain_and_typed(tmp_path: Path, emulator: EmulatorServer) -> tuple[Path, Path, Path]:
    """The same job written without and with --json-columns, and its prompts manifest."""
    images = images_manifest(tmp_path, {f"i{k}": ((20 + k, 10), "green") for k in range(3)})
    prompts = prompts_manifest(
        tmp_path,
        [
            {"prompt_id": "cap", "prompt": "Describe."},
            {"prompt_id": "meta", "prompt": "Tag.", "json_schema": json.dumps(TAGS_TEXT_SCHEMA)},
        ],
    )
    base = ["run", images, "--prompts", prompts, "--base-url", emulator.base_url]
    assert vlmbatch(*base, "--out", tmp_path / "plain").code == 0
    assert vlmbatch(*base, "--out", tmp_path / "typed", "--json-columns").code == 0
    return tmp_path / "plain", tmp_path / "typed", prompts


def _sorted(table: pa.Table) -> list[dict]:
    drop = {"finished_at", "run_id", "latency_ms"}
    records = [{k: v for k, v in r.items() if k not in drop} for r in table.to_pylist()]
    return sorted(records, key=lambda r: (r["image_id"], r["prompt_id"]))


def test_export_with_the_prompts_matches_run_json_columns(
    tmp_path: Path, plain_and_typed: tuple[Path, Path, Path]
) -> None:
    plain, typed, prompts = plain_and_typed
    dest = tmp_path / "annotations.parquet"
    res = vlmbatch("export", plain, dest, "--json-columns", "--prompts", prompts)
    assert res.code == 0, res.err
    assert "wrote 6 rows" in res.out
    exported = pq.read_table(dest)
    written = pa.Table.from_pylist(rows(typed))
    assert exported.schema.names == written.schema.names  # tags, indoor, caption, json_text appended
    assert exported.schema.field("tags").type == pa.list_(pa.string())
    assert exported.schema.field("json_text").type == pa.int64()
    assert _sorted(exported) == _sorted(written.cast(exported.schema))
    assert not list(tmp_path.glob(".tmp-*"))


def test_export_infers_types_from_the_values_without_the_prompts(
    tmp_path: Path, plain_and_typed: tuple[Path, Path, Path]
) -> None:
    plain, typed, _ = plain_and_typed
    dest = tmp_path / "inferred.parquet"
    assert vlmbatch("export", plain, dest, "--json-columns").code == 0
    table = pq.read_table(dest)
    expected = {
        "caption": pa.string(),
        "tags": pa.list_(pa.string()),
        "indoor": pa.bool_(),
        "json_text": pa.int64(),
    }
    assert all(table.schema.field(name).type == kind for name, kind in expected.items()), table.schema
    for row in table.to_pylist():
        if row["prompt_id"] == "meta":
            assert row["tags"] == json.loads(row["json"])["tags"] and row["tags"]
        else:
            assert row["tags"] is None
    # an output that already has the typed columns is exported as it is, without doubles
    again = tmp_path / "again.parquet"
    assert vlmbatch("export", typed, again, "--json-columns").code == 0
    assert pq.read_schema(again).names == pq.read_schema(dest).names
    # without --json-columns: the output's own columns only
    assert vlmbatch("export", plain, tmp_path / "bare.parquet").code == 0
    assert "tags" not in pq.read_schema(tmp_path / "bare.parquet").names


def test_inference_falls_back_to_json_text_when_values_disagree(tmp_path: Path) -> None:
    docs = [
        json.dumps({"n": 1, "x": 1, "mixed": "a", "obj": {"k": 1}, "nums": [1, 2], "gone": None}),
        json.dumps({"n": 2, "x": 1.5, "mixed": 3, "obj": {"k": 2}, "nums": [], "gone": None}),
        None,
        json.dumps(["not", "an", "object"]),
        json.dumps({"listed": []}),
        json.dumps({"listed": 3}),
    ]
    path = write_parquet(tmp_path / "part.parquet", {"json": pa.array(docs, pa.string())})
    fields = {f.name: str(f.type) for f in infer_json_fields([path], taken=["json", "n"])}
    assert fields == {
        "json_n": "int64",  # a taken name gets the json_ prefix
        "x": "double",  # ints and floats: float
        "mixed": "string",
        "obj": "string",
        "nums": "list<item: int64>",
        "gone": "string",
        "listed": "string",  # a list, then a number
    }


def test_export_refuses_bad_destinations(tmp_path: Path, plain_and_typed: tuple[Path, Path, Path]) -> None:
    plain, _, _ = plain_and_typed
    res = vlmbatch("export", plain, plain / "x.parquet")
    assert res.code == 1 and "inside" in res.err and "would become part of the output" in res.err
    res = vlmbatch("export", plain, tmp_path)
    assert res.code == 1 and "is a directory" in res.err
    res = vlmbatch("export", tmp_path / "nope", tmp_path / "x.parquet")
    assert res.code == 1 and "is not a directory" in res.err
    res = vlmbatch("export", plain, tmp_path / "missing" / "x.parquet")
    assert res.code == 1 and "does not exist" in res.err


def test_export_replaces_an_earlier_export_but_not_another_file(
    tmp_path: Path, plain_and_typed: tuple[Path, Path, Path]
) -> None:
    plain, _, _ = plain_and_typed
    dest = tmp_path / "annotations.parquet"
    assert vlmbatch("export", plain, dest).code == 0
    assert vlmbatch("export", plain, dest).code == 0  # re-exported: an earlier export is replaced
    manifest = write_parquet(tmp_path / "images.parquet", {"image_id": ["a"], "image": ["a.jpg"]})
    res = vlmbatch("export", plain, manifest)
    assert res.code == 1 and "exists and is not an earlier export" in res.err
    assert pq.read_table(manifest).column_names == ["image_id", "image"]  # untouched
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    assert vlmbatch("export", plain, notes).code == 1 and notes.read_text() == "mine"
    assert vlmbatch("export", plain, manifest, "--force").code == 0
    assert "status" in pq.read_table(manifest).column_names


def test_export_leaves_null_a_json_value_its_typed_column_cannot_hold(tmp_path: Path) -> None:
    """The same rule as the run's own --json-columns: null in the typed column, whole in json."""
    from tasks.inputs.prompt import Prompt
    from tasks.outputs.export import export_output
    from tasks.outputs.index import OutputIndex
    from tasks.outputs.layout import prepare_out_dir
    from tasks.outputs.store import OutputStore
    from tasks.row import OUTPUT_SCHEMA, ResultRow

    out = prepare_out_dir(tmp_path / "out")
    store = OutputStore(out, OUTPUT_SCHEMA, "r", OutputIndex.empty())
    answers = ['{"count":3}', '{"count":1180591620717411303424}', '["x"]']
    for n, answer in enumerate(answers):
        store.add(0, ResultRow(f"i{n}", "p", "qa", "ok", json=answer, request_key="k" * 64))
    store.finish(0)
    schema = '{"type": "object", "properties": {"count": {"type": "integer"}}}'
    dest = tmp_path / "annotations.parquet"
    export_output(out, dest, json_columns=True, prompts=[Prompt("p", "Count.", "qa", json_schema=schema)])
    table = pq.read_table(dest)
    assert table["count"].to_pylist() == [3, None, None] and table["json"].to_pylist() == answers


def test_nested_lists_and_lists_of_objects_are_json_text_not_null_lists(tmp_path: Path) -> None:
    from tasks.outputs.export import export_output  # noqa: F401 - the inference is what export uses

    docs = [json.dumps({"m": [[64]], "objs": [{"k": 1}], "json_text": "x", "text": "y"})]
    path = write_parquet(tmp_path / "part.parquet", {"json": pa.array(docs, pa.string())})
    fields = {f.name: str(f.type) for f in infer_json_fields([path], taken=["json", "text"])}
    assert fields == {"m": "string", "objs": "string", "json_text": "string", "json_json_text": "string"}


def test_json_columns_of_nullable_types_and_colliding_names() -> None:
    """["integer", "null"] crashed --json-columns (unhashable list); a
    property whose json_ name another property has crashed the writer after every request was sent."""
    from tasks.inputs.prompt import Prompt
    from tasks.outputs.json_columns import json_fields

    schema = {
        "type": "object",
        "properties": {
            "n": {"type": ["integer", "null"]},
            "tags": {"type": "array", "items": {"type": ["string", "null"]}},
            "opt": {"anyOf": [{"type": "number"}, {"type": "null"}]},
            "either": {"type": ["integer", "string"]},
            "text": {"type": "string"},
            "json_text": {"type": "integer"},
        },
    }
    prompt = Prompt("p", "Describe.", "qa", json_schema=json.dumps(schema))
    fields = {
        f.name: (str(f.type), f.metadata[b"vlmbatch.json_property"].decode())
        for f in json_fields([prompt], ["text", "json"])
    }
    assert fields == {
        "n": ("int64", "n"),
        "tags": ("list<item: string>", "tags"),
        "opt": ("string", "opt"),  # a union, as before: outputs written with it keep their columns
        "either": ("string", "either"),
        "json_text": ("string", "text"),
        "json_json_text": ("int64", "json_text"),
    }


def test_export_keeps_off_other_outputs_and_running_ones(
    tmp_path: Path, plain_and_typed: tuple[Path, Path, Path]
) -> None:
    """A part file of another output has the output's columns but is no earlier export: replacing it
    replaced that output's rows. Nor may a run be exported while it writes."""
    from tasks.outputs.lock import OutLock

    plain, typed, _ = plain_and_typed
    victim = next(typed.glob("part-*.parquet"))
    before = pq.read_table(victim)
    res = vlmbatch("export", plain, victim)
    assert res.code == 1 and "is a vlmbatch output" in res.err
    assert vlmbatch("export", plain, typed / "new.parquet").code == 1  # not a new file in it either
    assert pq.read_table(victim).equals(before)
    lock = OutLock(plain, "run-1")
    lock.acquire()
    try:
        res = vlmbatch("export", plain, tmp_path / "x.parquet")
        assert res.code == 1 and "is being written by run run-1" in res.err
    finally:
        lock.release()
    assert vlmbatch("export", plain, tmp_path / "x.parquet").code == 0


def test_export_of_files_written_with_other_columns_keeps_every_column(tmp_path: Path) -> None:
    from tasks.outputs.export import export_output
    from tasks.row import OUTPUT_SCHEMA

    out = tmp_path / "out"
    row = {name: None for name in OUTPUT_SCHEMA.names} | {"image_id": "a", "prompt_id": "p", "status": "ok"}
    old = pa.Table.from_pylist([row | {"reasoning": "kept"}], OUTPUT_SCHEMA)
    write_parquet(
        out / "part-000000-old.parquet",
        old.drop_columns(["latency_ms"]).append_column("legacy", pa.array([1])),
    )
    write_parquet(
        out / "part-000001-new.parquet", pa.Table.from_pylist([row | {"image_id": "b"}], OUTPUT_SCHEMA)
    )
    assert export_output(out, tmp_path / "x.parquet") == 2
    table = pq.read_table(tmp_path / "x.parquet")
    assert {"legacy", "latency_ms", "reasoning"} <= set(table.column_names)
    assert table["reasoning"].to_pylist() == ["kept", None] and table["legacy"].to_pylist() == [1, None]


def test_export_names_a_column_whose_types_in_older_files_cannot_meet(tmp_path: Path) -> None:
    from tasks.errors import UsageError
    from tasks.outputs.export import export_output
    from tasks.row import OUTPUT_SCHEMA

    out = tmp_path / "out"
    row = {name: None for name in OUTPUT_SCHEMA.names} | {"image_id": "a", "prompt_id": "p", "status": "ok"}
    base = pa.Table.from_pylist([row], OUTPUT_SCHEMA)
    write_parquet(out / "part-000000-old.parquet", base.append_column("score", pa.array([[1]])))
    write_parquet(out / "part-000001-new.parquet", base.append_column("score", pa.array(["high"])))
    with pytest.raises(UsageError, match=r"column 'score' has types that cannot be joined"):
        export_output(out, tmp_path / "x.parquet")
    assert vlmbatch("inspect", out).code == 0  # inspect reads only the contract's columns


def test_an_export_written_before_the_mark_is_still_replaced(
    tmp_path: Path, plain_and_typed: tuple[Path, Path, Path]
) -> None:
    from tasks.row import OUTPUT_SCHEMA, without_later_columns

    plain, _, _ = plain_and_typed
    older = write_parquet(tmp_path / "nightly.parquet", OUTPUT_SCHEMA.empty_table())  # no export mark
    assert vlmbatch("export", plain, older).code == 0
    assert pq.read_table(older).num_rows > 0
    # and one written before the tool_calls column, too
    oldest = write_parquet(tmp_path / "weekly.parquet", without_later_columns(OUTPUT_SCHEMA).empty_table())
    assert vlmbatch("export", plain, oldest).code == 0
    assert pq.read_table(oldest).num_rows > 0
