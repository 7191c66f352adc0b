"""``--json-columns``: the top-level properties of the prompts' JSON Schemas as typed Parquet columns.

Each property becomes a column (``tags`` list<string>, ``indoor`` bool, ...) filled from a row's
validated ``json``, so users query it directly. A name taken by a contract or carried column gets a
``json_`` prefix; a property whose schemas disagree on the type, or whose type has no plain Arrow
equivalent (objects, mixed arrays), is a string column holding its JSON. The column's field metadata
names the property it comes from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    from tasks.manifests import Prompt

PROPERTY_KEY = b"vlmbatch.json_property"
SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def _arrow_type(spec: Any) -> pa.DataType:
    if not isinstance(spec, dict):
        return pa.string()
    kind = spec.get("type")
    if kind in SCALARS:
        return SCALARS[kind]
    if kind == "array" and isinstance(spec.get("items"), dict) and spec["items"].get("type") in SCALARS:
        return pa.list_(SCALARS[spec["items"]["type"]])
    return pa.string()  # objects, unions, anything else: its JSON text


def json_fields(prompts: Sequence[Prompt], taken: Iterable[str]) -> list[pa.Field]:
    """The typed columns for every json_schema prompt's top-level properties, in first-seen order."""
    types: dict[str, pa.DataType] = {}
    for prompt in prompts:
        if prompt.json_schema is None:
            continue
        properties = json.loads(prompt.json_schema).get("properties") or {}
        for name, spec in properties.items():
            kind = _arrow_type(spec)
            types[name] = kind if types.get(name, kind).equals(kind) else pa.string()
    reserved = set(taken)
    return [
        pa.field(f"json_{name}" if name in reserved else name, kind, metadata={PROPERTY_KEY: name.encode()})
        for name, kind in types.items()
    ]


def json_object(document: str | None) -> dict[str, Any] | None:
    """A row's validated JSON, parsed once for all its property columns; None when there is none, or
    when it is not an object (an array or scalar schema's answer has no properties to spread)."""
    if not document:
        return None
    parsed = json.loads(document)
    return parsed if isinstance(parsed, dict) else None


def json_value(document: dict[str, Any] | None, field: pa.Field) -> Any:
    """The value of ``field``'s property in a row's JSON object (``json_object``); None when absent."""
    if document is None or field.metadata is None:
        return None
    value = document.get(field.metadata[PROPERTY_KEY].decode())
    if value is not None and pa.types.is_string(field.type) and not isinstance(value, str):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return value
