"""Turn a shard's image jobs into result rows: images → requests → endpoint → rows.

One ``ShardRunner`` per run, shared by all shard tasks in the run's event loop: it owns the image
loader (tasks/images/loader.py) and the item sender (tasks/endpoint/sender.py: request slots, rate limits,
retries, outage detection). Every failure becomes a row; nothing escapes a shard but cancellation.

A job is one image with its prompts, one multi-image prompt, or a text-only prompt. A job's prompts
are asked at once, except chained ones, asked when their parent has answered (tasks/inputs/chains.py).
Resume: an item whose row in OUT is ``ok`` with the same request key is skipped; its image's sha256
comes from the hash cache when possible, so a rerun of a finished job reads no image; a done parent's
answer is read back from OUT when a child of it must be asked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from tasks.config import RunConfig
from tasks.cpus import usable_cpus
from tasks.endpoint.preflight import PreflightResult
from tasks.endpoint.requests import History, Image, Images, RequestKeys, build_request, image_ref
from tasks.endpoint.sender import ItemSender
from tasks.errors import ItemFailure
from tasks.images.loader import ImageLoader, Loaded
from tasks.images.prepare import PreparedImage
from tasks.images.sources import ImageSource, is_http, parse_image_value
from tasks.inputs.chains import Pending, Turn, children_of, descendants, history_of, pending_prompts
from tasks.inputs.prompt import Prompt
from tasks.inputs.work_items import NO_IMAGE, ImageJob, ManyImages, Shard
from tasks.outputs.index import HashCache, OutputIndex, StoredAnswers
from tasks.outputs.store import OutputStore
from tasks.retry import RetryPolicy
from tasks.row import ResultRow
from tasks.stopping import StopSwitch


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
        checked: PreflightResult | None = None,
    ) -> None:
        self.config = config
        self.image_root = image_root
        self.manifest_dir = manifest_dir
        self.run_id = run_id
        self.stop = stop
        self.store = store
        self.index = index or OutputIndex.empty()
        self.stored = StoredAnswers(self.index)  # done parents' answers, for their chained children
        self.keys = RequestKeys(config)
        self.on_row = on_row
        self.skipped = 0
        self.skipped_in: dict[int, int] = {}  # by shard, while it runs
        # images held in memory at once: enough to keep every request slot busy, no more
        cap = config.endpoint.total_in_flight
        self.workers = cap + 2 * usable_cpus()
        self.images_in_progress = asyncio.Semaphore(self.workers)
        self._handed_out = asyncio.Event()  # set once the last shard started has handed out its jobs
        self._handed_out.set()
        self.sender = None if config.dry_run else ItemSender(config, stop, retry_policy, api_key, checked)
        self.images = ImageLoader(
            config, image_root=image_root, hashes=hashes, use_cache=bool(len(self.index)) and not config.force
        )

    async def aclose(self) -> None:
        if self.sender is not None:
            await self.sender.aclose()
        await self.images.aclose()

    async def drop_done(self, shard: Shard) -> tuple[Shard, int]:
        """Resuming: the shard without its finished jobs, and how many work items those held (counted
        as skipped here). One pass on a worker thread, before any Prefect task starts for the shard."""
        if not self.images.use_cache:
            return shard, 0
        loop = asyncio.get_running_loop()
        jobs, done = await loop.run_in_executor(self.images.pool, self._left_to_do, shard.jobs)
        self._count_skipped(done)
        return Shard(shard.index, jobs), done

    async def run(self, shard: Shard) -> int:
        """Run a shard's jobs; returns how many of its work items were skipped as done.

        A few workers take the jobs in order, not a task per job: a shard of a million jobs would
        otherwise hold a million coroutines (~2 KB each) while a few hundred of them can move.

        Overlapping shards hand out their jobs one after another, in the order they started: a shard
        begins once the one before it has handed out its last job, so its images are prepared while
        that one's last requests are in flight. Side by side, two shards ended together: both waited
        on their last answers with no job of theirs left to fill the slots those freed, and the next
        shard only started then (at C=256: up to 0.14 s of the whole endpoint idle at such a boundary).
        """
        jobs = iter(shard.jobs)
        earlier, handed_out = self._handed_out, asyncio.Event()
        self._handed_out = handed_out

        async def worker() -> None:
            for job in jobs:  # shared: each job is taken by one worker
                await self._job(shard.index, job)
            handed_out.set()

        try:
            await earlier.wait()  # the shard started before this one has handed out all its jobs
            await asyncio.gather(*(worker() for _ in range(min(self.workers, len(shard.jobs)))))
        finally:
            handed_out.set()  # a later shard is never held up, not even by a failed or cancelled one
        return self.skipped_in.pop(shard.index, 0)

    def _left_to_do(self, jobs: list[ImageJob]) -> tuple[list[ImageJob], int]:
        """The jobs with work left, and the number of work items of the others: those whose image hash
        is in the cache and whose prompts are all done. No image is read and no coroutine made for them,
        which is what keeps the rerun of a finished job cheap (bench/rerun.py). Runs on a worker thread.
        """
        left: list[ImageJob] = []
        done = 0
        for job in jobs:
            known, ref = self._cached_ref(job)
            if known and not self._pending(job.image_id, job.prompts, ref).prompts:
                done += len(job.prompts)
            else:
                left.append(job)
        return left, done

    def _cached_ref(self, job: ImageJob) -> tuple[bool, str | None]:
        """(known, the job's image reference for its request keys) without reading the image."""
        if job.value is NO_IMAGE:
            return True, None
        if isinstance(job.value, ManyImages):
            return False, None
        try:
            source = parse_image_value(job.value, manifest_dir=self.manifest_dir)
        except ItemFailure:
            return False, None
        if is_http(source) and not self.images.fetches:
            return True, f"url:{source.value!s}"
        sha = self.images.cached_sha256(source)
        return sha is not None, image_ref(sha) if sha is not None else None

    # images ------------------------------------------------------------------------------------

    async def _job(self, shard_index: int, job: ImageJob) -> None:
        async with self.images_in_progress:
            if self.stop.is_set:
                return
            if job.value is NO_IMAGE:
                await self._ask_all(shard_index, job, None, None)
                return
            if isinstance(job.value, ManyImages):
                await self._many(shard_index, job, job.value)
                return
            try:
                source = parse_image_value(job.value, manifest_dir=self.manifest_dir)
            except ItemFailure as failure:
                self._fail_unreadable(shard_index, job, failure)
                return
            if is_http(source) and not self.images.fetches:  # --image-urls pass: the server fetches it
                url = str(source.value)
                await self._ask_all(shard_index, job, url, f"url:{url}")
                return
            async with self.images.turn(source):  # read to prepared without letting others cut in
                try:
                    loaded = await self.images.load(source)
                except ItemFailure as failure:
                    self._fail_unreadable(shard_index, job, failure)
                    return
                if self.store is not None and loaded.fingerprint is not None and loaded.data is not None:
                    self.store.remember(shard_index, loaded.fingerprint, loaded.sha256)  # new to the cache
                pending = self._pending(job.image_id, job.prompts, image_ref(loaded.sha256))
                self._skip(shard_index, len(job.prompts) - len(pending.prompts))
                if not pending.prompts:
                    return
                try:
                    image = await self.images.prepare(source, loaded)
                except ItemFailure as failure:
                    for p in pending.prompts:
                        self._emit(shard_index, self._row(job, p, sha256=loaded.sha256).fail(failure))
                    return
            await self._ask_all(shard_index, job, image.url, image_ref(image.sha256), image, pending)

    async def _many(self, shard_index: int, job: ImageJob, many: ManyImages) -> None:
        """A multi-image prompt: every image read (and prepared) first, then one request with all."""
        prompt = job.prompts[0]
        urls: list[Image] = []
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
            self._skip(shard_index, 1)
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
        url: Image | None,
        ref: str | None,
        image: PreparedImage | None = None,
        pending: Pending | None = None,
    ) -> None:
        """Ask the job's pending prompts: roots at once, each chained prompt once its parent answered."""
        if pending is None:  # a passed-through URL or no image: nothing read here, the key uses the URL
            pending = self._pending(job.image_id, job.prompts, ref)
            self._skip(shard_index, len(job.prompts) - len(pending.prompts))
        kids = children_of(pending.prompts)
        waiting = {p.prompt_id for p in pending.prompts}
        by_id = {p.prompt_id: p for p in job.prompts}
        roots = [p for p in pending.prompts if p.parent_prompt_id not in waiting]
        chains = [
            self._chain(
                shard_index,
                job,
                p,
                history_of(p, pending.answers, by_id),
                kids,
                url,
                ref,
                image,
                recheck=False,
            )
            for p in roots
        ]
        if len(chains) == 1:  # the common case: no task to wrap it in
            await chains[0]
        else:
            await asyncio.gather(*chains)

    def _pending(self, image_id: str | None, prompts: list[Prompt], ref: Images) -> Pending:
        """The prompts not yet done, and the stored answers of done parents (tasks/inputs/chains.py)."""
        if self.config.force or not len(self.index):
            return Pending(list(prompts), {})
        return pending_prompts(
            prompts,
            lambda p, history: self._done(image_id, p, ref, history),
            lambda p: self.stored.text(image_id, p.prompt_id),
        )

    def _done(self, image_id: str | None, prompt: Prompt, ref: Images, history: History = ()) -> bool:
        if self.config.force or not len(self.index):
            return False
        return self.index.is_done(image_id, prompt.prompt_id, self.keys.key(prompt, ref, history))

    async def _chain(
        self,
        shard_index: int,
        job: ImageJob,
        prompt: Prompt,
        history: History | None,
        kids: dict[str, list[Prompt]],
        url: Images,
        ref: Images,
        image: PreparedImage | None,
        recheck: bool = True,
    ) -> None:
        """Ask ``prompt`` (``history``: its conversation so far), then its chained children.

        ``recheck``: whether it may be done already. Not for a job's roots, which ``_pending`` checked;
        yes for a child whose parent was just answered, since the answer may be the one stored.
        """
        below = kids.get(prompt.prompt_id, [])
        if history is None:  # its parent is in no job with it: nothing to continue
            failure = ItemFailure("parent_failed", f"parent prompt {prompt.parent_prompt_id!r} was not asked")
            for p in [prompt, *descendants(prompt, kids)]:
                self._emit(shard_index, self._row(job, p, image).fail(failure))
            return
        if recheck and history and self._done(job.image_id, prompt, ref, history):  # answered as before
            text = self.stored.text(job.image_id, prompt.prompt_id)
            if text is not None or not below:
                self._skip(shard_index, 1)
                turns = (*history, Turn(prompt, text or ""))
                await asyncio.gather(
                    *(self._chain(shard_index, job, c, turns, kids, url, ref, image) for c in below)
                )
                return
        row = await self._ask(shard_index, job, prompt, url, ref, image, history)
        if row is None or not below:
            return
        if self.sender is None:  # dry run: the children are ready; their keys need the parent's answer
            for p in descendants(prompt, kids):
                self._emit(shard_index, self._row(job, p, image))
            return
        if row.status != "ok" or row.text is None:
            why = (
                row.error_type if row.status != "ok" else f"no answer text, finish_reason {row.finish_reason}"
            )
            failure = ItemFailure(
                "parent_failed",
                f"prompt {prompt.prompt_id!r}, earlier in the chain, failed ({why}); not sent",
            )
            for p in descendants(prompt, kids):
                self._emit(shard_index, self._row(job, p, image).fail(failure))
            return
        turns = (*history, Turn(prompt, row.text))
        await asyncio.gather(*(self._chain(shard_index, job, c, turns, kids, url, ref, image) for c in below))

    def _fail_unreadable(self, shard_index: int, job: ImageJob, failure: ItemFailure) -> None:
        for p in job.prompts:
            found = None if self.config.force else self.index.lookup(job.image_id, p.prompt_id)
            if found is not None and found[0]:
                self._skip(shard_index, 1)  # an answer we have is never replaced by "the image is gone now"
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
        history: History = (),
    ) -> ResultRow | None:
        """Send one work item with retries and emit its row; returns the row, or None if dropped."""
        row = self._row(job, prompt, image)
        request = build_request(prompt, url, ref, self.config, history, self.keys)
        row.request_key = request.key
        if self.sender is None:  # dry run: everything but the request (status stays "ok": ready)
            self._emit(shard_index, row)
            return row
        if not await self.sender.fill(row, request):
            return None  # the run is stopping: the item is left for the rerun
        self._emit(shard_index, row)
        return row

    def _emit(self, shard_index: int, row: ResultRow) -> None:
        if self.store is not None:
            self.store.add(shard_index, row)
        if self.on_row is not None:
            self.on_row(row)

    def _skip(self, shard_index: int, count: int) -> None:
        self.skipped_in[shard_index] = self.skipped_in.get(shard_index, 0) + count
        self._count_skipped(count)

    def _count_skipped(self, count: int) -> None:
        self.skipped += count
        if self.on_row is not None:
            for _ in range(count):
                self.on_row(None)
