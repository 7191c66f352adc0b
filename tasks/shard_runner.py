"""Turn a shard's image jobs into result rows: images → requests → endpoint → rows.

One ``ShardRunner`` per run, shared by all shard tasks in the run's event loop: it owns the endpoint
client, the semaphore that bounds requests in flight across the whole run (held only while a request
is on the wire, never during backoff), and the thread pool that prepares images. Every failure
becomes a row; nothing escapes a shard but cancellation.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError as SchemaValidationError
from jsonschema.validators import validator_for

from tasks.config import RunConfig
from tasks.endpoint import Answer, EndpointClient
from tasks.errors import ItemFailure, RequestFailure
from tasks.image_sources import parse_image_value
from tasks.images import PreparedImage, load_image
from tasks.manifests import Prompt
from tasks.requests import build_chat_request
from tasks.results import ResultRow
from tasks.retry import RetryPolicy
from tasks.work_items import ImageJob, Shard, item_id

ProgressCallback = Callable[[ResultRow], None]


class ShardRunner:
    def __init__(
        self,
        config: RunConfig,
        *,
        image_root: Path,
        manifest_dir: Path,
        run_id: str,
        on_row: ProgressCallback | None = None,
        retry_policy: RetryPolicy | None = None,
    ) -> None:
        self.config = config
        self.image_root = image_root
        self.manifest_dir = manifest_dir
        self.run_id = run_id
        self.on_row = on_row
        self.policy = retry_policy or RetryPolicy(max_retries=config.endpoint.max_retries)
        self.requests = asyncio.Semaphore(config.endpoint.concurrency)
        # images held in memory at once: enough to keep every request slot busy, no more
        self.images_in_progress = asyncio.Semaphore(config.endpoint.concurrency + 2 * (os.cpu_count() or 2))
        self.pool = ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="vlmbatch-image")
        self.client: EndpointClient | None = None if config.dry_run else EndpointClient(config.endpoint)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def run(self, shard: Shard) -> list[ResultRow]:
        groups = await asyncio.gather(*(self._job(job) for job in shard.jobs))
        return [row for rows in groups for row in rows]

    async def _job(self, job: ImageJob) -> list[ResultRow]:
        async with self.images_in_progress:
            try:
                source = parse_image_value(job.value, manifest_dir=self.manifest_dir)
                loop = asyncio.get_running_loop()
                image = await loop.run_in_executor(
                    self.pool, lambda: load_image(source, self.config.image, image_root=self.image_root)
                )
            except ItemFailure as failure:
                return [self._emit(self._row(job, p).fail(failure)) for p in job.prompts]
            return list(await asyncio.gather(*(self._ask(job, p, image) for p in job.prompts)))

    def _row(self, job: ImageJob, prompt: Prompt, image: PreparedImage | None = None) -> ResultRow:
        row = ResultRow(
            image_id=job.image_id,
            prompt_id=prompt.prompt_id,
            task=prompt.task,
            status="ok",
            model=self.config.endpoint.model,
            run_id=self.run_id,
            carry=job.carry,
        )
        if image is not None:
            row.image_sha256 = image.sha256
            row.image_width, row.image_height = image.width, image.height
            row.sent_width, row.sent_height = image.sent_width, image.sent_height
        return row

    async def _ask(self, job: ImageJob, prompt: Prompt, image: PreparedImage) -> ResultRow:
        row = self._row(job, prompt, image)
        request = build_chat_request(prompt, image.url, image.sha256, self.config)
        row.request_key = request.key
        if self.client is None:  # dry run: everything but the request
            pass  # status stays "ok": ready to send
            return self._emit(row)
        client = self.client
        rid = item_id(job.image_id, prompt.prompt_id)

        async def attempt() -> Answer:
            row.attempts += 1
            async with self.requests:
                try:
                    return await client.chat(request.body, request_id=rid)
                except RequestFailure as failure:
                    row.http_status = failure.http_status
                    raise

        try:
            answer = await self.policy.call(attempt)
            _fill(row, answer, prompt)
        except ItemFailure as failure:
            attempts = row.attempts
            row.fail(failure)
            if failure.retryable and attempts > 1:
                row.error_message = f"{failure.message} (after {attempts} attempts)"
        return self._emit(row)

    def _emit(self, row: ResultRow) -> ResultRow:
        if self.on_row is not None:
            self.on_row(row)
        return row


def _fill(row: ResultRow, answer: Answer, prompt: Prompt) -> None:
    row.text = answer.text
    row.reasoning = answer.reasoning
    row.finish_reason = answer.finish_reason
    row.prompt_tokens = answer.prompt_tokens
    row.completion_tokens = answer.completion_tokens
    row.http_status = answer.http_status
    row.latency_ms = answer.latency_ms
    row.model = answer.model or row.model
    if prompt.json_schema is not None:
        row.json = validate_json(answer.text, prompt.json_schema)


def validate_json(text: str | None, schema_text: str) -> str:
    """The answer as compact JSON if it parses and validates, else an invalid_json failure."""
    try:
        value = json.loads(text or "")
    except ValueError as exc:
        raise RequestFailure("invalid_json", f"the answer is not JSON: {exc}") from None
    schema = json.loads(schema_text)
    validator: Draft202012Validator = validator_for(schema)(schema)
    try:
        validator.validate(value)
    except SchemaValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise RequestFailure(
            "invalid_json", f"the answer does not match the schema at {where}: {exc.message}"
        ) from None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
