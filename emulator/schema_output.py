"""A JSON document built from a JSON Schema and what the emulator received, deterministically.

Strings come from the caption (the text a plain request gets), the images' colour names and the
prompt's words; integers from the image size (``width``/``height``/``count``-like names get those,
others the width); numbers from the aspect ratio; booleans from a hash of the fingerprint and the
property name. ``enum`` picks a member (the dominant colour when it is one), arrays get one element
per image (at least one, at most three) within ``minItems``/``maxItems``, objects get every declared
property. ``anyOf``/``oneOf`` take their first branch, ``allOf`` is merged, ``$ref`` must point into
the schema itself (``#/$defs/...``). What cannot be built raises :class:`SchemaProblem`; the caller
checks the document against the schema with ``jsonschema`` in any case.
"""

from __future__ import annotations

import zlib
from typing import Any

from emulator.schema_scalars import Facts, SchemaProblem, number_value, string_value

__all__ = ["Facts", "SchemaProblem", "build"]

MAX_DEPTH = 24  # deeper: a recursive $ref that never ends
REQUIRED_ONLY_DEPTH = 6  # deeper: optional properties are left out, so recursive schemas end
MAX_ARRAY = 3
TYPE_HINTS = (
    ("properties", "object"),
    ("required", "object"),
    ("additionalProperties", "object"),
    ("items", "array"),
    ("prefixItems", "array"),
    ("minItems", "array"),
    ("minLength", "string"),
    ("maxLength", "string"),
    ("pattern", "string"),
    ("format", "string"),
    ("minimum", "number"),
    ("maximum", "number"),
)


def build(schema: Any, facts: Facts) -> Any:
    """A document for ``schema`` (SchemaProblem when it cannot be built)."""
    return _Builder(schema, facts).value(schema, "", None, 0)


class _Builder:
    def __init__(self, root: Any, facts: Facts) -> None:
        self.root = root
        self.facts = facts

    def value(self, schema: Any, name: str, element: int | None, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise SchemaProblem(f"the schema nests deeper than {MAX_DEPTH} levels (a recursive $ref?)")
        schema = self.resolve(schema)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            return self.member(schema["enum"], name, element)
        kind = _type_of(schema)
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, name, depth)
        if kind == "string":
            return string_value(schema, name, element, self.facts)
        if kind in ("integer", "number"):
            return number_value(schema, name, element, self.facts, integer=kind == "integer")
        if kind == "boolean":
            return (zlib.crc32(name.encode()) + self.facts.seed + (element or 0)) % 2 == 0
        if kind == "null":
            return None
        raise SchemaProblem(f"unknown type {kind!r}")

    def resolve(self, schema: Any, depth: int = 0) -> dict[str, Any]:
        """``schema`` with ``$ref``, ``allOf`` and the first ``anyOf``/``oneOf`` branch merged in."""
        if schema is True:
            return {}
        if not isinstance(schema, dict):
            raise SchemaProblem(f"a schema must be an object or true, got {schema!r}")
        if depth > MAX_DEPTH:
            raise SchemaProblem("$ref/allOf/anyOf chains too long (a $ref cycle?)")
        current: dict[str, Any] = schema
        if "$ref" in current:
            rest = {key: value for key, value in current.items() if key != "$ref"}
            return self.resolve({**self.target(current["$ref"]), **rest}, depth + 1)
        if "allOf" in current:
            rest = {key: value for key, value in current.items() if key != "allOf"}
            parts = [self.resolve(part, depth + 1) for part in _schemas(current["allOf"], "allOf")]
            return self.resolve(_merge([*parts, rest]), depth + 1)
        for keyword in ("anyOf", "oneOf"):
            if keyword in current:
                branches = _schemas(current[keyword], keyword)
                if not branches:
                    raise SchemaProblem(f"{keyword} must list at least one schema")
                rest = {key: value for key, value in current.items() if key != keyword}
                return self.resolve(_merge([rest, self.resolve(branches[0], depth + 1)]), depth + 1)
        return current

    def target(self, ref: Any) -> dict[str, Any]:
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise SchemaProblem(f"only local $ref (#/$defs/...) is supported, got {ref!r}")
        node: Any = self.root
        for part in filter(None, ref[1:].split("/")):
            key = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or key not in node:
                raise SchemaProblem(f"$ref {ref!r} points to nothing")
            node = node[key]
        if node is True:
            return {}
        if not isinstance(node, dict):
            raise SchemaProblem(f"$ref {ref!r} does not point to a schema")
        target: dict[str, Any] = node
        return target

    def member(self, members: Any, name: str, element: int | None) -> Any:
        if not isinstance(members, list) or not members:
            raise SchemaProblem("enum must be a non-empty array")
        for colour in self.facts.colours:
            for member in members:
                if isinstance(member, str) and member.lower() == colour:
                    return member
        return members[(zlib.crc32(name.encode()) + self.facts.seed + (element or 0)) % len(members)]

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise SchemaProblem("properties must be an object and required an array")
        names = list(properties) if depth < REQUIRED_ONLY_DEPTH else [n for n in properties if n in required]
        names += [name for name in required if isinstance(name, str) and name not in names]
        extra = schema.get("additionalProperties", True)
        document: dict[str, Any] = {}
        for index, name in enumerate(names):
            if name in properties:
                document[name] = self.value(properties[name], name, None, depth + 1)
            elif extra is False:
                raise SchemaProblem(f"required property {name!r} is not allowed by additionalProperties")
            else:
                document[name] = self.value(extra, name, None, depth + 1)
            maximum = schema.get("maxProperties")
            if isinstance(maximum, int) and len(document) >= maximum and index + 1 >= len(required):
                break
        minimum = schema.get("minProperties", 0)
        while isinstance(minimum, int) and len(document) < minimum and extra is not False:
            name = f"extra_{len(document) + 1}"
            document[name] = self.value(extra, name, None, depth + 1)
        return document

    def array(self, schema: dict[str, Any], name: str, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", True)
        if isinstance(items, list):  # draft 4-2019: a list of items is a tuple
            prefix, items = items, schema.get("additionalItems", True)
        if not isinstance(prefix, list):
            raise SchemaProblem("prefixItems must be an array of schemas")
        count = max(1, min(self.facts.images, MAX_ARRAY))
        count = max(count, len(prefix)) if items is not False else len(prefix)
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if not isinstance(low, int) or (high is not None and not isinstance(high, int)):
            raise SchemaProblem("minItems and maxItems must be integers")
        count = max(count, low) if high is None else min(max(count, low), high)
        return [
            self.value(prefix[index] if index < len(prefix) else items, name, index, depth + 1)
            for index in range(count)
        ]


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or ["null"]
        kind = kinds[0]
    if kind is None:
        return next((hinted for key, hinted in TYPE_HINTS if key in schema), "string")
    if not isinstance(kind, str):
        raise SchemaProblem(f"type must be a string or a list of strings, got {kind!r}")
    return kind


def _schemas(value: Any, keyword: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not all(isinstance(s, dict) or s is True for s in value):
        raise SchemaProblem(f"{keyword} must be an array of schemas")
    return [s if isinstance(s, dict) else {} for s in value]


def _merge(schemas: list[dict[str, Any]]) -> dict[str, Any]:
    """One schema from several (allOf, a branch and its siblings): later keys win, objects combine."""
    merged: dict[str, Any] = {}
    for schema in schemas:
        for key, value in schema.items():
            if key == "properties" and isinstance(value, dict):
                merged[key] = {**merged.get(key, {}), **value}
            elif key == "required" and isinstance(value, list):
                merged[key] = list(dict.fromkeys([*merged.get(key, []), *value]))
            else:
                merged[key] = value
    return merged
