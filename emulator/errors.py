"""Error responses shaped like vLLM's: nested (vLLM >= 0.10.1) or flat (older vLLM, SGLang)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    404: "NotFoundError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
JSON_HEADERS: dict[str, str] = {"Content-Type": "application/json"}


class ApiError(Exception):
    """A request the emulated server refuses, with the status and message a real one would send."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    @property
    def error_type(self) -> str:
        return ERROR_TYPES.get(self.status, "BadRequestError")


def error_body(error: ApiError, *, flat: bool) -> dict[str, Any]:
    """The JSON body vLLM sends for ``error``."""
    fields: dict[str, Any] = {
        "message": error.message,
        "type": error.error_type,
        "param": error.param,
        "code": error.status,
    }
    if flat:
        return {"object": "error", **fields}
    return {"error": fields}


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON response encoded with the standard library (UTF-8, no ASCII escaping)."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()
    all_headers = {**JSON_HEADERS, **headers} if headers else JSON_HEADERS
    return web.Response(body=body, status=status, headers=all_headers)


def error_response(error: ApiError, *, flat: bool, headers: dict[str, str] | None = None) -> web.Response:
    return json_response(error_body(error, flat=flat), status=error.status, headers=headers)


def unauthorized_response() -> web.Response:
    """vLLM's ``--api-key`` rejection: a plain string, not the usual error object."""
    return json_response({"error": "Unauthorized"}, status=401)
