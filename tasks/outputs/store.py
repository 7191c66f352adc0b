"""Writing a run's rows into OUT: a part file per shard and run, with exactly one row per work item.

A shard's file is rewritten (all its rows so far) about once a second while the shard runs, so a
crash loses at most about a second of answers. When a work item is redone (its old row failed, or its
request key changed), the old row is removed from its file *before* the new row is written: at no
moment does OUT hold two rows for one item — at worst, after a crash, none, and the rerun redoes it.

On an object store (tasks/outputs/object_path.py) the same holds with each write one PUT: a run's own
files (names no other writer uses) are created only if absent and then replaced only if unchanged
since this run wrote them, and another run's file loses a replaced row through a read-modify-write
conditional on the version read (retried when it changed). A write that finds its condition broken,
or that comes after the run's lease lapsed, is not made (``LeaseLost``): a run that lost OUT never
writes into it again.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Collection
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.outputs.buckets import PreconditionFailed
from tasks.outputs.index import HashCache, OutputIndex, RowFilter, identity_hash
from tasks.outputs.layout import (
    OUT_SCOPE,
    STATE_DIR,
    fsync_dir,
    hash_files,
    part_files,
    part_name,
    read_schema,
    table_bytes,
    write_atomic,
)
from tasks.outputs.object_path import LeaseLost, ObjectPath, OutPath
from tasks.outputs.table import rows_to_table
from tasks.row import LATER_COLUMNS, OUTPUT_SCHEMA, ResultRow

log = logging.getLogger(__name__)


def read_index(
    out: OutPath, scope: str = OUT_SCOPE, keep: RowFilter | None = None
) -> tuple[OutputIndex, HashCache]:
    """The index of what OUT holds (empty if OUT does not exist); read-only. A slice's (``scope``) holds
    only its rows (``keep``) and the image hashes of whole-job runs and of its own scope."""
    if not out.is_dir():
        return OutputIndex.empty(), HashCache.load([])
    hashes = hash_files(out)
    if scope != OUT_SCOPE:
        hashes = [p for p in hashes if file_scope(p.name) in (OUT_SCOPE, scope)]
    return OutputIndex.load(part_files(out), keep), HashCache.load(hashes)


def file_scope(name: str) -> str:
    """The scope that wrote a part or hash file: ``out`` or ``slice-K-of-N`` (its name's prefix)."""
    found = _SCOPED.match(name)
    return found[1] if found else OUT_SCOPE


_SCOPED = re.compile(r"(?:part-)?(slice-\d+-of-\d+)-")


@dataclass
class _ShardFile:
    path: Any  # OutPath
    rows: list[ResultRow] = field(default_factory=list)
    hashes: dict[str, str] = field(default_factory=dict)  # fingerprint → sha256
    written: int = 0  # rows already on disk
    hashes_written: int = 0
    tag: str | None = None  # on an object store: the version of the file this run last wrote
    hashes_tag: str | None = None


def run_tag(run_id: str) -> str:
    """The tag in the names of a run's files: 12 hex digits of its id, then 8 random ones.

    Not the id alone: a flow run that Prefect retries (flow ``retries``, "Retry" in the UI) keeps its
    id, and its files must not replace the ones its earlier attempt wrote, which hold the rows the
    retry skips as done.
    """
    return f"{run_id.replace('-', '')[:12]}{secrets.token_hex(4)}"


class OutputStore:
    """Writes a run's rows into OUT. Not thread-safe: call from one thread (the flow's writer)."""

    def __init__(
        self,
        out: OutPath,
        schema: pa.Schema,
        run_tag: str,
        index: OutputIndex,
        *,
        scope: str = OUT_SCOPE,
        shared: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
        on_lost: Callable[[str], None] | None = None,
    ) -> None:
        self.out = out
        self.schema = schema
        self.run_tag = run_tag
        self.index = index
        self.scope = scope  # the writer's scope of OUT (tasks/outputs/layout.py)
        self.shared = shared  # held while rewriting files older runs wrote (other writers may too)
        self.on_lost = on_lost  # called once when a write is refused for the lease's sake
        self.lost: str | None = None
        self.removed: set[int] = set()  # identity hashes whose old rows are gone
        self.shards: dict[int, _ShardFile] = {}

    def _shard(self, shard_index: int) -> _ShardFile:
        shard = self.shards.get(shard_index)
        if shard is None:
            path = self.out / part_name(shard_index, self.run_tag, self.scope)
            shard = self.shards[shard_index] = _ShardFile(path)
        return shard

    def keep_columns(self) -> None:
        """A run that wrote no row (an empty manifest, everything beyond --limit) leaves OUT without
        files, and ``pyarrow.dataset(OUT)`` without the contract's columns: give it one empty file."""
        if self.lost is not None or part_files(self.out):
            return
        try:
            write_atomic(
                self.schema.empty_table(), self.out / part_name(0, self.run_tag, self.scope), self.scope
            )
        except LeaseLost as exc:
            self._lose(exc)

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
        if self.lost is not None:
            return  # the lease is gone: nothing more is written (the rerun redoes these rows)
        targets = [shard_index] if shard_index is not None else list(self.shards)
        try:
            for index in targets:
                shard = self.shards.get(index)
                if shard is not None:
                    self._flush_shard(index, shard)
        except LeaseLost as exc:
            self._lose(exc)

    def _lose(self, exc: LeaseLost) -> None:
        self.lost = str(exc)
        log.error("%s: rows not yet written are dropped; the rerun redoes them", exc)
        if self.on_lost is not None:
            self.on_lost(str(exc))

    def _flush_shard(self, index: int, shard: _ShardFile) -> None:
        rows = shard.rows[: len(shard.rows)]
        hashes = dict(shard.hashes)
        if len(hashes) > shard.hashes_written:
            table = pa.table({"fingerprint": list(hashes), "sha256": list(hashes.values())})
            prefix = "" if self.scope == OUT_SCOPE else f"{self.scope}-"
            path = self.out / STATE_DIR / "hashes" / f"{prefix}{self.run_tag}-{index:06d}.parquet"
            shard.hashes_tag = self._write_own(table, path, shard.hashes_tag)
            shard.hashes_written = len(hashes)
        if len(rows) > shard.written:
            self._remove_replaced(rows[shard.written :])
            shard.tag = self._write_own(rows_to_table(rows, self.schema), shard.path, shard.tag)
            shard.written = len(rows)

    def _write_own(self, table: pa.Table, path: OutPath, tag: str | None) -> str | None:
        """Write one of this run's own files; on an object store, created only if absent, then replaced
        only if still the version this run wrote (else another writer touched it: LeaseLost)."""
        if not isinstance(path, ObjectPath):
            write_atomic(table, path, self.scope)
            return None
        data = table_bytes(table)
        try:
            return path.put(data, create=tag is None, match=tag)
        except PreconditionFailed:
            found = path.get()
            if found is not None and found.data == data:  # ours: a retry after a lost response
                return found.tag
            message = f"{path} was changed by another writer: this run no longer holds {self.out}"
            raise LeaseLost(message) from None

    def finish(self, shard_index: int) -> OutPath | None:
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
            with self.shared():
                remove_rows(self.index.files[number], identities, self.scope)
            self.removed |= identities

    def heal_duplicates(self, keep: RowFilter | None = None) -> int:
        """Remove rows that a newer file also holds (left by an interrupted older version); returns count.
        Only rows in this store's index (a slice's: its own); call holding OUT's gate."""
        removed = 0
        for number, identities in self.index.shadowed_rows().items():
            remove_rows(self.index.files[number], identities, self.scope)
            removed += len(identities)
        if removed:
            self.index = OutputIndex.load(part_files(self.out), keep)
        return removed


def remove_rows(path: OutPath, identities: set[int], scope: str = OUT_SCOPE) -> None:
    """Rewrite ``path`` without the rows whose identity hash is in ``identities`` (delete if empty)."""
    if isinstance(path, ObjectPath):
        _rewrite_object(path, lambda table: _without(table, identities), drop_empty=True)
        return
    try:  # the caller holds OUT's gate when another writer may rewrite the same file
        kept = _without(pq.read_table(path), identities)
    except FileNotFoundError:  # another writer removed its last rows meanwhile
        return
    if kept is None:
        return
    if kept.num_rows == 0:
        path.unlink(missing_ok=True)
        fsync_dir(path.parent)
    else:
        write_atomic(kept, path, scope)


def _without(table: pa.Table, identities: set[int]) -> pa.Table | None:
    """``table`` without those rows, or None when it has none of them."""
    ids = zip(table["image_id"].to_pylist(), table["prompt_id"].to_pylist(), strict=True)
    keep = pa.array([identity_hash(i, p) not in identities for i, p in ids], pa.bool_())
    if pc.all(keep).as_py() is not False:
        return None
    return table.filter(keep)


def _rewrite_object(
    path: ObjectPath, change: Callable[[pa.Table], pa.Table | None], drop_empty: bool
) -> None:
    """Read-modify-write of an object another run wrote: the new version (or with ``drop_empty`` the
    deletion, when no row is left) is conditional on the version read, and made again from a fresh
    read when another writer changed it in between (after a short random pause, so that writers
    contending for one object draw apart). ``change`` returns None when nothing changes."""
    for attempt in range(20):
        if attempt:
            time.sleep(random.uniform(0, 0.05 * attempt))
        found = path.get()
        if found is None:
            return
        changed = change(pq.read_table(pa.BufferReader(found.data)))
        if changed is None:
            return
        try:
            if changed.num_rows == 0 and drop_empty:
                path.delete(match=found.tag)
            else:
                path.put(table_bytes(changed), match=found.tag)
            return
        except PreconditionFailed:
            continue
    raise LeaseLost(f"{path} was changed by other writers 20 times while this run rewrote it")


def add_later_columns(
    out: OutPath, schema: pa.Schema, scope: str = OUT_SCOPE, live: Collection[str] = ()
) -> int:
    """Give OUT's files written before the contract's later columns (``tool_calls``, ``replica``) those of
    them in ``schema``, all null, when this run writes them (tasks/outputs/reading.py, ``check_schema``):
    then every file has the same columns, and pyarrow.dataset(OUT) reads one schema whichever file it
    looks at first. Each file is rewritten atomically and keeps its modification time, by which the
    index orders files (on duplicate rows the newest wins). Call holding OUT's lock and gate; the files
    of the other writers running now (their scopes: ``live``) are theirs, and left alone. Returns how
    many files were rewritten."""
    wanted = [schema.field(name) for name in LATER_COLUMNS if name in schema.names]
    rewritten = 0

    def added(table: pa.Table) -> pa.Table | None:
        missing = [column for column in wanted if column.name not in table.column_names]
        for column in missing:
            at = _contract_position(table.column_names, column.name)
            table = table.add_column(at, column, pa.nulls(table.num_rows, column.type))
        return table if missing else None

    for path in part_files(out) if wanted else []:
        if file_scope(path.name) in live:  # a live writer's own file: its to write
            continue
        names = read_schema(path).names
        if all(column.name in names for column in wanted):
            continue
        if isinstance(path, ObjectPath):  # its modification time cannot be kept: see the README
            _rewrite_object(path, added, drop_empty=False)
            rewritten += 1
            continue
        try:  # the caller holds OUT's gate
            stat = path.stat()
            table = added(pq.read_table(path))
        except FileNotFoundError:
            continue
        if table is None:
            continue
        write_atomic(table, path, scope)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        rewritten += 1
    return rewritten


def _contract_position(names: list[str], name: str) -> int:
    """Where the contract puts column ``name`` among ``names``: after the last contract column before it."""
    before = set(OUTPUT_SCHEMA.names[: OUTPUT_SCHEMA.names.index(name)])
    return max((i + 1 for i, present in enumerate(names) if present in before), default=len(names))
