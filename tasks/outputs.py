"""The output directory: atomic Parquet files, one per shard and run, with exactly one row per item.

Layout of OUT::

    part-<shard>-<run>.parquet     the rows (what pyarrow.dataset.dataset(OUT) reads)
    _vlmbatch/lock                 held (flock) by the run writing OUT; the kernel frees it on a crash
    _vlmbatch/hashes/*.parquet     image sha256 by source fingerprint, so reruns need not re-read images

Every file is written under a hidden temporary name, flushed, then renamed into place: a reader never
sees a half-written file. A shard's file is rewritten (all its rows so far) about once a second while
the shard runs, so a crash loses at most about a second of answers. When a work item is redone (its
old row failed, or its request key changed), the old row is removed from its file *before* the new row
is written: at no moment does OUT hold two rows for one item — at worst, after a crash, none, and the
rerun redoes it.
"""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tasks.errors import UsageError
from tasks.output_index import HashCache, OutputIndex, identity_hash
from tasks.results import OUTPUT_SCHEMA, ResultRow, rows_to_table

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
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
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


def check_schema(out: str | Path, schema: pa.Schema) -> None:
    """OUT's existing files must have this run's columns, or pyarrow.dataset(OUT) would read them
    inconsistently: raise UsageError naming the difference (other --carry or --json-columns)."""
    path = Path(out)
    files = part_files(path) if path.is_dir() else []
    if not files:
        return
    existing = pq.read_schema(files[-1])
    if [(f.name, f.type) for f in existing] == [(f.name, f.type) for f in schema]:
        return  # nullability aside: a carried column is nullable now, and was not always
    ours, theirs = set(schema.names), set(existing.names)
    missing, extra = sorted(theirs - ours), sorted(ours - theirs)
    changed = sorted(n for n in ours & theirs if not schema.field(n).type.equals(existing.field(n).type))
    detail = "; ".join(
        part
        for part in (
            f"its files also have {', '.join(missing)}" if missing else "",
            f"this run adds {', '.join(extra)}" if extra else "",
            f"types differ for {', '.join(changed)}" if changed else "",
        )
        if part
    )
    raise UsageError(
        f"--out {path} holds rows with other columns ({detail or 'column order differs'}); rerun with the "
        "same --carry and --json-columns options, or write to a new --out (`vlmbatch export --json-columns` "
        "adds typed JSON columns to an existing output)"
    )


def read_index(out: Path) -> tuple[OutputIndex, HashCache]:
    """The index of what OUT holds (empty if OUT does not exist); read-only."""
    if not out.is_dir():
        return OutputIndex.empty(), HashCache.load([])
    hashes = sorted((out / STATE_DIR / "hashes").glob("*.parquet"))
    return OutputIndex.load(part_files(out)), HashCache.load(hashes)


class OutLock:
    """An exclusive lock on OUT for one run. flock: released by the kernel when the process dies."""

    def __init__(self, out: Path, run_id: str) -> None:
        self.path = out / STATE_DIR / "lock"
        self.run_id = run_id
        self._fh: IO[str] | None = None

    def acquire(self) -> None:
        fh = open(self.path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            _lock_within(fh, LOCK_PATIENCE_S)
        except BlockingIOError:
            fh.seek(0)
            who = _holder(fh.read())
            fh.close()
            raise UsageError(
                f"--out {self.path.parent.parent} is being written by {who}; wait for it to finish or choose "
                "another --out"
            ) from None
        fh.seek(0)
        fh.truncate()
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        fh.write(
            json.dumps(
                {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(), "since": since}
            )
        )
        fh.flush()
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


LOCK_PATIENCE_S = 1.0  # a reader's probe (writer_of) holds the lock shared for a moment: not a run


def _lock_within(fh: IO[str], seconds: float) -> None:
    """flock(LOCK_EX), trying for ``seconds``; BlockingIOError if another still holds it."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)


def writer_of(out: Path) -> str | None:
    """Which run is writing OUT now (its lock is held), or None: for readers (export, inspect), which
    would otherwise read part files as they are rewritten or replaced."""
    try:
        fh = open(out / STATE_DIR / "lock")  # noqa: SIM115 - closed below
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _holder(fh.read())
        fcntl.flock(fh, fcntl.LOCK_UN)
    return None


def _holder(text: str) -> str:
    try:
        info = json.loads(text.strip() or "{}")
        pid, host, since = info.get("pid"), info.get("host"), info.get("since")
        return f"run {info.get('run_id')} (pid {pid} on {host}, since {since})"
    except (ValueError, AttributeError):
        return "another run"


@dataclass
class _ShardFile:
    path: Path
    rows: list[ResultRow] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # fingerprint → sha256
    written: int = 0  # rows already on disk
    hashes_written: int = 0


def run_tag(run_id: str) -> str:
    """The tag in the names of a run's files: 12 hex digits of its id, then 8 random ones.

    Not the id alone: a flow run that Prefect retries (flow ``retries``, "Retry" in the UI) keeps its
    id, and its files must not replace the ones its earlier attempt wrote, which hold the rows the
    retry skips as done.
    """
    return f"{run_id.replace('-', '')[:12]}{secrets.token_hex(4)}"


class OutputStore:
    """Writes a run's rows into OUT. Not thread-safe: call from one thread (the flow's writer)."""

    def __init__(self, out: Path, schema: pa.Schema, run_tag: str, index: OutputIndex) -> None:
        self.out = out
        self.schema = schema
        self.run_tag = run_tag
        self.index = index
        self.removed: set[int] = set()  # identity hashes whose old rows are gone
        self.shards: dict[int, _ShardFile] = {}

    def _shard(self, shard_index: int) -> _ShardFile:
        shard = self.shards.get(shard_index)
        if shard is None:
            path = self.out / f"part-{shard_index:06d}-{self.run_tag}.parquet"
            shard = self.shards[shard_index] = _ShardFile(path)
        return shard

    def keep_columns(self) -> None:
        """A run that wrote no row (an empty manifest, everything beyond --limit) leaves OUT without
        files, and ``pyarrow.dataset(OUT)`` without the contract's columns: give it one empty file."""
        if not part_files(self.out):
            write_atomic(self.schema.empty_table(), self.out / f"part-000000-{self.run_tag}.parquet")

    def add(self, shard_index: int, row: ResultRow) -> None:
        """Queue a finished row (event-loop thread); it reaches disk at the next flush."""
        self._shard(shard_index).rows.append(row)

    def remember(self, shard_index: int, fingerprint: str, sha256: str) -> None:
        """Cache an image's hash by its source fingerprint (event-loop thread)."""
        self._shard(shard_index).hashes[fingerprint] = sha256

    def flush(self, shard_index: int | None = None) -> None:
        """Write every shard with new rows (or just one), after removing the rows they replace.

        Runs on the writer thread while the event loop appends: it works on snapshots.
        """
        targets = [shard_index] if shard_index is not None else list(self.shards)
        for index in targets:
            shard = self.shards.get(index)
            if shard is None:
                continue
            rows = shard.rows[: len(shard.rows)]
            hashes = dict(shard.hashes)
            if len(hashes) > shard.hashes_written:
                table = pa.table({"fingerprint": list(hashes), "sha256": list(hashes.values())})
                write_atomic(table, self.out / STATE_DIR / "hashes" / f"{self.run_tag}-{index:06d}.parquet")
                shard.hashes_written = len(hashes)
            if len(rows) > shard.written:
                self._remove_replaced(rows[shard.written :])
                write_atomic(rows_to_table(rows, self.schema), shard.path)
                shard.written = len(rows)

    def finish(self, shard_index: int) -> Path | None:
        """Final write of a shard; its rows leave memory. Returns its file, if it has rows."""
        self.flush(shard_index)
        shard = self.shards.pop(shard_index, None)
        return shard.path if shard is not None and shard.written else None

    def _remove_replaced(self, rows: list[ResultRow]) -> None:
        by_file: dict[int, set[int]] = {}
        for row in rows:
            found = self.index.lookup(row.image_id, row.prompt_id)
            if found is None:
                continue
            identity = identity_hash(row.image_id, row.prompt_id)
            if identity not in self.removed:
                by_file.setdefault(found[2], set()).add(identity)
        for number, identities in by_file.items():
            remove_rows(self.index.files[number], identities)
            self.removed |= identities

    def heal_duplicates(self) -> int:
        """Remove rows that a newer file also holds (left by an interrupted older version); returns count."""
        removed = 0
        for number, identities in self.index.shadowed_rows().items():
            remove_rows(self.index.files[number], identities)
            removed += len(identities)
        if removed:
            self.index = OutputIndex.load(part_files(self.out))
        return removed


def remove_rows(path: Path, identities: set[int]) -> None:
    """Rewrite ``path`` without the rows whose identity hash is in ``identities`` (delete if empty)."""
    if not path.exists():
        return
    table = pq.read_table(path)
    ids = zip(table["image_id"].to_pylist(), table["prompt_id"].to_pylist(), strict=True)
    keep = pa.array([identity_hash(i, p) not in identities for i, p in ids])
    if pc.all(keep).as_py():
        return
    kept = table.filter(keep)
    if kept.num_rows == 0:
        path.unlink()
        _fsync_dir(path.parent)
    else:
        write_atomic(kept, path)


def read_output(out: str | Path, columns: list[str] | None = None) -> pa.Table:
    """The output dataset as one table (only complete files: temporaries and state are hidden)."""
    return ds.dataset(out, format="parquet").to_table(columns=columns)


SUMMARY_COLUMNS = [
    "status", "error_type", "finish_reason", "prompt_tokens", "completion_tokens", "attempts", "latency_ms",
]  # fmt: skip


def read_summary_columns(out: Path) -> pa.Table:
    """What ``inspect`` counts, file by file: only these columns in memory, whatever OUT's size, each as
    the contract types it, and null where an older run's file lacks it."""
    files = part_files(out)
    if not files:
        raise UsageError(f"{out} holds no vlmbatch part files")
    if "status" not in pq.read_schema(files[-1]).names:
        raise UsageError(f"{out} is not a vlmbatch output (no status column)")
    wanted = pa.schema([OUTPUT_SCHEMA.field(name) for name in SUMMARY_COLUMNS])
    tables = []
    for f in files:
        present = set(pq.read_schema(f).names)
        tables.append(conform(pq.read_table(f, columns=[n for n in SUMMARY_COLUMNS if n in present]), wanted))
    return pa.concat_tables(tables)


def output_files_schema(files: Sequence[Path]) -> pa.Schema:
    """One schema for files that older runs may have written with other columns (one without
    ``reasoning``, one with a column since dropped): every column of any of them, each with a type
    they all fit (pyarrow's permissive promotion); UsageError naming a column whose types cannot meet."""
    fields: dict[str, list[tuple[pa.Field, Path]]] = {}
    for f in files:
        for column in pq.read_schema(f):
            fields.setdefault(column.name, []).append((column, f))
    unified = []
    for name, found in fields.items():
        try:
            one = pa.unify_schemas([pa.schema([column]) for column, _ in found], promote_options="permissive")
        except (pa.ArrowTypeError, pa.ArrowInvalid):
            kinds = sorted({str(column.type) for column, _ in found})
            raise UsageError(
                f"column {name!r} has types that cannot be joined in OUT's files ({', '.join(kinds)}; e.g. "
                f"{found[0][1].name} and {found[-1][1].name}); export those files separately"
            ) from None
        unified.append(one.field(name))
    return pa.schema(unified)


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` with ``schema``'s columns, in its order: a column its file lacks is null."""
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(len(table), f.type)
        for f in schema
    ]
    return pa.Table.from_arrays(columns, schema=schema)
