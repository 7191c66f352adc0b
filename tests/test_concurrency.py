import asyncio

from tasks.endpoint.concurrency import (
    AUTO_START,
    OVERLOAD_STATUS,
    InFlightLimiter,
    RateLimiter,
    Slot,
    estimate_tokens,
)
from tests.builders import Clock


def test_fixed_limit_bounds_requests_in_flight() -> None:
    async def main() -> int:
        limiter = InFlightLimiter(3)
        peak = 0

        async def one() -> None:
            nonlocal peak
            async with limiter.slot():
                peak = max(peak, limiter.in_flight)
                await asyncio.sleep(0.01)

        await asyncio.gather(*(one() for _ in range(20)))
        return peak

    assert asyncio.run(main()) == 3


def test_adaptive_grows_fast_then_halves_once_per_round_trip() -> None:
    clock = Clock()
    limiter = InFlightLimiter(1, adaptive=True, maximum=100, clock=clock)
    assert limiter.limit == AUTO_START == 16
    for _ in range(16):  # one round of answers at a steady latency: slow start doubles
        limiter.observe(Slot(latency=0.2))
    assert limiter.limit == 32
    limiter.in_flight = 24  # requests still out when the 429s come back
    limiter.observe(Slot(overloaded=True))
    limiter.observe(Slot(overloaded=True))  # the same burst: not cut again
    assert limiter.limit == 16 and not limiter.slow_start
    limiter.in_flight = 0
    clock.now = 0.3
    limiter.observe(Slot(overloaded=True))  # a round trip later: cut again
    assert limiter.limit == 8 and limiter.ceiling == 16
    for _ in range(7):  # back up at the slow-start pace, to 90 % of the limit that drew the 429
        limiter.observe(Slot(latency=0.2))
    assert limiter.limit == 0.9 * 16
    for _ in range(15):  # then, just under that level, probe gently: about +1 per two rounds
        limiter.observe(Slot(latency=0.2))
    assert 14.9 < limiter.limit < 15.0
    while limiter.limit < 16:
        limiter.observe(Slot(latency=0.2))
    for _ in range(16):  # past it: congestion avoidance, about +1 per round
        limiter.observe(Slot(latency=0.2))
    assert 16.9 < limiter.limit < 17.1
    before = limiter.limit
    limiter.observe(Slot(latency=1.0))  # latency does not hold: no increase
    assert limiter.limit == before


def test_adaptive_429s_after_the_cut_hold_the_limit_to_the_requests_still_out() -> None:
    clock = Clock()

    async def main() -> InFlightLimiter:
        limiter = InFlightLimiter(1, adaptive=True, maximum=100, clock=clock)
        for _ in range(18):
            limiter.observe(Slot(latency=0.25))
        assert limiter.limit == 34  # just over a hidden capacity of 32
        limiter.observe(Slot(overloaded=True))  # the first 429: cut to 17, ceiling 34
        for _ in range(17):  # answers on their way back: climbing towards 0.9 × 34 again
            limiter.observe(Slot(latency=0.25))
        assert 30.5 < limiter.limit < 31
        # 29 requests out (in service), one more is rejected at once: its slot must not go on
        held = [limiter.slot() for _ in range(29)]
        for cm in held:
            await cm.__aenter__()
        async with limiter.slot() as slot:
            slot.overloaded = True
        assert limiter.limit == 29 and limiter.ceiling == 34  # what it climbs back to is unchanged
        waiter = asyncio.create_task(limiter.slot().__aenter__())
        await asyncio.sleep(0)
        assert not waiter.done()  # no slot for the next request until an answer comes back
        await held[0].__aexit__(None, None, None)  # an answer (no latency reported): its slot goes on
        await asyncio.sleep(0)
        assert waiter.done() and limiter.in_flight == 29
        return limiter

    asyncio.run(main())


def test_adaptive_follows_an_endpoint_whose_capacity_drops() -> None:
    clock = Clock()
    limiter = InFlightLimiter(1, adaptive=True, maximum=256, clock=clock)
    for _ in range(48):  # slow start: 16 → 64
        limiter.observe(Slot(latency=0.2))
    limiter.observe(Slot(overloaded=True))
    assert limiter.limit == 32 and limiter.ceiling == 64
    for _ in range(10):  # climbing back towards 0.9 × 64 ...
        limiter.observe(Slot(latency=0.2))
    assert limiter.limit == 42
    clock.now = 1.0
    limiter.observe(Slot(overloaded=True))  # ... the endpoint now takes less: a 429 on the way up
    assert limiter.limit == 21 and limiter.ceiling == 42  # the new, lower level is what it climbs back to
    for _ in range(50):
        limiter.observe(Slot(latency=0.2))
    assert limiter.limit < 42


def test_adaptive_never_exceeds_the_maximum_nor_drops_below_one() -> None:
    clock = Clock()
    limiter = InFlightLimiter(1, adaptive=True, maximum=12, clock=clock)
    for _ in range(100):
        limiter.observe(Slot(latency=0.1))
    assert limiter.limit == 12
    for step in range(20):
        clock.now = step * 10.0
        limiter.observe(Slot(overloaded=True))
    assert limiter.limit == 1


def test_rate_limiter_spaces_requests_and_tokens() -> None:
    clock = Clock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    async def take_all(limiter: RateLimiter, costs: list[int]) -> float:
        for cost in costs:
            await limiter.take(cost)
        return clock.now

    rpm = RateLimiter(120, None, clock=clock, sleep=sleep)
    assert asyncio.run(take_all(rpm, [0] * 5)) == 2.5  # 2 per second, starting empty
    clock.now, slept[:] = 0.0, []
    tpm = RateLimiter(None, 6000, clock=clock, sleep=sleep)  # 100 tokens a second
    # a big request goes once the bucket is full and leaves a debt: 700 tokens at 100/s take 7 s
    assert asyncio.run(take_all(tpm, [300, 300, 100])) == 7.0
    assert not RateLimiter(None, None).active


def test_token_estimate_counts_image_budgets_text_and_output() -> None:
    assert estimate_tokens("x" * 40, images=2, max_soft_tokens=280, max_tokens=100) == 560 + 10 + 100


def test_a_freed_slot_goes_to_the_longest_waiter() -> None:
    async def main() -> list[int]:
        limiter = InFlightLimiter(1)
        order: list[int] = []
        release = asyncio.Event()

        async def holder() -> None:
            async with limiter.slot():
                await release.wait()

        async def waiter(n: int) -> None:
            async with limiter.slot():
                order.append(n)
                assert limiter.in_flight == 1

        first = asyncio.create_task(holder())
        await asyncio.sleep(0)
        waiters = []
        for n in range(5):
            waiters.append(asyncio.create_task(waiter(n)))
            await asyncio.sleep(0)  # each queues before the next
        release.set()
        await asyncio.gather(first, *waiters)
        assert limiter.in_flight == 0
        return order

    assert asyncio.run(main()) == [0, 1, 2, 3, 4]


def test_a_cancelled_waiter_never_holds_a_slot() -> None:
    async def main() -> None:
        limiter = InFlightLimiter(1)
        got: list[str] = []

        async def use(name: str) -> None:
            async with limiter.slot():
                got.append(name)

        held = limiter.slot()
        await held.__aenter__()
        cancelled_while_waiting = asyncio.create_task(use("never"))
        granted_then_cancelled = asyncio.create_task(use("never either"))
        last = asyncio.create_task(use("last"))
        await asyncio.sleep(0)  # all three wait, in this order
        cancelled_while_waiting.cancel()
        await asyncio.sleep(0)
        await held.__aexit__(None, None, None)  # hands the slot to the first live waiter...
        assert limiter.in_flight == 1
        granted_then_cancelled.cancel()  # ...cancelled before it runs: it gives the slot on
        cancelled = (cancelled_while_waiting, granted_then_cancelled)
        results = await asyncio.gather(*cancelled, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        await asyncio.wait_for(last, 5)  # a leaked slot would keep it waiting
        assert got == ["last"]
        assert limiter.in_flight == 0

    asyncio.run(main())


def test_a_raised_adaptive_limit_lets_waiters_in_at_once() -> None:
    clock = Clock()

    async def main() -> int:
        limiter = InFlightLimiter(1, adaptive=True, maximum=8, clock=clock)
        peak = 0

        async def one() -> None:
            nonlocal peak
            async with limiter.slot() as slot:
                peak = max(peak, limiter.in_flight)
                await asyncio.sleep(0.001)
                slot.latency = 0.1

        await asyncio.gather(*(one() for _ in range(40)))
        assert limiter.in_flight == 0
        return peak

    assert asyncio.run(main()) > 1  # answers raised the limit while others were waiting


def test_adaptive_takes_a_gateway_timeout_for_pushback_but_not_a_slow_answer() -> None:
    """A 408 (a gateway gave up waiting) halves the limit like a 429. One slow answer does not: answer
    latency varies 2-5x with length alone, and cutting on it collapsed the limit under jitter."""
    clock = Clock()
    limiter = InFlightLimiter(1, adaptive=True, maximum=256, clock=clock)
    for _ in range(16):
        limiter.observe(Slot(latency=0.25))
    assert limiter.limit == 32
    clock.now = 5.0
    for latency in (1.0, 0.6, 2.0):  # slow answers: no growth, no cut
        limiter.observe(Slot(latency=latency))
    assert limiter.limit == 32
    assert 408 in OVERLOAD_STATUS
    limiter.observe(Slot(overloaded=True))
    assert limiter.limit == 16 and limiter.ceiling == 32


def test_a_stopped_run_does_not_wait_out_the_rate_limiter() -> None:
    """SIGINT at --rpm 60 took 37 s to exit; the wait now ends with the stop, and nothing is taken."""
    from tasks.stopping import StopSwitch

    async def first_then_stopped() -> float:
        limiter = RateLimiter(1, None)
        stop = StopSwitch()
        asyncio.get_running_loop().call_later(0.2, stop.set, "SIGINT", "test")
        started = asyncio.get_running_loop().time()
        await limiter.take(1, stop)
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(first_then_stopped()) < 5  # not the minute one request a minute needs


def test_runs_in_one_event_loop_share_one_rate_limiter_per_endpoint() -> None:
    """A backfill's partitions run side by side in one loop: a limiter each doubled --rpm at 2."""
    from tasks.endpoint.concurrency import rate_limiter

    async def main() -> None:
        one, two = rate_limiter("http://gw/v1", 600, None), rate_limiter("http://gw/v1", 600, None)
        assert one is two
        assert rate_limiter("http://other/v1", 600, None) is not one
        assert rate_limiter("http://gw/v1", 300, None) is not one
        assert not rate_limiter("http://gw/v1", None, None).active

    asyncio.run(main())
