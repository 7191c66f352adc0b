import asyncio
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from tasks.errors import ImageFailure, UsageError
from tasks.inputs.prompt import Prompt
from tasks.outputs.index import OutputIndex
from tasks.outputs.json_columns import json_fields
from tasks.outputs.layout import check_out_dir, prepare_out_dir
from tasks.outputs.lock import OutLock
from tasks.outputs.reading import read_output
from tasks.outputs.store import OutputStore, read_index, run_tag
from tasks.outputs.writer import AsyncWriter
from tasks.row import OUTPUT_SCHEMA, ResultRow, output_schema


def row(image_id: str, status: str = "ok", key: str = "a" * 64, prompt_id: str = "cap") -> ResultRow:
    r = ResultRow(image_id, prompt_id, "caption", "ok", text=f"answer {image_id}", request_key=key)
    return r.fail(ImageFailure("bad_image", "x")) if status == "failed" else r


def store(out: Path, tag: str, schema: pa.Schema = OUTPUT_SCHEMA) -> OutputStore:
    prepare_out_dir(out)
    return OutputStore(out, schema, tag, read_index(out)[0])


def test_contract_columns_in_order() -> None:
    assert OUTPUT_SCHEMA.names[:4] == ["image_id", "prompt_id", "task", "status"]
    assert OUTPUT_SCHEMA.field("attempts").type == pa.int32()
    assert OUTPUT_SCHEMA.field("finished_at").type == pa.timestamp("us", tz="UTC")


def test_store_round_trip_with_carry(tmp_path: Path) -> None:
    schema = output_schema(pa.schema([("title", pa.string()), ("score", pa.float32())]))
    s = store(tmp_path / "out", "run1", schema)
    ok = ResultRow("a", "cap", "caption", "ok", text="hello", attempts=1, carry={"title": "A", "score": 0.5})
    bad = ResultRow("b", "cap", "caption", "ok", carry={"title": "B", "score": None}).fail(
        ImageFailure("missing_image", "no such file")
    )
    s.add(3, ok)
    s.flush()  # mid-shard: on disk already
    assert read_output(tmp_path / "out").num_rows == 1
    s.add(3, bad)
    path = s.finish(3)
    assert path is not None and path.name == "part-000003-run1.parquet"
    assert s.finish(4) is None
    table = read_output(tmp_path / "out")
    assert table.schema.equals(schema)
    rows = table.to_pylist()
    assert rows[0]["text"] == "hello" and rows[0]["title"] == "A" and rows[0]["score"] == 0.5
    assert (
        rows[1]["status"] == "failed" and rows[1]["error_type"] == "missing_image" and rows[1]["text"] is None
    )
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["_vlmbatch", path.name]


def test_replacing_rows_never_duplicates(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = store(out, "r1")
    for image_id, status in [("a", "ok"), ("b", "failed"), ("c", "ok")]:
        first.add(0, row(image_id, status))
    first.finish(0)
    index = read_index(out)[0]
    assert index.is_done("a", "cap", "a" * 64) and not index.is_done("a", "cap", "b" * 64)
    assert not index.is_done("b", "cap", "a" * 64)  # failed: to be retried
    second = OutputStore(out, OUTPUT_SCHEMA, "r2", index)
    second.add(0, row("b", "ok"))  # the retried failure
    second.add(0, row("c", "ok", key="b" * 64))  # a changed request key
    second.finish(0)
    table = ds.dataset(out).to_table().to_pylist()
    assert sorted((r["image_id"], r["status"], r["request_key"][0]) for r in table) == [
        ("a", "ok", "a"),
        ("b", "ok", "a"),
        ("c", "ok", "b"),
    ]


def test_a_retried_flow_run_keeps_what_its_first_attempt_wrote(tmp_path: Path) -> None:
    """Prefect retries a flow run under the same id: the retry's files must not replace the first's."""
    out = tmp_path / "out"
    run_id = "0192f3a4-b5c6-7d8e-9f00-112233445566"
    first = store(out, run_tag(run_id))
    first.add(0, row("a"))
    first.add(0, row("b", "failed"))
    first.finish(0)
    retry = OutputStore(out, OUTPUT_SCHEMA, run_tag(run_id), read_index(out)[0])
    retry.add(0, row("b"))  # only the failed item is asked again; "a" is skipped as done
    retry.finish(0)
    rows = sorted((r["image_id"], r["status"]) for r in read_output(out).to_pylist())
    assert rows == [("a", "ok"), ("b", "ok")]
    assert len(list(out.glob("part-000000-0192f3a4b5c6*.parquet"))) == 2


def test_old_file_emptied_by_replacements_is_removed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = store(out, "r1")
    first.add(0, row("a", "failed"))
    old = first.finish(0)
    second = OutputStore(out, OUTPUT_SCHEMA, "r2", read_index(out)[0])
    second.add(0, row("a"))
    second.finish(0)
    assert old is not None and not old.exists()
    assert ds.dataset(out).count_rows() == 1


def test_duplicates_left_by_an_older_version_are_healed(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for tag in ("r1", "r2"):  # two files holding the same item, as a crash could leave
        s = OutputStore(prepare_out_dir(out), OUTPUT_SCHEMA, tag, OutputIndex.empty())
        s.add(0, row("a", key=tag[-1] * 64))
        s.finish(0)
    s = store(out, "r3")
    assert s.heal_duplicates() == 1
    (only,) = ds.dataset(out).to_table().to_pylist()
    assert only["request_key"] == "2" * 64  # the newer file wins


def test_hidden_temporaries_and_state_are_invisible_to_readers(tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = store(out, "r")
    s.add(0, row("a"))
    s.remember(0, "file:/x:1:2", "ab" * 32)
    s.finish(0)
    (out / ".tmp-123-part-000001-r.parquet").write_bytes(b"half written")
    assert ds.dataset(out, format="parquet").count_rows() == 1
    assert read_index(out)[1].get("file:/x:1:2") == "ab" * 32


def test_lock_refuses_a_second_writer_and_dies_with_its_holder(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "out")
    first = OutLock(out, "run-1")
    first.acquire()
    with pytest.raises(UsageError, match=r"being written by run run-1 \(pid \d+"):
        OutLock(out, "run-2").acquire()
    first.release()
    second = OutLock(out, "run-2")
    second.acquire()
    second.release()


def test_out_dir_problems(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        check_out_dir(blocker)
    with pytest.raises(UsageError, match="in the way"):
        check_out_dir(blocker / "sub")  # a file in the way of the parent
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checking creates nothing


def test_json_values_a_typed_column_cannot_hold_are_null_there_and_whole_in_json(tmp_path: Path) -> None:
    schemas = [
        '{"type": "object", "properties": {"count": {"type": "integer"}, "tags": {"type": "array", '
        '"items": {"type": "string"}}}}',
        '{"type": "array", "items": {"type": "string"}}',
    ]
    prompts = [Prompt(f"p{i}", "Describe.", "caption", json_schema=s) for i, s in enumerate(schemas)]
    schema = output_schema(None, json_fields(prompts, OUTPUT_SCHEMA.names))
    answers = ['{"count":3,"tags":["a"]}', '{"count":1180591620717411303424,"tags":["b",2]}', '["x","y"]']
    s = store(tmp_path / "out", "r", schema)
    for n, answer in enumerate(answers):
        s.add(0, ResultRow(f"img{n}", "p0", "caption", "ok", json=answer))
    s.finish(0)
    rows = read_output(tmp_path / "out").to_pylist()
    assert [(r["count"], r["tags"]) for r in rows] == [(3, ["a"]), (None, None), (None, None)]
    assert [r["json"] for r in rows] == answers  # nothing lost: the whole answer stays in json


def test_a_failed_periodic_write_is_logged_and_tried_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    s = store(out, "r")
    real_flush, calls = s.flush, []

    def flush(shard_index: int | None = None) -> None:
        calls.append(shard_index)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        real_flush(shard_index)

    monkeypatch.setattr(s, "flush", flush)

    async def main() -> None:
        async with AsyncWriter(s, interval=0.02):
            s.add(0, row("a"))
            while read_output(out).num_rows == 0:  # the second tick writes it
                await asyncio.sleep(0.01)
            s.add(0, row("b"))

    asyncio.run(asyncio.wait_for(main(), timeout=10))
    assert sorted(r["image_id"] for r in read_output(out).to_pylist()) == ["a", "b"]  # b: the final flush
    assert "trying again in 0.02 s: [Errno 28] No space left on device" in caplog.text


def test_an_out_holding_what_is_not_vlmbatch_output_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = store(out, "r")
    s.add(0, row("a"))
    s.finish(0)
    (out / ".DS_Store").write_bytes(b"")  # hidden: Parquet readers skip it
    check_out_dir(out)
    for name in ("notes.txt", "other.parquet"):
        (out / name).write_text("x")
    (out / "images").mkdir()
    with pytest.raises(UsageError) as err:
        check_out_dir(out)
    assert str(err.value).startswith(
        f"--out {out} holds what is not vlmbatch output (images, notes.txt, other.parquet)"
    )


def test_an_output_whose_carried_column_was_written_non_nullable_takes_a_nullable_one(tmp_path: Path) -> None:
    """Carried columns are nullable now; an OUT written when one was not still takes the rerun, and a
    real difference is still refused."""
    import pyarrow.parquet as pq

    from tasks.outputs.reading import check_schema

    out = tmp_path / "out"
    out.mkdir()
    strict = output_schema(pa.schema([pa.field("lbl", pa.string(), nullable=False)]))
    pq.write_table(strict.empty_table(), out / "part-000000-old.parquet")
    check_schema(out, output_schema(pa.schema([pa.field("lbl", pa.string())])))
    with pytest.raises(UsageError, match="types differ for lbl"):
        check_schema(out, output_schema(pa.schema([pa.field("lbl", pa.int64())])))


def test_a_readers_probe_of_the_lock_does_not_stop_a_run_from_starting(tmp_path: Path) -> None:
    """inspect and export probe OUT's lock (shared, for a moment): a run starting then must not fail."""
    import fcntl
    import threading

    from tasks.outputs.lock import writer_of

    prepare_out_dir(tmp_path / "out")
    assert writer_of(tmp_path / "out") is None  # never run yet: no lock file
    first = OutLock(tmp_path / "out", "first")
    first.acquire()
    assert writer_of(tmp_path / "out") == writer_of(tmp_path / "out") is not None
    first.release()
    probe = open(tmp_path / "out" / "_vlmbatch" / "lock")  # noqa: SIM115 - a probe held for 0.3 s
    fcntl.flock(probe, fcntl.LOCK_SH)
    threading.Timer(0.3, probe.close).start()
    run = OutLock(tmp_path / "out", "second")
    run.acquire()  # waits out the probe instead of failing
    run.release()


def test_an_out_written_before_tool_calls_is_written_with_its_own_columns(tmp_path: Path) -> None:
    """tasks/outputs/reading.py, ``check_schema``: OUT's older columns unless the run needs tool_calls;
    then the store's rows carry them, and ``add_later_columns`` gives them (null) to the older files."""
    import pyarrow.parquet as pq

    from tasks.outputs.reading import check_schema
    from tasks.outputs.store import add_later_columns
    from tasks.row import without_later_columns

    out = tmp_path / "out"
    carry = pa.schema([pa.field("lbl", pa.string())])
    full, older = output_schema(carry), without_later_columns(output_schema(carry))
    old = store(out, "old", older)
    old.add(0, row("a"))
    old.flush()
    assert check_schema(out, full).names == older.names  # no tools: OUT keeps its columns
    assert check_schema(out, full, {"tool_calls", "replica"}) is full
    assert check_schema(out, full, {"tool_calls"}).names == [n for n in full.names if n != "replica"]
    with pytest.raises(UsageError, match=r"its files also have lbl\)") as refused:
        check_schema(out, without_later_columns(OUTPUT_SCHEMA))  # a real difference is still refused
    assert "tool_calls" not in str(refused.value)

    again = store(out, "new", older)  # a rerun without tools: rows written without the column
    tooled = row("b")
    tooled.tool_calls = '[{"name":"f","arguments":{}}]'
    again.add(0, tooled)
    again.flush()
    assert all("tool_calls" not in pq.read_schema(p).names for p in out.glob("part-*.parquet"))

    before = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert check_schema(out, full).names == older.names  # nothing added yet
    assert add_later_columns(out, full) == 2 and add_later_columns(out, full) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == before
    assert ds.dataset(out).schema.names == full.names
    assert read_output(out)["tool_calls"].to_pylist() == [None, None]
    assert check_schema(out, full) is full
