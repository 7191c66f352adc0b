"""Request bodies on the wire: a large image written as it is held, never copied into the body."""

from __future__ import annotations

import base64
import json

import orjson

from tasks.endpoint.json_body import SPLICE_MIN, encode_body
from tasks.images.data_url import DataUrl


def encode(body: dict) -> bytes:
    """The body as it goes on the wire: its pieces, joined."""
    return b"".join(encode_body(body))


LARGE = DataUrl.encode("image/jpeg", b"\xff\xd8" * SPLICE_MIN)  # base64 over SPLICE_MIN bytes
SMALL = DataUrl.encode("image/png", b"tiny")


def body(*urls: object, text: str = "Describe.") -> dict[str, object]:
    content = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {
        "model": "m",
        "messages": [{"role": "user", "content": [*content, {"type": "text", "text": text}]}],
    }


def urls_in(encoded: bytes) -> list[str]:
    return [part["image_url"]["url"] for part in json.loads(encoded)["messages"][0]["content"][:-1]]


def test_a_large_image_is_a_piece_of_its_own_the_very_bytes_held() -> None:
    pieces = encode_body(body(SMALL, LARGE, "https://x.test/a.jpg", LARGE))
    held = [piece for piece in pieces if piece is LARGE.data]  # the same object: no copy made
    assert len(held) == 2 and len(pieces) == 5
    as_text = body(str(SMALL), str(LARGE), "https://x.test/a.jpg", str(LARGE))
    assert b"".join(pieces) == orjson.dumps(as_text)  # byte for byte what the text would encode to


def test_small_images_and_plain_bodies_are_one_piece() -> None:
    (piece,) = encode_body(body(SMALL, SMALL))
    assert urls_in(piece) == [str(SMALL)] * 2
    assert encode_body({"a": "é", "n": 1}) == ['{"a":"é","n":1}'.encode()]


def test_a_prompt_holding_the_marker_text_gets_the_body_unspliced() -> None:
    from tasks.endpoint import json_body

    tricky = f"say {json_body._MARK} twice: {json_body._MARK}"
    (piece,) = encode_body(body(LARGE, text=tricky))
    decoded = json.loads(piece)
    assert decoded["messages"][0]["content"][1]["text"] == tricky
    assert urls_in(piece) == [str(LARGE)]


def test_what_orjson_refuses_is_encoded_by_json_images_included() -> None:
    (piece,) = encode_body({**body(LARGE), "seed": 2**70})
    assert json.loads(piece)["seed"] == 2**70 and urls_in(piece) == [str(LARGE)]
    assert json.loads(encode({"big": 2**70, "a": "é"})) == {"big": 2**70, "a": "é"}


def test_a_data_url_reads_as_its_text_and_compares_by_value() -> None:
    url = DataUrl.encode("image/gif", b"GIF89a")
    assert str(url) == "data:image/gif;base64," + base64.b64encode(b"GIF89a").decode()
    assert len(url) == len(str(url))
    assert url == DataUrl.encode("image/gif", b"GIF89a") != DataUrl.encode("image/png", b"GIF89a")
    assert "R0lG" not in repr(url) and "image/gif" in repr(url)  # a log line never dumps the image
