from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from tasks.errors import ImageFailure, UsageError
from tasks.outputs import ShardWriter, prepare_out_dir, read_output
from tasks.results import OUTPUT_SCHEMA, ResultRow, output_schema


def test_contract_columns_in_order() -> None:
    assert OUTPUT_SCHEMA.names[:4] == ["image_id", "prompt_id", "task", "status"]
    assert OUTPUT_SCHEMA.field("attempts").type == pa.int32()
    assert OUTPUT_SCHEMA.field("finished_at").type == pa.timestamp("us", tz="UTC")


def test_writer_round_trip_with_carry(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "out")
    schema = output_schema(pa.schema([("title", pa.string()), ("score", pa.float32())]))
    writer = ShardWriter(out, schema, "run1")
    ok = ResultRow("a", "cap", "caption", "ok", text="hello", attempts=1, carry={"title": "A", "score": 0.5})
    bad = ResultRow("b", "cap", "caption", "ok", carry={"title": "B", "score": None}).fail(
        ImageFailure("missing_image", "no such file")
    )
    path = writer.write(3, [ok, bad])
    assert path is not None and path.name == "part-000003-run1.parquet"
    assert writer.write(4, []) is None
    table = read_output(out)
    assert table.schema.equals(schema)
    rows = table.to_pylist()
    assert rows[0]["text"] == "hello" and rows[0]["title"] == "A" and rows[0]["score"] == 0.5
    assert (
        rows[1]["status"] == "failed" and rows[1]["error_type"] == "missing_image" and rows[1]["text"] is None
    )
    assert [p.name for p in out.iterdir()] == [path.name]  # no temporaries left behind


def test_hidden_temporaries_are_invisible_to_readers(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "out")
    ShardWriter(out, OUTPUT_SCHEMA, "r").write(0, [ResultRow("a", "p", "caption", "ok")])
    (out / ".tmp-123-part-000001-r.parquet").write_bytes(b"half written")
    assert ds.dataset(out, format="parquet").count_rows() == 1


def test_out_dir_problems(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UsageError, match="exists and is not a directory"):
        prepare_out_dir(blocker)
    with pytest.raises(UsageError, match="not writable"):
        prepare_out_dir(blocker / "sub")  # a file in the way of the parent
