"""An OpenAI-compatible stand-in for the model server (vLLM / NVIDIA NIM serving Gemma 4).

It validates requests and answers errors like the real servers, and answers valid requests with a
deterministic, clearly labelled description of what it received (image size, dominant colour,
fingerprint, the prompt echoed), with latency, a concurrency cap and injected faults. It is for the
demo, the tests and the benchmarks; it never does the pipeline's own work.
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
