"""The output row: one record type for every work item's outcome, and the Parquet schema checked against
it here (README.md, "Output" lists the columns). The bottom of the house: it imports only the errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from tasks.errors import ItemFailure


@dataclass(slots=True)
class ResultRow:
    image_id: str | None  # None for a text-only prompt
    prompt_id: str
    task: str
    status: str  # "ok" or "failed"
    text: str | None = None
    reasoning: str | None = None
    json: str | None = None
    tool_calls: str | None = None  # JSON: [{"name", "arguments"}] of the answer's validated function calls
    finish_reason: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    http_status: int | None = None
    attempts: int = 0
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    model: str | None = None
    replica: str | None = None  # the base URL (without credentials) of the replica that answered
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
        self.text = self.reasoning = self.json = self.tool_calls = None
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
        ("tool_calls", pa.string()),
        ("finish_reason", pa.string()),
        ("error_type", pa.string()),
        ("error_message", pa.string()),
        ("http_status", pa.int32()),
        ("attempts", pa.int32()),
        ("latency_ms", pa.float64()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("model", pa.string()),
        ("replica", pa.string()),
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

# Contract columns added after OUTs were written without them. A run into such an OUT keeps its columns
# unless it needs one of these (tool_calls: a prompt has tools; replica: several --base-url), and then
# adds it, null, to the older files (tasks/outputs/reading.py: check_schema; store.py: add_later_columns).
LATER_COLUMNS: tuple[str, ...] = ("tool_calls", "replica")

ROW_FIELDS = [f.name for f in dataclasses.fields(ResultRow) if f.name != "carry"]
if OUTPUT_SCHEMA.names != ROW_FIELDS:  # pragma: no cover - a programming error, caught at import
    raise RuntimeError(f"ResultRow fields {ROW_FIELDS} do not match OUTPUT_SCHEMA {OUTPUT_SCHEMA.names}")


def output_schema(carry_schema: pa.Schema | None = None, extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The contract's columns, then the carried ones, then any typed JSON columns (``--json-columns``)."""
    carried = list(carry_schema) if carry_schema is not None else []
    if not carried and not extra:
        return OUTPUT_SCHEMA
    return pa.schema([*OUTPUT_SCHEMA, *carried, *extra])


def without_later_columns(schema: pa.Schema, columns: Collection[str] = LATER_COLUMNS) -> pa.Schema:
    """``schema`` as an OUT written before the later ``columns`` (all of ``LATER_COLUMNS``) has it."""
    return pa.schema([f for f in schema if f.name not in columns], metadata=schema.metadata)
