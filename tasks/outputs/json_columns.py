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
from typing import Any

import pyarrow as pa

from tasks.inputs.prompt import Prompt

PROPERTY_KEY = b"vlmbatch.json_property"
SCALARS = {"string": pa.string(), "integer": pa.int64(), "number": pa.float64(), "boolean": pa.bool_()}


def _arrow_type(spec: Any) -> pa.DataType:
    spec = _one_type(spec)
    if not isinstance(spec, dict):
        return pa.string()
    kind = spec.get("type")
    if isinstance(kind, str) and kind in SCALARS:
        return SCALARS[kind]
    items = _one_type(spec.get("items"))
    item = items.get("type") if isinstance(items, dict) else None
    if kind == "array" and isinstance(item, str) and item in SCALARS:
        return pa.list_(SCALARS[item])
    return pa.string()  # objects, unions, anything else: its JSON text


def _one_type(spec: Any) -> Any:
    """A schema of one type or null (``["integer", "null"]``) as that one type: columns are nullable.
    (``anyOf`` a schema and null stays a union, a string column: outputs already written have it so.)"""
    if not isinstance(spec, dict):
        return spec
    kind = spec.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        return {**spec, "type": kinds[0] if len(kinds) == 1 else None}
    return spec


def column_names(properties: Iterable[str], taken: Iterable[str]) -> list[str]:
    """A column name per property, each unique: a name already taken (by a contract or carried column,
    or by an earlier property's column: ``text`` → ``json_text`` beside a ``json_text`` property) gets
    ``json_`` in front until it is free."""
    used = set(taken)
    names = []
    for name in properties:
        column = name
        while column in used:
            column = f"json_{column}"
        used.add(column)
        names.append(column)
    return names


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
    return fields_for(types, taken)


def fields_for(types: dict[str, pa.DataType], taken: Iterable[str]) -> list[pa.Field]:
    """The columns of these properties, uniquely named, each naming its property in its metadata."""
    return [
        pa.field(column, kind, metadata={PROPERTY_KEY: name.encode()})
        for column, (name, kind) in zip(column_names(types, taken), types.items(), strict=True)
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
