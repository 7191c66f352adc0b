"""Objects in an S3 or GCS bucket, as OUT on object storage needs them: whole-object reads and writes,
conditional writes, listings, and the store's own clock.

OUT on object storage (tasks/outputs/object_path.py) has no rename and no flock; what it relies on is
that one PUT is atomic (a reader sees the old object or the new one, whole) and that a write can be
made conditional: created only if absent (S3 ``If-None-Match: *``, GCS ``ifGenerationMatch=0``) or
replaced only if unchanged since it was read (S3 ``If-Match: <etag>``, GCS
``ifGenerationMatch=<generation>``). pyarrow's filesystems offer neither condition, so OUT's objects
go through the providers' own SDKs: boto3 for S3 (and S3-compatible stores), google-cloud-storage for
GCS (an optional dependency: ``pip install 'vlmbatch[gcs]'``).

Settings come from the same environment as image URLs (tasks/images/object_store.py): the AWS
variables, ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` for S3-compatible stores, Google's default
credentials and ``STORAGE_EMULATOR_HOST``. A version of an object is named by a ``tag``: S3's ETag, or
GCS's generation as a string.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

from tasks.errors import UsageError
from tasks.images.object_store import CONNECT_TIMEOUT, REQUEST_TIMEOUT, endpoint_parts, s3_settings


class PreconditionFailed(Exception):
    """A conditional write or delete found the object not as it expected (exists, or changed)."""


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    key: str
    size: int
    mtime_ns: int
    tag: str


@dataclass(frozen=True, slots=True)
class Fetched:
    """An object's bytes and version, with when it was last written and the store's clock at reading."""

    data: bytes
    tag: str
    modified: datetime
    now: datetime


class Bucket(Protocol):
    """One bucket of one store. Every method is thread-safe."""

    url: str  # scheme://bucket

    def exists(self) -> bool: ...
    def list(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        """Objects directly under ``prefix`` (which ends with "/") and the names of its sub-prefixes."""
        ...

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]: ...
    def get(self, key: str) -> Fetched | None:
        """The object, or None when there is none."""
        ...

    def put(
        self, key: str, data: bytes, *, create: bool = False, match: str | None = None, once: bool = False
    ) -> str:
        """Write ``data``; ``create``: only if absent; ``match``: only if its version is still
        ``match``. Raises PreconditionFailed otherwise. Returns the new version's tag. ``once``: one
        attempt, no retry by the SDK (the caller retries, checking its lease before each attempt)."""
        ...

    def delete(self, key: str, *, match: str | None = None, once: bool = False) -> None:
        """Delete (absent is fine); ``match``: only if its version is still ``match``."""
        ...


class S3Bucket:
    def __init__(self, bucket: str, settings: tuple[str | None, ...]) -> None:
        import boto3  # the AWS SDK: its import takes a while, and only an s3:// OUT needs it
        from botocore.config import Config

        endpoint_url, region, access_key, secret_key, token = settings
        scheme, host = endpoint_parts(endpoint_url) if endpoint_url else (None, None)
        self.url = f"s3://{bucket}"
        self.bucket = bucket
        session = boto3.session.Session()

        def client(attempts: int) -> Any:
            return session.client(
                "s3",
                endpoint_url=f"{scheme or 'https'}://{host}" if host else None,
                region_name=region or ("us-east-1" if host else None),
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key if access_key else None,
                aws_session_token=token if access_key else None,
                config=Config(
                    connect_timeout=CONNECT_TIMEOUT,
                    read_timeout=REQUEST_TIMEOUT,
                    retries={"mode": "standard", "max_attempts": attempts},
                ),
            )

        self.client = client(4)
        self.once = client(1)  # for fenced writes: a retry must check the lease again first

    def exists(self) -> bool:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            if _status(exc) == 404:
                return False
            raise
        return True

    def list(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        objects, prefixes = [], []
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix, Delimiter="/"
        )
        for page in pages:
            objects += [_s3_info(item) for item in page.get("Contents", [])]
            prefixes += [p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", [])]
        return objects, prefixes

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            yield from (_s3_info(item) for item in page.get("Contents", []))

    def get(self, key: str) -> Fetched | None:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=key)
        except Exception as exc:
            if _status(exc) == 404:
                return None
            raise
        data = response["Body"].read()
        date = response["ResponseMetadata"]["HTTPHeaders"].get("date")
        now = parsedate_to_datetime(date) if date else datetime.now(UTC)
        return Fetched(data, response["ETag"], response["LastModified"], now)

    def put(
        self, key: str, data: bytes, *, create: bool = False, match: str | None = None, once: bool = False
    ) -> str:
        conditions: dict[str, str] = {}
        if create:
            conditions["IfNoneMatch"] = "*"
        if match is not None:
            conditions["IfMatch"] = match
        client = self.once if once else self.client
        try:
            response = client.put_object(Bucket=self.bucket, Key=key, Body=data, **conditions)
        except Exception as exc:
            if _precondition(exc) or (match is not None and _status(exc) == 404):
                raise PreconditionFailed(f"{self.url}/{key}") from None
            raise
        return str(response["ETag"])

    def delete(self, key: str, *, match: str | None = None, once: bool = False) -> None:
        client = self.once if once else self.client
        try:
            if match is None:
                client.delete_object(Bucket=self.bucket, Key=key)
            else:
                client.delete_object(Bucket=self.bucket, Key=key, IfMatch=match)
        except Exception as exc:
            if _precondition(exc):
                raise PreconditionFailed(f"{self.url}/{key}") from None
            if _status(exc) != 404:
                raise


def _s3_info(item: Mapping[str, Any]) -> ObjectInfo:
    modified: datetime = item["LastModified"]
    return ObjectInfo(item["Key"], int(item["Size"]), _ns(modified), str(item["ETag"]))


def _ns(when: datetime) -> int:
    return int(when.timestamp()) * 1_000_000_000 + when.microsecond * 1000


def _status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return int(status) if status is not None else None
    code = getattr(exc, "code", None)  # google.api_core's exceptions
    return int(code) if isinstance(code, int) else None


def retryable(exc: Exception) -> bool:
    """Whether a failed request may succeed if sent again: not a 4xx (denied, no bucket, bad request)
    other than 408 and 429; network errors and 5xx may."""
    status = _status(exc)
    return status is None or status >= 500 or status in {408, 429}


def _precondition(exc: Exception) -> bool:
    """S3 answers a failed condition with 412; a conditional write racing another on the same key may
    get 409 ConditionalRequestConflict instead: either way the condition did not hold."""
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return _status(exc) == 412 or code in {"PreconditionFailed", "ConditionalRequestConflict"}


class GcsBucket:
    """GCS through google-cloud-storage's documented interface (generation preconditions); tested
    against fake-gcs-server (tests/test_out_gcs.py), which ignores preconditions on deletes."""

    def __init__(self, bucket: str, emulator: str | None) -> None:
        try:
            from google.cloud import storage  # optional: pip install 'vlmbatch[gcs]'
        except ImportError:
            raise UsageError(
                "--out gs://... needs google-cloud-storage for its conditional writes: "
                "pip install 'vlmbatch[gcs]'"
            ) from None
        if emulator:
            from google.auth.credentials import AnonymousCredentials

            scheme, host = endpoint_parts(emulator)
            client = storage.Client(
                project="vlmbatch",
                credentials=AnonymousCredentials(),  # type: ignore[no-untyped-call]
                client_options={"api_endpoint": f"{scheme or 'http'}://{host}"},
            )
        else:
            client = storage.Client()
        self.url = f"gs://{bucket}"
        self.client = client
        self.bucket = client.bucket(bucket)

    def exists(self) -> bool:
        return bool(self.bucket.exists())

    def list(self, prefix: str) -> tuple[list[ObjectInfo], list[str]]:
        blobs = self.client.list_blobs(self.bucket, prefix=prefix, delimiter="/")
        objects = [_gcs_info(blob) for blob in blobs]  # prefixes are known once the pages are read
        return objects, [p[len(prefix) :].rstrip("/") for p in sorted(blobs.prefixes)]

    def list_all(self, prefix: str) -> Iterator[ObjectInfo]:
        return (_gcs_info(blob) for blob in self.client.list_blobs(self.bucket, prefix=prefix))

    def get(self, key: str) -> Fetched | None:
        from google.api_core import exceptions

        blob = self.bucket.get_blob(key)
        if blob is None:
            return None
        try:
            data = blob.download_as_bytes(if_generation_match=blob.generation)
        except (exceptions.NotFound, exceptions.PreconditionFailed):
            return self.get(key)  # replaced or deleted between the two requests: look again
        # GCS does not expose its clock through this client: the local clock stands in (NTP-synced)
        return Fetched(data, str(blob.generation), blob.updated, datetime.now(UTC))

    def put(
        self, key: str, data: bytes, *, create: bool = False, match: str | None = None, once: bool = False
    ) -> str:
        from google.api_core import exceptions
        from google.cloud.storage.retry import DEFAULT_RETRY

        blob = self.bucket.blob(key)
        generation = 0 if create else (int(match) if match is not None else None)
        try:
            blob.upload_from_string(
                data, if_generation_match=generation, retry=None if once else DEFAULT_RETRY
            )
        except exceptions.PreconditionFailed:
            raise PreconditionFailed(f"{self.url}/{key}") from None
        return str(blob.generation)

    def delete(self, key: str, *, match: str | None = None, once: bool = False) -> None:
        from google.api_core import exceptions
        from google.cloud.storage.retry import DEFAULT_RETRY

        generation = int(match) if match is not None else None
        try:
            self.bucket.blob(key).delete(
                if_generation_match=generation, retry=None if once else DEFAULT_RETRY
            )
        except exceptions.PreconditionFailed:
            raise PreconditionFailed(f"{self.url}/{key}") from None
        except exceptions.NotFound:
            pass


def _gcs_info(blob: Any) -> ObjectInfo:
    return ObjectInfo(blob.name, int(blob.size or 0), _ns(blob.updated), str(blob.generation))


_buckets: dict[tuple[object, ...], Bucket] = {}
_lock = threading.Lock()


def bucket_for(scheme: str, name: str, environ: Mapping[str, str] | None = None) -> Bucket:
    """The process's client for one bucket with the environment's current settings (made once)."""
    env = os.environ if environ is None else environ
    settings: tuple[str | None, ...] = (
        (env.get("STORAGE_EMULATOR_HOST") or None,) if scheme == "gs" else s3_settings(env)
    )
    key = (scheme, name, *settings)
    with _lock:
        bucket = _buckets.get(key)
        if bucket is None:
            bucket = S3Bucket(name, settings) if scheme == "s3" else GcsBucket(name, settings[0])
            _buckets[key] = bucket
        return bucket
