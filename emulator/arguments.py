"""Command-line flags for every :class:`EmulatorSettings` field (``python -m emulator --help``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from emulator.settings import FAULT_KINDS, FAULT_MODES, REASONING_FIELDS, EmulatorSettings

DEFAULTS = EmulatorSettings()


def _optional_seconds(text: str) -> float | None:
    return None if text.lower() in ("none", "off", "") else float(text)


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser(prog: str = "python -m emulator", port: int = DEFAULTS.port) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="OpenAI-compatible stand-in for a vLLM / NIM server: deterministic answers, faults.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--host", default=DEFAULTS.host, help="address to listen on (default: %(default)s)")
    add("--port", type=int, default=port, help="0: any free port")
    add("--model", dest="models", action="append", help=f"served model, repeatable ({DEFAULTS.models[0]})")
    add("--max-model-len", type=int, default=DEFAULTS.max_model_len)
    add("--api-key", default=DEFAULTS.api_key, help="require 'Authorization: Bearer KEY' on /v1")
    add("--latency", type=float, default=DEFAULTS.latency, help="seconds per request (to the first token)")
    add("--token-seconds", type=float, default=DEFAULTS.token_seconds, help="decode seconds per output token")
    add("--jitter", type=float, default=DEFAULTS.jitter, help="uniform extra 0..JITTER seconds")
    add("--max-concurrency", type=int, default=DEFAULTS.max_concurrency, help="0: unlimited")
    add(
        "--reject-over-capacity",
        action="store_true",
        help="beyond --max-concurrency answer 429 (with Retry-After) at once instead of queueing",
    )
    add("--max-images-per-prompt", type=int, default=DEFAULTS.max_images_per_prompt)
    add("--flat-errors", action="store_true", help="old flat {'object':'error',...} error bodies")
    add("--reasoning-field", choices=REASONING_FIELDS, default=DEFAULTS.reasoning_field)
    add("--seed", type=int, default=DEFAULTS.seed)
    add("--fault-rate", type=float, default=DEFAULTS.fault_rate, help="0..1")
    add(
        "--fault-kinds",
        type=_names,
        default=DEFAULTS.fault_kinds,
        help=f"comma-separated, from {','.join(FAULT_KINDS)}",
    )
    add("--fault-mode", choices=FAULT_MODES, default=DEFAULTS.fault_mode)
    add("--fault-script", type=_names, default=DEFAULTS.fault_script, help="comma-separated: ok or a kind")
    add("--retry-after", type=_optional_seconds, default=DEFAULTS.retry_after, help="seconds, or 'none'")
    add("--retry-after-ms", type=int, default=DEFAULTS.retry_after_ms)
    add("--hang-seconds", type=float, default=DEFAULTS.hang_seconds)
    add("--down", action="store_true", help="reset every /v1 connection")
    add(
        "--loading-seconds",
        type=float,
        default=DEFAULTS.loading_seconds,
        help="answer 503 on the model routes and /v1/health/ready for this long after start (NIM loading)",
    )
    add("--image-fetch-timeout", type=float, default=DEFAULTS.image_fetch_timeout)
    add("--image-cache-size", type=int, default=DEFAULTS.image_cache_size)
    add("--azure-gateway", action="store_true", help="Azure ML endpoint: container errors arrive as 424")
    add(
        "--gateway-timeout",
        type=_optional_seconds,
        default=DEFAULTS.gateway_timeout,
        help="seconds until a gateway 408 (Azure's default 5), or 'none'; streams pass once started",
    )
    add(
        "--no-health-route",
        dest="health_route",
        action="store_false",
        default=argparse.SUPPRESS,  # absent: the settings' default (served)
        help="GET /v1/health/ready and /live answer 404, like vLLM (which serves only /health)",
    )
    return parser


def settings_from_args(
    argv: Sequence[str] | None = None, prog: str = "python -m emulator", port: int = DEFAULTS.port
) -> EmulatorSettings:
    """Parse ``argv`` into settings (``port``: the default port); exits with a usage error when a value
    is invalid."""
    parser = build_parser(prog, port)
    values: dict[str, Any] = vars(parser.parse_args(argv))
    if not values["models"]:
        values["models"] = DEFAULTS.models
    try:
        return EmulatorSettings(**values)
    except ValueError as exc:
        parser.error(str(exc))
