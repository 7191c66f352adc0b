"""An OpenAI-compatible stand-in for the model server (vLLM / NVIDIA NIM serving Gemma 4).

It validates requests and answers errors like the real servers, and answers valid requests with a
deterministic, clearly labelled description of what it received (image size, dominant colour,
fingerprint, the prompt echoed), with latency, a concurrency cap and injected faults. It is for the
demo, the tests and the benchmarks; it never does the pipeline's own work.

Routes: ``POST /v1/chat/completions`` (multi-image, multi-turn, reasoning, structured output through
``response_format`` or ``structured_outputs``, function calling through ``tools``/``tool_choice``
(:mod:`emulator.tools`), continuing a final assistant message, ``stream: true`` as server-sent events)
and ``POST /v1/responses`` (vLLM's Responses API with function tools, not streamed) share one path
(:mod:`emulator.server` lists its order); ``GET /v1/models``, ``GET /v1/health/ready|live``
(switchable off); ``/_emulator/*`` for stats, reset and runtime config. With ``azure_gateway`` and
``gateway_timeout`` it behaves like an Azure ML online endpoint in front of the server (424-wrapped
container errors, 408 on slow answers).
Faults: ``429``, ``503``, ``408``, ``reset`` (gateway), ``500``, ``hang``, ``malformed``, ``bad_json``,
``broken_json``, ``stream_error`` (engine), by script or by a per-attempt hash (:mod:`emulator.faults`).
"""

from emulator.arguments import build_parser, settings_from_args
from emulator.errors import ApiError
from emulator.faults import FaultPlanner, rate_fault
from emulator.images import ImageInfo, describe_bytes
from emulator.runner import EmulatorServer, serve
from emulator.server import create_app
from emulator.settings import DEFAULT_MODEL, FAULT_KINDS, FAULT_MODES, REASONING_FIELDS, EmulatorSettings
from emulator.stats import Stats

__all__ = [
    "DEFAULT_MODEL",
    "FAULT_KINDS",
    "FAULT_MODES",
    "REASONING_FIELDS",
    "ApiError",
    "EmulatorServer",
    "EmulatorSettings",
    "FaultPlanner",
    "ImageInfo",
    "Stats",
    "build_parser",
    "create_app",
    "describe_bytes",
    "rate_fault",
    "serve",
    "settings_from_args",
]
