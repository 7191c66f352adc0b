"""Error responses shaped like vLLM's: nested (vLLM >= 0.10.1) or flat (older vLLM, SGLang).

Behind an Azure ML endpoint (``azure_gateway``) a non-200 answer of the container (the model server)
reaches the client as 424 with the original status in ``ms-azureml-model-error-statuscode`` and the
original body; what the gateway answers itself (401, 408, 429, 503) is never wrapped.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

ERROR_TYPES: dict[int, str] = {
    400: "BadRequestError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
    500: "InternalServerError",
    501: "NotImplementedError",
    503: "ServiceUnavailableError",
}
JSON_HEADERS: dict[str, str] = {"Content-Type": "application/json"}
AZURE_STATUS_HEADER = "ms-azureml-model-error-statuscode"


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


def from_container(response: web.Response, *, azure: bool) -> web.Response:
    """``response`` as the client sees it: wrapped in a 424 when an Azure ML gateway is in front."""
    if azure and response.status != 200:
        response.headers[AZURE_STATUS_HEADER] = str(response.status)
        response.set_status(424)
    return response


def container_error(error: ApiError, *, flat: bool, azure: bool) -> web.Response:
    """The model server's error response, as it reaches the client (see :func:`from_container`)."""
    return from_container(error_response(error, flat=flat), azure=azure)
