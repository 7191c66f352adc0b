"""Request bodies on the wire: JSON by orjson, with each image's data URL spliced in, not copied.

A prepared image's data URL is most of a request (a few hundred KB for a photo, against a few hundred
bytes of JSON around it). It is held once, as bytes (:class:`DataUrl`), however many prompts ask about
the image, and each request's body is written as pieces: the JSON before the image, the image's own
bytes, the JSON after it. A request in flight so costs its small JSON, not a second copy of its image
(bench/memory.py --photos). Small images are joined into one piece: a copy of a few KB is cheaper than
the extra writes.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

import orjson

from tasks.images.data_url import DataUrl

SPLICE_MIN = 64 * 1024  # bytes of base64 from which an image is written as a piece of its own
_MARK = f"vlmbatch-image-{uuid.uuid4().hex}"  # stands for an image in the encoded JSON
_MARK_BYTES = _MARK.encode()


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
