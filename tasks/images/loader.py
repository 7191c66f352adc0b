"""Reading and preparing images for the shard runner: local, object-store and fetched sources.

One ``ImageLoader`` per run owns the thread pool (sized to the cores) that reads, hashes and prepares
images, a second pool for object-store reads (``s3://``, ``gs://``: each waits tens of milliseconds
on the network, so they run many at once, ``OBJECT_STORE_READS``), and the shared ``ImageFetcher``
for http(s) sources. On a rerun it takes an image's sha256 from
the hash cache by source fingerprint, so images whose work is already done are never read.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tasks.config import RunConfig
from tasks.cpus import usable_cpus
from tasks.images.fetch import ImageFetcher
from tasks.images.prepare import PreparedImage, prepare_image
from tasks.images.sources import ImageSource, is_http, is_remote, read_image_bytes

OBJECT_STORE_READS = 32  # object-store reads at once (threads of their own pool)


class KnownHashes(Protocol):
    """Image hashes by source fingerprint, from earlier runs (OUT's hash cache: tasks/outputs/index.py)."""

    def get(self, fingerprint: str) -> str | None: ...


class _NoHashes:
    def get(self, fingerprint: str) -> str | None:
        return None


@dataclass(slots=True)
class Loaded:
    sha256: str
    data: bytes | None  # None when the sha came from the hash cache
    fingerprint: str | None


def fingerprint(source: ImageSource) -> str | None:
    """A cheap identity of a source's content: a path with its size and mtime, or a URL.

    No containment check here (``Path.resolve`` is the costliest step per image): a cache hit only
    ever lets work be skipped, and an image that is read goes through ``read_image_bytes``, which
    enforces the image root.
    """
    if source.kind == "url":
        return f"url:{source.value!s}"
    if source.kind == "path":
        try:
            st = os.stat(str(source.value))
        except OSError:
            return None
        return f"file:{source.value!s}:{st.st_size}:{st.st_mtime_ns}"
    return None


class ImageLoader:
    """Create inside the event loop that uses it (the fetcher's session binds to it)."""

    def __init__(
        self, config: RunConfig, *, image_root: Path, hashes: KnownHashes | None, use_cache: bool
    ) -> None:
        self.config = config
        self.image_root = image_root
        self.hashes: KnownHashes = hashes if hashes is not None else _NoHashes()
        self.use_cache = use_cache
        threads = usable_cpus()
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="vlmbatch-image")
        self._turns = asyncio.Semaphore(2 * threads)  # images between read and prepared: see turn()
        self._object_reads: ThreadPoolExecutor | None = None  # made on the first s3:// or gs:// image
        self.fetcher: ImageFetcher | None = None
        if config.image.image_urls == "fetch":
            self.fetcher = ImageFetcher(config.image, allow_private=config.image.allow_private_urls)

    @property
    def fetches(self) -> bool:
        """False with --image-urls pass: http(s) images go to the server as URLs."""
        return self.fetcher is not None

    async def aclose(self) -> None:
        if self.fetcher is not None:
            await self.fetcher.aclose()
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self._object_reads is not None:
            self._object_reads.shutdown(wait=False, cancel_futures=True)

    def _reader(self, source: ImageSource) -> ThreadPoolExecutor:
        """The pool that reads ``source``: its own for object stores, else the image pool."""
        if not is_remote(source):
            return self.pool
        if self._object_reads is None:
            self._object_reads = ThreadPoolExecutor(OBJECT_STORE_READS, thread_name_prefix="vlmbatch-object")
        return self._object_reads

    async def read(self, source: ImageSource) -> bytes:
        if is_http(source):
            assert self.fetcher is not None
            return await self.fetcher.fetch(str(source.value))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._reader(source), self._read, source)

    def _read(self, source: ImageSource) -> bytes:
        return read_image_bytes(source, self.config.image, image_root=self.image_root)

    def cached_sha256(self, source: ImageSource) -> str | None:
        """The image's sha256 from the hash cache, if resuming and it is there (one ``stat``)."""
        return self._cached(fingerprint(source)) if self.use_cache else None

    def _cached(self, fp: str | None) -> str | None:
        return self.hashes.get(fp) if fp is not None and self.use_cache else None

    def turn(self, source: ImageSource) -> contextlib.AbstractAsyncContextManager[object]:
        """Hold this from ``load`` to the end of ``prepare``: images are read and prepared a few at a
        time, each finished before more are read. Unbounded, every image waiting for a request slot
        was read first (the pool runs in arrival order), so the first request went out only after
        hundreds of reads, all their bytes held at once. Remote images (http(s), object stores) are
        not bounded here: they wait on the network, not the cores, and their own pool or the fetcher
        bounds how many are read at once."""
        return contextlib.nullcontext() if is_remote(source) else self._turns

    async def load(self, source: ImageSource) -> Loaded:
        """The image's sha256 (from the hash cache when resuming) and, unless cached, its bytes:
        fingerprint, read and hash in one trip to a pool (an http(s) image: fetched, then hashed)."""
        loop = asyncio.get_running_loop()
        if is_http(source):
            data = await self.read(source)
            sha = await loop.run_in_executor(self.pool, _sha256, data)
            return Loaded(sha, data, fingerprint(source))
        return await loop.run_in_executor(self._reader(source), self._load, source)

    def _load(self, source: ImageSource) -> Loaded:
        fp = fingerprint(source)
        sha = self._cached(fp)
        if sha is not None:
            return Loaded(sha, None, fp)
        data = self._read(source)
        return Loaded(_sha256(data), data, fp)

    async def prepare(self, source: ImageSource, loaded: Loaded) -> PreparedImage:
        """The image as it is sent. ``loaded`` lets go of the original bytes here: only the prepared image
        goes on with the request (a phone photo's megabytes, kept for each request in flight, would be
        hundreds of MB at C=256)."""
        data, loaded.data = loaded.data, None
        loop = asyncio.get_running_loop()
        if data is None:  # its hash came from the cache: read it, and hash what was read
            data = await self.read(source)
            return await loop.run_in_executor(self.pool, prepare_image, data, self.config.image)
        return await loop.run_in_executor(self.pool, prepare_image, data, self.config.image, loaded.sha256)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
