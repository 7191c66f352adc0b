"""Classification of endpoint failures, without sockets."""

import asyncio
import json

import aiohttp
import httpx2
import pytest
from aiohttp.client_reqrep import ConnectionKey

from tasks.endpoint.answers import StreamAggregator, parse_chat_answer, parse_responses_answer
from tasks.endpoint.client import classify, classify_status, error_message
from tasks.endpoint.structured import validate_json
from tasks.errors import RequestFailure
from tasks.retry import parse_retry_after


@pytest.mark.parametrize(
    ("status", "error_type", "retryable"),
    [
        (400, "bad_request", False),
        (413, "bad_request", False),
        (422, "bad_request", False),
        (401, "auth", False),
        (403, "auth", False),
        (404, "not_found", False),
        (408, "timeout", True),
        (409, "server_error", True),
        (429, "rate_limited", True),
        (500, "server_error", True),
        (502, "server_error", True),
        (503, "server_error", True),
        (504, "server_error", True),
    ],
)
def test_status_classes(status: int, error_type: str, retryable: bool) -> None:
    failure = classify_status(status, {}, {"error": {"message": "boom"}})
    assert (failure.error_type, failure.retryable, failure.http_status) == (error_type, retryable, status)
    assert failure.message == "boom"


@pytest.mark.parametrize("status", [301, 307, 308])
def test_a_redirect_is_not_retried_and_says_where_it_points(status: int) -> None:
    failure = classify_status(status, {"Location": "https://gw.test/v1/chat/completions"}, None)
    assert (failure.error_type, failure.retryable, failure.http_status) == ("bad_request", False, status)
    assert failure.message == (
        f"HTTP {status} redirect to https://gw.test/v1/chat/completions: set --base-url to where it points"
    )


def test_azure_424_is_classified_by_the_original_status() -> None:
    wrapped_400 = classify_status(424, {"ms-azureml-model-error-statuscode": "400"}, {"message": "bad image"})
    assert wrapped_400.error_type == "bad_request" and not wrapped_400.retryable
    assert "400" in wrapped_400.message and wrapped_400.http_status == 424
    wrapped_503 = classify_status(424, {"ms-azureml-model-error-statuscode": "503"}, None)
    assert wrapped_503.error_type == "server_error" and wrapped_503.retryable
    assert classify_status(424, {}, None).retryable


def test_error_bodies_nested_flat_and_plain() -> None:
    assert error_message({"error": {"message": "nested", "code": 400}}) == "nested"
    assert error_message({"object": "error", "message": "flat", "code": 400}) == "flat"
    assert error_message({"error": "Unauthorized"}) == "Unauthorized"
    assert error_message("plain text") == "plain text"
    assert error_message(None) is None


def test_retry_after_forms() -> None:
    assert parse_retry_after(httpx2.Headers({"retry-after": "3"})) == 3.0
    assert parse_retry_after(httpx2.Headers({"retry-after-ms": "250", "retry-after": "9"})) == 0.25
    assert parse_retry_after(httpx2.Headers({})) is None
    assert parse_retry_after(httpx2.Headers({"retry-after": "soon"})) is None
    http_date = parse_retry_after(httpx2.Headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}))
    assert http_date == 0.0  # in the past: no wait


def test_transport_exceptions_map_once() -> None:
    refused = aiohttp.ClientConnectorError(
        ConnectionKey("h", 1, False, True, None, None, None), OSError(111, "refused")
    )
    assert classify(refused).error_type == "connection"
    try:
        raise aiohttp.ClientOSError(104, "Connection reset by peer")
    except aiohttp.ClientOSError as exc:
        assert classify(exc).error_type == "connection"
    assert classify(aiohttp.ServerDisconnectedError()).error_type == "connection"
    assert classify(aiohttp.ClientPayloadError("cut short")).error_type == "connection"
    assert classify(ConnectionResetError()).error_type == "connection"
    assert classify(aiohttp.ServerTimeoutError("read")).error_type == "timeout"
    assert classify(aiohttp.ConnectionTimeoutError()).error_type == "timeout"
    assert classify(TimeoutError()).error_type == "timeout"
    assert classify(ValueError("weird")).error_type == "invalid_response"
    failure = RequestFailure("rate_limited", "slow", http_status=429, retry_after=2.0)
    assert classify(failure) is failure


def test_answer_parsing_prefers_reasoning_then_reasoning_content() -> None:
    def body(message: dict) -> bytes:
        return json.dumps(
            {
                "model": "m",
                "choices": [
                    {"message": {"role": "assistant", "content": "hi", **message}, "finish_reason": "length"}
                ],
                "usage": {"prompt_tokens": 5, "completion_tokens": 2},
            }
        ).encode()

    a = parse_chat_answer(body({"reasoning": "r1", "reasoning_content": "r2"}), status=200, latency_ms=1)
    assert (a.text, a.reasoning, a.finish_reason, a.prompt_tokens, a.completion_tokens) == (
        "hi",
        "r1",
        "length",
        5,
        2,
    )
    assert parse_chat_answer(body({"reasoning_content": "r2"}), status=200, latency_ms=1).reasoning == "r2"
    assert parse_chat_answer(body({}), status=200, latency_ms=1).reasoning is None


@pytest.mark.parametrize("content", [b'{"id": "x", "choices": [', b"{}", b'{"choices": []}', b"<html>"])
def test_malformed_answers_are_transient(content: bytes) -> None:
    with pytest.raises(RequestFailure) as err:
        parse_chat_answer(content, status=200, latency_ms=1)
    assert err.value.error_type == "invalid_response" and err.value.retryable


def chat_body(content: object = "hi", finish: object = "stop", **top: object) -> bytes:
    message = {"role": "assistant", "content": content}
    return json.dumps(
        {"model": "m", "choices": [{"message": message, "finish_reason": finish}], **top}
    ).encode()


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ({"text": "hi"}, "the message content is dict, not text"),
        (42, "the message content is int, not text"),
        ([{"type": "image"}], "the message content is list, not text"),
    ],
)
def test_an_answer_a_row_cannot_hold_is_a_transient_failure_that_says_why(content: object, why: str) -> None:
    with pytest.raises(RequestFailure) as err:
        parse_chat_answer(chat_body(content), status=200, latency_ms=1)
    assert err.value.error_type == "invalid_response" and err.value.retryable
    assert why in err.value.message
    agg = StreamAggregator()
    with pytest.raises(RequestFailure, match="a content delta is"):
        agg.feed("data: " + json.dumps({"choices": [{"delta": {"content": content}}]}))
    with pytest.raises(RequestFailure, match="unparseable answer"):
        StreamAggregator().feed('data: ["not", "a", "chunk"]')


def test_labels_and_token_counts_of_the_wrong_type_are_left_empty_not_failed() -> None:
    usage = {"prompt_tokens": "12", "completion_tokens": 2**40}
    a = parse_chat_answer(chat_body(finish=7, model=["m"], usage=usage), status=200, latency_ms=1)
    assert (a.text, a.finish_reason, a.model, a.prompt_tokens, a.completion_tokens) == (
        "hi",
        None,
        None,
        None,
        None,
    )
    parts = [{"type": "text", "text": "a "}, {"type": "text", "text": "cat"}]
    assert parse_chat_answer(chat_body(parts), status=200, latency_ms=1).text == "a cat"  # text parts joined


@pytest.mark.parametrize("finish", ["abort", "error"])
def test_a_generation_the_server_gave_up_on_is_retried_not_stored(finish: str) -> None:
    with pytest.raises(RequestFailure) as err:
        parse_chat_answer(chat_body("half an ans", finish), status=200, latency_ms=1)
    assert (
        err.value.error_type == "server_error" and err.value.retryable and repr(finish) in err.value.message
    )
    agg = StreamAggregator()
    agg.feed("data: " + json.dumps({"choices": [{"delta": {"content": "half"}, "finish_reason": finish}]}))
    with pytest.raises(RequestFailure, match="stopped the generation"):
        agg.answer(status=200, latency_ms=1)


def test_retry_policy_retries_only_transient_and_honours_retry_after() -> None:
    from tasks.retry import RetryPolicy

    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    policy = RetryPolicy(max_retries=3, sleep=fake_sleep)
    calls = 0

    async def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RequestFailure("rate_limited", "429", http_status=429, retry_after=2.0)
        if calls == 2:
            raise RequestFailure("server_error", "500", http_status=500)
        return "ok"

    assert asyncio.run(policy.call(flaky)) == "ok"
    assert calls == 3
    assert 2.0 <= slept[0] <= 2.3  # Retry-After honoured, with a little jitter
    assert 0 < slept[1] <= 30

    calls = 0

    async def bad() -> str:
        nonlocal calls
        calls += 1
        raise RequestFailure("bad_request", "400", http_status=400)

    with pytest.raises(RequestFailure, match="bad_request"):
        asyncio.run(policy.call(bad))
    assert calls == 1  # never retried

    calls = 0

    async def down() -> str:
        nonlocal calls
        calls += 1
        raise RequestFailure("connection", "refused")

    with pytest.raises(RequestFailure, match="connection"):
        asyncio.run(policy.call(down))
    assert calls == 4  # first attempt + max_retries
    backoffs = slept[2:]
    assert len(backoffs) == 3 and all(0 < b <= 30 for b in backoffs)
    # exponential from the first retry on: 0.5 s, 1 s, 2 s, each plus up to 0.5 s of jitter
    assert [0.5 <= backoffs[0] <= 1.0, 1.0 <= backoffs[1] <= 1.5, 2.0 <= backoffs[2] <= 2.5] == [True] * 3

    calls = 0
    with pytest.raises(RequestFailure, match="connection"):
        asyncio.run(RetryPolicy(max_retries=0, sleep=fake_sleep).call(down))
    assert calls == 1 and len(slept) == 5  # no retries: no wait


def test_responses_answers_and_streams_parse() -> None:
    body = {
        "model": "m",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [
            {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "think"}], "summary": []},
            {"type": "message", "content": [{"type": "output_text", "text": "ans", "annotations": []}]},
        ],
        "usage": {"input_tokens": 7, "output_tokens": 3},
    }
    a = parse_responses_answer(json.dumps(body).encode(), status=200, latency_ms=1)
    assert (a.text, a.reasoning, a.finish_reason, a.prompt_tokens, a.completion_tokens) == (
        "ans",
        "think",
        "length",
        7,
        3,
    )
    with pytest.raises(RequestFailure, match="invalid_response"):
        parse_responses_answer(b'{"status": "completed"}', status=200, latency_ms=1)

    agg = StreamAggregator()
    for line in [
        'data: {"model": "m", "choices": [{"delta": {"role": "assistant", "content": ""}}]}',
        "",
        'data: {"choices": [{"delta": {"reasoning_content": "hm"}}]}',
        'data: {"choices": [{"delta": {"content": "Hel"}}]}',
        'data: {"choices": [{"delta": {"content": "lo"}, "finish_reason": "stop"}]}',
        'data: {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 2}}',
        "data: [DONE]",
    ]:
        agg.feed(line)
    a = agg.answer(status=200, latency_ms=1)
    assert (a.text, a.reasoning, a.finish_reason, a.prompt_tokens) == ("Hello", "hm", "stop", 4)
    broken = StreamAggregator()
    broken.feed('data: {"choices": [{"delta": {"content": "Hel"}}]}')
    with pytest.raises(RequestFailure) as err:
        broken.feed('data: {"error": {"message": "engine died", "code": 500}}')
    assert err.value.error_type == "server_error" and err.value.retryable
    with pytest.raises(RequestFailure, match="ended before it was complete"):
        broken.answer(status=200, latency_ms=1)
    done_early = StreamAggregator()  # [DONE] after part of the answer, no finish_reason: cut, not ok
    for line in ['data: {"choices": [{"delta": {"content": "Hel"}}]}', "data: [DONE]"]:
        done_early.feed(line)
    with pytest.raises(RequestFailure) as err:
        done_early.answer(status=200, latency_ms=1)
    assert err.value.error_type == "invalid_response" and err.value.retryable


def test_json_nested_beyond_reading_is_an_invalid_json_failure() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(RequestFailure) as err:
        validate_json(deep, '{"type": "array"}')
    assert err.value.error_type == "invalid_json" and "nested too deeply" in err.value.message


@pytest.mark.parametrize("retry_after", [0.0, -5.0])
def test_a_retry_after_of_zero_or_less_gets_the_backoff_not_a_retry_at_once(retry_after: float) -> None:
    """A negative value or a date gone by (parsed as 0) says nothing: hammering the server is no answer."""
    from tasks.retry import RetryPolicy

    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    async def busy() -> str:
        raise RequestFailure("server_error", "503", http_status=503, retry_after=retry_after)

    with pytest.raises(RequestFailure):
        asyncio.run(RetryPolicy(max_retries=3, sleep=fake_sleep).call(busy))
    assert len(slept) == 3 and slept[0] >= 0.5 and slept[1] >= 1.0 and slept[2] >= 2.0


@pytest.mark.parametrize(
    ("status", "body", "message"),
    [
        (404, {"detail": "Not Found"}, "Not Found"),  # vLLM's (FastAPI's) own unknown route
        (
            422,
            {
                "detail": [
                    {"loc": ["body", "max_tokens"], "msg": "Input should be a valid integer", "type": "x"}
                ]
            },
            "body.max_tokens: Input should be a valid integer",
        ),
        (429, {"statusCode": 429, "message": "Rate limit is exceeded."}, "Rate limit is exceeded."),  # APIM
        (
            502,
            "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body><center><h1>502 Bad Gateway</h1>"
            "</center><hr><center>nginx</center></body></html>",
            "HTTP 502: 502 Bad Gateway",
        ),
        (
            500,
            "<!DOCTYPE html><html><body><p>Upstream &amp; friends\n  down</p></body></html>",
            "HTTP 500: Upstream & friends down",
        ),
        (503, "upstream connect error\n or disconnect", "HTTP 503: upstream connect error or disconnect"),
        (500, "", "HTTP 500"),
    ],
)
def test_error_bodies_of_every_shape_give_a_readable_message(status: int, body: object, message: str) -> None:
    assert classify_status(status, {}, body).message == message


def test_a_body_cut_short_says_so_not_http_400() -> None:
    """aiohttp's parser errors print as "400, message: ..." (its own code), which read as an HTTP 400."""
    from aiohttp.http_exceptions import ContentLengthError

    cut = aiohttp.ClientPayloadError("Response payload is not completed")
    cut.__cause__ = ContentLengthError("Not enough data to satisfy content length header.")
    failure = classify(cut)
    assert (failure.error_type, failure.retryable) == ("connection", True)
    assert (
        failure.message
        == "the answer was cut short or garbled: Not enough data to satisfy content length header."
    )
