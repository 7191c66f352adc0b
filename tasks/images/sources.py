"""Where an image's bytes come from: one manifest cell → an ImageSource → the encoded bytes.

A cell is a local path, a ``file://``, ``http(s)://``, ``s3://`` or ``gs://`` URL, a ``data:`` URL,
raw bytes, or the Hugging Face ``datasets`` Image struct ``{"bytes": ..., "path": ...}`` (README.md,
"Images manifest"). ``read_image_bytes`` reads all of them except ``http(s)://``, which
``tasks.images.fetch.ImageFetcher`` fetches asynchronously (``is_http`` tells which); ``s3://`` and
``gs://`` go through tasks/images/object_store.py.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, unquote_to_bytes, urlsplit

from tasks.config import ImageConfig
from tasks.errors import ImageFailure
from tasks.images import object_store

HTTP_SCHEMES = frozenset({"http", "https"})
REMOTE_SCHEMES = HTTP_SCHEMES | object_store.SCHEMES
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_BYTES_TYPES = (bytes, bytearray, memoryview)


@dataclass(frozen=True, slots=True)
class ImageSource:
    """One image's origin. ``value``: absolute path (path), the encoded bytes (bytes) or the URL (url)."""

    kind: Literal["path", "bytes", "url"]
    value: str | bytes
    label: str  # short and human-readable, for error messages


def parse_image_value(value: object, *, manifest_dir: Path) -> ImageSource:
    """Turn one ``image`` cell into a source; raise ImageFailure (missing_image, bad_image) if it can't be."""
    if value is None:
        raise ImageFailure("missing_image", "no image (the image value is null)")
    if isinstance(value, _BYTES_TYPES):
        return _from_bytes(bytes(value))
    if isinstance(value, dict):
        return _from_struct(value, manifest_dir)
    if isinstance(value, str):
        return _from_string(value, manifest_dir)
    raise ImageFailure(
        "bad_image",
        f"unsupported image value of type {type(value).__name__} (expected a string, bytes or a "
        "{bytes, path} struct)",
    )


def _from_bytes(data: bytes) -> ImageSource:
    if not data:
        raise ImageFailure("missing_image", "no image (the image bytes are empty)")
    return ImageSource("bytes", data, f"<{len(data)} bytes>")


def _from_struct(value: dict[object, object], manifest_dir: Path) -> ImageSource:
    data, path = value.get("bytes"), value.get("path")
    if isinstance(data, _BYTES_TYPES) and len(data) > 0:
        return _from_bytes(bytes(data))
    if data is not None and not isinstance(data, _BYTES_TYPES):
        raise ImageFailure("bad_image", f"image struct: 'bytes' is a {type(data).__name__}, not binary")
    if isinstance(path, str) and path:
        return _from_string(path, manifest_dir)
    if path is not None and not isinstance(path, str):
        raise ImageFailure("bad_image", f"image struct: 'path' is a {type(path).__name__}, not a string")
    raise ImageFailure("missing_image", "no image (the image struct has neither bytes nor a path)")


def _from_string(value: str, manifest_dir: Path) -> ImageSource:
    if not value.strip():
        raise ImageFailure("missing_image", "no image (the image value is an empty string)")
    if "\x00" in value:  # no path, URL or base64 holds one (and the OS would refuse it)
        raise ImageFailure("bad_image", f"the image value contains a NUL character: {_shorten(value)!r}")
    if value[:5].lower() == "data:":
        return _from_data_url(value)
    if value[:5].lower() == "file:":  # file:///abs, file://localhost/abs and RFC 8089's file:/abs
        return _from_file_url(value)
    match = _SCHEME.match(value)
    if match is None:
        return ImageSource("path", _local_path(value, manifest_dir), value)
    scheme = match.group(1).lower()
    if scheme in REMOTE_SCHEMES:
        return ImageSource("url", value, value)
    raise ImageFailure(
        "bad_image",
        f"unsupported image source scheme {scheme}:// in {_shorten(value)} "
        "(use a local path, file://, http(s)://, s3://, gs:// or a data: URL)",
    )


def _local_path(value: str, manifest_dir: Path) -> str:
    """``str(manifest_dir.absolute() / value)``, without pathlib for the common plain relative path
    (a rerun does this for every image; the result must stay the same, as the hash cache keys on it)."""
    plain = not (
        value.startswith(("/", "./")) or value.endswith(("/", "/.")) or "//" in value or "/./" in value
    )
    if plain and value != ".":
        base = _folder(manifest_dir) if manifest_dir.is_absolute() else str(manifest_dir.absolute())
        return os.path.join(base, value)
    path = Path(value)
    return str(path if path.is_absolute() else manifest_dir.absolute() / path)


@functools.lru_cache(maxsize=64)
def _folder(folder: Path) -> str:
    return str(folder)


def _from_file_url(url: str) -> ImageSource:
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. "Invalid IPv6 URL" for file://[x/a.png
        raise ImageFailure("bad_image", f"malformed file:// URL ({exc}): {url}") from None
    if parts.netloc not in ("", "localhost"):
        raise ImageFailure("bad_image", f"file:// URL with a host ({parts.netloc!r}) is not supported: {url}")
    if parts.query or parts.fragment:
        raise ImageFailure(
            "bad_image", f"file:// URL with a query or fragment (percent-encode '?' and '#'): {url}"
        )
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ImageFailure("bad_image", f"file:// URL without an absolute path: {url}")
    return ImageSource("path", str(Path(path)), url)


def _from_data_url(url: str) -> ImageSource:
    """Decode a ``data:[<mediatype>][;base64],<data>`` URL (RFC 2397)."""
    header, comma, payload = url[5:].partition(",")
    if not comma:
        raise ImageFailure("bad_image", f"malformed data: URL (no ',' after the media type): {_shorten(url)}")
    if header.lower().endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except ValueError:
            data = _lenient_b64decode(payload, url)
    else:
        data = unquote_to_bytes(payload)
    if not data:
        raise ImageFailure("missing_image", "no image (the data: URL is empty)")
    return ImageSource("bytes", data, f"data: URL ({len(data)} bytes)")


def _lenient_b64decode(payload: str, url: str) -> bytes:
    """Base64 with percent-escapes, whitespace or missing padding; still rejects foreign characters."""
    text = "".join(unquote(payload).split())
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ImageFailure(
            "bad_image", f"malformed data: URL (invalid base64: {exc}): {_shorten(url)}"
        ) from None


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def url_scheme(source: ImageSource) -> str | None:
    """The lower-case scheme of a ``url`` source (http, https, s3, gs); None for other kinds."""
    if source.kind != "url" or not isinstance(source.value, str):
        return None
    return source.value.partition("://")[0].lower()


def is_http(source: ImageSource) -> bool:
    """True for an ``http(s)://`` source: fetch it with ImageFetcher, not read_image_bytes."""
    return url_scheme(source) in HTTP_SCHEMES


def is_remote(source: ImageSource) -> bool:
    """True for an ``http(s)://``, ``s3://`` or ``gs://`` source: reading it waits on the network."""
    return url_scheme(source) in REMOTE_SCHEMES


def read_image_bytes(source: ImageSource, config: ImageConfig, *, image_root: Path) -> bytes:
    """The encoded bytes of a source, enforcing the image root and ``config.max_image_bytes``.

    Synchronous (run it on the image thread pool); raises ImageFailure. ``http(s)://`` sources are not
    read here: they are fetched asynchronously by tasks.images.fetch.ImageFetcher (see ``is_http``).
    """
    value = source.value
    if source.kind == "url" and isinstance(value, str):
        scheme = url_scheme(source)
        if scheme in object_store.SCHEMES:
            return object_store.read_object(value, config.max_image_bytes)
        if scheme in HTTP_SCHEMES:
            raise ImageFailure(
                "bad_image",
                f"http(s) images are fetched asynchronously by ImageFetcher, not read_image_bytes: "
                f"{source.label}",
            )
        raise ImageFailure("bad_image", f"unsupported image URL scheme {scheme}:// in {source.label}")
    if source.kind == "bytes" and isinstance(value, bytes):
        _check_size(len(value), source.label, config)
        return value
    if source.kind == "path" and isinstance(value, str):
        return _read_path(value, source.label, config, image_root)
    raise TypeError(f"inconsistent ImageSource: kind {source.kind!r} with a {type(value).__name__} value")


def _check_size(size: int, label: str, config: ImageConfig) -> None:
    if size > config.max_image_bytes:
        raise ImageFailure(
            "bad_image",
            f"image {label} is {size:,} bytes, over the cap of {config.max_image_bytes:,} bytes "
            "(max_image_bytes)",
        )


def _read_path(value: str, label: str, config: ImageConfig, image_root: Path) -> bytes:
    try:
        root = image_root.resolve()
        path = Path(value).resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise ImageFailure("bad_image", f"cannot resolve image path {label}: {exc}") from None
    if not path.is_relative_to(root):
        raise ImageFailure("bad_image", f"image path {label} resolves outside the image root {root} ({path})")
    try:
        info = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        raise ImageFailure("missing_image", f"image file {label} does not exist ({path})") from None
    except OSError as exc:
        raise ImageFailure("bad_image", f"cannot read image file {label}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise ImageFailure("bad_image", f"image path {label} is a directory, not a file ({path})")
    if not stat.S_ISREG(info.st_mode):
        raise ImageFailure("bad_image", f"image path {label} is not a regular file ({path})")
    _check_size(info.st_size, label, config)
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError as exc:
        raise ImageFailure("bad_image", f"cannot read image file {label}: {exc.strerror or exc}") from None
    _check_size(len(data), label, config)  # it may have grown since stat
    if not data:
        raise ImageFailure("bad_image", f"image file {label} is empty (0 bytes)")
    return data
