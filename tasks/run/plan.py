"""The run plan: both manifests read and checked, OUT checked, nothing sent and nothing written.

The CLI plans before it starts a flow, so a bad manifest or option stops it (exit 1) before anything
is sent; the annotate flow plans again, since it may run in a worker, and reuses the CLI's plan while
nothing it was made from has changed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pyarrow as pa

from tasks.config import RunConfig
from tasks.errors import MAX_LISTED, ConfigError, ManifestError, UsageError
from tasks.inputs.chains import group_by_root
from tasks.inputs.manifests import (
    ImagesManifest,
    check_prompt_images,
    parquet_files,
    read_images_manifest,
    read_prompts_manifest,
)
from tasks.inputs.prompt import Prompt
from tasks.inputs.slice_keys import SliceKeys, jobs_in
from tasks.inputs.work_items import (
    PromptPlan,
    Shard,
    iter_image_jobs,
    iter_shards,
    iter_text_jobs,
    limit_items,
)
from tasks.outputs.json_columns import json_fields
from tasks.outputs.layout import OUT_SCOPE, check_out_dir
from tasks.outputs.reading import check_schema
from tasks.partitions import resolve_paths
from tasks.row import OUTPUT_SCHEMA, output_schema
from tasks.slice import Slice


@dataclass(frozen=True)
class RunPlan:
    """A validated run: manifests read and checked, nothing sent, nothing written."""

    config: RunConfig
    images: ImagesManifest | None  # None: a text-only run (prompts without images)
    prompts: PromptPlan
    image_root: Path
    output_schema: pa.Schema  # the contract's columns, carried ones, typed JSON ones
    calls_tools: bool = False  # a prompt has tools: OUT needs the tool_calls column
    slice_items: int | None = None  # with --slice: the work items of this slice

    @property
    def part(self) -> Slice | None:
        """The slice this run does (--slice), or None: the whole job."""
        return self.config.part

    @property
    def scope(self) -> str:
        """What of OUT this run writes, for its lock and clean-up: ``out`` or ``slice-K-of-N``."""
        part = self.part
        return part.scope if part is not None else OUT_SCOPE

    @property
    def slice_keys(self) -> SliceKeys:
        return SliceKeys(self.prompts.for_all if self.images is None else (), self.prompts.multi)

    def row_filter(self) -> Callable[[str | None, str], bool] | None:
        """Whether a row of OUT is this run's to resume (None: every row is)."""
        part = self.part
        return None if part is None else self.slice_keys.row_filter(part)

    @property
    def num_images(self) -> int:
        return self.images.num_rows if self.images is not None else 0

    @property
    def base_dir(self) -> Path:
        return self.images.base_dir if self.images is not None else self.image_root

    @property
    def work_items(self) -> int:
        if self.slice_items is not None:
            return self.slice_items
        if self.images is None:
            total = len(self.prompts.for_all)
        else:
            total = self.prompts.count_items(self.images.num_rows)
        return min(total, self.config.limit) if self.config.limit else total

    def shards(self) -> Iterator[Shard]:
        if self.images is None:
            jobs = iter_text_jobs(self.prompts.for_all)
        else:
            jobs = iter_image_jobs(self.images, self.prompts)
        jobs = limit_items(jobs, self.config.limit)
        if (part := self.part) is not None:
            jobs = jobs_in(jobs, part)  # cut after --limit: the slices of a job are the job
        return iter_shards(jobs, self.config.shard_size)


_PLANS: dict[str, RunPlan] = {}  # the last plan, by config and manifest files


def plan_run(config: RunConfig) -> RunPlan:
    """Read and validate everything a run needs; raises UsageError (exit 1) before anything is sent.

    The CLI plans before starting the flow (to fail fast) and the flow plans again (it may run in a
    worker): while the config and the manifests' files are unchanged, the second call reuses the
    first's manifests, so a million-row manifest's ids are read and checked once per process, not
    twice. OUT is checked every time.
    """
    config = resolve_paths(config)  # {date} in paths filled from config.date (ConfigError without one)
    key = _plan_key(config)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _plan(config)
        pa.default_memory_pool().release_unused()  # the id checks' buffers: back to the OS, not kept
        _PLANS.clear()
        if key is not None:
            _PLANS[key] = plan
    if not config.dry_run:  # OUT may change between two plans: checked every time
        check_out_dir(config.out)
        # an OUT written before the later columns keeps its columns unless this run needs them
        needed = {"tool_calls"} if plan.calls_tools else set()
        if len(config.endpoint.base_urls) > 1:
            needed.add("replica")
        schema = check_schema(config.out, plan.output_schema, needed)
        if schema is not plan.output_schema:
            plan = replace(plan, output_schema=schema)
    return plan


def _plan_key(config: RunConfig) -> str | None:
    """The config and the size and mtime of every manifest file; None if a manifest is missing."""
    stats = []
    for path, what in ((config.images, "images"), (config.prompts, "prompts")):
        if path is None:
            continue
        try:
            for file in parquet_files(Path(path), what):
                st = file.stat()
                stats.append(f"{file}:{st.st_size}:{st.st_mtime_ns}")
        except (UsageError, OSError):
            return None
    return config.model_dump_json() + "\n" + "\n".join(stats)


def _plan(config: RunConfig) -> RunPlan:
    prompts = read_prompts_manifest(config.prompts) if config.prompts else None
    if config.images is None:
        images = None
        _check_text_only(config, prompts)
    else:
        images = read_images_manifest(
            config.images, id_column=config.id_column, image_column=config.image_column, carry=config.carry
        )
        if prompts is not None:
            check_prompt_images(prompts, images, config.prompts or "", config.endpoint.max_images_per_prompt)
    if config.image.image_root is not None:
        image_root = Path(config.image.image_root)
        if not image_root.is_dir():
            raise ConfigError(f"--image-root {image_root} is not a directory")
    else:
        image_root = images.base_dir if images is not None else Path.cwd()
    if prompts is not None:
        _check_prompt_features(config, prompts)
    schema = _output_schema(config, images, prompts)
    calls = any(p.tools is not None for p in prompts or ())
    plan = RunPlan(config, images, PromptPlan.build(prompts), image_root.resolve(), schema, calls)
    if config.part is not None:
        plan = replace(plan, slice_items=_count_slice(plan, config.part))
    if images is not None:  # checked and counted: a million ids need not stay in memory for the run
        plan = replace(plan, images=images.without_ids())
    return plan


def _count_slice(plan: RunPlan, part: Slice) -> int:
    """The work items of ``part`` (after --limit), from the manifests' ids: no image is read."""
    remaining = plan.config.limit if plan.config.limit is not None else -1
    count = 0
    if plan.images is None:
        for chain in group_by_root(plan.prompts.for_all):
            take = len(chain) if remaining < 0 else min(len(chain), remaining)
            if take <= 0:
                break
            count += take if part.holds(chain[0].prompt_id) else 0
            remaining -= take
        return count
    ids = plan.images.ids
    assert ids is not None  # counted before they are dropped
    each, by_image = len(plan.prompts.for_all), plan.prompts.by_image
    for chunk in ids.chunks:
        for image_id in chunk.to_pylist():
            items = each + len(by_image.get(image_id, ()))
            if remaining >= 0:
                if remaining == 0:
                    return count
                items = min(items, remaining)
                remaining -= items
            if items and part.holds(image_id):
                count += items
    for p in plan.prompts.multi:
        if remaining == 0:
            break
        remaining -= 1 if remaining > 0 else 0
        count += part.holds(p.prompt_id)
    return count


def _output_schema(
    config: RunConfig, images: ImagesManifest | None, prompts: list[Prompt] | None
) -> pa.Schema:
    carry = images.carry_schema if images is not None else None
    if not (config.json_columns and prompts):
        return output_schema(carry)
    return output_schema(carry, json_fields(prompts, [*OUTPUT_SCHEMA.names, *(carry.names if carry else [])]))


def _check_prompt_features(config: RunConfig, prompts: list[Prompt]) -> None:
    """What a prompt asks that this run's options cannot send (README.md, "Prefill")."""
    prefilled = [p.prompt_id for p in prompts if p.prefill is not None]
    if prefilled and config.endpoint.api == "responses":
        raise ManifestError(
            f"{config.prompts}: column 'prefill' is set for prompts {_names(prefilled)}, but --api responses "
            "cannot continue an assistant message (vLLM's Responses API has no continue_final_message); "
            "use --api chat, or leave 'prefill' null"
        )


def _names(ids: list[str]) -> str:
    shown = ", ".join(repr(i) for i in ids[:MAX_LISTED])
    return shown + (f" and {len(ids) - MAX_LISTED} more" if len(ids) > MAX_LISTED else "")


def _check_text_only(config: RunConfig, prompts: list[Prompt] | None) -> None:
    if prompts is None:
        raise ConfigError("give an images manifest, a --prompts manifest, or both")
    if config.carry:
        raise ConfigError("--carry copies images-manifest columns: it needs an images manifest")
    named = [row for row, p in enumerate(prompts) if p.image_id is not None or p.image_ids is not None]
    if named:
        raise ManifestError(
            f"{config.prompts}: column 'image_id' names images, but no images manifest was given "
            f"(rows {', '.join(map(str, named[:10]))})"
        )
