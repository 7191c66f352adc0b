"""A JSON Schema given in the prompts manifest (a ``json_schema``, a function's ``parameters``) checked
when the manifest is read, so a schema the validator cannot use stops the run before anything is sent.

Valid against its dialect's meta-schema is not enough: a ``$ref`` is resolved only when an answer is
validated, so one that cannot be resolved would fail every row. Every ``$ref`` must therefore be a local
JSON pointer (``#`` or ``#/...``) that resolves, inside the schema itself, to a schema; nothing is
ever fetched, so a remote or relative reference is refused too. References are found and resolved as
the validator does (:mod:`referencing`, ``$id`` scopes included).
"""

from __future__ import annotations

from typing import Any

from jsonschema import SchemaError
from jsonschema.validators import validator_for
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import specification_with


def schema_problem(schema: Any) -> str | None:
    """Why ``schema`` is not a usable JSON Schema (an object the validator accepts whose every ``$ref``
    resolves inside it), or None."""
    if not isinstance(schema, dict):
        return "a JSON Schema must be a JSON object"
    validator = validator_for(schema)
    try:
        validator.check_schema(schema)
        specification = specification_with(validator.META_SCHEMA["$schema"])
        return ref_problem(specification.create_resource(schema))
    except SchemaError as exc:
        return exc.message
    except RecursionError:
        return "the schema is nested too deeply to check"


def ref_problem(root: Resource[Any]) -> str | None:
    """The first ``$ref`` of the schema ``root`` that is not a local JSON pointer resolving inside it to a
    schema, said, or None."""
    return _first_problem(root, Registry().resolver_with_root(root))


def _first_problem(resource: Resource[Any], resolver: Any) -> str | None:
    contents = resource.contents
    if isinstance(contents, dict) and "$ref" in contents:
        problem = _ref_problem(contents["$ref"], resolver)
        if problem is not None:
            return problem
    for sub in resource.subresources():
        problem = _first_problem(sub, resolver.in_subresource(sub))
        if problem is not None:
            return problem
    return None


def _ref_problem(ref: Any, resolver: Any) -> str | None:
    if not isinstance(ref, str):
        return f"$ref {ref!r} is not a string"
    if ref != "#" and not ref.startswith("#/"):
        return (
            f"$ref {ref!r} is not a local JSON pointer ('#/...'): only references inside the schema "
            "itself are resolved, nothing is fetched"
        )
    try:
        target = resolver.lookup(ref).contents
    except Unresolvable:
        return f"$ref {ref!r} does not resolve inside the schema"
    if not isinstance(target, dict | bool):
        return f"$ref {ref!r} points at a {type(target).__name__}, not a schema"
    return None
