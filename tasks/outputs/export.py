"""``vlmbatch export``: OUT as one Parquet file, optionally with the JSON answers as typed columns.

For an OUT written without ``--json-columns``: the top-level properties of the answers' JSON become
columns, typed from the prompts' JSON Schemas when the prompts manifest is given (the same columns
``run --json-columns`` writes: tasks/outputs/json_columns.py), else inferred from the values (a property
whose values disagree on the type, or that holds objects, is a string column of its JSON). OUT's
files are read one at a time, so memory stays at one part file whatever the output's size; the
destination is written to a temporary name and renamed, so a failed export leaves nothing half
written.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UsageError
from tasks.inputs.prompt import Prompt
from tasks.outputs.json_columns import PROPERTY_KEY, fields_for, json_fields, json_object, json_value
from tasks.outputs.layout import STATE_DIR, read_table
from tasks.outputs.lock import writer_of
from tasks.outputs.object_path import ObjectPath, OutPath
from tasks.outputs.reading import conform, output_files, output_files_schema
from tasks.outputs.table import column_array
from tasks.row import OUTPUT_SCHEMA, without_later_columns


def export_output(
    out: OutPath,
    dest: Path,
    *,
    json_columns: bool = False,
    prompts: Sequence[Prompt] | None = None,
    force: bool = False,
) -> int:
    """Write OUT's rows to ``dest`` (one Parquet file); returns the number of rows written. An existing
    ``dest`` is replaced only when it is an earlier export, or with ``force``."""
    files = _check(out, dest, force)
    schema = output_files_schema(files)
    fields: list[pa.Field] = []
    if json_columns:
        have = {f.metadata[PROPERTY_KEY] for f in schema if f.metadata and PROPERTY_KEY in f.metadata}
        found = (
            json_fields(prompts, schema.names)
            if prompts is not None
            else infer_json_fields(files, schema.names)
        )
        fields = [f for f in found if f.metadata[PROPERTY_KEY] not in have]
    target = pa.schema([*schema, *fields], metadata={EXPORT_KEY: b"1"})
    temporary = dest.with_name(f".tmp-{dest.name}")
    rows = 0
    try:
        with pq.ParquetWriter(temporary, target) as writer:
            for path in files:
                table = conform(read_table(path), schema)
                if fields:
                    documents = [json_object(doc) for doc in table["json"].to_pylist()]
                    for field in fields:
                        values = [json_value(doc, field) for doc in documents]
                        table = table.append_column(field, column_array(values, field.type))
                writer.write_table(table)
                rows += table.num_rows
        os.replace(temporary, dest)
    finally:
        temporary.unlink(missing_ok=True)
    return rows


def infer_json_fields(files: Sequence[OutPath], taken: Sequence[str]) -> list[pa.Field]:
    """Typed columns for the top-level properties found in the ``json`` column, from their values."""
    types: dict[str, pa.DataType] = {}
    for path in files:
        for document in read_table(path, columns=["json"])["json"].to_pylist():
            if document is None:
                continue
            value = json.loads(document)
            if not isinstance(value, dict):
                continue
            for name, item in value.items():
                kind = _value_type(item)
                if kind is None:  # null: says nothing about the type
                    types.setdefault(name, pa.null())
                    continue
                types[name] = _merge(types.get(name), kind)
    return fields_for({name: _settled(kind) for name, kind in types.items()}, taken)


def _merge(known: pa.DataType | None, kind: pa.DataType) -> pa.DataType:
    if known is None or pa.types.is_null(known) or known.equals(kind):
        return kind
    if pa.types.is_null(kind):
        return known
    if _unknown(known) and pa.types.is_list(kind):
        return kind
    if _unknown(kind) and pa.types.is_list(known):
        return known
    if {str(known), str(kind)} == {"int64", "double"}:
        return pa.float64()
    return pa.string()


def _unknown(kind: pa.DataType) -> bool:
    """Null, or a list seen only empty: any later type fits."""
    return pa.types.is_null(kind) or (pa.types.is_list(kind) and pa.types.is_null(kind.value_type))


def _settled(kind: pa.DataType) -> pa.DataType:
    if pa.types.is_null(kind):
        return pa.string()
    if pa.types.is_list(kind) and pa.types.is_null(kind.value_type):
        return pa.list_(pa.string())
    return kind


def _value_type(value: Any) -> pa.DataType | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return pa.bool_()
    if isinstance(value, int):
        return pa.int64()
    if isinstance(value, float):
        return pa.float64()
    if isinstance(value, str):
        return pa.string()
    if isinstance(value, list):
        kinds = {_value_type(v) for v in value} - {None}
        if not kinds:
            return pa.list_(pa.null())  # empty: the element type is known from other rows, if any
        if len(kinds) == 1:
            (item,) = kinds
            # a list of lists, or of objects (whose type reads "string": their JSON), is no plain list
            nested = any(isinstance(v, list | dict) for v in value)
            if not nested:
                return pa.list_(item)
    return pa.string()  # objects and mixed arrays: their JSON text


EXPORT_KEY = b"vlmbatch.export"  # in an export's schema metadata: what export may replace


def _check(out: OutPath, dest: Path, force: bool) -> list[OutPath]:
    files = output_files(out)
    if (who := writer_of(out)) is not None:
        raise UsageError(f"{out} is being written by {who}; export it when that run has finished")
    if not isinstance(out, ObjectPath) and dest.resolve().is_relative_to(out.resolve()):
        raise UsageError(f"{dest} is inside {out}: it would become part of the output; export elsewhere")
    if (dest.parent / STATE_DIR).is_dir():
        raise UsageError(
            f"{dest.parent} is a vlmbatch output: a file there would become part of it; export elsewhere"
        )
    if dest.is_dir():
        raise UsageError(f"{dest} is a directory; give a file name such as {dest / 'annotations.parquet'}")
    if not dest.parent.is_dir():
        raise UsageError(f"{dest.parent} does not exist")
    if dest.exists() and not force and not _is_export(dest):
        raise UsageError(
            f"{dest} exists and is not an earlier export (which is all export replaces); "
            "choose another file, or --force to replace it"
        )
    return files


def _is_export(path: Path) -> bool:
    """Whether ``path`` is an earlier export: its schema says so, or (an export written before the
    mark) it has the output's columns outside any output (``_check`` refuses a FILE inside one)."""
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException):
        return False
    contract = without_later_columns(OUTPUT_SCHEMA).names  # such an export predates tool_calls too
    return EXPORT_KEY in (schema.metadata or {}) or set(contract) <= set(schema.names)
