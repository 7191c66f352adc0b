"""Reading OUT back: its part files checked, their schemas joined, only the columns asked for in memory.

Used by a run (is OUT's schema this run's?), ``inspect`` and ``export``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.errors import UsageError
from tasks.outputs.layout import part_files
from tasks.row import LATER_COLUMNS, OUTPUT_SCHEMA


def check_schema(out: str | Path, schema: pa.Schema) -> None:
    """OUT's existing files must have this run's columns, or pyarrow.dataset(OUT) would read them
    inconsistently: raise UsageError naming the difference (other --carry or --json-columns). A file
    written before the contract added a column (``LATER_COLUMNS``) may lack it: the run's new files
    have it, the old ones are read with nulls there."""
    path = Path(out)
    files = part_files(path) if path.is_dir() else []
    if not files:
        return
    existing = pq.read_schema(files[-1])
    columns = [(f.name, f.type) for f in existing]
    if columns == [(f.name, f.type) for f in schema]:
        return  # nullability aside: a carried column is nullable now, and was not always
    if columns == [
        (f.name, f.type) for f in schema if f.name in existing.names or f.name not in LATER_COLUMNS
    ]:
        return  # written before some columns existed
    ours, theirs = set(schema.names), set(existing.names)
    missing, extra = sorted(theirs - ours), sorted(ours - theirs - set(LATER_COLUMNS))
    changed = sorted(n for n in ours & theirs if not schema.field(n).type.equals(existing.field(n).type))
    detail = "; ".join(
        part
        for part in (
            f"its files also have {', '.join(missing)}" if missing else "",
            f"this run adds {', '.join(extra)}" if extra else "",
            f"types differ for {', '.join(changed)}" if changed else "",
        )
        if part
    )
    raise UsageError(
        f"--out {path} holds rows with other columns ({detail or 'column order differs'}); rerun with the "
        "same --carry and --json-columns options, or write to a new --out (`vlmbatch export --json-columns` "
        "adds typed JSON columns to an existing output)"
    )


def read_output(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The output dataset as one table (only complete files: temporaries and state are hidden)."""
    return ds.dataset(out, format="parquet").to_table(columns=columns)


SUMMARY_COLUMNS = [
    "status", "error_type", "finish_reason", "prompt_tokens", "completion_tokens", "attempts", "latency_ms",
    "replica",
]  # fmt: skip


def output_files(out: Path) -> list[Path]:
    """OUT's part files, oldest first; UsageError unless OUT is a vlmbatch output with at least one."""
    if not out.is_dir():
        raise UsageError(f"{out} is not a directory")
    files = part_files(out)
    if not files:
        raise UsageError(f"{out} holds no vlmbatch part files")
    if "status" not in pq.read_schema(files[-1]).names:
        raise UsageError(f"{out} is not a vlmbatch output (no status column)")
    return files


def read_summary_columns(out: Path) -> pa.Table:
    """What ``inspect`` counts, file by file: only these columns in memory, whatever OUT's size, each as
    the contract types it, and null where an older run's file lacks it."""
    files = output_files(out)
    wanted = pa.schema([OUTPUT_SCHEMA.field(name) for name in SUMMARY_COLUMNS])
    tables = []
    for f in files:
        present = set(pq.read_schema(f).names)
        tables.append(conform(pq.read_table(f, columns=[n for n in SUMMARY_COLUMNS if n in present]), wanted))
    return pa.concat_tables(tables)


def output_files_schema(files: Sequence[Path]) -> pa.Schema:
    """One schema for files that older runs may have written with other columns (one without
    ``reasoning``, one with a column since dropped): every column of any of them, each with a type
    they all fit (pyarrow's permissive promotion); UsageError naming a column whose types cannot meet."""
    fields: dict[str, list[tuple[pa.Field, Path]]] = {}
    for f in files:
        for column in pq.read_schema(f):
            fields.setdefault(column.name, []).append((column, f))
    unified = []
    for name, found in fields.items():
        try:
            one = pa.unify_schemas([pa.schema([column]) for column, _ in found], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            kinds = sorted({str(column.type) for column, _ in found})
            raise UsageError(
                f"column {name!r} has types that cannot be joined in OUT's files ({', '.join(kinds)}; e.g. "
                f"{found[0][1].name} and {found[-1][1].name}); export those files separately"
            ) from None
        unified.append(one.field(name))
    return pa.schema(unified)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order: a column its file lacks is null."""
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
