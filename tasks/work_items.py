"""Work items (image × prompt, CONTRACT.md §1) grouped by image and cut into shards.

For each image, in manifest order: every prompt whose ``image_id`` is null, then every prompt naming
that image, in prompts-manifest order. An image's prompts stay together in one shard, so the image is
read and prepared once. Shards are produced lazily from the streamed images manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tasks.manifests import DEFAULT_PROMPT, ImagesManifest, Prompt

READ_BATCH_ROWS = 256  # manifest rows per read: small, since the image column may hold the bytes


def item_id(image_id: str, prompt_id: str) -> str:
    """A short stable id of a work item, sent as X-Request-Id (the same on every retry)."""
    return hashlib.sha256(f"{image_id}\x1f{prompt_id}".encode()).hexdigest()[:24]


@dataclass(slots=True)
class ImageJob:
    """One image and the prompts to ask of it."""

    image_id: str
    value: Any  # the manifest cell: str, bytes, {"bytes", "path"} or None
    prompts: list[Prompt]
    carry: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Shard:
    """The unit of orchestration: one Prefect task run."""

    index: int
    jobs: list[ImageJob]

    @property
    def num_items(self) -> int:
        return sum(len(job.prompts) for job in self.jobs)


@dataclass(frozen=True)
class PromptPlan:
    """Which prompts apply to which images."""

    for_all: tuple[Prompt, ...]
    by_image: dict[str, tuple[Prompt, ...]]

    @classmethod
    def build(cls, prompts: Sequence[Prompt] | None) -> PromptPlan:
        if prompts is None:
            return cls((DEFAULT_PROMPT,), {})
        by_image: dict[str, list[Prompt]] = {}
        for p in prompts:
            if p.image_id is not None:
                by_image.setdefault(p.image_id, []).append(p)
        return cls(
            tuple(p for p in prompts if p.image_id is None), {k: tuple(v) for k, v in by_image.items()}
        )

    def prompts_for(self, image_id: str) -> list[Prompt]:
        return [*self.for_all, *self.by_image.get(image_id, ())]

    def count_items(self, num_images: int) -> int:
        return num_images * len(self.for_all) + sum(len(v) for v in self.by_image.values())


def iter_image_jobs(
    manifest: ImagesManifest, plan: PromptPlan, limit: int | None = None
) -> Iterator[ImageJob]:
    """Every image with its prompts, streamed; stops after ``limit`` work items."""
    remaining = limit
    for batch in manifest.iter_batches(READ_BATCH_ROWS):
        ids = batch.column(0).to_pylist()
        values = batch.column(1).to_pylist()
        carried = {name: batch.column(name).to_pylist() for name in manifest.carry}
        for row, image_id in enumerate(ids):
            prompts = plan.prompts_for(image_id)
            if not prompts:
                continue
            if remaining is not None:
                if remaining <= 0:
                    return
                prompts = prompts[:remaining]
                remaining -= len(prompts)
            yield ImageJob(image_id, values[row], prompts, {name: col[row] for name, col in carried.items()})


def iter_shards(jobs: Iterator[ImageJob], shard_size: int) -> Iterator[Shard]:
    """Cut the stream of image jobs into shards of about ``shard_size`` work items."""
    index = 0
    current: list[ImageJob] = []
    size = 0
    for job in jobs:
        if current and size + len(job.prompts) > shard_size:
            yield Shard(index, current)
            index += 1
            current, size = [], 0
        current.append(job)
        size += len(job.prompts)
    if current:
        yield Shard(index, current)
