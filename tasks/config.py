"""The one config model of a run, one section per concern, and how flags, env and TOML fill it.

Every option has one flat name (``max_soft_tokens``), used as the CLI flag (``--max-soft-tokens``),
the environment variable (``VLMBATCH_MAX_SOFT_TOKENS``) and the TOML key (``max-soft-tokens`` or
``max_soft_tokens``). Precedence: flag > environment > config file > default.
"""

from __future__ import annotations

import datetime
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tasks.errors import ConfigError
from tasks.slice import Slice

PIXELS_PER_SOFT_TOKEN = 48 * 48  # Gemma 4: one visual token covers 48×48 px
ENV_PREFIX = "VLMBATCH_"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NOT_SHOWN = {"api_key_env"}  # options whose wrong value may be a key given by mistake: never echoed


def public_url(url: str) -> str:
    """``url`` as it may be shown or stored: without the ``user:password@`` of its authority."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _listed(value: object) -> list[object]:
    """One value, a list, or a comma-separated string of them (an environment variable, a TOML string)."""
    items = list(value) if isinstance(value, list | tuple) else [value]
    parts = [part for item in items for part in (item.split(",") if isinstance(item, str) else [item])]
    return [part.strip() if isinstance(part, str) else part for part in parts if part != ""]


def _one_or_many(values: list[str]) -> str | tuple[str, ...]:
    """A single value stays a plain string (what a config with one endpoint always held)."""
    return values[0] if len(values) == 1 else tuple(values)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EndpointConfig(_Section):
    """Where requests go and how hard we push."""

    base_url: str | tuple[str, ...] = Field(
        "http://localhost:8000/v1",
        description="OpenAI-compatible base URL; several (a list, or comma-separated): replicas of one model",
    )
    model: str = Field("google/gemma-4-31b-it", min_length=1)
    api_key_env: str | tuple[str, ...] = Field(
        "VLMBATCH_API_KEY",
        description="name of the environment variable holding the key (unset: no key); one per base URL, "
        "in the same order, when replicas sit behind different gateways",
    )
    api_key_secret: str | None = Field(
        None, description="name of a Prefect Secret block holding the key (wins over --api-key-env)"
    )
    api: Literal["chat", "responses"] = "chat"
    concurrency: int | Literal["auto"] = Field(
        32, description="requests in flight per replica; auto: find each replica's limit (AIMD)"
    )
    max_concurrency: int = Field(
        256, ge=1, le=4096, description="with --concurrency auto: the most in flight per replica"
    )
    rpm: float | None = Field(
        None, gt=0, description="requests per minute at most (a gateway's published limit)"
    )
    tpm: float | None = Field(
        None, gt=0, description="estimated tokens per minute at most (images, prompt, output)"
    )
    max_retries: int = Field(6, ge=0, le=50, description="retries after the first attempt")
    request_timeout: float = Field(300.0, gt=0, le=86400, description="seconds per attempt")
    stream: bool = Field(False, description="stream Chat Completions answers (SSE) and aggregate them")
    preflight: bool = Field(True, description="check /models and /health/ready before the run")
    max_images_per_prompt: int = Field(
        4, ge=1, le=64, description="the server's per-prompt image limit (NIM_MAX_IMAGES_PER_PROMPT)"
    )
    outage_window: float = Field(
        60.0, gt=0, le=86400, description="abort (exit 3) after this long with the endpoint unreachable"
    )
    concurrency_limit: str | None = Field(
        "vlmbatch-endpoint",
        description="Prefect global concurrency limit shared by all runs on a server ('' or 'off': none)",
    )
    concurrency_limit_slots: int = Field(
        64, ge=1, le=100_000, description="slots of the global limit when vlmbatch creates it"
    )

    @field_validator("concurrency_limit")
    @classmethod
    def _limit_name(cls, value: str | None) -> str | None:
        if value is None or value.strip().lower() in ("", "off", "none"):
            return None
        return value.strip()

    @field_validator("concurrency", mode="before")
    @classmethod
    def _concurrency(cls, value: object) -> object:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        if isinstance(value, str):
            if not value.strip().isdigit():
                raise ValueError("must be a number from 1 to 4096, or auto")
            value = int(value)
        if isinstance(value, int) and not 1 <= value <= 4096:
            raise ValueError("must be a number from 1 to 4096, or auto")
        return value

    @property
    def in_flight_cap(self) -> int:
        """The most requests this run may have in flight at one replica."""
        return self.max_concurrency if self.concurrency == "auto" else self.concurrency

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every replica's base URL, in the order given (one for a single endpoint)."""
        return (self.base_url,) if isinstance(self.base_url, str) else self.base_url

    @property
    def api_key_envs(self) -> tuple[str, ...]:
        """The key variable of each replica, aligned with ``base_urls``."""
        names = (self.api_key_env,) if isinstance(self.api_key_env, str) else self.api_key_env
        return names * len(self.base_urls) if len(names) == 1 else names

    @property
    def total_in_flight(self) -> int:
        """The most requests this run may have in flight across its replicas."""
        return self.in_flight_cap * len(self.base_urls)

    @field_validator("base_url", mode="before")
    @classmethod
    def _http_urls(cls, value: object) -> object:
        urls = []
        for url in _listed(value):
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError("must start with http:// or https://")
            urls.append(url.rstrip("/"))
        if not urls:
            raise ValueError("give at least one base URL")
        shown = [public_url(u) for u in urls]  # two replicas must not look alike in rows and summaries
        if twice := sorted({u for u in shown if shown.count(u) > 1}):
            raise ValueError(f"lists {', '.join(twice)} more than once")
        return _one_or_many(urls)

    @field_validator("api_key_env", mode="before")
    @classmethod
    def _variable_names(cls, value: object, info: ValidationInfo) -> object:
        names = _listed(value)
        if not names or not all(isinstance(n, str) and _ENV_NAME.fullmatch(n) for n in names):
            raise ValueError(
                "must be the name of an environment variable (letters, digits and _), not the key itself"
            )
        urls = info.data.get("base_url")
        replicas = 1 if urls is None or isinstance(urls, str) else len(urls)
        if len(names) > 1 and len(names) != replicas:
            raise ValueError(
                f"names {len(names)} variables for {replicas} base URLs: give one for all, or one per "
                "base URL in the same order"
            )
        return _one_or_many([str(n) for n in names])


class GenerationConfig(_Section):
    """What the model is asked to do with each prompt (defaults; a prompt's own columns win)."""

    max_tokens: int = Field(1024, ge=1, le=1_000_000, description="output token budget")
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    reasoning: bool | None = Field(
        None,
        description="Gemma 4 thinking: true/false sends enable_thinking true/false; unset sends nothing "
        "(the server's default)",
    )
    hide_reasoning: bool = Field(False, description="ask the server not to return the reasoning text")
    reasoning_effort: Literal["low", "medium", "high"] = Field(
        "medium", description="with --api responses: reasoning.effort when reasoning is on"
    )
    structured_output: Literal["openai", "vllm", "tools"] = Field(
        "openai",
        description="send a prompt's json_schema as response_format (openai), structured_outputs (vllm) "
        "or one function the model must call (tools)",
    )


class ImageConfig(_Section):
    """How images are read and prepared before they are sent."""

    max_soft_tokens: int = Field(280, ge=1, le=16384, description="the model's visual token budget per image")
    image_root: str | None = Field(None, description="local image paths must resolve inside it")
    image_urls: Literal["fetch", "pass"] = Field(
        "fetch", description="fetch http(s) images here (checked, prepared) or pass the URL to the server"
    )
    allow_private_urls: bool = Field(
        False, description="let fetched URLs reach loopback, private, link-local or metadata addresses"
    )
    max_image_bytes: int = Field(64 * 1024 * 1024, ge=1, description="larger images fail as bad_image")
    max_image_pixels: int = Field(
        150_000_000, ge=1, description="decoded size cap (decompression bombs fail as bad_image)"
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="quality of re-encoded JPEGs")

    @property
    def max_pixels(self) -> int:
        """The most pixels the model can use: larger images are downscaled to this area."""
        return PIXELS_PER_SOFT_TOKEN * self.max_soft_tokens


class RunConfig(_Section):
    """One annotate run: inputs, output, and the sections above. The annotate flow's only parameter."""

    images: str | None = Field(
        None, description="images manifest: a Parquet file or a directory of them (none: text-only prompts)"
    )
    prompts: str | None = Field(None, description="prompts manifest (default: one caption prompt)")
    out: str = Field(description="output dataset directory")
    id_column: str = "image_id"
    image_column: str = "image"
    carry: tuple[str, ...] = Field((), description="images-manifest columns copied to the output")
    shard_size: int = Field(1000, ge=1, le=1_000_000, description="work items per Prefect task")
    limit: int | None = Field(None, ge=1, description="only the first N work items")
    slice: str | None = Field(
        None,
        description="K/N: only the K-th of N disjoint parts of the job (by a stable hash of the image id)",
    )
    slices: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="run the job as N slice flow runs (deployment annotate/annotate-slice) on a work pool",
    )
    dry_run: bool = False
    force: bool = Field(False, description="re-run items already ok in OUT")
    json_columns: bool = Field(
        False, description="write the JSON Schemas' top-level properties as typed columns"
    )
    # format "date": the Prefect UI's form offers a date picker and checks what is typed
    date: Annotated[str, Field(json_schema_extra={"format": "date"})] | None = Field(
        None, description="date partition YYYY-MM-DD: fills {date} in paths"
    )
    endpoint: EndpointConfig = EndpointConfig()
    generation: GenerationConfig = GenerationConfig()
    image: ImageConfig = ImageConfig()

    @field_validator("slice")
    @classmethod
    def _slice_spec(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return Slice.parse(value).spec

    @model_validator(mode="after")
    def _one_way_to_slice(self) -> RunConfig:
        if self.slice is not None and self.slices is not None:
            raise ValueError("--slice K/N runs one slice, --slices N runs them all: give one of them")
        if self.slices is not None and self.dry_run:
            raise ValueError("--slices runs on a work pool: a dry run takes --slice K/N or neither")
        return self

    @property
    def part(self) -> Slice | None:
        """The slice this run does (``--slice``), or None: the whole job."""
        return Slice.parse(self.slice) if self.slice is not None else None

    @field_validator("date")
    @classmethod
    def _calendar_date(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        try:
            if len(value) == 10 and value[4] == value[7] == "-":
                datetime.date.fromisoformat(value)
                return value
        except ValueError:
            pass
        raise ValueError("must be a calendar date written YYYY-MM-DD")


SECTIONS: dict[str, type[_Section]] = {
    "endpoint": EndpointConfig,
    "generation": GenerationConfig,
    "image": ImageConfig,
}

# flat option name -> section name (None: a top-level RunConfig field)
OPTIONS: dict[str, str | None] = {
    **{name: None for name in RunConfig.model_fields if name not in SECTIONS},
    **{name: section for section, model in SECTIONS.items() for name in model.model_fields},
}
LIST_OPTIONS = frozenset({"carry", "base_url", "api_key_env"})  # repeatable flags; comma-separated in env


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper()


def flag_name(option: str) -> str:
    """How the command line names an option: ``--max-tokens``; the images manifest is the argument IMAGES."""
    return "IMAGES" if option == "images" else "--" + option.replace("_", "-")


def _from_env(environ: Mapping[str, str]) -> dict[str, tuple[Any, str]]:
    found: dict[str, tuple[Any, str]] = {}
    for option in OPTIONS:
        raw = environ.get(env_name(option))
        if raw is None or raw == "":
            continue
        value: Any = (
            [part.strip() for part in raw.split(",") if part.strip()] if option in LIST_OPTIONS else raw
        )
        found[option] = (value, f"environment variable {env_name(option)}")
    return found


def _from_toml(path: Path) -> dict[str, tuple[Any, str]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} does not exist") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    found: dict[str, tuple[Any, str]] = {}
    for key, value in data.items():
        option = key.replace("-", "_")
        if option not in OPTIONS:
            raise ConfigError(
                f"config file {path}: unknown key {key!r} (options: {', '.join(sorted(OPTIONS))})"
            )
        found[option] = (value, f"config file {path}")
    return found


def build_config(
    flags: Mapping[str, Any],
    *,
    environ: Mapping[str, str] | None = None,
    config_file: str | Path | None = None,
) -> RunConfig:
    """Merge flag > env > file > default into a validated RunConfig, or raise ConfigError.

    ``flags`` maps option names to values given on the command line; ``None`` means not given.
    """
    environ = os.environ if environ is None else environ
    merged: dict[str, tuple[Any, str]] = {}
    if config_file is not None:
        merged.update(_from_toml(Path(config_file)))
    merged.update(_from_env(environ))
    for option, value in flags.items():
        if option not in OPTIONS:
            raise ConfigError(f"unknown option {option!r}")
        if value is not None and not (option in LIST_OPTIONS and not value):
            merged[option] = (value, f"option {flag_name(option)}")

    tree: dict[str, Any] = {section: {} for section in SECTIONS}
    for option, (value, _source) in merged.items():
        section = OPTIONS[option]
        (tree if section is None else tree[section])[option] = value
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, merged)) from None


def _describe(exc: ValidationError, merged: Mapping[str, tuple[Any, str]]) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"] if not isinstance(part, int)]
        if not loc:  # a rule across options
            lines.append(error["msg"].removeprefix("Value error, "))
            continue
        option = loc[-1] if loc else "?"
        if option in SECTIONS:  # a whole section failed (should not happen from flat input)
            option = ".".join(loc)
        source = merged.get(option, (None, flag_name(option)))[1]
        if error["type"] == "missing":
            lines.append(f"{flag_name(option)} is required")
        else:
            given = error.get("input")
            if option == "base_url":  # shown without a URL's user:password@
                given = [public_url(u) if isinstance(u, str) else u for u in _listed(given)]
                given = given[0] if len(given) == 1 else given
            shown = "" if option in _NOT_SHOWN else f" (got {given!r})"  # it may be a key
            lines.append(f"{source}: {error['msg']}{shown}")
    return "; ".join(lines)
