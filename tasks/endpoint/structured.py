"""Structured output: an answer to a prompt with a ``json_schema`` must parse and validate.

The same checks serve a function call's arguments against the function's ``parameters``
(tasks/endpoint/tools.py).
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jsonschema.exceptions import ValidationError
from jsonschema.validators import validator_for

from tasks.errors import RequestFailure


@lru_cache(maxsize=256)
def _validator(schema_text: str) -> Any:
    schema = json.loads(schema_text)
    return validator_for(schema)(schema)


def parse_json(text: str | None, what: str) -> Any:
    """The JSON value of ``text``, else an ``invalid_json`` failure saying ``what`` is not JSON."""
    try:
        return json.loads(text or "")
    except ValueError as exc:
        raise RequestFailure("invalid_json", f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise RequestFailure("invalid_json", f"{what} is JSON nested too deeply to read") from None


def mismatch(value: Any, schema_text: str, what: str, against: str) -> RequestFailure | None:
    """The ``invalid_json`` failure saying where and how ``value`` (``what``) breaks the schema
    (``against``: "the schema", "its parameters"), or None when it validates."""
    try:
        _validator(schema_text).validate(value)
    except ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        return RequestFailure("invalid_json", f"{what} does not match {against} at {where}: {exc.message}")
    except RecursionError:
        return RequestFailure("invalid_json", f"{what} is nested too deeply to check")
    return None


def compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def validate_json(text: str | None, schema_text: str) -> str:
    """The answer as compact JSON if it parses and validates, else an ``invalid_json`` failure."""
    value = parse_json(text, "the answer")
    failure = mismatch(value, schema_text, "the answer", "the schema")
    if failure is not None:
        raise failure
    return compact(value)
