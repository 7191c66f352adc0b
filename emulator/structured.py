"""Structured output: which format a request asks for, and the content that satisfies it.

Chat completions ask with ``response_format`` (``json_schema`` or ``json_object``; ``text`` is plain)
or with vLLM's native ``structured_outputs`` (``json``, ``json_object`` or ``choice``); as in vLLM,
``response_format`` is written into ``structured_outputs``, so a ``json_schema`` there replaces
``structured_outputs.json`` and two different kinds are a 400. The old ``guided_json`` is ignored.
The Responses API's ``text.format`` goes through :func:`parse_format` too.

A schema is checked against its meta-schema with ``jsonschema`` (an invalid one is a 400, worded like
vLLM's "Failed to transform json schema into a grammar: ..."), the document is built by
:mod:`emulator.schema_output` and checked against the schema before it is sent, so a 200 always
validates, unless a JSON fault asks for content that does not: ``bad_json`` gives JSON that breaks the
schema (a required property missing, ...; not JSON at all when the schema accepts any JSON),
``broken_json`` JSON cut in half. :func:`schema_document` serves function-call arguments too
(:mod:`emulator.tools`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from emulator.errors import ApiError
from emulator.images import ImageInfo
from emulator.schema_output import Facts, SchemaProblem, build

GRAMMAR_ERROR = "Failed to transform json schema into a grammar: "
UNSUPPORTED_KINDS = ("regex", "grammar", "structural_tag")
JSON_FAULTS = frozenset({"bad_json", "broken_json"})  # faults that spoil JSON content or arguments
ONE_KIND = "You can only use one kind of structured outputs constraint but multiple are specified."


class _Validator(Protocol):
    def is_valid(self, instance: Any) -> bool: ...


@dataclass(frozen=True, slots=True)
class OutputFormat:
    """What the content must be: a document for ``schema``, any JSON object, or one of ``choices``."""

    kind: str  # "json_schema", "json_object" or "choice"
    schema: Any = None
    choices: tuple[str, ...] = ()


def chat_output_format(body: dict[str, Any]) -> OutputFormat | None:
    """The format a chat completions body asks for (None: plain text); ApiError 400 when invalid."""
    native = _structured_outputs(body.get("structured_outputs"))
    response_format = body.get("response_format")
    if response_format is None:
        return native
    if not isinstance(response_format, dict):
        raise ApiError(400, "`response_format` must be an object.", param="response_format")
    json_schema = response_format.get("json_schema")
    if response_format.get("type") == "json_schema" and not isinstance(json_schema, dict):
        raise ApiError(400, "`response_format.json_schema` is required for type json_schema.")
    flat = {**(json_schema or {}), "type": response_format.get("type")}
    wanted = parse_format(flat, "response_format.json_schema")
    if wanted is None:
        return native
    if native is not None and native.kind != wanted.kind:  # same kind: response_format replaces it
        raise ApiError(400, ONE_KIND)
    return wanted


def parse_format(spec: dict[str, Any], where: str) -> OutputFormat | None:
    """A flat ``{"type", "name", "schema", "strict"}`` format (Responses' ``text.format``)."""
    kind = spec.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object")
    if kind != "json_schema":
        raise ApiError(400, f"Unsupported format type {kind!r}: use text, json_object or json_schema.")
    if not isinstance(spec.get("name"), str):
        raise ApiError(400, f"`{where}.name` must be a string.", param=where)
    schema = spec.get("schema")
    if not isinstance(schema, dict):
        raise ApiError(400, f"`{where}.schema` must be a JSON Schema object.", param=where)
    _validator(_key(schema))
    return OutputFormat("json_schema", schema)


def _structured_outputs(value: Any) -> OutputFormat | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ApiError(400, "`structured_outputs` must be an object.", param="structured_outputs")
    kinds = [
        key for key in ("json", "json_object", "choice", *UNSUPPORTED_KINDS) if value.get(key) is not None
    ]
    kinds = [key for key in kinds if value[key] is not False]
    if len(kinds) > 1:
        raise ApiError(400, ONE_KIND)
    if not kinds:
        return None
    kind = kinds[0]
    if kind in UNSUPPORTED_KINDS:
        raise ApiError(400, f"`structured_outputs.{kind}` is not supported by this emulator.")
    if kind == "json_object":
        return OutputFormat("json_object")
    if kind == "choice":
        choices = value["choice"]
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise ApiError(400, "`structured_outputs.choice` must be a list of strings.")
        return OutputFormat("choice", choices=tuple(choices))
    schema = value["json"]
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError:
            raise ApiError(400, "Invalid JSON grammar specification.") from None
    if not isinstance(schema, dict):
        raise ApiError(400, "Invalid JSON grammar specification.")
    _validator(_key(schema))
    return OutputFormat("json_schema", schema)


def render(
    wanted: OutputFormat, caption: str, prompt: str, images: Sequence[ImageInfo], *, fault: str | None = None
) -> str:
    """The content for ``wanted``: valid, or (``fault`` one of :data:`JSON_FAULTS`) a 200's content
    that does not validate."""
    facts = Facts.of(caption, prompt, images)
    if wanted.kind == "choice":
        member = _choice(wanted.choices, facts)
        return {"bad_json": member + "?", "broken_json": member[: len(member) // 2]}.get(fault or "", member)
    if wanted.kind == "json_object":
        document = {"caption": caption, "colours": list(facts.colours), "width": facts.width}
        text = json.dumps(document, ensure_ascii=False)
        return text[: len(text) // 2] if fault in JSON_FAULTS else text
    return schema_document(wanted.schema, facts, fault=fault)


def schema_document(schema: Any, facts: Facts, *, fault: str | None = None) -> str:
    """JSON for ``schema`` built from ``facts`` and checked against it (ApiError 400 when the schema is
    invalid or cannot be built); ``bad_json``: JSON that does not validate; ``broken_json``: cut JSON."""
    validator = _validator(_key(schema))
    try:
        document = build(schema, facts)
    except SchemaProblem as exc:
        raise ApiError(400, GRAMMAR_ERROR + str(exc)) from None
    if not validator.is_valid(document):
        raise ApiError(400, GRAMMAR_ERROR + "the emulator cannot build a document for this schema.")
    text = json.dumps(document, ensure_ascii=False)
    if fault == "bad_json":
        return _invalid(document, validator)
    if fault == "broken_json":
        return text[: len(text) // 2]
    return text


def check_schema(schema: Any) -> None:
    """ApiError 400 (vLLM's grammar message) unless ``schema`` is a valid JSON Schema."""
    _validator(_key(schema))


def _choice(choices: tuple[str, ...], facts: Facts) -> str:
    if not choices:
        raise ApiError(400, "`structured_outputs.choice` must not be empty.")
    for choice in choices:
        if choice.lower() in facts.colours:
            return choice
    return choices[facts.seed % len(choices)]


def _invalid(document: Any, validator: _Validator) -> str:
    """JSON close to ``document`` that does not validate: a required property missing, else worse."""
    candidates: list[Any] = []
    if isinstance(document, dict) and document:
        first = next(iter(document))
        candidates += [{key: value for key, value in document.items() if key != name} for name in document]
        candidates.append({**document, first: {"unexpected": [document[first]]}})
    candidates += [[document], {"unexpected": document}, "unexpected"]
    for candidate in candidates:
        if not validator.is_valid(candidate):
            return json.dumps(candidate, ensure_ascii=False)
    text = json.dumps(document, ensure_ascii=False)
    return text[: len(text) // 2]  # the schema accepts any JSON: not JSON at all


def _key(schema: Any) -> str:
    try:
        return json.dumps(schema, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ApiError(400, GRAMMAR_ERROR + str(exc)) from None


@functools.lru_cache(maxsize=256)
def _validator(key: str) -> _Validator:
    """A validator for the schema ``key`` encodes; ApiError 400 when it is not a valid schema."""
    from jsonschema import Draft202012Validator, SchemaError, validators  # ~0.1 s: only when needed

    schema = json.loads(key)
    cls = validators.validator_for(schema, default=Draft202012Validator)
    try:
        cls.check_schema(schema)
    except SchemaError as exc:
        raise ApiError(400, GRAMMAR_ERROR + exc.message) from None
    return cast(_Validator, cls(schema))
