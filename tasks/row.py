"""The output row: one record type for every work item's outcome, and the Parquet schema checked against
it here (README.md, "Output" lists the columns). The bottom of the house: it imports only the errors."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
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

# Columns the contract added after its first release: OUT files written before may lack them. A rerun
# into such an OUT writes them in its new files and leaves the old ones as they are (tasks/outputs/
# reading.py: check_schema); readers of OUT see nulls there (README.md, "Output").
LATER_COLUMNS: tuple[str, ...] = ("replica",)

ROW_FIELDS = [f.name for f in dataclasses.fields(ResultRow) if f.name != "carry"]
if OUTPUT_SCHEMA.names != ROW_FIELDS:  # pragma: no cover - a programming error, caught at import
    raise RuntimeError(f"ResultRow fields {ROW_FIELDS} do not match OUTPUT_SCHEMA {OUTPUT_SCHEMA.names}")


def output_schema(carry_schema: pa.Schema | None = None, extra: Sequence[pa.Field] = ()) -> pa.Schema:
    """The contract's columns, then the carried ones, then any typed JSON columns (``--json-columns``)."""
    carried = list(carry_schema) if carry_schema is not None else []
    if not carried and not extra:
        return OUTPUT_SCHEMA
    return pa.schema([*OUTPUT_SCHEMA, *carried, *extra])
