"""A prompt's JSON Schema (a json_schema, a function's parameters) checked when the manifest is read:
valid, and every $ref a local JSON pointer that resolves inside the schema to a schema
(tasks/inputs/json_schemas.py)."""

from __future__ import annotations

from typing import Any

import pytest
from jsonschema.validators import validator_for

from tasks.inputs.json_schemas import schema_problem

POINT = {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}
NOT_LOCAL = "is not a local JSON pointer ('#/...')"


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"p": {"$ref": "#/$defs/point"}}, "$defs": {"point": POINT}},
        {"type": "object", "properties": {"next": {"$ref": "#"}}},  # recursive: the whole schema
        {"items": {"$ref": "#/$defs/a%20b"}, "$defs": {"a b": POINT}},  # a URI fragment, %-encoded
        {"items": {"$ref": "#/$defs/a~1b"}, "$defs": {"a/b": True}},  # a JSON pointer, ~-escaped
        {
            "$schema": "http://json-schema.org/draft-07/schema#",
            "properties": {"p": {"$ref": "#/definitions/point"}},
            "definitions": {"point": POINT},
        },
        {  # under a nested $id, "#/..." is that resource's own pointer, as the validator reads it
            "$id": "https://example.com/root",
            "properties": {
                "inner": {
                    "$id": "https://example.com/inner",
                    "properties": {"p": {"$ref": "#/$defs/point"}},
                    "$defs": {"point": POINT},
                }
            },
        },
        # data and names that look like references are not references
        {"const": {"$ref": "https://example.com/x"}, "properties": {"$ref": {"type": "string"}}},
    ],
)
def test_local_references_that_resolve_are_accepted(schema: dict[str, Any]) -> None:
    assert schema_problem(schema) is None
    validator_for(schema)(schema).is_valid({"x": 1})  # and the validator resolves them too


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        (
            {"properties": {"p": {"$ref": "#/$defs/point"}}},
            "$ref '#/$defs/point' does not resolve inside the schema",
        ),
        (
            {
                "$schema": "http://json-schema.org/draft-07/schema#",
                "properties": {"p": {"$ref": "#/definitions/pont"}},
                "definitions": {"point": POINT},
            },
            "$ref '#/definitions/pont' does not resolve inside the schema",
        ),
        (  # deep inside: items of an anyOf of a property
            {"properties": {"a": {"anyOf": [{"type": "null"}, {"items": {"$ref": "#/$defs/x"}}]}}},
            "$ref '#/$defs/x' does not resolve",
        ),
        (  # the nested $id's resource has no $defs: the root's are out of its reach
            {
                "$id": "https://example.com/root",
                "$defs": {"point": POINT},
                "properties": {"inner": {"$id": "https://example.com/inner", "$ref": "#/$defs/point"}},
            },
            "$ref '#/$defs/point' does not resolve",
        ),
        ({"items": {"$ref": "https://example.com/point.json"}}, NOT_LOCAL),
        ({"items": {"$ref": "point.json#/x"}}, NOT_LOCAL),
        ({"items": {"$ref": "#point"}, "$defs": {"p": {"$anchor": "point"}}}, NOT_LOCAL),
        ({"type": "object", "properties": {"p": {"$ref": "#/type"}}}, "$ref '#/type' points at a str"),
        ({"type": "objet"}, "is not valid under any of the given schemas"),  # the meta-schema still rules
        ([POINT], "a JSON Schema must be a JSON object"),
    ],
)
def test_references_that_would_fail_every_row_are_refused(schema: Any, message: str) -> None:
    problem = schema_problem(schema)
    assert problem is not None and message in problem
