"""The output row (CONTRACT.md §2): one record type, and the Parquet schema checked against it here."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from tasks.errors import ItemFailure
from tasks.json_columns import PROPERTY_KEY, json_object, json_value


@dataclass(slots=True)
class ResultRow:
    image_id: str | None  # None for a text-only prompt
    prompt_id: str
    task: str
    status: str  # "ok" or "failed"
    text: str | None = None
    reasoning: str | None = None
    json: str | None = None
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    attempts: int = 0
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    request_key: str | None = None
    image_sha256: str | None = None
    image_width: int | None = None
    image_height: int | None = None
    sent_width: int | None = None
    sent_height: int | None = None
    run_id: str | None = None
    finished_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    carry: dict[str, Any] = field(default_factory=dict)

    def fail(self, failure: ItemFailure) -> ResultRow:
        """Mark this row failed with a classified failure; returns self."""
        self.status = "failed"
        self.text = self.reasoning = self.json = None
        self.error_type = failure.error_type
        self.error_message = failure.message
        self.http_status = failure.http_status
        self.finished_at = datetime.now(UTC)
        return self


OUTPUT_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("prompt_id", pa.string()),
        ("task", pa.string()),
        ("status", pa.string()),
        ("text", pa.string()),
        ("reasoning", pa.string()),
        ("json", pa.string()),
        ("finish_reason", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("latency_ms", pa.float64()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("model", pa.string()),
        ("request_key", pa.string()),
        ("image_sha256", pa.string()),
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("sent_width", pa.int32()),
        ("sent_height", pa.int32()),
        ("run_id", pa.string()),
        ("finished_at", pa.timestamp("us", tz="UTC")),
    ]
)

_FIELDS = [f.name for f in dataclasses.fields(ResultRow) if f.name != "carry"]
if OUTPUT_SCHEMA.names != _FIELDS:  # pragma: no cover - a programming error, caught at import
    raise RuntimeError(f"ResultRow fields {_FIELDS} do not match OUTPUT_SCHEMA {OUTPUT_SCHEMA.names}")


def output_schema(carry_schema: pa.Schema | None = None, extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The contract's columns, then the carried ones, then any typed JSON columns (``--json-columns``)."""
    carried = list(carry_schema) if carry_schema is not None else []
    if not carried and not extra:
        return OUTPUT_SCHEMA
    return pa.schema([*OUTPUT_SCHEMA, *carried, *extra])


def rows_to_table(rows: list[ResultRow], schema: pa.Schema) -> pa.Table:
    columns: dict[str, list[Any]] = {name: [] for name in schema.names}
    extras = list(schema)[len(_FIELDS) :]
    typed = any(extra.metadata and PROPERTY_KEY in extra.metadata for extra in extras)
    for row in rows:
        for name in _FIELDS:
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
