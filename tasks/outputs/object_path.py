"""OUT on object storage: ``s3://bucket/prefix`` or ``gs://bucket/prefix`` as a small path-like handle.

An ``ObjectPath`` names a key (a "directory" prefix or an object) in one bucket and offers the few
operations OUT's code needs of a path: ``/``, ``name``, ``parent``, ``is_dir``, and whole-object
reads and writes. Writes may carry a condition (tasks/outputs/buckets.py) and pass the handle's
``fence`` first: the writer's lease (tasks/outputs/lease.py), which raises ``LeaseLost`` once the
lease has lapsed, so that a run that lost OUT never writes into it again.

``out_path`` turns ``--out`` into an ``ObjectPath`` or a local ``pathlib.Path``; the functions of
tasks/outputs/layout.py take either (``OutPath``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from tasks.errors import UsageError
from tasks.outputs.buckets import Bucket, Fetched, ObjectInfo, PreconditionFailed, bucket_for, retryable

T = TypeVar("T")

OBJECT_SCHEMES = ("s3", "gs")


class LeaseLost(Exception):
    """This run no longer holds OUT (its lease lapsed or was taken over): it must not write."""


@dataclass(frozen=True)
class ObjectPath:
    bucket: Bucket = field(compare=False)
    scheme: str
    bucket_name: str
    key: str  # without a leading or trailing "/"; "" is the bucket itself
    fence: Callable[[], None] | None = field(default=None, compare=False, repr=False)
    mtime_ns: int = field(default=0, compare=False)  # from the listing that found it (0: unknown)

    def __truediv__(self, name: str) -> ObjectPath:
        key = f"{self.key}/{name}" if self.key else name
        return replace(self, key=key, mtime_ns=0)

    def __str__(self) -> str:
        return (
            f"{self.scheme}://{self.bucket_name}/{self.key}"
            if self.key
            else f"{self.scheme}://{self.bucket_name}"
        )

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        return replace(self, key=self.key.rsplit("/", 1)[0] if "/" in self.key else "", mtime_ns=0)

    @property
    def prefix(self) -> str:
        """The key as a "directory": what the keys of the objects inside it start with."""
        return f"{self.key}/" if self.key else ""

    def fenced(self, fence: Callable[[], None]) -> ObjectPath:
        """This handle (and every one made from it) checking ``fence`` before each write."""
        return replace(self, fence=fence)

    def child(self, info: ObjectInfo) -> ObjectPath:
        return replace(self, key=info.key, mtime_ns=info.mtime_ns)

    def listing(self) -> tuple[list[ObjectPath], list[str]]:
        """The objects directly inside this "directory", and the names of its sub-directories."""
        objects, prefixes = self.bucket.list(self.prefix)
        return [self.child(info) for info in objects], prefixes

    def is_dir(self) -> bool:
        """Whether any object lies under this prefix (object stores have no empty directories)."""
        return next(iter(self.bucket.list_all(self.prefix)), None) is not None

    def get(self) -> Fetched | None:
        return self.bucket.get(self.key)

    def put(self, data: bytes, *, create: bool = False, match: str | None = None) -> str:
        """One PUT (a fenced one: the lease checked before each attempt)."""
        if self.fence is None:
            return self.bucket.put(self.key, data, create=create, match=match)
        return _fenced(
            self.fence, lambda: self.bucket.put(self.key, data, create=create, match=match, once=True)
        )

    def delete(self, *, match: str | None = None) -> None:
        if self.fence is None:
            self.bucket.delete(self.key, match=match)
        else:
            _fenced(self.fence, lambda: self.bucket.delete(self.key, match=match, once=True))


WRITE_ATTEMPTS = 5


def _fenced(fence: Callable[[], None], request: Callable[[], T]) -> T:
    """``request`` made only while ``fence`` allows, retried (a transient failure) with the fence
    checked again before each attempt: an attempt's retry never goes out after the lease lapsed, as
    an SDK's own retries would. A retried conditional write whose first attempt landed unseen fails
    its condition: the callers check for that (tasks/outputs/store.py)."""
    for attempt in range(WRITE_ATTEMPTS):
        fence()
        try:
            return request()
        except PreconditionFailed:
            raise
        except Exception as exc:
            if attempt == WRITE_ATTEMPTS - 1 or not retryable(exc):
                raise
            time.sleep(min(0.2 * 2**attempt, 2.0) * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


OutPath = Path | ObjectPath


def is_object_url(value: str | Path) -> bool:
    return isinstance(value, str) and value.partition("://")[0].lower() in OBJECT_SCHEMES and "://" in value


def out_path(out: str | Path | ObjectPath) -> OutPath:
    """``--out`` as a path: an ``ObjectPath`` for ``s3://``/``gs://`` URLs, else a local ``Path``.
    Raises UsageError for a URL that names no bucket."""
    if isinstance(out, ObjectPath | Path):
        return out
    if not is_object_url(out):
        return Path(out)
    scheme, _, rest = out.partition("://")
    bucket, _, key = rest.partition("/")
    key = key.strip("/")
    if not bucket or "//" in key or any(part in {".", ".."} for part in key.split("/")):
        raise UsageError(f"--out {out} is not a usable {scheme}://bucket/prefix URL")
    scheme = scheme.lower()
    return ObjectPath(bucket_for(scheme, bucket), scheme, bucket, key)
