"""Send one work item's request: rate limit, a request slot, retries, and the repair of a JSON answer or a
function call that does not validate.

One ``ItemSender`` per run, shared by all its shards, the one place that sends: it owns the replica
router (tasks/endpoint/replicas.py: each replica's client and in-flight limit; a slot is held while a
request waits for its rate permit and while it is on the wire, never during backoff), the rate
limiter, the retry policy (the only one: tasks/retry.py) and the outage detector, which stops the run
when the endpoint (every replica of it) stays unusable. Each attempt asks the router for a slot, so a
retry goes to another replica when the item failed on one and another is usable.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import Iterator

from tasks.config import RunConfig, public_url
from tasks.endpoint.answers import Answer
from tasks.endpoint.client import api_keys
from tasks.endpoint.concurrency import OVERLOAD_STATUS, rate_limiter
from tasks.endpoint.outage import OutageDetector, is_outage_failure
from tasks.endpoint.preflight import PreflightResult
from tasks.endpoint.replicas import Replica, Router
from tasks.endpoint.requests import REPAIR_PROMPT, Request, repair_request
from tasks.endpoint.structured import validate_json
from tasks.endpoint.tools import CALL_REPAIR_PROMPT, calls_text, checked_calls, schema_document
from tasks.errors import ItemFailure, RequestFailure
from tasks.inputs.work_items import item_id
from tasks.retry import RetryPolicy
from tasks.row import ResultRow
from tasks.stopping import StopSwitch

log = logging.getLogger(__name__)


class _Dropped(Exception):
    """The item was not finished because the run is stopping: it gets no row."""


class ItemSender:
    def __init__(
        self,
        config: RunConfig,
        stop: StopSwitch,
        retry_policy: RetryPolicy | None,
        api_key: str | None,
        checked: PreflightResult | None = None,
    ) -> None:
        """``api_key``: every replica's key (a Secret block's), or None for each one's own variable;
        ``checked``: the preflight's word on each replica (dropped ones get nothing, waiting ones
        start set aside)."""
        endpoint = config.endpoint
        urls = endpoint.base_urls
        self.stop = stop
        self.policy = retry_policy or RetryPolicy(max_retries=endpoint.max_retries, sleep=stop.sleep)
        several = len(urls) > 1
        self.detector = OutageDetector(
            window=endpoint.outage_window,
            describe="every replica" if several else public_url(urls[0]),
            max_wait=self.policy.max_retry_after,
            replicas=[public_url(url) for url in urls] if several else (),
        )
        self.router = Router(
            endpoint, api_keys(endpoint, api_key), stop=stop, detector=self.detector, checked=checked
        )
        self.rate = rate_limiter(",".join(urls), endpoint.rpm, endpoint.tpm)
        self.nonce = secrets.token_hex(4)  # this run's part of every X-Request-Id

    async def aclose(self) -> None:
        await self.router.aclose()

    async def fill(self, row: ResultRow, request: Request) -> bool:
        """Send ``request`` with retries and fill ``row`` with its answer or failure.

        False when the item is dropped (the run is stopping, or the endpoint is down and the run
        stops): it gets no row, and the rerun asks it.
        """
        try:
            answer = await self._send(row, request, row_id(row))
            _take(row, answer, request)
            # an ok row has its answer (README, "Output": text null only when failed or a function call);
            # "" or blanks are none
            if not _answered(answer):
                raise ItemFailure("no_answer", _no_answer(answer), http_status=answer.http_status)
            if request.json_schema is not None:
                row.json = await self._valid_json(row, request, answer, request.json_schema)
            elif request.tools is not None and answer.tool_calls:
                row.tool_calls = await self._valid_calls(row, request, answer, request.tools)
        except _Dropped:
            return False
        except ItemFailure as failure:
            if (
                self.stop.is_set
                and isinstance(failure, RequestFailure)
                and is_outage_failure(failure, self.detector.max_wait)
            ):
                return False
            attempts = row.attempts
            row.fail(failure)
            if failure.retryable and attempts > 1:
                row.error_message = f"{failure.message} (after {attempts} attempts)"
        except Exception as exc:  # a bug here must cost one row, not the shard's rows and the run
            log.exception("image %r, prompt %r: failed inside vlmbatch", row.image_id, row.prompt_id)
            row.fail(
                ItemFailure("internal_error", f"vlmbatch failed on this item: {type(exc).__name__}: {exc}")
            )
        return True

    async def _send(self, row: ResultRow, request: Request, rid: str) -> Answer:
        """Send with retries; every attempt counted on the row. Raises ItemFailure or _Dropped."""
        router = self.router
        tried: set[Replica] = set()  # the replicas this item failed on: its retries go elsewhere first

        async def attempt() -> Answer:
            if self.stop.is_set:
                raise _Dropped
            row.attempts += 1
            async with router.slot(tried) as lease:
                if lease is None:  # the run stopped while this waited for a slot
                    row.attempts -= 1
                    raise _Dropped
                # the rate's permit once the slot is held: a request cleared to go then goes at once,
                # where permits taken first piled up behind the slots and went out in a burst
                await self.rate.take(request.cost, self.stop)
                if self.stop.is_set:
                    row.attempts -= 1
                    raise _Dropped
                replica = lease.replica
                replica.requests += 1
                row.replica = replica.name
                try:
                    # unique per attempt and run: vLLM takes X-Request-Id as its engine request id,
                    # and refuses one that is still running (a timed-out attempt may still be)
                    request_id = f"{rid}-{self.nonce}-{row.attempts}"
                    answer = await replica.client.send(request, request_id=request_id)
                except RequestFailure as failure:
                    row.latency_ms = failure.latency_ms  # README.md, "Output": of the last attempt
                    row.http_status = failure.http_status
                    lease.slot.overloaded = failure.http_status in OVERLOAD_STATUS
                    tried.add(replica)
                    router.failed(replica, failure)
                    failure.retry_elsewhere = router.several and failure.retryable and router.elsewhere(tried)
                    raise
                lease.slot.latency = answer.latency_ms / 1000
            router.succeeded(replica, answer.latency_ms)
            return answer

        return await self.policy.call(attempt)

    async def _valid_json(self, row: ResultRow, request: Request, answer: Answer, schema: str) -> str:
        """The validated JSON of the answer; one repair request (the error fed back) when it is not."""
        try:
            return validate_json(row.text, schema)
        except RequestFailure as failure:
            given: str | None = row.text
            feedback = REPAIR_PROMPT
            if answer.tool_calls:  # --structured-output tools: the call given back, to be made again
                given, feedback = calls_text(answer.tool_calls), CALL_REPAIR_PROMPT
            repaired = await self._repair(row, request, given, failure, feedback)
        with _last_status(repaired):
            return validate_json(row.text, schema)

    async def _valid_calls(self, row: ResultRow, request: Request, answer: Answer, tools: str) -> str | None:
        """The answer's calls checked against their functions' parameters (the ``tool_calls`` column);
        one repair request, as for a JSON answer, when they are not. Null when the repaired answer
        is text instead of a call (a prompt whose tool_choice lets the model answer in text)."""
        try:
            return checked_calls(answer.tool_calls, tools)
        except RequestFailure as failure:
            given = calls_text(answer.tool_calls)
            repaired = await self._repair(row, request, given, failure, CALL_REPAIR_PROMPT)
        with _last_status(repaired):
            if not _answered(repaired):
                raise RequestFailure("invalid_json", "the repair got neither a function call nor text")
            return checked_calls(repaired.tool_calls, tools) if repaired.tool_calls else None

    async def _repair(
        self, row: ResultRow, request: Request, given: str | None, failure: RequestFailure, feedback: str
    ) -> Answer:
        """Send the one repair request (``given``: the answer as it is given back); the row takes its
        answer, and counts the tokens of both requests, as both are billed."""
        again = repair_request(request, given, failure.message, feedback)
        repaired = await self._send(row, again, row_id(row))
        spent = (row.prompt_tokens, row.completion_tokens)
        _take(row, repaired, request)
        row.prompt_tokens = _plus(spent[0], repaired.prompt_tokens)
        row.completion_tokens = _plus(spent[1], repaired.completion_tokens)
        return repaired


@contextlib.contextmanager
def _last_status(answer: Answer) -> Iterator[None]:
    """A failure raised inside has the repaired answer's HTTP status (README, "Output": the last one, 200)."""
    try:
        yield
    except RequestFailure as failure:
        failure.http_status = answer.http_status
        raise


def _answered(answer: Answer) -> bool:
    return bool((answer.text or "").strip() or answer.tool_calls)


def _plus(a: int | None, b: int | None) -> int | None:
    return None if a is None and b is None else (a or 0) + (b or 0)


def row_id(row: ResultRow) -> str:
    return item_id(row.image_id, row.prompt_id)


def _no_answer(answer: Answer) -> str:
    if answer.finish_reason == "length":
        spent = f"{answer.completion_tokens} tokens" if answer.completion_tokens is not None else "all of it"
        on = ", on reasoning" if answer.reasoning else ""
        return (
            f"the model gave no answer text: the output budget ran out ({spent}{on}); "
            "raise --max-tokens or the prompt's max_tokens"
        )
    what = "no answer text" if answer.text is None else f"an empty answer ({answer.text!r})"
    return f"the model gave {what} (finish_reason {answer.finish_reason!r})"


def _take(row: ResultRow, answer: Answer, request: Request) -> None:
    """The row takes the answer: its text is the JSON document of a json_schema prompt (the call's
    arguments with --structured-output tools), the prefill and its continuation, or null beside a
    function call when blank (vLLM sends "")."""
    _fill(row, answer, request.keep_reasoning)
    if request.json_schema is not None:
        row.text = schema_document(answer)
    if answer.tool_calls and not (row.text or "").strip():
        row.text = None
    if request.prefill is not None and row.text is not None:
        row.text = request.prefill + row.text


def _fill(row: ResultRow, answer: Answer, keep_reasoning: bool) -> None:
    """``keep_reasoning``: reasoning is stored when it was on, else null, though a server may think anyway
    (README.md, "Output")."""
    row.text = answer.text
    row.reasoning = answer.reasoning if keep_reasoning else None
    row.finish_reason = answer.finish_reason
    row.prompt_tokens = answer.prompt_tokens
    row.completion_tokens = answer.completion_tokens
    row.http_status = answer.http_status
    row.latency_ms = answer.latency_ms
    row.model = answer.model or row.model
