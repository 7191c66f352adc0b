"""Several replicas: config, routing, ejection and readmission, pauses, the outage verdict, the summary, and
reruns into an OUT written before the ``replica`` column (unit level; tests/test_replicas_e2e.py runs three
emulators)."""

from __future__ import annotations

import asyncio
from collections import Counter
from itertools import pairwise
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.config import EndpointConfig, build_config, public_url
from tasks.endpoint import replicas as replicas_module
from tasks.endpoint.client import api_keys
from tasks.endpoint.outage import OutageDetector
from tasks.endpoint.preflight import PreflightResult
from tasks.endpoint.replicas import COOLDOWN_S, EJECT_AFTER, MAX_COOLDOWN_S, Replica, Router
from tasks.errors import RequestFailure, UsageError
from tasks.outputs.reading import check_schema
from tasks.retry import RetryPolicy
from tasks.row import LATER_COLUMNS, OUTPUT_SCHEMA, output_schema
from tasks.stopping import StopSwitch
from tests.builders import Clock

BASE = {"images": "in.parquet", "out": "out"}
URLS = ["http://a:8000/v1", "http://b:8000/v1", "http://c:8000/v1"]


# --- config ----------------------------------------------------------------------------------------------


def test_one_base_url_is_the_plain_string_it_always_was() -> None:
    for given in ("http://gpu:8000/v1/", ["http://gpu:8000/v1"]):
        endpoint = build_config({**BASE, "base_url": given}, environ={}).endpoint
        assert endpoint.base_url == "http://gpu:8000/v1" and endpoint.base_urls == ("http://gpu:8000/v1",)
        assert endpoint.api_key_envs == ("VLMBATCH_API_KEY",) and endpoint.total_in_flight == 32


def test_several_base_urls_from_flags_environment_toml_and_a_deployments_config(tmp_path: Path) -> None:
    flags = build_config({**BASE, "base_url": URLS, "concurrency": "8"}, environ={}).endpoint
    env = build_config(BASE, environ={"VLMBATCH_BASE_URL": " , ".join(URLS)}).endpoint
    toml = tmp_path / "c.toml"
    toml.write_text(f"base-url = {URLS!r}\n".replace("'", '"'))
    from_file = build_config(BASE, environ={}, config_file=toml).endpoint
    yaml_like = EndpointConfig.model_validate({"base_url": URLS})  # prefect.yaml's config: a list
    for endpoint in (flags, env, from_file, yaml_like):
        assert endpoint.base_urls == tuple(URLS)
    assert flags.in_flight_cap == 8 and flags.total_in_flight == 24  # --concurrency is per replica
    assert flags.model_dump(mode="json")["base_url"] == URLS  # a flow parameter: a list


def test_per_replica_key_variables_in_order_and_never_the_keys() -> None:
    cfg = build_config({**BASE, "base_url": URLS[:2], "api_key_env": ["KEY_A", "KEY_B"]}, environ={})
    assert cfg.endpoint.api_key_envs == ("KEY_A", "KEY_B")
    environ = {"VLMBATCH_BASE_URL": ",".join(URLS[:2]), "VLMBATCH_API_KEY_ENV": "KEY_A,KEY_B"}
    assert build_config(BASE, environ=environ).endpoint.api_key_envs == ("KEY_A", "KEY_B")
    one = build_config({**BASE, "base_url": URLS[:2], "api_key_env": "SHARED"}, environ={}).endpoint
    assert one.api_key_envs == ("SHARED", "SHARED")  # one variable: every replica's
    with pytest.raises(UsageError, match=r"--api-key-env.*3 variables for 2 base URLs"):
        build_config({**BASE, "base_url": URLS[:2], "api_key_env": ["A", "B", "C"]}, environ={})
    with pytest.raises(UsageError, match="not the key itself") as refused:
        build_config({**BASE, "base_url": URLS[:2], "api_key_env": ["KEY_A", "sk-live-123"]}, environ={})
    assert "sk-live-123" not in str(refused.value)


def test_api_keys_each_replicas_own_or_one_for_all(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEY_A", "ka")
    monkeypatch.delenv("KEY_B", raising=False)
    endpoint = EndpointConfig(base_url=tuple(URLS[:2]), api_key_env=("KEY_A", "KEY_B"))
    assert api_keys(endpoint) == ["ka", None]
    assert api_keys(endpoint, "from-a-secret-block") == ["from-a-secret-block"] * 2


def test_credentials_in_a_url_are_never_shown() -> None:
    assert public_url("https://user:pa55@gw.example:8443/v1") == "https://gw.example:8443/v1"
    assert public_url("http://gpu:8000/v1") == "http://gpu:8000/v1"
    with pytest.raises(UsageError) as refused:
        build_config({**BASE, "base_url": ["http://u:pa55@gw/v1", "ftp://u:pa55@x"]}, environ={})
    assert "pa55" not in str(refused.value) and "ftp://x" in str(refused.value)
    with pytest.raises(
        UsageError, match=r"lists http://gw/v1 more than once"
    ):  # rows could not tell them apart
        build_config({**BASE, "base_url": ["http://u:1@gw/v1", "http://v:2@gw/v1"]}, environ={})
    replica = Replica(EndpointConfig(base_url="http://u:pa55@gw/v1"), "http://u:pa55@gw/v1", None)
    assert replica.name == "http://gw/v1" and "pa55" not in repr(replica)


# --- routing ---------------------------------------------------------------------------------------------


def router(
    n: int = 3,
    *,
    clock: Clock | None = None,
    window: float = 60.0,
    checked: PreflightResult | None = None,
    **endpoint: Any,
) -> tuple[Router, StopSwitch, OutageDetector]:
    config = EndpointConfig(base_url=tuple(URLS[:n]) if n > 1 else URLS[0], **endpoint)
    clock = clock or Clock()
    names = [public_url(u) for u in config.base_urls] if n > 1 else ()
    detector = OutageDetector(window=window, clock=clock, replicas=names, describe=URLS[0])
    stop = StopSwitch()
    return (
        Router(config, [None] * n, stop=stop, detector=detector, checked=checked, clock=clock),
        stop,
        detector,
    )


def refused() -> RequestFailure:
    return RequestFailure("connection", "refused")


def test_each_request_goes_to_the_replica_with_the_fewest_outstanding_relative_to_its_limit() -> None:
    async def main() -> None:
        r, _, _ = router(concurrency=4)
        a, b, c = r.replicas
        c.limiter.limit = 2  # an auto limit found lower there
        held = [await r.slot().__aenter__() for _ in range(10)]
        assert Counter(lease.replica.name for lease in held if lease) == {a.name: 4, b.name: 4, c.name: 2}
        order = [lease.replica for lease in held if lease]
        assert order[:3] == [a, b, c]  # 0/4, 0/4, 0/2 — ties go to the first listed, then the loads even out
        await r.aclose()

    asyncio.run(main())


def test_when_every_slot_is_taken_requests_wait_in_order_for_the_first_freed() -> None:
    async def main() -> None:
        r, _, _ = router(2, concurrency=1)
        first, second = r.slot(), r.slot()
        a = await first.__aenter__()
        b = await second.__aenter__()
        assert a and b and {a.replica, b.replica} == set(r.replicas)
        waiting = [asyncio.ensure_future(r.slot().__aenter__()) for _ in range(2)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiting)
        await second.__aexit__(None, None, None)
        got = await asyncio.wait_for(waiting[0], 1)
        assert got is not None and got.replica is b.replica and not waiting[1].done()
        waiting[1].cancel()
        await r.aclose()

    asyncio.run(main())


def test_a_retry_avoids_the_replica_that_failed_it_while_another_is_usable() -> None:
    async def main() -> None:
        r, _, _ = router(2, concurrency=4)
        a, b = r.replicas
        async with r.slot({a}) as lease:
            assert lease is not None and lease.replica is b
        assert r.elsewhere({a}) and not r.elsewhere({a, b})
        one, _, _ = router(1)
        async with one.slot(set(one.replicas)) as lease:  # one endpoint: the retry goes where it can
            assert lease is not None and lease.replica is one.replicas[0]
        assert not one.several and not one.elsewhere(set(one.replicas))
        await r.aclose()
        await one.aclose()

    asyncio.run(main())


def test_a_stop_wakes_every_request_waiting_for_a_slot() -> None:
    async def main() -> None:
        r, stop, _ = router(1, concurrency=1)
        held = r.slot()
        await held.__aenter__()
        waiter = asyncio.ensure_future(r.slot().__aenter__())
        await asyncio.sleep(0)
        stop.set("SIGINT", "test")
        assert await asyncio.wait_for(waiter, 1) is None  # nothing may come: every replica could be down
        async with r.slot() as late:
            assert late is None
        await r.aclose()

    asyncio.run(main())


# --- health ----------------------------------------------------------------------------------------------


def test_three_failures_in_a_row_eject_a_replica_for_a_cooldown_that_grows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = Clock()
    r, _, _ = router(clock=clock)
    a, b, _ = r.replicas
    monkeypatch.setattr(r, "_start_watch", lambda: None)  # probes by hand below
    for _ in range(EJECT_AFTER - 1):
        r.failed(a, refused())
    r.succeeded(a, 10.0)  # not in a row
    for _ in range(EJECT_AFTER - 1):
        r.failed(a, RequestFailure("server_error", "boom", http_status=500))
    assert not a.ejected
    r.failed(a, RequestFailure("bad_request", "too many images", http_status=400))  # says nothing of health
    r.failed(a, RequestFailure("timeout", "slow"))
    assert a.ejected and a.ejections == 1 and a.ejected_until == COOLDOWN_S
    assert not a.usable(clock.now) and b.usable(clock.now)
    seen = []
    for _ in range(6):  # a replica that stays down: each failed probe waits twice as long, 60 s at most
        clock.now = a.ejected_until
        seen.append(a.ejected_until)
        r._probe_failed(a, refused())
    assert [round(later - earlier) for earlier, later in pairwise(seen)] == [10, 20, 40, 60, 60]
    assert a.cooldown == MAX_COOLDOWN_S


def test_a_readmitted_replica_starts_over_at_five_seconds_after_a_minute_in_service() -> None:
    async def main() -> None:
        clock = Clock()
        r, _, _ = router(clock=clock)
        a = r.replicas[0]

        async def healthy(replica: Replica) -> None:
            return None

        r._health = healthy  # type: ignore[method-assign]
        for _ in range(EJECT_AFTER):
            r.failed(a, refused())
        assert a.ejected
        clock.now = 5.0
        await r._probe(a)
        assert not a.ejected and a.readmitted_at == 5.0
        for _ in range(EJECT_AFTER):  # down again at once: a longer cooldown
            r.failed(a, refused())
        assert a.ejected_until == 5.0 + 2 * COOLDOWN_S
        clock.now = 20.0
        await r._probe(a)
        clock.now = 20.0 + MAX_COOLDOWN_S  # a minute in service
        for _ in range(EJECT_AFTER):
            r.failed(a, refused())
        assert a.ejected_until == clock.now + COOLDOWN_S and a.ejections == 3
        await r.aclose()

    asyncio.run(main())


def test_the_last_replica_in_service_is_never_ejected_nor_paused() -> None:
    clock = Clock()
    r, _, _ = router(2, clock=clock)
    a, b = r.replicas
    for _ in range(EJECT_AFTER):
        r.failed(a, refused())
    for _ in range(2 * EJECT_AFTER):
        r.failed(b, refused())
        r.failed(b, RequestFailure("rate_limited", "busy", http_status=429, retry_after=30))
    assert a.ejected and not b.ejected and b.paused_until == 0  # the retry policy's backoff does the waiting
    single, _, _ = router(1, clock=clock)
    only = single.replicas[0]
    for _ in range(10):
        single.failed(only, refused())
    assert not only.ejected and only.failures == 10


def test_a_429_or_503_with_retry_after_pauses_that_replica_alone() -> None:
    async def main() -> None:
        clock = Clock()
        r, _, _ = router(2, clock=clock, concurrency=1)
        a, b = r.replicas
        r.failed(a, RequestFailure("rate_limited", "slow down", http_status=429, retry_after=0.2))
        assert a.paused_until == 0.2 and not a.ejected and a.consecutive == 0  # busy, not unhealthy
        async with r.slot() as lease:
            assert lease is not None and lease.replica is b
            waiter = asyncio.ensure_future(r.slot().__aenter__())  # b is full, a paused: it waits...
            await asyncio.sleep(0.05)
            assert not waiter.done()
            clock.now = 0.25  # ...until a's pause ends (a timer wakes it)
            got = await asyncio.wait_for(waiter, 2)
            assert got is not None and got.replica is a
        r.failed(b, RequestFailure("server_error", "loading", http_status=503, retry_after=1))
        assert b.paused_until == 1.25 and b.consecutive == 1  # a 503 also counts towards ejection
        await r.aclose()

    asyncio.run(main())


def test_ejected_replicas_are_probed_on_their_readiness_route_and_readmitted_when_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replicas_module, "TICK_S", 0.01)
    probed: list[str] = []

    async def main() -> None:
        r, _, _ = router(2, concurrency=1)
        a = r.replicas[0]
        answers = iter([RequestFailure("server_error", "loading", http_status=503), None])

        async def get_json(path: str) -> object:
            probed.append(path)
            if path == "/health/ready":
                raise RequestFailure("not_found", "no such route", http_status=404)  # vLLM: no such route
            outcome = next(answers)
            if outcome is not None:
                raise outcome
            return {"data": []}

        monkeypatch.setattr(a.client, "get_json", get_json)
        for _ in range(EJECT_AFTER):
            r.failed(a, refused())
        a.ejected_until = 0.0  # due at once
        for _ in range(200):
            await asyncio.sleep(0.01)
            if a.ejected and a.ejected_until > 0 and not a.probing:
                a.ejected_until = 0.0  # the failed probe's cooldown, cut short for the test
            if not a.ejected:
                break
        assert not a.ejected and a.health_route == "/models"
        async with r.slot() as lease:
            assert lease is not None and lease.replica is a  # back in the rotation
        await r.aclose()

    asyncio.run(main())
    assert probed[:2] == ["/health/ready", "/models"] and probed[-1] == "/models"


def test_a_replica_set_aside_at_preflight_gets_the_whole_preflight_before_traffic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checked = PreflightResult(
        ready=[URLS[0]], waiting=[URLS[1]], dropped={URLS[2]: "does not serve the model"}
    )
    r, _, detector = router(checked=checked)
    a, b, c = r.replicas
    assert a.in_service and b.ejected and not b.checked and c.gone is not None
    assert detector.gone(c.name) is not None and detector.check() is None
    calls: list[str] = []

    async def preflight(stop: StopSwitch) -> None:
        calls.append("preflight")

    monkeypatch.setattr(b, "preflight", preflight)
    asyncio.run(r._probe(b))
    assert calls == ["preflight"] and b.in_service and b.checked


# --- the outage verdict ----------------------------------------------------------------------------------


def test_the_verdict_comes_only_when_every_replica_has_been_unusable_for_the_window() -> None:
    clock = Clock()
    names = ["http://a/v1", "http://b/v1"]
    d = OutageDetector(window=10, clock=clock, replicas=names, describe="every replica")
    assert d.failure(refused(), "http://a/v1") is None
    clock.now = 30
    assert d.failure(refused(), "http://a/v1") is None  # b still answers
    d.success("http://b/v1")
    assert d.check() is None
    assert d.failure(refused(), "http://b/v1") is None
    clock.now = 39.9
    assert d.check() is None
    clock.now = 40
    verdict = d.check()
    assert verdict is not None and verdict.startswith("every replica is unusable (--outage-window 10): ")
    assert (
        "http://a/v1 has been unreachable for 40 s" in verdict
        and "http://b/v1 has been unreachable for 10 s" in verdict
    )


def test_a_replica_refusing_the_credentials_is_given_up_alone() -> None:
    d = OutageDetector(window=60, replicas=["http://a/v1", "http://b/v1"])
    auth = RequestFailure("auth", "Unauthorized", http_status=401)
    for _ in range(3):
        assert d.failure(auth, "http://a/v1") is None
    assert "rejected the credentials (HTTP 401) on 3 requests in a row" in (d.gone("http://a/v1") or "")
    for _ in range(3):
        d.failure(auth, "http://b/v1")
    assert d.verdict is not None and d.verdict.count("rejected the credentials") == 2


def test_a_run_with_every_replica_ejected_still_gets_its_verdict_from_the_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With no request going out, nothing fails to say so: the watch looks every TICK_S."""
    monkeypatch.setattr(replicas_module, "TICK_S", 0.01)

    async def main() -> str | None:
        clock = Clock()
        r, stop, _ = router(2, clock=clock, window=5)
        a, b = r.replicas
        r.failed(b, refused())  # b failing since 0 (in service: the last one)
        for _ in range(EJECT_AFTER):
            r.failed(a, refused())
        a.ejected_until = 1e9  # no probe in this test
        clock.now = 5.0
        for _ in range(100):
            await asyncio.sleep(0.01)
            if stop.is_set:
                break
        await r.aclose()
        return stop.message

    message = asyncio.run(main())
    assert message is not None and "every replica is unusable" in message


def test_a_retry_elsewhere_waits_no_backoff_but_counts() -> None:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    async def main() -> int:
        attempts = 0

        async def attempt() -> str:
            nonlocal attempts
            attempts += 1
            if attempts < 3:
                failure = RequestFailure("server_error", "down", http_status=503, retry_after=30)
                failure.retry_elsewhere = attempts == 1
                raise failure
            return "ok"

        assert await RetryPolicy(max_retries=5, sleep=sleep).call(attempt) == "ok"
        return attempts

    assert asyncio.run(main()) == 3
    assert waits[0] == 0.0 and waits[1] >= 30  # elsewhere at once; then the Retry-After as before


# --- the output --------------------------------------------------------------------------------------


def test_a_rerun_into_an_out_written_before_the_replica_column(tmp_path: Path) -> None:
    assert "replica" in OUTPUT_SCHEMA.names and "replica" in LATER_COLUMNS
    out = tmp_path / "out"
    out.mkdir()
    old_schema = pa.schema([f for f in OUTPUT_SCHEMA if f.name not in LATER_COLUMNS])
    pq.write_table(old_schema.empty_table(), out / "part-000000-old.parquet")
    check_schema(out, OUTPUT_SCHEMA)  # accepted
    carried = output_schema(pa.schema([("source", pa.string())]))
    with pytest.raises(UsageError, match=r"this run adds source\)"):  # other differences still count
        check_schema(out, carried)


def test_a_retry_waiting_for_another_replica_does_not_hold_up_those_behind_it() -> None:
    async def main() -> None:
        r, _, _ = router(2, concurrency=1)
        a, b = r.replicas
        held = r.slot({a})
        lease = await held.__aenter__()
        assert lease is not None and lease.replica is b
        retry = asyncio.ensure_future(r.slot({a}).__aenter__())  # failed on a: waits for b...
        await asyncio.sleep(0)
        fresh = asyncio.ensure_future(r.slot().__aenter__())  # ...while a new request takes a's free slot
        got = await asyncio.wait_for(fresh, 1)
        assert got is not None and got.replica is a and not retry.done()
        await held.__aexit__(None, None, None)
        again = await asyncio.wait_for(retry, 1)
        assert again is not None and again.replica is b
        await r.aclose()

    asyncio.run(main())


def test_the_summary_table_and_artifact_show_each_replica() -> None:
    from rich.console import Console

    from flows.artifacts import summary_markdown
    from flows.cli.summary_table import print_summary
    from tasks.outputs.summary import ReplicaSummary, RunSummary

    replicas = [
        ReplicaSummary(
            replica="http://a:8000/v1",
            requests=120,
            answered=118,
            failures=2,
            ejections=1,
            latency_p50_ms=251.2,
        ),
        ReplicaSummary(replica="http://b:8000/v1", requests=80, answered=80, latency_p50_ms=1003.0),
    ]
    summary = RunSummary(work_items=198, ok=198, requests=200, replicas=replicas)
    markdown = summary_markdown(summary)
    assert "| `http://a:8000/v1` | 120 | 118 | 2 | 1 | 251 ms |" in markdown
    assert "| `http://b:8000/v1` | 80 | 80 | 0 | – | 1003 ms |" in markdown
    console = Console(width=200, record=True)
    print_summary(summary, console)
    text = console.export_text()
    assert "replicas" in text and "http://a:8000/v1" in text and "251 ms" in text
    alone = Console(width=200, record=True)
    print_summary(RunSummary(work_items=1, ok=1), alone)
    assert "replicas" not in alone.export_text()  # one endpoint: the summary it always had


def test_preflight_of_several_replicas_starts_without_one_still_loading_and_drops_one_without_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The run does not wait out --outage-window for a replica still loading once another is ready: it
    starts set aside and joins once its own preflight passes; one without the model is left out."""
    from emulator import EmulatorServer, EmulatorSettings
    from tasks.endpoint.preflight import PreflightFailed, preflight_replicas

    ready = EmulatorServer(EmulatorSettings(latency=0)).start()
    loading = EmulatorServer(EmulatorSettings(latency=0, loading_seconds=60, retry_after=0.05)).start()
    other = EmulatorServer(EmulatorSettings(latency=0, models=("someone/else",))).start()
    try:
        urls = (ready.base_url, loading.base_url, other.base_url)
        config = EndpointConfig(base_url=urls, outage_window=30)

        async def main() -> None:
            started = asyncio.get_running_loop().time()
            result = await preflight_replicas(config, [None] * 3)
            assert asyncio.get_running_loop().time() - started < 10  # not the 30 s window
            assert (result.ready, result.waiting) == ([ready.base_url], [loading.base_url])
            assert "does not serve the model" in result.dropped[other.base_url]
            detector = OutageDetector(window=30, replicas=[public_url(u) for u in urls])
            r = Router(config, [None] * 3, stop=StopSwitch(), detector=detector, checked=result)
            a, b, c = r.replicas
            assert a.in_service and b.ejected and not b.checked and c.gone is not None
            await r._probe(b)  # still loading: stays aside, its unusable time starts
            assert b.ejected and detector.replicas[b.name].failing_since is not None
            loading.configure(loading_seconds=0)
            await r._probe(b)  # its whole preflight passes now
            assert b.in_service and b.checked
            await r.aclose()
            loading.configure(loading_seconds=60)
            with pytest.raises(PreflightFailed, match="no replica is usable") as failed:
                await preflight_replicas(
                    EndpointConfig(base_url=(other.base_url, loading.base_url), outage_window=0.5), [None] * 2
                )
            assert other.base_url in str(failed.value) and loading.base_url in str(failed.value)

        asyncio.run(main())
    finally:
        for server in (ready, loading, other):
            server.stop()
