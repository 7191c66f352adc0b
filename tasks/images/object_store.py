"""Read one object's bytes from ``s3://`` or ``gs://`` through pyarrow's filesystems.

One filesystem per (scheme, bucket and settings) is made on first use and kept (thread-safe), so a
run's images share connections. Settings come from the standard environment:

- S3: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN`` (else the AWS SDK's
  default chain: profiles, instance roles), ``AWS_REGION`` or ``AWS_DEFAULT_REGION`` (else the
  bucket's own region, asked once), and an endpoint override for S3-compatible stores from
  ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (``http://host:port`` or ``host:port``).
- GCS: Google's default credentials; ``STORAGE_EMULATOR_HOST`` points at an emulator (anonymous).

The object's size is checked before it is read (over ``max_bytes``: ``bad_image``); a missing object or
bucket is ``missing_image``; access denied and any other error is ``bad_image`` with a message that
never contains credentials. The key is taken literally (no percent-decoding), as fsspec does. Failed
requests are retried only by the AWS SDK's standard strategy inside pyarrow (3 attempts).
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

from pyarrow import ArrowException
from pyarrow import fs as pafs

from tasks.errors import ImageFailure

SCHEMES = frozenset({"s3", "gs"})
CONNECT_TIMEOUT = 10.0  # seconds
REQUEST_TIMEOUT = 60.0  # seconds
_BUCKET = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,221}")
_SECRET_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
_DENIED = ("ACCESS_DENIED", "AccessDenied", "PERMISSION_DENIED", "Forbidden", "HTTP 403", "status 403")


@dataclass(frozen=True, slots=True)
class ObjectURL:
    """``scheme://bucket/key``; ``path`` is pyarrow's ``bucket/key``."""

    scheme: str
    bucket: str
    key: str

    @property
    def path(self) -> str:
        return f"{self.bucket}/{self.key}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"


def parse_object_url(url: str) -> ObjectURL:
    """Split an ``s3://`` or ``gs://`` URL; raise ImageFailure("bad_image") when it names no object."""
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ImageFailure("bad_image", f"not an s3:// or gs:// URL: {url}")
    bucket, _, key = rest.partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise ImageFailure("bad_image", f"invalid bucket name {bucket!r} in {url}")
    if not key or key.endswith("/"):
        raise ImageFailure("bad_image", f"{url} names a bucket or a prefix, not an object")
    return ObjectURL(scheme, bucket, key)


def endpoint_parts(value: str) -> tuple[str | None, str]:
    """``http://host:port`` → ("http", "host:port"); ``host:port`` → (None, "host:port")."""
    scheme, sep, rest = value.partition("://")
    if not sep:
        return None, value.rstrip("/")
    return scheme.lower(), rest.split("/", 1)[0]


class ObjectStore:
    """Reads objects; keeps one pyarrow filesystem per (scheme, bucket, settings). Thread-safe."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = environ  # None: os.environ, read at each use
        self._filesystems: dict[tuple[object, ...], pafs.FileSystem] = {}
        self._lock = threading.Lock()

    @property
    def environ(self) -> Mapping[str, str]:
        return os.environ if self._environ is None else self._environ

    def read(self, url: str, max_bytes: int) -> bytes:
        """The object's bytes; raises ImageFailure (``missing_image``, ``bad_image``)."""
        target = parse_object_url(url)
        try:
            filesystem = self.filesystem(target.scheme, target.bucket)
            with filesystem.open_input_file(target.path) as file:  # one HEAD: the size, before any GET
                size = file.size()
                if size > max_bytes:
                    raise ImageFailure(
                        "bad_image",
                        f"image {url} is {size:,} bytes, over the cap of {max_bytes:,} bytes "
                        "(max_image_bytes)",
                    )
                data = file.read(max_bytes + 1)  # bounded even if the object changed in between
        except FileNotFoundError:
            raise ImageFailure("missing_image", self._missing(target)) from None
        except ImageFailure:
            raise
        except (OSError, ArrowException, ValueError) as exc:
            raise ImageFailure("bad_image", self._describe(exc, url)) from None
        if len(data) > max_bytes:
            raise ImageFailure(
                "bad_image", f"image {url} is over the cap of {max_bytes:,} bytes (max_image_bytes)"
            )
        if not data:
            raise ImageFailure("bad_image", f"image {url} is empty (0 bytes)")
        return data

    def filesystem(self, scheme: str, bucket: str) -> pafs.FileSystem:
        key = (scheme, bucket, *self._settings(scheme))
        with self._lock:  # made once per key even when many threads ask at once
            filesystem = self._filesystems.get(key)
            if filesystem is None:
                filesystem = self._filesystems[key] = self._make(scheme, bucket)
            return filesystem

    def clear(self) -> None:
        with self._lock:
            self._filesystems.clear()

    def _settings(self, scheme: str) -> tuple[str | None, ...]:
        env = self.environ
        if scheme == "gs":
            return (env.get("STORAGE_EMULATOR_HOST") or None,)
        return s3_settings(env)

    def _make(self, scheme: str, bucket: str) -> pafs.FileSystem:
        if scheme == "gs":
            (emulator,) = self._settings("gs")
            limit = timedelta(seconds=REQUEST_TIMEOUT)  # the client library's own retries stop then
            if not emulator:
                return pafs.GcsFileSystem(retry_time_limit=limit)
            emulator_scheme, emulator_host = endpoint_parts(emulator)
            return pafs.GcsFileSystem(
                anonymous=True,
                endpoint_override=emulator_host,
                scheme=emulator_scheme or "http",
                retry_time_limit=limit,
            )
        endpoint_url, region, access_key, secret_key, token = self._settings("s3")
        endpoint_scheme, endpoint = endpoint_parts(endpoint_url) if endpoint_url else (None, None)
        if region is None and endpoint is None:
            try:
                region = pafs.resolve_s3_region(bucket)
            except (OSError, ArrowException, ValueError):
                region = None  # the SDK's default; a wrong region then fails with a clear error
        return pafs.S3FileSystem(
            access_key=access_key,
            secret_key=secret_key if access_key else None,
            session_token=token if access_key else None,
            region=region or ("us-east-1" if endpoint else None),
            endpoint_override=endpoint,
            scheme=endpoint_scheme or "https",
            connect_timeout=CONNECT_TIMEOUT,
            request_timeout=REQUEST_TIMEOUT,
        )

    def _missing(self, target: ObjectURL) -> str:
        try:
            filesystem = self.filesystem(target.scheme, target.bucket)
            bucket_missing = filesystem.get_file_info(target.bucket).type == pafs.FileType.NotFound
        except (OSError, ArrowException, ValueError):
            bucket_missing = False
        if bucket_missing:
            return f"image {target} does not exist: no bucket {target.bucket!r}"
        return f"image {target} does not exist"

    def _describe(self, exc: BaseException, url: str) -> str:
        text = str(exc)
        for name in _SECRET_VARS:
            secret = self.environ.get(name)
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        if any(marker in text for marker in _DENIED) or isinstance(exc, PermissionError):
            return f"access denied to image {url} (check the credentials and the bucket's policy): {text}"[
                :500
            ]
        return f"cannot read image {url}: {type(exc).__name__}: {text}"[:500]


def s3_settings(env: Mapping[str, str]) -> tuple[str | None, ...]:
    """(endpoint URL, region, access key, secret key, session token) from the environment; None: unset."""
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
    return (endpoint, region, *(env.get(name) or None for name in _SECRET_VARS))


_default: ObjectStore | None = None
_default_lock = threading.Lock()


def default_store() -> ObjectStore:
    """The process's store (reads os.environ); its filesystems live as long as the process."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ObjectStore()
        return _default


def read_object(url: str, max_bytes: int) -> bytes:
    """Read ``s3://`` or ``gs://`` ``url`` through the default store; raises ImageFailure."""
    return default_store().read(url, max_bytes)
