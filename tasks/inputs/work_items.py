"""Work items (image × prompt, README.md "Manifests") grouped by image and cut into shards.

For each image, in manifest order: every prompt whose ``image_id`` is null, then every prompt naming
that image, in prompts-manifest order (parents before their chained children: tasks/inputs/chains.py).
An image's prompts stay together in one shard, so the image is read and prepared once. Shards are
produced lazily from the streamed images manifest.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from tasks.inputs.chains import group_by_root
from tasks.inputs.manifests import ImagesManifest
from tasks.inputs.prompt import DEFAULT_PROMPT, Prompt

READ_BATCH_ROWS = 256  # manifest rows per read: small, since the image column may hold the bytes


def identity(image_id: str | None, prompt_id: str) -> str:
    """One string per work item, and never the same for two: the image id's length in front says where
    it ends, whatever characters the ids hold (a separator alone would not: "a\x1fb" + "c" and
    "a" + "b\x1fc" would meet)."""
    return f"-:{prompt_id}" if image_id is None else f"{len(image_id)}:{image_id}{prompt_id}"


def item_id(image_id: str | None, prompt_id: str) -> str:
    """A short stable id of a work item: the front of its X-Request-Id (tasks/endpoint/sender.py)."""
    return hashlib.sha256(identity(image_id, prompt_id).encode()).hexdigest()[:24]


NO_IMAGE = object()  # the value of a text-only job: its prompts are asked without an image


@dataclass(frozen=True, slots=True)
class ManyImages:
    """The value of a multi-image job: (image_id, manifest cell) for each image, in the prompt's order."""

    images: tuple[tuple[str, Any], ...]


@dataclass(slots=True)
class ImageJob:
    """One image and the prompts to ask of it (or, text-only, prompts with no image)."""

    image_id: str | None
    value: Any  # the manifest cell: str, bytes, {"bytes", "path"}, None, or NO_IMAGE
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
    multi: tuple[Prompt, ...] = ()  # prompts with image_ids: one work item each

    @classmethod
    def build(cls, prompts: Sequence[Prompt] | None) -> PromptPlan:
        if prompts is None:
            return cls((DEFAULT_PROMPT,), {})
        by_image: dict[str, list[Prompt]] = {}
        for p in prompts:
            if p.image_id is not None:
                by_image.setdefault(p.image_id, []).append(p)
        return cls(
            tuple(p for p in prompts if p.image_id is None and p.image_ids is None),
            {k: tuple(v) for k, v in by_image.items()},
            tuple(p for p in prompts if p.image_ids is not None),
        )

    def prompts_for(self, image_id: str) -> list[Prompt]:
        return [*self.for_all, *self.by_image.get(image_id, ())]

    def count_items(self, num_images: int) -> int:
        per_image = num_images * len(self.for_all) + sum(len(v) for v in self.by_image.values())
        return per_image + len(self.multi)


def limit_items(jobs: Iterator[ImageJob], limit: int | None) -> Iterator[ImageJob]:
    """The first ``limit`` work items of a stream of jobs."""
    if limit is None:
        yield from jobs
        return
    remaining = limit
    for job in jobs:
        if remaining <= 0:
            return
        if len(job.prompts) > remaining:
            job.prompts = job.prompts[:remaining]
        remaining -= len(job.prompts)
        yield job


def carried_values(column: pa.Array) -> list[Any]:
    """A carried column's values as the writer takes them back, exactly. Nanosecond times go as their
    integers: as Python objects they need pandas (not a dependency) and would lose the nanoseconds."""
    kind = column.type
    if (
        pa.types.is_timestamp(kind) or pa.types.is_time64(kind) or pa.types.is_duration(kind)
    ) and kind.unit == "ns":
        return column.cast(pa.int64()).to_pylist()
    return column.to_pylist()


def iter_image_jobs(manifest: ImagesManifest, plan: PromptPlan) -> Iterator[ImageJob]:
    """Every image with its prompts, streamed, then the multi-image prompts."""
    for batch in manifest.iter_batches(READ_BATCH_ROWS):
        ids = batch.column(0).to_pylist()
        values = batch.column(1).to_pylist()
        carried = {name: carried_values(batch.column(name)) for name in manifest.carry}
        for row, image_id in enumerate(ids):
            prompts = plan.prompts_for(image_id)
            if prompts:
                carry = {name: col[row] for name, col in carried.items()}
                yield ImageJob(image_id, values[row], prompts, carry)
    yield from iter_multi_jobs(manifest, plan.multi)


def iter_multi_jobs(
    manifest: ImagesManifest, prompts: Sequence[Prompt], chunk: int = 256
) -> Iterator[ImageJob]:
    """One job per multi-image prompt; each chunk of prompts costs one scan for the images it names."""
    for start in range(0, len(prompts), chunk):
        part = prompts[start : start + chunk]
        wanted = {i for p in part for i in p.image_ids or ()}
        found: dict[str, tuple[Any, dict[str, Any]]] = {}
        for batch in manifest.iter_batches(READ_BATCH_ROWS):
            ids = batch.column(0).to_pylist()
            rows = [row for row, image_id in enumerate(ids) if image_id in wanted]
            if rows:
                values = batch.column(1).to_pylist()
                carried = {name: carried_values(batch.column(name)) for name in manifest.carry}
                for row in rows:
                    found[ids[row]] = (values[row], {name: col[row] for name, col in carried.items()})
        for p in part:
            image_ids = p.image_ids or ()
            images = ManyImages(tuple((i, found[i][0]) for i in image_ids))
            yield ImageJob(image_ids[0], images, [p], found[image_ids[0]][1])


def iter_text_jobs(prompts: Sequence[Prompt]) -> Iterator[ImageJob]:
    """Text-only work: each prompt once, with no image; a chain's prompts in one job."""
    for chain in group_by_root(prompts):
        yield ImageJob(None, NO_IMAGE, chain)


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
