"""A prepared image as the endpoint gets it: a ``data:`` URL, held once as bytes.

A photo's data URL is a few hundred KB. It is made once, when the image is prepared, and every request
about the image refers to the same bytes (tasks/endpoint/json_body.py splices them into each body).
"""

from __future__ import annotations

import base64


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
