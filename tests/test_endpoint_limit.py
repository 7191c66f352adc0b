"""The run's hold on the global limit's slots: shared by overlapping shards, given back in turn."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from flows import endpoint_limit
from flows.endpoint_limit import SlotLease
from tests.builders import Clock


class FakeLimit:
    """Stands in for EndpointLimit.hold: records acquisitions and releases, in order."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.held = 0

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        entered_in = asyncio.current_task()
        await asyncio.sleep(0)  # a server round trip
        self.held += 1
        self.events.append("acquire")
        try:
            yield
        finally:
            # like Prefect's concurrency(), whose anyio cancel scope must be left where it was entered
            assert asyncio.current_task() is entered_in, "left in a different task than entered"
            await asyncio.sleep(0)
            self.held -= 1
            self.events.append("release")


def test_overlapping_shards_share_one_hold_released_by_the_last_one_out() -> None:
    limit = FakeLimit()

    async def main() -> SlotLease:
        lease = SlotLease(limit.hold, clock=Clock())
        first_in = asyncio.Event()
        first_done = asyncio.Event()

        async def shard(name: str, start: asyncio.Event | None, done: asyncio.Event | None) -> None:
            if start is not None:
                await start.wait()
            async with lease.hold():
                limit.events.append(f"{name} in (held {limit.held})")
                if name == "a":
                    first_in.set()
                    await first_done.wait()
                else:
                    first_done.set()  # b is inside before a leaves: the shards overlap
                    await asyncio.sleep(0.01)
            limit.events.append(f"{name} out")

        await asyncio.gather(shard("a", None, None), shard("b", first_in, None))
        return lease

    lease = asyncio.run(main())
    assert limit.events == ["acquire", "a in (held 1)", "b in (held 1)", "a out", "release", "b out"]
    assert lease.holds == 1 and lease.inside == 0 and limit.held == 0


def test_an_old_hold_admits_no_new_shard_until_the_slots_went_back() -> None:
    limit = FakeLimit()
    clock = Clock()

    async def main() -> SlotLease:
        lease = SlotLease(limit.hold, max_hold=60, clock=clock)
        a_inside = asyncio.Event()
        let_a_finish = asyncio.Event()

        async def a() -> None:
            async with lease.hold():
                a_inside.set()
                await let_a_finish.wait()
            limit.events.append("a out")

        async def b() -> None:
            await a_inside.wait()
            clock.now += 61  # the hold is a minute old when b arrives
            entering = asyncio.create_task(enter_b())
            for _ in range(5):
                await asyncio.sleep(0)
            assert not entering.done()  # b waits: no joining an old hold
            limit.events.append("b waits")
            let_a_finish.set()
            await entering

        async def enter_b() -> None:
            async with lease.hold():
                limit.events.append(f"b in (held {limit.held})")

        await asyncio.gather(a(), b())
        return lease

    lease = asyncio.run(main())
    assert limit.events == ["acquire", "b waits", "release", "a out", "acquire", "b in (held 1)", "release"]
    assert lease.holds == 2 and limit.held == 0


def test_a_failing_shard_still_gives_the_slots_back() -> None:
    limit = FakeLimit()

    async def main() -> None:
        lease = SlotLease(limit.hold, clock=Clock())
        try:
            async with lease.hold():
                raise RuntimeError("a bug in a shard")
        except RuntimeError:
            pass
        async with lease.hold():  # the next shard gets a fresh hold
            assert limit.held == 1

    asyncio.run(main())
    assert limit.events == ["acquire", "release", "acquire", "release"] and limit.held == 0


def test_a_shard_cancelled_while_waiting_for_slots_stops_asking_for_them() -> None:
    asked: list[str] = []

    @contextlib.asynccontextmanager
    async def never_granted() -> AsyncIterator[None]:
        asked.append("asking")
        try:
            await asyncio.Event().wait()  # the server has no free slots
            yield
        finally:
            asked.append("stopped asking")

    async def main() -> SlotLease:
        lease = SlotLease(never_granted, clock=Clock())

        async def shard() -> None:
            async with lease.hold():
                raise AssertionError("never inside")

        waiting = asyncio.create_task(shard())
        for _ in range(3):
            await asyncio.sleep(0)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        for _ in range(3):
            await asyncio.sleep(0)
        return lease

    lease = asyncio.run(main())
    assert asked == ["asking", "stopped asking"] and lease.holds == 0 and lease.inside == 0


def test_a_long_wait_for_the_slots_is_logged_and_a_quick_one_is_not(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    waits = iter([0.0, 0.2])

    @contextlib.asynccontextmanager
    async def concurrency(name: str, occupy: int) -> AsyncIterator[None]:  # slots freed after a while
        await asyncio.sleep(next(waits))
        yield

    monkeypatch.setattr(endpoint_limit, "concurrency", concurrency)
    monkeypatch.setattr(endpoint_limit, "WAIT_WARNING_S", 0.05)
    limit = endpoint_limit.EndpointLimit("vlmbatch-endpoint", 64, 32)

    async def hold() -> None:
        async with limit.hold():
            pass

    asyncio.run(hold())
    assert "waiting for" not in caplog.text
    asyncio.run(hold())
    assert "waiting for 32 slots of the global concurrency limit 'vlmbatch-endpoint'" in caplog.text
    assert "keeps its slots until their lease expires" in caplog.text
