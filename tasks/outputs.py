"""Write result rows into the output dataset directory, atomically, and read it back.

Each file is written under a hidden temporary name (``.tmp-…``, which pyarrow.dataset ignores),
flushed to disk, then renamed into place: a reader never sees a half-written file.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.errors import UsageError
from tasks.results import ResultRow, rows_to_table


def prepare_out_dir(out: str | Path) -> Path:
    """Create OUT (and parents) or raise UsageError if it cannot hold our files."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path} exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
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
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Writes one shard's rows as a Parquet file in OUT."""

    def __init__(self, out: Path, schema: pa.Schema, run_tag: str) -> None:
        self.out = out
        self.schema = schema
        self.run_tag = run_tag

    def write(self, shard_index: int, rows: list[ResultRow]) -> Path | None:
        if not rows:
            return None
        path = self.out / f"part-{shard_index:06d}-{self.run_tag}.parquet"
        write_atomic(rows_to_table(rows, self.schema), path)
        return path


def read_output(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The output dataset as one table (only complete files: temporaries are hidden)."""
    return ds.dataset(out, format="parquet").to_table(columns=columns)
