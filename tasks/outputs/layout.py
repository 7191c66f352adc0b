"""The output directory OUT: what lives in it, and how a file gets there whole.

Layout of OUT::

    part-<shard>-<run>.parquet     the rows (what pyarrow.dataset.dataset(OUT) reads), of a whole-job run
    part-slice-K-of-N-<shard>-<run>.parquet   the rows, of a slice (--slice K/N)
    _vlmbatch/lock                 held (flock) by the run writing OUT, or shared by its live slices
    _vlmbatch/slices/slice-K-of-N  held (flock) by the run writing that slice
    _vlmbatch/gate                 held for a moment while a writer starts or rewrites a shared file
    _vlmbatch/hashes/*.parquet     image sha256 by source fingerprint, so reruns need not re-read images

Every file is written under a hidden temporary name, flushed, then renamed into place: a reader never
sees a half-written file. A temporary's name says which scope wrote it (``.tmp-<scope>-<random>-<name>``,
the scope ``out`` or ``slice-K-of-N``), so a starting writer deletes only those of scopes with no live
writer (tasks/outputs/lock.py).
"""

from __future__ import annotations

import fnmatch
import os
import re
import uuid
from collections.abc import Collection
from pathlib import Path
from stat import S_ISREG

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UsageError

STATE_DIR = "_vlmbatch"
OUT_SCOPE = "out"  # the scope of a run of the whole job (a slice's: slice-K-of-N)
_TEMPORARY = re.compile(r"\.tmp-(out|slice-\d+-of-\d+)-[0-9a-f]{32}-")


PART_GLOB = "part-*.parquet"


def check_out_dir(out: str | Path) -> Path:
    """Raise UsageError unless OUT is (or can be created as) a writable directory. Creates nothing."""
    path = Path(out)
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


def foreign_entries(out: Path) -> list[str]:
    """Names in OUT that are not ours: anything but part files, the state directory and the hidden
    files Parquet readers skip (names starting with "." or "_"), in name order."""
    with os.scandir(out) as entries:
        names = sorted(e.name for e in entries)
    return [n for n in names if not n.startswith((".", "_")) and not fnmatch.fnmatchcase(n, PART_GLOB)]


def prepare_out_dir(out: str | Path) -> Path:
    """Create OUT (and parents) or raise UsageError if it cannot hold our files."""
    path = check_out_dir(out)
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


def write_atomic(table: pa.Table, path: Path, scope: str = OUT_SCOPE) -> None:
    """Write ``table`` to ``path`` so that the file appears complete or not at all."""
    tmp = path.with_name(f".tmp-{scope}-{uuid.uuid4().hex}-{path.name}")
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


def part_files(out: Path) -> list[Path]:
    """The part files of OUT, oldest first (a file another writer deletes meanwhile is left out)."""
    found = []
    for path in out.glob(PART_GLOB):
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        if S_ISREG(stat.st_mode):
            found.append((stat.st_mtime_ns, path.name, path))
    return [path for *_, path in sorted(found)]


def temporary_scope(name: str) -> str:
    """The scope that wrote a temporary (one named before scopes: ``out``)."""
    found = _TEMPORARY.match(name)
    return found[1] if found else OUT_SCOPE


def remove_temporaries(out: Path, live: Collection[str] = ()) -> int:
    """Delete the temporaries killed runs left behind: those of every scope not in ``live`` (the scopes
    of the other writers running now; call holding OUT's gate, with the caller's own lock taken)."""
    stale = [*out.glob(".tmp-*"), *(out / STATE_DIR / "hashes").glob(".tmp-*")]
    removed = 0
    for path in stale:
        if temporary_scope(path.name) not in live:
            path.unlink(missing_ok=True)
            removed += 1
    return removed
