"""Turn a shard's image jobs into result rows: images → requests → endpoint → rows.

One ``ShardRunner`` per run, shared by all shard tasks in the run's event loop: it owns the endpoint
client, the semaphore that bounds requests in flight across the whole run (held only while a request
is on the wire, never during backoff), the image loader (tasks/image_loader.py) and the outage
detector. Every failure becomes a row; nothing escapes a shard but cancellation.

A job is one image with its prompts, one multi-image prompt, or a text-only prompt. Resume: an item
whose row in OUT is ``ok`` with the same request key is skipped; its image's sha256 comes from the hash
cache when possible, so a rerun of a finished job reads no image.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

from tasks.answers import Answer
from tasks.concurrency import OVERLOAD_STATUS, InFlightLimiter, RateLimiter
from tasks.config import RunConfig
from tasks.endpoint import EndpointClient
from tasks.errors import ItemFailure, RequestFailure
from tasks.image_loader import ImageLoader, Loaded
from tasks.image_sources import ImageSource, is_http, parse_image_value
from tasks.images import PreparedImage
from tasks.manifests import Prompt
from tasks.outage import OutageDetector, is_outage_failure
from tasks.output_index import HashCache, OutputIndex
from tasks.outputs import OutputStore
from tasks.requests import Images, Request, build_request, image_ref, repair_request, request_key
from tasks.results import ResultRow
from tasks.retry import RetryPolicy
from tasks.stopping import StopSwitch
from tasks.structured import validate_json
from tasks.work_items import NO_IMAGE, ImageJob, ManyImages, Shard, item_id


class _Dropped(Exception):
    """The item was not finished because the run is stopping: it gets no row."""


class ShardRunner:
    def __init__(
        self,
        config: RunConfig,
        *,
        image_root: Path,
        manifest_dir: Path,
        run_id: str,
        stop: StopSwitch,
        store: OutputStore | None = None,
        index: OutputIndex | None = None,
        hashes: HashCache | None = None,
        on_row: Callable[[ResultRow | None], None] | None = None,
        retry_policy: RetryPolicy | None = None,
        api_key: str | None = None,
    ) -> None:
        self.config = config
        self.image_root = image_root
        self.manifest_dir = manifest_dir
        self.run_id = run_id
        self.stop = stop
        self.store = store
        self.index = index or OutputIndex.empty()
        self.on_row = on_row
        self.skipped = 0
        self.policy = retry_policy or RetryPolicy(max_retries=config.endpoint.max_retries, sleep=stop.sleep)
        self.detector = OutageDetector(
            window=config.endpoint.outage_window, describe=config.endpoint.base_url
        )
        endpoint = config.endpoint
        self.requests = InFlightLimiter(
            endpoint.in_flight_cap, adaptive=endpoint.concurrency == "auto", maximum=endpoint.in_flight_cap
        )
        self.rate = RateLimiter(endpoint.rpm, endpoint.tpm)
        # images held in memory at once: enough to keep every request slot busy, no more
        self.images_in_progress = asyncio.Semaphore(endpoint.in_flight_cap + 2 * (os.cpu_count() or 2))
        self.client: EndpointClient | None = (
            None if config.dry_run else EndpointClient(config.endpoint, api_key)
        )
        self.images = ImageLoader(
            config, image_root=image_root, hashes=hashes, use_cache=bool(len(self.index)) and not config.force
        )

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        await self.images.aclose()

    async def run(self, shard: Shard) -> None:
        await asyncio.gather(*(self._job(shard.index, job) for job in shard.jobs))

    # images ------------------------------------------------------------------------------------

    async def _job(self, shard_index: int, job: ImageJob) -> None:
        async with self.images_in_progress:
            if self.stop.is_set:
                return
            if job.value is NO_IMAGE:
                await self._ask_all(shard_index, job, job.prompts, None, None)
                return
            if isinstance(job.value, ManyImages):
                await self._many(shard_index, job, job.value)
                return
            try:
                source = parse_image_value(job.value, manifest_dir=self.manifest_dir)
                if is_http(source) and not self.images.fetches:  # --image-urls pass: the server fetches it
                    url = str(source.value)
                    await self._ask_all(shard_index, job, job.prompts, url, f"url:{url}")
                    return
                loaded = await self.images.load(source)
            except ItemFailure as failure:
                self._fail_unreadable(shard_index, job, failure)
                return
            if self.store is not None and loaded.fingerprint is not None:
                self.store.remember(shard_index, loaded.fingerprint, loaded.sha256)
            pending = [p for p in job.prompts if not self._done(job.image_id, p, image_ref(loaded.sha256))]
            self._skip(len(job.prompts) - len(pending))
            if not pending:
                return
            try:
                image = await self.images.prepare(source, loaded)
            except ItemFailure as failure:
                for p in pending:
                    self._emit(shard_index, self._row(job, p, sha256=loaded.sha256).fail(failure))
                return
            await self._ask_all(shard_index, job, pending, image.url, image_ref(image.sha256), image)

    async def _many(self, shard_index: int, job: ImageJob, many: ManyImages) -> None:
        """A multi-image prompt: every image read (and prepared) first, then one request with all."""
        prompt = job.prompts[0]
        urls: list[str] = []
        refs: list[str] = []
        loaded: list[tuple[ImageSource, Loaded | None]] = []
        current = job.image_id
        try:
            for current, value in many.images:  # noqa: B007 - named in the failure below
                source = parse_image_value(value, manifest_dir=self.manifest_dir)
                if is_http(source) and not self.images.fetches:  # --image-urls pass
                    loaded.append((source, None))
                    refs.append(f"url:{source.value!s}")
                    continue
                one = await self.images.load(source)
                if self.store is not None and one.fingerprint is not None:
                    self.store.remember(shard_index, one.fingerprint, one.sha256)
                loaded.append((source, one))
                refs.append(image_ref(one.sha256))
        except ItemFailure as failure:
            self._fail_unreadable(shard_index, job, failure.about(f"image {current!r}"))
            return
        if self._done(job.image_id, prompt, refs):
            self._skip(1)
            return
        prepared: list[PreparedImage] = []
        try:
            for (source, maybe), (current, _) in zip(loaded, many.images, strict=True):  # noqa: B007 - named in the failure below
                if maybe is None:
                    urls.append(str(source.value))
                    continue
                image = await self.images.prepare(source, maybe)
                prepared.append(image)
                urls.append(image.url)
        except ItemFailure as failure:
            row = self._row(job, prompt).fail(failure.about(f"image {current!r}"))
            self._emit(shard_index, row)
            return
        await self._ask(shard_index, job, prompt, urls, refs, prepared[0] if prepared else None)

    async def _ask_all(
        self,
        shard_index: int,
        job: ImageJob,
        prompts: list[Prompt],
        url: str | None,
        ref: str | None,
        image: PreparedImage | None = None,
    ) -> None:
        if image is None:  # a passed-through URL or no image: nothing read here, the key uses the URL
            prompts = [p for p in prompts if not self._done(job.image_id, p, ref)]
            self._skip(len(job.prompts) - len(prompts))
        await asyncio.gather(*(self._ask(shard_index, job, p, url, ref, image) for p in prompts))

    def _done(self, image_id: str | None, prompt: Prompt, ref: Images) -> bool:
        if self.config.force or not len(self.index):
            return False
        return self.index.is_done(image_id, prompt.prompt_id, request_key(prompt, ref, self.config))

    def _fail_unreadable(self, shard_index: int, job: ImageJob, failure: ItemFailure) -> None:
        for p in job.prompts:
            found = None if self.config.force else self.index.lookup(job.image_id, p.prompt_id)
            if found is not None and found[0]:
                self._skip(1)  # an answer we have is never replaced by "the image is gone now"
                continue
            self._emit(shard_index, self._row(job, p).fail(failure))

    # requests ----------------------------------------------------------------------------------

    def _row(
        self, job: ImageJob, prompt: Prompt, image: PreparedImage | None = None, sha256: str | None = None
    ) -> ResultRow:
        row = ResultRow(
            image_id=job.image_id,
            prompt_id=prompt.prompt_id,
            task=prompt.task,
            status="ok",
            model=self.config.endpoint.model,
            image_sha256=sha256,
            run_id=self.run_id,
            carry=job.carry,
        )
        if image is not None:
            row.image_sha256 = image.sha256
            row.image_width, row.image_height = image.width, image.height
            row.sent_width, row.sent_height = image.sent_width, image.sent_height
        return row

    async def _ask(
        self,
        shard_index: int,
        job: ImageJob,
        prompt: Prompt,
        url: Images,
        ref: Images,
        image: PreparedImage | None,
    ) -> None:
        row = self._row(job, prompt, image)
        request = build_request(prompt, url, ref, self.config)
        row.request_key = request.key
        if self.client is None:  # dry run: everything but the request (status stays "ok": ready)
            self._emit(shard_index, row)
            return
        try:
            answer = await self._send(row, request, item_id(job.image_id, prompt.prompt_id))
            _fill(row, answer)
            if prompt.json_schema is not None:
                row.json = await self._valid_json(row, request, answer, prompt.json_schema)
        except _Dropped:
            return
        except ItemFailure as failure:
            if self.stop.is_set and isinstance(failure, RequestFailure) and is_outage_failure(failure):
                return  # the endpoint is down or we are stopping: leave the item for the rerun
            attempts = row.attempts
            row.fail(failure)
            if failure.retryable and attempts > 1:
                row.error_message = f"{failure.message} (after {attempts} attempts)"
        self._emit(shard_index, row)

    async def _send(self, row: ResultRow, request: Request, rid: str) -> Answer:
        """Send with retries; every attempt counted on the row. Raises ItemFailure or _Dropped."""
        assert self.client is not None
        client = self.client

        async def attempt() -> Answer:
            if self.stop.is_set:
                raise _Dropped
            await self.rate.take(request.cost)
            row.attempts += 1
            async with self.requests.slot() as slot:
                if self.stop.is_set:
                    row.attempts -= 1
                    raise _Dropped
                try:
                    answer = await client.send(request, request_id=rid)
                except RequestFailure as failure:
                    row.http_status = failure.http_status
                    slot.overloaded = failure.http_status in OVERLOAD_STATUS
                    self._observe(failure)
                    raise
                slot.latency = answer.latency_ms / 1000
            self.detector.success()
            return answer

        return await self.policy.call(attempt)

    async def _valid_json(self, row: ResultRow, request: Request, answer: Answer, schema: str) -> str:
        """The validated JSON of the answer; one repair request (the error fed back) when it is not."""
        try:
            return validate_json(answer.text, schema)
        except RequestFailure as failure:
            repaired = await self._send(
                row, repair_request(request, answer.text, failure.message), row_id(row)
            )
        _fill(row, repaired)
        return validate_json(repaired.text, schema)

    def _observe(self, failure: RequestFailure) -> None:
        verdict = self.detector.failure(failure)
        if verdict is not None:
            self.stop.set("outage", verdict)

    def _emit(self, shard_index: int, row: ResultRow) -> None:
        if self.store is not None:
            self.store.add(shard_index, row)
        if self.on_row is not None:
            self.on_row(row)

    def _skip(self, count: int) -> None:
        self.skipped += count
        if self.on_row is not None:
            for _ in range(count):
                self.on_row(None)


def row_id(row: ResultRow) -> str:
    return item_id(row.image_id, row.prompt_id)


def _fill(row: ResultRow, answer: Answer) -> None:
    row.text = answer.text
    row.reasoning = answer.reasoning
    row.finish_reason = answer.finish_reason
    row.prompt_tokens = answer.prompt_tokens
    row.completion_tokens = answer.completion_tokens
    row.http_status = answer.http_status
    row.latency_ms = answer.latency_ms
    row.model = answer.model or row.model
