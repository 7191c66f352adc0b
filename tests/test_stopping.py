"""Signals stop every run in the process, however many share its event loop."""

from __future__ import annotations

import asyncio
import os
import signal

from tasks.stopping import StopSwitch, signals_stop


def test_a_signal_stops_every_run_sharing_the_loop_until_the_last_is_out() -> None:
    seconds: list[int] = []
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)

    async def main() -> tuple[StopSwitch, StopSwitch, StopSwitch]:
        a, b, c = StopSwitch(), StopSwitch(), StopSwitch()
        b_out = asyncio.Event()

        async def run(switch: StopSwitch, leave: asyncio.Event | None = None) -> None:
            with signals_stop(switch, seconds.append):
                if leave is None:
                    await switch._event.wait()
                else:
                    await leave.wait()

        runs = [asyncio.create_task(run(a)), asyncio.create_task(run(b, b_out))]
        await asyncio.sleep(0.01)
        b_out.set()  # one partition finishes first: the other must still hear the signal
        await runs[1]
        runs.append(asyncio.create_task(run(c)))
        await asyncio.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(runs[0], runs[2]), timeout=5)
        return a, b, c

    a, b, c = asyncio.run(main())
    assert (a.reason, b.reason, c.reason) == ("SIGTERM", None, "SIGTERM")
    assert seconds == []
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # all out: as before


def test_a_second_signal_reaches_on_second_with_its_exit_code() -> None:
    seconds: list[int] = []

    async def main() -> StopSwitch:
        switch = StopSwitch()
        with signals_stop(switch, seconds.append):
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(0.05)
            os.kill(os.getpid(), signal.SIGINT)
            await asyncio.sleep(0.05)
        return switch

    assert asyncio.run(main()).reason == "SIGINT"
    assert seconds == [130]


def test_a_handler_put_in_place_by_someone_else_is_replaced_when_the_next_run_starts() -> None:
    """Prefect's engine installs its own SIGTERM handler when a flow run starts: a backfill's second
    partition starting must not leave the first (or itself) deaf to SIGTERM."""
    prefects: list[int] = []

    async def main() -> tuple[StopSwitch, StopSwitch]:
        a, b = StopSwitch(), StopSwitch()
        with signals_stop(a, lambda code: None):
            signal.signal(signal.SIGTERM, lambda sig, frame: prefects.append(sig))  # a child flow starts
            with signals_stop(b, lambda code: None):
                os.kill(os.getpid(), signal.SIGTERM)
                await asyncio.wait_for(asyncio.gather(a._event.wait(), b._event.wait()), timeout=5)
        return a, b

    a, b = asyncio.run(main())
    assert (a.reason, b.reason, prefects) == ("SIGTERM", "SIGTERM", [])
