"""Slices (``--slice K/N``): the K-th of N disjoint parts of a job, cut by a stable hash.

A work item belongs to the slice of its *slice key* (tasks/inputs/slice_keys.py: its image id, so that
an image's prompts and chains stay together; for a multi-image prompt its prompt id; for a text-only
prompt its chain's root prompt id). The key's slice is the first 8 bytes of its BLAKE2b digest,
big-endian, modulo N: the same on every machine, Python version and run, so N copies of a run started
anywhere split the job the same way and together do it exactly once.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")
MAX_SLICES = 100_000
SCOPE_RE = re.compile(r"slice-(\d+)-of-(\d+)")


def slice_hash(key: str) -> int:
    """The stable 64-bit hash that decides a key's slice."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Slice:
    """Part ``k`` (1-based) of ``n``."""

    k: int
    n: int

    @classmethod
    def parse(cls, text: str) -> Slice:
        """``"3/8"`` → Slice(3, 8); ValueError with what is expected otherwise."""
        found = _SPEC.fullmatch(text)
        if found is None:
            raise ValueError("must be K/N, the K-th of N slices (e.g. 3/8)")
        k, n = int(found[1]), int(found[2])
        if not 1 <= n <= MAX_SLICES:
            raise ValueError(f"N must be from 1 to {MAX_SLICES}")
        if not 1 <= k <= n:
            raise ValueError(f"K must be from 1 to N ({n})")
        return cls(k, n)

    @property
    def spec(self) -> str:
        return f"{self.k}/{self.n}"

    @property
    def scope(self) -> str:
        """Its name in OUT (locks, part files, temporaries): ``slice-3-of-8``."""
        return f"slice-{self.k}-of-{self.n}"

    def holds(self, key: str) -> bool:
        return slice_hash(key) % self.n == self.k - 1


def scope_of_slice(scope: str) -> tuple[int, int] | None:
    """``"slice-3-of-8"`` → (3, 8); None for any other scope (``"out"``)."""
    found = SCOPE_RE.fullmatch(scope)
    return (int(found[1]), int(found[2])) if found else None
