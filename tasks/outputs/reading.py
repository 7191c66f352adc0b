"""Reading OUT back: its part files checked, their schemas joined, only the columns asked for in memory.

Used by a run (is OUT's schema this run's?), ``inspect`` and ``export``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from tasks.errors import UsageError
from tasks.outputs.layout import part_files, read_schema, read_table
from tasks.outputs.object_path import ObjectPath, OutPath, out_path
from tasks.row import LATER_COLUMNS, OUTPUT_SCHEMA, without_later_columns


def check_schema(out: str | OutPath, schema: pa.Schema, needed: Collection[str] = ()) -> pa.Schema:
    """The columns this run writes into OUT: ``schema``, if OUT's files have them (or OUT has none).

    An OUT written before some of the contract's ``LATER_COLUMNS`` keeps its columns, so a rerun that
    does not need them leaves it as it was: the schema without them is returned. A later column the run
    ``needed`` (``tool_calls`` when a prompt has tools, ``replica`` with several replicas), or one some
    file already has (a run that added it was stopped half way), stays in the schema, and the run adds
    it to the older files (tasks/outputs/store.py, ``add_later_columns``). Otherwise OUT's files must
    have this run's columns, or pyarrow.dataset(OUT) would read them inconsistently: raise UsageError
    naming the difference (other --carry or --json-columns)."""
    path = out_path(out)
    files = part_files(path) if path.is_dir() else []
    if not files:
        return schema
    existing = read_schema(files[-1])
    lacking = [name for name in LATER_COLUMNS if name in schema.names and name not in existing.names]
    if not _same_columns(existing, without_later_columns(schema, lacking)):
        raise _other_columns(path, existing, without_later_columns(schema, lacking))
    if lacking and set(lacking) - set(needed):
        elsewhere = _later_columns_in(files[:-1], lacking)
        return without_later_columns(schema, [n for n in lacking if n not in needed and n not in elsewhere])
    return schema


def _same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    """Names and types in order; nullability aside (a carried column is nullable now, and was not always)."""
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]


def _later_columns_in(files: Sequence[OutPath], names: list[str]) -> set[str]:
    """Which of the later columns ``names`` some of ``files`` has (newest first, stopping once all are)."""
    found: set[str] = set()
    for file in reversed(files):
        found |= set(names) & set(read_schema(file).names)
        if len(found) == len(names):
            break
    return found


def _other_columns(path: OutPath, existing: pa.Schema, schema: pa.Schema) -> UsageError:
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
    return UsageError(
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


def output_files(out: OutPath) -> list[Any]:
    """OUT's part files, oldest first; UsageError unless OUT is a vlmbatch output with at least one."""
    if isinstance(out, ObjectPath):
        try:
            files = part_files(out)
        except Exception as exc:  # the SDK's: no bucket, access denied, no such endpoint
            raise UsageError(f"{out} cannot be listed: {type(exc).__name__}: {exc}"[:300]) from None
    elif not out.is_dir():
        raise UsageError(f"{out} is not a directory")
    else:
        files = part_files(out)
    if not files:
        raise UsageError(f"{out} holds no vlmbatch part files")
    if "status" not in read_schema(files[-1]).names:
        raise UsageError(f"{out} is not a vlmbatch output (no status column)")
    return files


def read_summary_columns(out: OutPath) -> pa.Table:
    """What ``inspect`` counts, file by file: only these columns in memory, whatever OUT's size, each as
    the contract types it, and null where an older run's file lacks it."""
    return pa.concat_tables([read_part(f, SUMMARY_COLUMNS) for f in output_files(out)])


def read_part(path: OutPath, columns: Sequence[str]) -> pa.Table:
    """Contract columns of one part file, each as the contract types it, and null where an older run's
    file lacks it."""
    wanted = pa.schema([OUTPUT_SCHEMA.field(name) for name in columns])
    if isinstance(path, ObjectPath):  # one GET: the whole object, then the columns it has
        whole = read_table(path)
        return conform(whole.select([n for n in columns if n in whole.column_names]), wanted)
    present = set(read_schema(path).names)
    return conform(read_table(path, columns=[n for n in columns if n in present]), wanted)


def output_files_schema(files: Sequence[OutPath]) -> pa.Schema:
    """One schema for files that older runs may have written with other columns (one without
    ``tool_calls``, one with a column since dropped): every column of any of them, each with a type
    they all fit (pyarrow's permissive promotion); UsageError naming a column whose types cannot meet."""
    fields: dict[str, list[tuple[pa.Field, OutPath]]] = {}
    for f in files:
        for column in read_schema(f):
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
    contract = {name: i for i, name in enumerate(OUTPUT_SCHEMA.names)}  # in its order, the others after
    return pa.schema(sorted(unified, key=lambda f: contract.get(f.name, len(contract))))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order: a column its file lacks is null."""
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
