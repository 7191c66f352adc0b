"""What a gateway in front of the model answers by itself: dropped connections, 401, 429/503, 408.

None of these is wrapped in a 424 by an Azure ML gateway: they never came from the container.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

from aiohttp import web

from emulator.errors import ApiError, error_response, unauthorized_response
from emulator.settings import EmulatorSettings

GATEWAY_MESSAGES = {
    "429": "Rate limit exceeded: too many requests in flight. Please retry later.",
    "503": "The service is temporarily unavailable. Please retry later.",
    "408": "The request timed out at the gateway (injected fault).",
}
LOADING_MESSAGE = "The model is loading and is not ready to serve requests yet."


def drop_connection(request: web.Request) -> web.StreamResponse:
    """Abort the TCP connection with a reset (SO_LINGER 0); the returned response is never written."""
    if request.transport is not None:
        reset(request.transport)
    return web.Response(status=204)


def reset(transport: asyncio.Transport) -> None:
    """Abort a connection with a TCP reset (SO_LINGER 0), not a clean close."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def authorized(request: web.Request, settings: EmulatorSettings) -> bool:
    return settings.api_key is None or request.headers.get("Authorization") == f"Bearer {settings.api_key}"


def gate(request: web.Request, settings: EmulatorSettings) -> web.StreamResponse | None:
    """``down`` and auth, for the /v1 routes other than the model routes."""
    if settings.down:
        return drop_connection(request)
    if not authorized(request, settings):
        return unauthorized_response()
    return None


def gateway_error(kind: str, settings: EmulatorSettings) -> web.Response:
    """An injected 429, 503 (with Retry-After / retry-after-ms when set) or 408."""
    headers = {} if kind == "408" else _retry_after(settings)
    error = ApiError(int(kind), GATEWAY_MESSAGES[kind])
    return error_response(error, flat=settings.flat_errors, headers=headers)


def loading_error(settings: EmulatorSettings) -> web.Response:
    """The 503 of a server still loading its model (with Retry-After / retry-after-ms when set)."""
    error = ApiError(503, LOADING_MESSAGE)
    return error_response(error, flat=settings.flat_errors, headers=_retry_after(settings))


def _retry_after(settings: EmulatorSettings) -> dict[str, str]:
    headers: dict[str, str] = {}
    if settings.retry_after is not None:
        headers["Retry-After"] = _seconds(settings.retry_after)
    if settings.retry_after_ms is not None:
        headers["retry-after-ms"] = str(settings.retry_after_ms)
    return headers


def timeout_error(settings: EmulatorSettings) -> web.Response:
    """The 408 of a request that outlived ``gateway_timeout`` before its first byte."""
    seconds = _seconds(settings.gateway_timeout or 0.0)
    error = ApiError(
        408,
        f"The request timed out after {seconds} s at the gateway (request_timeout_ms). "
        "Stream the response or raise the gateway's request timeout.",
    )
    return error_response(error, flat=settings.flat_errors)


def _seconds(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
