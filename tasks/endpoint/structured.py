"""Structured output: an answer to a prompt with a ``json_schema`` must parse and validate."""

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


def validate_json(text: str | None, schema_text: str) -> str:
    """The answer as compact JSON if it parses and validates, else an ``invalid_json`` failure."""
    try:
        value = json.loads(text or "")
    except ValueError as exc:
        raise RequestFailure("invalid_json", f"the answer is not JSON: {exc}") from None
    except RecursionError:
        raise RequestFailure("invalid_json", "the answer is JSON nested too deeply to read") from None
    try:
        _validator(schema_text).validate(value)
    except ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise RequestFailure(
            "invalid_json", f"the answer does not match the schema at {where}: {exc.message}"
        ) from None
    except RecursionError:
        raise RequestFailure("invalid_json", "the answer is nested too deeply to check") from None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
