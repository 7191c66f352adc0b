"""The output directory OUT: what lives in it, and how a file gets there whole.

Layout of OUT (a local directory, or a prefix in an S3 or GCS bucket: tasks/outputs/object_path.py)::

    part-<shard>-<run>.parquet     the rows (what pyarrow.dataset.dataset(OUT) reads), of a whole-job run
    part-slice-K-of-N-<shard>-<run>.parquet   the rows, of a slice (--slice K/N)
    _vlmbatch/lock                 local: held (flock) by the run writing OUT, or shared by its live slices
    _vlmbatch/slices/slice-K-of-N  local: held (flock) by the run writing that slice
    _vlmbatch/gate                 local: held for a moment while a writer starts or rewrites a shared file
    _vlmbatch/leases/<scope>.json  object store: the lease of the run writing OUT (``out``) or a slice
    _vlmbatch/hashes/*.parquet     image sha256 by source fingerprint, so reruns need not re-read images

Locally every file is written under a hidden temporary name, flushed, then renamed into place; on an
object store each file is one PUT, which is atomic. Either way a reader never sees a half-written file.

A writer holds OUT for a *scope*: ``out`` (``OUT_SCOPE``, a run of the whole job) or ``slice-K-of-N``.
A local temporary's name says which scope wrote it (``.tmp-<scope>-<random>-<name>``), so a starting
writer deletes only those of scopes with no live writer (tasks/outputs/lock.py).
"""

from __future__ import annotations

import errno
import fnmatch
import os
import re
import uuid
from collections.abc import Collection, Sequence
from pathlib import Path
from stat import S_ISREG
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UsageError
from tasks.outputs.object_path import ObjectPath, OutPath, out_path

STATE_DIR = "_vlmbatch"
OUT_SCOPE = "out"  # the scope of a run of the whole job (a slice's: slice-K-of-N)
_SCOPE = re.compile(r"out|slice-\d+-of-\d+")
_TEMPORARY = re.compile(r"\.tmp-(out|slice-\d+-of-\d+)-[0-9a-f]{32}-")


PART_GLOB = "part-*.parquet"


def check_scope(scope: str) -> str:
    if not _SCOPE.fullmatch(scope):
        raise ValueError(f"unknown writer scope {scope!r}")
    return scope


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


def part_name(shard_index: int, run_tag: str, scope: str = OUT_SCOPE) -> str:
    """A part file's name: the writer's scope (a slice's), shard and run tag; never another writer's."""
    prefix = "" if scope == OUT_SCOPE else f"{scope}-"
    return f"part-{prefix}{shard_index:06d}-{run_tag}.parquet"


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
    tmp = path.with_name(f".tmp-{check_scope(scope)}-{uuid.uuid4().hex}-{path.name}")
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
    """The part files of OUT, oldest first (on an object store: by last-modified time, to the second); a
    file another writer deletes meanwhile is left out."""
    if isinstance(out, ObjectPath):
        objects = [o for o in out.listing()[0] if fnmatch.fnmatchcase(o.name, PART_GLOB)]
        return sorted(objects, key=lambda o: (o.mtime_ns, o.name))
    found = []
    for path in out.glob(PART_GLOB):
        try:
            stat = path.stat()
        except FileNotFoundError:  # another writer deleted it meanwhile
            continue
        if S_ISREG(stat.st_mode):
            found.append((stat.st_mtime_ns, path.name, path))
    return [path for *_, path in sorted(found)]


def hash_files(out: OutPath) -> list[Any]:
    """The files of OUT's image-hash cache, by name."""
    hashes = out / STATE_DIR / "hashes"
    if isinstance(hashes, ObjectPath):
        return sorted((o for o in hashes.listing()[0] if o.name.endswith(".parquet")), key=lambda o: o.name)
    return sorted(p for p in hashes.glob("*.parquet") if not p.name.startswith("."))  # no temporaries


def temporary_scope(name: str) -> str:
    """The scope that wrote a temporary (one named before scopes: ``out``)."""
    found = _TEMPORARY.match(name)
    return found[1] if found else OUT_SCOPE


def remove_temporaries(out: OutPath, live: Collection[str] = ()) -> int:
    """Delete the temporaries killed runs left behind: those of every scope not in ``live`` (the scopes
    of the other writers running now; call holding OUT's gate, with the caller's own lock taken). An
    object store has none: each file is one PUT, which lands whole or not at all; what a killed run can
    leave there is the empty object of ``prepare_out_dir``'s writability probe, which any run may delete
    (its own run deletes it again, as an absent object, if it still lives)."""
    if isinstance(out, ObjectPath):
        probes = [o for o in out.listing()[0] if o.name.startswith(".probe-")]
        for probe in probes:
            probe.delete()
        return len(probes)
    stale = [*out.glob(".tmp-*"), *(out / STATE_DIR / "hashes").glob(".tmp-*")]
    removed = 0
    for path in stale:
        if temporary_scope(path.name) not in live:
            path.unlink(missing_ok=True)
            removed += 1
    return removed


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
