"""What an output directory already holds: which work items are done, and in which file.

Built once at the start of a run from the ``image_id``, ``prompt_id``, ``status`` and
``request_key`` columns of every part file. It is compact — sorted 64-bit hashes in ``array``s,
about 20 bytes per row, so a million-row output costs ~20 MB — and answers per work item:
is it ``ok`` with this request key (skip it), and which old file holds its row (to replace it).
The same structure caches image hashes by source fingerprint, so a rerun need not re-read images.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from bisect import bisect_left
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tasks.inputs.work_items import identity
from tasks.outputs.layout import read_table

INDEX_COLUMNS = ["image_id", "prompt_id", "status", "request_key"]
RowFilter = Callable[[str | None, str], bool]  # (image_id, prompt_id) → whether a row is wanted


def h64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def identity_hash(image_id: str | None, prompt_id: str) -> int:
    return h64(identity(image_id, prompt_id))


def key_hash(request_key: str | None) -> int:
    return int(request_key[:16], 16) if request_key else 0


class SortedTable:
    """An immutable map from 64-bit keys to rows of small ints, by binary search."""

    def __init__(self, keys: array, columns: list[array]) -> None:
        order = sorted(range(len(keys)), key=keys.__getitem__)
        self.keys = array("Q", (keys[i] for i in order))
        self.columns = [array(col.typecode, (col[i] for i in order)) for col in columns]

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, key: int) -> int:
        """The position of ``key`` (the last of equal keys), or -1."""
        pos = bisect_left(self.keys, key + 1) - 1 if key < 2**64 - 1 else len(self.keys) - 1
        return pos if pos >= 0 and self.keys[pos] == key else -1

    def duplicates(self) -> Iterable[int]:
        """Positions of keys equal to the next one (all but the last of each run)."""
        keys = self.keys
        return (i for i in range(len(keys) - 1) if keys[i] == keys[i + 1])


class OutputIndex:
    """The rows of an existing output, by work item."""

    def __init__(self, files: Sequence[Any], table: SortedTable) -> None:
        self.files = list(files)  # file number → path or ObjectPath (older files first)
        self.table = table

    @classmethod
    def empty(cls) -> OutputIndex:
        return cls([], SortedTable(array("Q"), [array("Q"), array("q")]))

    @classmethod
    def load(cls, files: Sequence[Any], keep: RowFilter | None = None) -> OutputIndex:
        """Index ``files`` (ordered oldest first: on duplicate rows, the newest file wins): the rows
        ``keep`` takes (by image and prompt id; a slice's own), or all. A file another writer deleted
        meanwhile held none of them."""
        keys, requests, where = array("Q"), array("Q"), array("q")
        for number, path in enumerate(files):
            try:
                table = read_table(path, columns=INDEX_COLUMNS)
            except FileNotFoundError:
                continue
            cols = [table[name].to_pylist() for name in INDEX_COLUMNS]
            for image_id, prompt_id, status, request_key in zip(*cols, strict=True):
                if keep is not None and not keep(image_id, prompt_id):
                    continue
                keys.append(identity_hash(image_id, prompt_id))
                requests.append(key_hash(request_key))
                where.append(number * 2 + (status == "ok"))  # file number and ok flag in one int
        return cls(files, SortedTable(keys, [requests, where]))

    def __len__(self) -> int:
        return len(self.table)

    def lookup(self, image_id: str | None, prompt_id: str) -> tuple[bool, int, int] | None:
        """(ok, request-key hash, file number) of the item's row, or None."""
        pos = self.table.find(identity_hash(image_id, prompt_id))
        if pos < 0:
            return None
        requests, where = self.table.columns
        return bool(where[pos] & 1), requests[pos], where[pos] >> 1

    def is_done(self, image_id: str | None, prompt_id: str, request_key: str) -> bool:
        found = self.lookup(image_id, prompt_id)
        return found is not None and found[0] and found[1] == key_hash(request_key)

    def shadowed_rows(self) -> dict[int, set[int]]:
        """Identity hashes of rows that also appear in a newer file, by older file number."""
        where = self.table.columns[1]
        found: dict[int, set[int]] = {}
        for pos in self.table.duplicates():
            found.setdefault(where[pos] >> 1, set()).add(self.table.keys[pos])
        return found


class StoredAnswers:
    """The text of ``ok`` rows already in OUT, read back for chained prompts whose parent is done.

    A child re-asked on a rerun needs its parent's answer as the conversation's assistant turn. The
    index says which file holds the parent's row; that file's ok answers are read once and kept for
    the few files most recently used (a rerun walks OUT's files roughly in order), so memory stays
    bounded by a few shards' text whatever the output's size.
    """

    def __init__(self, index: OutputIndex, keep_files: int = 8) -> None:
        self.index = index
        self.keep_files = keep_files
        self._files: OrderedDict[int, dict[int, str]] = OrderedDict()
        self._lock = threading.Lock()  # used from the event loop and from the shard runner's worker thread

    def text(self, image_id: str | None, prompt_id: str) -> str | None:
        """The stored answer of an ``ok`` row, or None (no row, failed, no text, or its file is gone)."""
        found = self.index.lookup(image_id, prompt_id)
        if found is None or not found[0]:
            return None
        return self._answers(found[2]).get(identity_hash(image_id, prompt_id))

    def _answers(self, number: int) -> dict[int, str]:
        with self._lock:
            return self._load(number)

    def _load(self, number: int) -> dict[int, str]:
        answers = self._files.get(number)
        if answers is not None:
            self._files.move_to_end(number)
            return answers
        answers = {}
        try:
            table = read_table(self.index.files[number], columns=["image_id", "prompt_id", "status", "text"])
        except FileNotFoundError:
            table = None
        if table is not None:
            cols = [table[name].to_pylist() for name in ("image_id", "prompt_id", "status", "text")]
            for image_id, prompt_id, status, text in zip(*cols, strict=True):
                if status == "ok" and text is not None:
                    answers[identity_hash(image_id, prompt_id)] = text
        self._files[number] = answers
        if len(self._files) > self.keep_files:
            self._files.popitem(last=False)
        return answers


class HashCache:
    """Image sha256 by source fingerprint (a path with its size and mtime, or a URL)."""

    def __init__(self, table: SortedTable, digests: bytes) -> None:
        self.table = table
        self.digests = digests

    @classmethod
    def load(cls, files: Sequence[Any]) -> HashCache:
        keys, slots = array("Q"), array("Q")
        blob = bytearray()
        for path in files:
            try:
                table = read_table(path, columns=["fingerprint", "sha256"])
            except FileNotFoundError:  # gone meanwhile: a cache, not needed
                continue
            for fingerprint, sha in zip(
                table["fingerprint"].to_pylist(), table["sha256"].to_pylist(), strict=True
            ):
                keys.append(h64(fingerprint))
                slots.append(len(blob) // 32)
                blob += bytes.fromhex(sha)
        return cls(SortedTable(keys, [slots]), bytes(blob))

    def get(self, fingerprint: str) -> str | None:
        pos = self.table.find(h64(fingerprint))
        if pos < 0:
            return None
        slot = self.table.columns[0][pos]
        return self.digests[slot * 32 : slot * 32 + 32].hex()
