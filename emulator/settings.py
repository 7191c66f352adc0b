"""Every knob of the emulator in one dataclass, validated on construction and on runtime changes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

DEFAULT_MODEL = "google/gemma-4-31b-it"
FAULT_KINDS: tuple[str, ...] = (
    "429",
    "500",
    "503",
    "408",
    "hang",
    "reset",
    "malformed",
    "bad_json",
    "broken_json",
    "stream_error",
)
FAULT_MODES: tuple[str, ...] = ("any", "first_attempt")
REASONING_FIELDS: tuple[str, ...] = ("reasoning", "reasoning_content", "both")
# Fixed for the life of a server: changing them at runtime would need a new socket or app.
STARTUP_ONLY: frozenset[str] = frozenset({"host", "port", "image_cache_size"})


@dataclass
class EmulatorSettings:
    """Knobs of one emulator. Build a changed copy with :meth:`with_changes`; never mutate in place."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port
    models: tuple[str, ...] = (DEFAULT_MODEL,)
    max_model_len: int = 131072
    api_key: str | None = None  # set: every /v1 route needs "Authorization: Bearer <key>"
    latency: float = 0.05  # seconds a successful request holds a concurrency slot (time to first token)
    token_seconds: float = 0.0  # decode time per output token, after the latency; paces streamed chunks
    jitter: float = 0.0  # uniform extra 0..jitter seconds
    max_concurrency: int = 64  # requests processed at once, the rest queue; 0 = unlimited
    reject_over_capacity: bool = False  # beyond max_concurrency answer 429 at once (a gateway), not queue
    max_images_per_prompt: int = 4
    flat_errors: bool = False  # old vLLM / SGLang {"object":"error",...} bodies
    reasoning_field: str = "reasoning"  # "reasoning" (vLLM >= 0.16), "reasoning_content" or "both"
    seed: int = 0
    fault_rate: float = 0.0  # probability that an attempt fails, decided by hash
    fault_kinds: tuple[str, ...] = ("429", "500", "503")
    fault_mode: str = "any"  # "any" attempt may fail, or only the "first_attempt" of each work item
    fault_script: tuple[str, ...] = ()  # outcomes ("ok" or a kind) for successive requests
    retry_after: float | None = 1.0  # Retry-After header (seconds) on 429 and 503; None: no header
    retry_after_ms: int | None = None  # retry-after-ms header on 429 and 503 (Azure OpenAI style)
    hang_seconds: float = 3600.0  # how long a "hang" fault waits before answering
    down: bool = False  # every /v1 request gets its connection reset
    image_fetch_timeout: float = 5.0  # seconds for fetching an http(s) image URL
    image_cache_size: int = 1024  # decoded-image infos kept (LRU, keyed by the URL's hash)
    azure_gateway: bool = False  # behave like an Azure ML endpoint: container errors arrive as 424
    gateway_timeout: float | None = None  # seconds before a gateway answers 408 (Azure's default: 5)
    health_route: bool = True  # False: GET /v1/health/* is 404, like vLLM (which has only /health)
    # for this many seconds after it is set (at start, or at runtime), the model routes and
    # /v1/health/ready answer 503 (with Retry-After), as NIM does while its model loads; /v1/models and
    # /v1/health/live answer
    loading_seconds: float = 0.0

    def __post_init__(self) -> None:
        for name in ("models", "fault_kinds", "fault_script"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = tuple(part.strip() for part in value.split(",") if part.strip())
            object.__setattr__(self, name, tuple(str(item) for item in value))
        self._check()

    def _check(self) -> None:
        problems: list[str] = []
        if not self.models or any(not model for model in self.models):
            problems.append("models must be a non-empty list of names")
        if not isinstance(self.port, int) or isinstance(self.port, bool) or not 0 <= self.port <= 65535:
            problems.append("port must be an integer 0..65535")
        _positive_int(problems, "max_model_len", self.max_model_len)
        _positive_int(problems, "max_images_per_prompt", self.max_images_per_prompt, allow_zero=True)
        _positive_int(problems, "max_concurrency", self.max_concurrency, allow_zero=True)
        _positive_int(problems, "image_cache_size", self.image_cache_size)
        for name in ("latency", "jitter", "hang_seconds", "token_seconds", "loading_seconds"):
            if not _number(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name} must be a number >= 0")
        if not _number(self.image_fetch_timeout) or self.image_fetch_timeout <= 0:
            problems.append("image_fetch_timeout must be a number > 0")
        if self.gateway_timeout is not None and (
            not _number(self.gateway_timeout) or self.gateway_timeout <= 0
        ):
            problems.append("gateway_timeout must be a number > 0 or null")
        for name in ("azure_gateway", "health_route"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false")
        if not _number(self.fault_rate) or not 0.0 <= self.fault_rate <= 1.0:
            problems.append("fault_rate must be within 0..1")
        if unknown := [kind for kind in self.fault_kinds if kind not in FAULT_KINDS]:
            problems.append(f"unknown fault kinds {unknown}; known: {list(FAULT_KINDS)}")
        if unknown := [step for step in self.fault_script if step != "ok" and step not in FAULT_KINDS]:
            problems.append(f"unknown fault_script steps {unknown}; use 'ok' or one of {list(FAULT_KINDS)}")
        if self.fault_mode not in FAULT_MODES:
            problems.append(f"fault_mode must be one of {list(FAULT_MODES)}")
        if self.reasoning_field not in REASONING_FIELDS:
            problems.append(f"reasoning_field must be one of {list(REASONING_FIELDS)}")
        if self.retry_after is not None and (not _number(self.retry_after) or self.retry_after < 0):
            problems.append("retry_after must be a number >= 0 or null")
        if self.retry_after_ms is not None:
            _positive_int(problems, "retry_after_ms", self.retry_after_ms, allow_zero=True)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            problems.append("seed must be an integer")
        if problems:
            raise ValueError("; ".join(problems))

    def with_changes(self, **changes: Any) -> EmulatorSettings:
        """A validated copy with ``changes`` applied; ValueError on unknown names or bad values."""
        known = {f.name for f in dataclasses.fields(self)}
        if unknown := sorted(set(changes) - known):
            raise ValueError(f"unknown settings {unknown}")
        return dataclasses.replace(self, **changes)

    def public_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data, with the API key masked."""
        data = dataclasses.asdict(self)
        for name in ("models", "fault_kinds", "fault_script"):
            data[name] = list(data[name])
        if data["api_key"] is not None:
            data["api_key"] = "***"
        return data


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(problems: list[str], name: str, value: object, *, allow_zero: bool = False) -> None:
    lowest = 0 if allow_zero else 1
    if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
        problems.append(f"{name} must be an integer >= {lowest}")
