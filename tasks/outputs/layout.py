"""The output directory OUT: what lives in it, and how a file gets there whole.

Layout of OUT (a local directory, or a prefix in an S3 or GCS bucket: tasks/outputs/object_path.py)::

    part-<shard>-<run>.parquet     the rows (what pyarrow.dataset.dataset(OUT) reads)
    _vlmbatch/lock                 local: held (flock) by the run writing OUT; the kernel frees it on a crash
    _vlmbatch/lock-<scope>         local: the same for a writer of one scope (a slice) of OUT
    _vlmbatch/rewrite.lock         local: held while a file other writers may change is rewritten
    _vlmbatch/leases/<scope>.json  object store: the lease of the run writing OUT (or one scope of it)
    _vlmbatch/hashes/*.parquet     image sha256 by source fingerprint, so reruns need not re-read images

Locally every file is written under a hidden temporary name, flushed, then renamed into place; on an
object store each file is one PUT, which is atomic. Either way a reader never sees a half-written file.

A writer holds OUT for a *scope*: ``OUT_SCOPE`` (the whole of OUT, a normal run) or a name of its own
(e.g. ``slice-3-of-8``). Its temporaries carry the scope's name, and a starting writer deletes only the
temporaries of its own scope: never those of a live writer of another scope.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import os
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UsageError
from tasks.outputs.object_path import ObjectPath, OutPath, out_path

STATE_DIR = "_vlmbatch"
OUT_SCOPE = "out"  # the scope of a writer of the whole of OUT
_SCOPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


PART_GLOB = "part-*.parquet"


def check_scope(scope: str) -> str:
    if not _SCOPE.fullmatch(scope):
        raise UsageError(f"writer scope {scope!r}: use letters, digits, '.', '_' and '-' (at most 100)")
    return scope


def _tmp_prefix(scope: str) -> str:
    """Temporaries of OUT's whole-OUT writer are ``.tmp-*`` (as they always were); those of another
    scope ``.tmp.<scope>-*``, which the ``.tmp-*`` pattern does not match."""
    return ".tmp-" if scope == OUT_SCOPE else f".tmp.{check_scope(scope)}-"


def check_out_dir(out: str | Path | ObjectPath) -> OutPath:
    """Raise UsageError unless OUT is (or can be created as) a writable directory. Creates nothing."""
    path = out_path(out)
    if isinstance(path, ObjectPath):
        return _check_object_out(path)
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"--out {path} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise UsageError(f"--out {path} is not writable")
        if foreign := foreign_entries(path):
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise UsageError(
                f"--out {path} holds what is not vlmbatch output ({shown}): a Parquet reader of the "
                "directory would take it for part of the output; choose a new or empty directory"
            )
        return path
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise UsageError(f"--out {path}: {parent} is in the way and is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path} cannot be created: {parent} is not writable")
    return path


def foreign_entries(out: OutPath) -> list[str]:
    """Names in OUT that are not ours: anything but part files, the state directory and the hidden
    files Parquet readers skip (names starting with "." or "_"), in name order."""
    if isinstance(out, ObjectPath):
        objects, prefixes = out.listing()
        names = sorted([o.name for o in objects] + prefixes)
    else:
        with os.scandir(out) as entries:
            names = sorted(e.name for e in entries)
    return [n for n in names if not n.startswith((".", "_")) and not fnmatch.fnmatchcase(n, PART_GLOB)]


def _check_object_out(out: ObjectPath) -> ObjectPath:
    try:
        if not out.bucket.exists():
            raise UsageError(f"--out {out}: there is no bucket {out.bucket_name!r} (vlmbatch creates none)")
        foreign = foreign_entries(out)
    except UsageError:
        raise
    except Exception as exc:  # the SDKs' errors: access denied, no such endpoint, ...
        raise UsageError(f"--out {out} cannot be read: {_brief(exc)}") from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise UsageError(
            f"--out {out} holds what is not vlmbatch output ({shown}): a Parquet reader of the "
            "prefix would take it for part of the output; choose a new or empty prefix"
        )
    return out


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def prepare_out_dir(out: str | Path | ObjectPath) -> OutPath:
    """Create OUT (and parents) or raise UsageError if it cannot hold our files."""
    path = check_out_dir(out)
    if isinstance(path, ObjectPath):  # nothing to create: a probe object written and deleted
        probe_object = path / f".probe-{uuid.uuid4().hex}"
        try:
            probe_object.bucket.put(probe_object.key, b"")
            probe_object.bucket.delete(probe_object.key)
        except Exception as exc:
            raise UsageError(f"--out {path} is not writable: {_brief(exc)}") from None
        return path
    try:
        (path / STATE_DIR / "hashes").mkdir(parents=True, exist_ok=True)
        probe = path / f".probe-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"--out {path} is not writable: {exc.strerror or exc}") from None
    return path


@contextlib.contextmanager
def rewriting(out: Path) -> Iterator[None]:
    """Hold ``_vlmbatch/rewrite.lock`` (flock) while a file of a local OUT that other writers may also
    change (an older run's: rows removed, a later column added) is read, changed and replaced:
    writers of several scopes (slices) never lose each other's changes to one file. On an object
    store the same is a write conditional on the version read (tasks/outputs/store.py)."""
    state = out / STATE_DIR
    state.mkdir(parents=True, exist_ok=True)
    with open(state / "rewrite.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def table_bytes(table: pa.Table) -> bytes:
    """``table`` as a Parquet file's bytes (what one PUT to an object store writes)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return bytes(sink.getvalue())


def write_atomic(table: pa.Table, path: OutPath, scope: str = OUT_SCOPE) -> None:
    """Write ``table`` to ``path`` so that the file appears complete or not at all (on an object store:
    one unconditional PUT, for files no other writer writes)."""
    if isinstance(path, ObjectPath):
        path.put(table_bytes(table))
        return
    tmp = path.with_name(f"{_tmp_prefix(scope)}{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def part_files(out: OutPath) -> list[Any]:
    """The part files of OUT, oldest first (on an object store: by last-modified time, to the second)."""
    if isinstance(out, ObjectPath):
        objects = [o for o in out.listing()[0] if fnmatch.fnmatchcase(o.name, PART_GLOB)]
        return sorted(objects, key=lambda o: (o.mtime_ns, o.name))
    files = [p for p in out.glob(PART_GLOB) if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def hash_files(out: OutPath) -> list[Any]:
    """The files of OUT's image-hash cache, by name."""
    hashes = out / STATE_DIR / "hashes"
    if isinstance(hashes, ObjectPath):
        return sorted((o for o in hashes.listing()[0] if o.name.endswith(".parquet")), key=lambda o: o.name)
    return sorted(hashes.glob("*.parquet"))


def remove_temporaries(out: OutPath, scope: str = OUT_SCOPE) -> int:
    """Delete temporaries a killed writer of ``scope`` left behind (call while holding the scope's lock:
    none of them can be live); other scopes' temporaries are left alone. An object store has none: each
    file is one PUT, which lands whole or not at all; what a killed run can leave there is the empty
    object of ``prepare_out_dir``'s writability probe, which any run may delete (its own run deletes
    it again, as an absent object, if it still lives)."""
    if isinstance(out, ObjectPath):
        probes = [o for o in out.listing()[0] if o.name.startswith(".probe-")]
        for probe in probes:
            probe.delete()
        return len(probes)
    pattern = f"{_tmp_prefix(scope)}*"
    stale = [*out.glob(pattern), *(out / STATE_DIR / "hashes").glob(pattern)]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def read_table(path: OutPath, columns: Sequence[str] | None = None) -> pa.Table:
    """One of OUT's Parquet files (only ``columns``, if given)."""
    if isinstance(path, ObjectPath):
        return pq.read_table(pa.BufferReader(_fetch(path)), columns=columns)
    return pq.read_table(path, columns=columns)


def read_schema(path: OutPath) -> pa.Schema:
    if isinstance(path, ObjectPath):
        return pq.read_schema(pa.BufferReader(_fetch(path)))
    return pq.read_schema(path)


def _fetch(path: ObjectPath) -> bytes:
    fetched = path.get()
    if fetched is None:  # as a local file deleted in between
        raise FileNotFoundError(errno.ENOENT, "no such object", str(path))
    return fetched.data
