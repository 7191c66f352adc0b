"""Request bodies on the wire: JSON by orjson, with each image's data URL spliced in, not copied.

A prepared image's data URL is most of a request (a few hundred KB for a photo, against a few hundred
bytes of JSON around it). It is held once, as bytes (:class:`DataUrl`), however many prompts ask about
the image, and each request's body is written as pieces: the JSON before the image, the image's own
bytes, the JSON after it. A request in flight so costs its small JSON, not a second copy of its image
(bench/memory.py --photos). Small images are joined into one piece: a copy of a few KB is cheaper than
the extra writes.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

SPLICE_MIN = 64 * 1024  # bytes of base64 from which an image is written as a piece of its own
_MARK = f"vlmbatch-image-{uuid.uuid4().hex}"  # stands for an image in the encoded JSON
_MARK_BYTES = _MARK.encode()


class DataUrl:
    """``data:<mime>;base64,<data>``, held as bytes: base64 needs no escaping in a JSON string."""

    __slots__ = ("data", "head")

    def __init__(self, mime: str, data: bytes) -> None:
        self.head = f"data:{mime};base64,".encode("ascii")
        self.data = data  # the base64 text

    @classmethod
    def encode(cls, mime: str, raw: bytes | memoryview) -> DataUrl:
        return cls(mime, base64.b64encode(raw))

    def __len__(self) -> int:
        return len(self.head) + len(self.data)

    def __str__(self) -> str:
        return (self.head + self.data).decode("ascii")

    def __repr__(self) -> str:
        return f"DataUrl({self.head.decode('ascii')}…, {len(self.data):,} bytes of base64)"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DataUrl):
            return NotImplemented
        return self.head == other.head and self.data == other.data

    def __hash__(self) -> int:
        return hash((self.head, self.data))


def encode_body(body: Mapping[str, Any]) -> list[bytes]:
    """The body as UTF-8 JSON, in pieces to be written in order (one piece unless it holds a large
    image). orjson encodes it; ``json`` what orjson refuses (e.g. ints over 64 bits), in one piece."""
    images: list[DataUrl] = []

    def mark(obj: object) -> str:
        if isinstance(obj, DataUrl):
            images.append(obj)
            return _MARK
        raise TypeError(f"{type(obj).__name__} is not JSON serializable")

    try:
        text = orjson.dumps(body, default=mark)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return [json.dumps(body, ensure_ascii=False, default=_plain).encode()]
    if not images:
        return [text]
    around = text.split(_MARK_BYTES)
    if len(around) != len(images) + 1:  # the marker written in a prompt (never by chance): no splicing
        return [orjson.dumps(body, default=_plain)]
    pieces: list[bytes] = []
    pending = [around[0]]
    for image, after in zip(images, around[1:], strict=True):
        pending.append(image.head)
        if len(image.data) >= SPLICE_MIN:
            pieces += [b"".join(pending), image.data]
            pending = []
        else:
            pending.append(image.data)
        pending.append(after)
    pieces.append(b"".join(pending))
    return pieces


def _plain(obj: object) -> str:
    if isinstance(obj, DataUrl):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
