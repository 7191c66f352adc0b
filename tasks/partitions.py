"""Date partitions: ``{date}`` in input and output paths, the scheduled default, backfill ranges.

A path may contain the placeholder ``{date}`` (e.g. ``manifests/date={date}/images.parquet`` and
``out/date={date}``). ``--date YYYY-MM-DD`` fills it. A run started by a deployment without a date
takes the day before its scheduled start, in the timezone of the deployment's schedule (a nightly run
at 02:00 on the 2nd annotates the 1st). Anything else with ``{date}`` and no date is a config error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tasks.config import RunConfig, flag_name
from tasks.errors import ConfigError

PLACEHOLDER = "{date}"
MAX_PARTITIONS = 3660  # ten years of days: a typo in --start/--end, not a backfill
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_date(value: str | date, what: str = "--date") -> date:
    """A calendar date written YYYY-MM-DD (nothing else), or ConfigError naming ``what``."""
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    text = str(value).strip()
    if not _ISO_DATE.fullmatch(text):
        raise ConfigError(f"{what} must be a date written YYYY-MM-DD (got {value!r})")
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not a calendar date") from None


def has_placeholder(path: str | None) -> bool:
    return path is not None and PLACEHOLDER in path


def render(path: str, day: str | date) -> str:
    """``path`` with every ``{date}`` replaced (no other brace is interpreted)."""
    return path.replace(PLACEHOLDER, parse_date(day).isoformat())


def templated_paths(config: RunConfig) -> dict[str, str]:
    """The option names of the paths that contain ``{date}``, with their values."""
    paths = {
        "images": config.images,
        "prompts": config.prompts,
        "out": config.out,
        "image_root": config.image.image_root,
    }
    return {name: value for name, value in paths.items() if value is not None and has_placeholder(value)}


def needs_date(config: RunConfig) -> bool:
    return bool(templated_paths(config))


def resolve_paths(config: RunConfig) -> RunConfig:
    """The config with ``{date}`` filled in from ``config.date``; ConfigError if a date is needed."""
    templated = templated_paths(config)
    if not templated:
        return config
    if config.date is None:
        names = ", ".join(flag_name(name) for name in templated)
        raise ConfigError(
            f"{names} contain{'s' if len(templated) == 1 else ''} {{date}}: give --date YYYY-MM-DD"
        )
    top = {k: render(v, config.date) for k, v in templated.items() if k != "image_root"}
    update: dict[str, object] = dict(top)
    if "image_root" in templated:
        update["image"] = config.image.model_copy(
            update={"image_root": render(templated["image_root"], config.date)}
        )
    return config.model_copy(update=update)


def day_before(scheduled: datetime, timezone: str | None) -> date:
    """The partition a run scheduled at ``scheduled`` annotates: the previous day in ``timezone``."""
    try:
        zone = ZoneInfo(timezone or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"unknown timezone {timezone!r}") from None
    if scheduled.tzinfo is None:
        scheduled = scheduled.replace(tzinfo=ZoneInfo("UTC"))
    return scheduled.astimezone(zone).date() - timedelta(days=1)


def date_range(start: str | date, end: str | date) -> list[date]:
    """Every day from ``start`` to ``end``, both included."""
    first, last = parse_date(start, "--start"), parse_date(end, "--end")
    if last < first:
        raise ConfigError(f"--end {last} is before --start {first}")
    days = (last - first).days + 1
    if days > MAX_PARTITIONS:
        raise ConfigError(f"--start {first} to --end {last} is {days} partitions (at most {MAX_PARTITIONS})")
    return [first + timedelta(days=k) for k in range(days)]


@dataclass(frozen=True)
class Partition:
    """One date of a backfill: its resolved config, and which input is missing (if any)."""

    day: date
    config: RunConfig
    missing: str | None = None

    @property
    def name(self) -> str:
        return self.day.isoformat()


def _missing_input(config: RunConfig) -> str | None:
    for what, path in (("images", config.images), ("prompts", config.prompts)):
        if _absent(path):
            return f"{what} manifest {path} does not exist"
    return None


def _absent(path: str | None) -> bool:
    """A local manifest path that does not exist (a remote one is left to the run to find)."""
    return path is not None and "://" not in path and not Path(path).exists()


def check_template(template: RunConfig) -> None:
    """A backfill writes each partition to its own OUT: ``--out`` must contain ``{date}``. A manifest
    path without ``{date}`` is the same for every partition: it must exist (a typo is a usage error,
    not a "missing input" on every date)."""
    if not has_placeholder(template.out):
        raise ConfigError(
            "a backfill needs {date} in --out (e.g. out/date={date}), or every partition "
            "would write into the same directory"
        )
    for what, path in (("IMAGES", template.images), ("--prompts", template.prompts)):
        if not has_placeholder(path) and _absent(path):
            raise ConfigError(
                f"{what} {path} does not exist (and has no {{date}}: it is the same for every date)"
            )


def select_partitions(template: RunConfig, start: str | date, end: str | date) -> list[Partition]:
    """The backfill's partitions from ``start`` to ``end``, each resolved, missing inputs marked."""
    check_template(template)
    partitions = []
    for day in date_range(start, end):
        config = resolve_paths(template.model_copy(update={"date": day.isoformat()}))
        partitions.append(Partition(day, config, _missing_input(config)))
    return partitions
