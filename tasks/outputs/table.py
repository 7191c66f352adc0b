"""Rows as an Arrow table: the contract's columns, then carried and typed JSON (``--json-columns``) ones."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from tasks.outputs.json_columns import PROPERTY_KEY, json_object, json_value
from tasks.row import ROW_FIELDS, ResultRow

_CONTRACT = frozenset(ROW_FIELDS)  # carried and typed JSON columns never take these names


def rows_to_table(rows: list[ResultRow], schema: pa.Schema) -> pa.Table:
    """``schema``: the run's (tasks/row.py, ``output_schema``), or that without the contract's later
    columns for an OUT written before them (tasks/outputs/reading.py, ``check_schema``)."""
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    contract = [name for name in ROW_FIELDS if name in columns]
    extras = [field for field in schema if field.name not in _CONTRACT]
    typed = any(extra.metadata and PROPERTY_KEY in extra.metadata for extra in extras)
    for row in rows:
        for name in contract:
            columns[name].append(getattr(row, name))
        document = json_object(row.json) if typed else None
        for extra in extras:
            if extra.metadata and PROPERTY_KEY in extra.metadata:
                columns[extra.name].append(json_value(document, extra))
            else:
                columns[extra.name].append(row.carry.get(extra.name))
    arrays = [column_array(columns[name], schema.field(name).type) for name in schema.names]
    return pa.Table.from_arrays(arrays, schema=schema)  # the schema's field metadata kept


def column_array(values: list[Any], kind: pa.DataType) -> pa.Array:
    """The column; a value its type cannot hold (a typed JSON property answered as 2**70, "3" or
    [1, "a"]) is left null there, never failing the write: the row's ``json`` keeps it whole."""
    try:
        return pa.array(values, type=kind)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return pa.array([value if _fits(value, kind) else None for value in values], type=kind)


def _fits(value: Any, kind: pa.DataType) -> bool:
    try:
        pa.array([value], type=kind)
    except (pa.ArrowException, TypeError, ValueError, OverflowError):
        return False
    return True
