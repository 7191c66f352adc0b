"""Scalars of the documents :mod:`emulator.schema_output` builds: the facts, strings and numbers."""

from __future__ import annotations

import math
import re
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from emulator.images import ImageInfo

FORMATS = {
    "date": "2026-01-01",
    "date-time": "2026-01-01T00:00:00Z",
    "time": "00:00:00Z",
    "email": "emulator@example.com",
    "hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
}


class SchemaProblem(Exception):
    """The schema is invalid or uses something the emulator cannot build a document for."""


@dataclass(frozen=True, slots=True)
class Facts:
    """What the documents are made of."""

    caption: str
    colours: tuple[str, ...]
    words: tuple[str, ...]
    width: int
    height: int
    images: int
    seed: int
    fingerprint: str

    @classmethod
    def of(cls, caption: str, prompt: str, images: Sequence[ImageInfo]) -> Facts:
        fingerprint = images[0].fingerprint if images else f"{zlib.crc32(prompt.encode()):08x}"
        return cls(
            caption=caption,
            colours=tuple(dict.fromkeys(info.colour for info in images)),
            words=tuple(dict.fromkeys(re.findall(r"[a-z0-9]+", prompt.lower()))),
            width=images[0].width if images else 0,
            height=images[0].height if images else 0,
            images=len(images),
            seed=int(fingerprint, 16),
            fingerprint=fingerprint,
        )

    def tag(self, index: int) -> str:
        """The ``index``-th string of a list: colours, then the prompt's words, then numbered tags."""
        pool = self.colours + self.words
        return pool[index] if index < len(pool) else f"tag-{index + 1}"


def string_value(schema: dict[str, Any], name: str, element: int | None, facts: Facts) -> str:
    """A string from the caption, a colour or the prompt's words (or a ``format``'s example)."""
    text = FORMATS.get(str(schema.get("format")), "")
    if schema.get("format") in ("uri", "url", "iri", "uri-reference"):
        text = f"https://example.com/{facts.fingerprint}"
    elif schema.get("format") == "uuid":
        text = str(uuid.UUID(int=facts.seed * 0x9E3779B97F4A7C15 % 2**128))
    elif not text and element is not None:
        text = facts.tag(element)
    elif not text and "colo" in name.lower():
        text = facts.colours[0] if facts.colours else "none"
    elif not text:
        text = facts.caption
    pattern = schema.get("pattern")
    if isinstance(pattern, str):
        text = _matching(pattern, [text, *facts.colours, *facts.words, facts.caption])
    low, high = schema.get("minLength", 0), schema.get("maxLength")
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    if isinstance(low, int) and len(text) < low:
        text = (text + " " + (text or facts.tag(0))) * (low // max(1, len(text)) + 1)
        text = text[: max(low, min(len(text), high or low))]
    return text


def _matching(pattern: str, candidates: list[str]) -> str:
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise SchemaProblem(f"invalid pattern {pattern!r}: {exc}") from None
    for candidate in candidates:
        if compiled.search(candidate):
            return candidate
    raise SchemaProblem(f"the emulator cannot build a string matching pattern {pattern!r}")


def number_value(
    schema: dict[str, Any], name: str, element: int | None, facts: Facts, *, integer: bool
) -> float:
    """The image's width/height/count by the name, else the width (integers) or the aspect ratio."""
    lowered = name.lower()
    if "height" in lowered:
        value: float = facts.height
    elif "width" in lowered:
        value = facts.width
    elif "count" in lowered or lowered.startswith(("num", "n_")):
        value = facts.images
    elif integer:
        value = facts.width
    else:
        value = round(facts.width / facts.height, 3) if facts.height else 0.0
    value += element or 0
    return _within(value, schema, integer)


def _within(value: float, schema: dict[str, Any], integer: bool) -> float:
    """``value`` moved inside the schema's bounds and onto ``multipleOf``."""
    low, low_open = _bound(schema, "minimum", "exclusiveMinimum")
    high, high_open = _bound(schema, "maximum", "exclusiveMaximum")
    if integer:
        if low is not None:
            low, low_open = (math.floor(low) + 1 if low_open else math.ceil(low)), False
        if high is not None:
            high, high_open = (math.ceil(high) - 1 if high_open else math.floor(high)), False
        if low is not None and high is not None and low > high:
            raise SchemaProblem("no integer lies within minimum/maximum")
    if low is not None and (value < low or (low_open and value == low)):
        value = low if not low_open else (low + high) / 2 if high is not None else low + 1
    if high is not None and (value > high or (high_open and value == high)):
        value = high if not high_open else (low + high) / 2 if low is not None else high - 1
    multiple = schema.get("multipleOf")
    if isinstance(multiple, int | float) and not isinstance(multiple, bool) and multiple > 0:
        value = math.ceil(value / multiple) * multiple
        if high is not None and value > high:
            value -= multiple
    return int(value) if integer else value


def _bound(schema: dict[str, Any], closed: str, opened: str) -> tuple[float | None, bool]:
    """A bound and whether it is exclusive (draft 4's boolean exclusiveMinimum included)."""
    inclusive, exclusive = schema.get(closed), schema.get(opened)
    if isinstance(exclusive, bool):
        inclusive, exclusive = (None, inclusive) if exclusive else (inclusive, None)
    for bound in (inclusive, exclusive):
        if bound is not None and not _is_number(bound):
            raise SchemaProblem(f"{closed} and {opened} must be numbers")
    if exclusive is not None and (inclusive is None or _tighter(exclusive, inclusive, closed)):
        return exclusive, True
    return inclusive, False


def _tighter(exclusive: float, inclusive: float, closed: str) -> bool:
    return exclusive >= inclusive if closed == "minimum" else exclusive <= inclusive


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
