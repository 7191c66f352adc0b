"""Thumbnails of a report's sampled images, read the way ``run`` reads them.

Only the sampled image ids are looked for: the images manifest is streamed in batches (id and image
columns only) and the cells of those ids picked out. Each cell goes through the images stage as in a
run: ``parse_image_value`` (paths, ``file://``, ``data:``, binary, Hugging Face structs, URLs),
``read_image_bytes`` (local paths confined to the image root, size cap; ``s3://`` and ``gs://``
through the object store) or, for ``http(s)://``, the run's ``ImageFetcher`` (the same address checks:
no loopback, private or link-local hosts unless allowed; a shorter timeout and one retry, as a report
should not wait long for one picture). Then ``thumbnail_jpeg``: at most 160 pixels a side, JPEG quality
70, as a ``data:`` URL the page embeds. An image that cannot be had gets a note saying why instead;
no image ever fails the report.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tasks.config import ImageConfig
from tasks.cpus import usable_cpus
from tasks.errors import ImageFailure
from tasks.images.fetch import ImageFetcher
from tasks.images.prepare import thumbnail_jpeg
from tasks.images.sources import ImageSource, is_http, parse_image_value, read_image_bytes
from tasks.inputs.manifests import ImagesManifest
from tasks.retry import RetryPolicy

THUMBNAIL_SIDE = 160  # pixels, the longer side
THUMBNAIL_QUALITY = 70
FETCH_TIMEOUT = 15.0  # seconds per http(s) attempt
FETCHES_AT_ONCE = 16
BATCH_ROWS = 256  # manifest rows per batch while looking for the sampled ids (binary cells can be large)


@dataclass(frozen=True, slots=True)
class Thumbnail:
    """A thumbnail's ``data:`` URL, or the reason there is none."""

    url: str | None
    note: str | None = None


def make_thumbnails(
    manifest: ImagesManifest, image_ids: Iterable[str], config: ImageConfig, *, image_root: Path
) -> dict[str, Thumbnail]:
    """A thumbnail (or a note) for each of ``image_ids``."""
    wanted = sorted(set(image_ids))
    if not wanted:
        return {}
    cells = find_cells(manifest, wanted)
    found: dict[str, Thumbnail] = {
        image_id: Thumbnail(None, "not in the images manifest")
        for image_id in wanted
        if image_id not in cells
    }
    sources: dict[str, ImageSource] = {}
    for image_id, cell in cells.items():
        try:
            sources[image_id] = parse_image_value(cell, manifest_dir=manifest.base_dir)
        except ImageFailure as exc:
            found[image_id] = _note(exc)
    remote = {image_id: s for image_id, s in sources.items() if is_http(s)}
    fetched = asyncio.run(_fetch_all(remote, config)) if remote else {}
    with ThreadPoolExecutor(max_workers=usable_cpus(), thread_name_prefix="vlmbatch-thumb") as pool:
        jobs = {
            image_id: pool.submit(_thumbnail, source, fetched.get(image_id), config, image_root)
            for image_id, source in sources.items()
        }
        found.update({image_id: job.result() for image_id, job in jobs.items()})
    return found


def find_cells(manifest: ImagesManifest, wanted: list[str]) -> dict[str, object]:
    """The image cells of ``wanted`` ids, streaming the manifest (stops once all are found)."""
    value_set = pa.array(wanted, type=pa.string())
    cells: dict[str, object] = {}
    for batch in manifest.iter_batches(BATCH_ROWS):
        mask = pc.is_in(batch.column(0), value_set=value_set)
        if not pc.any(mask).as_py():
            continue
        picked = batch.filter(mask)
        for image_id, cell in zip(picked.column(0).to_pylist(), picked.column(1).to_pylist(), strict=True):
            cells.setdefault(image_id, cell)
        if len(cells) == len(wanted):
            break
    return cells


async def _fetch_all(sources: dict[str, ImageSource], config: ImageConfig) -> dict[str, bytes | ImageFailure]:
    turns = asyncio.Semaphore(FETCHES_AT_ONCE)
    retry = RetryPolicy(max_retries=1, max_retry_after=5.0)
    async with ImageFetcher(
        config, timeout=FETCH_TIMEOUT, allow_private=config.allow_private_urls, retry=retry
    ) as fetcher:

        async def one(url: str) -> bytes | ImageFailure:
            async with turns:
                try:
                    return await fetcher.fetch(url)
                except ImageFailure as exc:
                    return exc

        results = await asyncio.gather(*(one(str(s.value)) for s in sources.values()))
    return dict(zip(sources, results, strict=True))


def _thumbnail(
    source: ImageSource, fetched: bytes | ImageFailure | None, config: ImageConfig, image_root: Path
) -> Thumbnail:
    try:
        if isinstance(fetched, ImageFailure):
            raise fetched
        data = fetched if fetched is not None else read_image_bytes(source, config, image_root=image_root)
        jpeg = thumbnail_jpeg(data, config, max_side=THUMBNAIL_SIDE, quality=THUMBNAIL_QUALITY)
    except ImageFailure as exc:
        return _note(exc)
    except Exception as exc:  # a view only: whatever goes wrong with one image, the report goes on
        return Thumbnail(None, f"unreadable: {type(exc).__name__}: {exc}"[:300])
    return Thumbnail("data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"))


def _note(exc: ImageFailure) -> Thumbnail:
    return Thumbnail(None, f"{exc.error_type}: {exc.message}")
