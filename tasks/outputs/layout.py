"""The output directory OUT: what lives in it, and how a file gets there whole.

Layout of OUT::

    part-<shard>-<run>.parquet     the rows (what pyarrow.dataset.dataset(OUT) reads)
    _vlmbatch/lock                 held (flock) by the run writing OUT; the kernel frees it on a crash
    _vlmbatch/hashes/*.parquet     image sha256 by source fingerprint, so reruns need not re-read images

Every file is written under a hidden temporary name, flushed, then renamed into place: a reader never
sees a half-written file.
"""

from __future__ import annotations

import fnmatch
import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import UsageError

STATE_DIR = "_vlmbatch"


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


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to ``path`` so that the file appears complete or not at all."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
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
    """The part files of OUT, oldest first."""
    files = [p for p in out.glob(PART_GLOB) if p.is_file()]
    return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))


def remove_temporaries(out: Path) -> int:
    """Delete temporaries a killed run left behind (call while holding the lock: none can be live)."""
    stale = [*out.glob(".tmp-*"), *(out / STATE_DIR / "hashes").glob(".tmp-*")]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)
