"""The parent of ``--slices N`` deciding what to do with each slice's run (flows/slice_runs.py), with
Prefect's API and OUT's holders played by this test: which states it reads, which results its slices
published, who holds their part of OUT. The real server, workers and OUT run in
tests/test_slices_prefect_e2e.py; here are the turns that are hard to bring about there (a slice that
lost its lease, another run holding a slice's part, a Ctrl-C as a slice finishes)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.schemas.objects import FlowRun, State, StateType

from flows import slice_runs
from flows.slice_runs import SliceRuns
from tasks.outputs.summary import RunSummary
from tasks.slice import Slice

log = logging.getLogger("test-slice-runs")


class FakePrefect:
    """The flow runs of the slices, as Prefect's API would show them; ``states`` set by each test."""

    def __init__(self) -> None:
        self.runs: dict[uuid.UUID, FlowRun] = {}
        self.submitted: list[str] = []  # flow run names, in order
        self.state_requests: list[tuple[str, str, bool]] = []  # (run name, state type, force)
        self.results: dict[uuid.UUID, tuple[int, str]] = {}  # published slice results
        self.refuse_final = True  # as Prefect does an unforced transition out of a final state
        self.by_key: dict[str, FlowRun] = {}  # idempotency keys: the same key finds the same run
        self.on_submit: Callable[[str], None] = lambda name: None  # e.g. a signal, an answer lost

    def set(self, name: str, kind: StateType) -> None:
        run = next(r for r in self.runs.values() if r.name == name)
        run.state = State(type=kind, name=kind.value.title())

    def publish(self, name: str, code: int, message: str = "") -> None:
        run = next(r for r in self.runs.values() if r.name == name)
        self.results[run.id] = (code, message)

    async def arun_deployment(
        self, deployment_id: Any, *, flow_run_name: str, idempotency_key: str, **_: Any
    ) -> FlowRun:
        if idempotency_key not in self.by_key:
            running = State(type=StateType.RUNNING)
            run = FlowRun(id=uuid.uuid4(), name=flow_run_name, flow_id=uuid.uuid4(), state=running)
            self.runs[run.id] = self.by_key[idempotency_key] = run
            self.submitted.append(flow_run_name)
        self.on_submit(flow_run_name)
        return self.by_key[idempotency_key]

    async def read_flow_runs(self, flow_run_filter: Any) -> list[FlowRun]:
        return [self.runs[i] for i in flow_run_filter.id.any_ if i in self.runs]

    async def read_flow_run(self, run_id: uuid.UUID) -> FlowRun:
        return self.runs[run_id]

    async def set_flow_run_state(self, run_id: uuid.UUID, state: State[Any], force: bool = False) -> None:
        run = self.runs[run_id]
        self.state_requests.append((run.name, state.type.value, force))
        if run.state is not None and run.state.is_final() and not force and self.refuse_final:
            return
        run.state = state

    async def read_artifacts(self, *, key: str, flow_run_ids: list[Any]) -> list[Any]:
        found = []
        for run_id in flow_run_ids:
            if run_id in self.results:
                code, message = self.results[run_id]
                summary = RunSummary(out="out", work_items=4, ok=4 if code == 0 else 1)
                row = {"summary": summary.model_dump_json(), "exit_code": code, "message": message}
                found.append(type("Artifact", (), {"data": json.dumps([row])})())
        return found


@pytest.fixture
def prefect(monkeypatch: pytest.MonkeyPatch) -> FakePrefect:
    fake = FakePrefect()
    monkeypatch.setattr(slice_runs, "arun_deployment", fake.arun_deployment)
    monkeypatch.setattr(slice_runs, "read_artifacts", fake.read_artifacts)
    monkeypatch.setattr(slice_runs, "POLL_S", 0.01)
    return fake


def run_parent(
    prefect: FakePrefect,
    holders: Callable[[str], str | None],
    script: Callable[[SliceRuns], Any],
    monkeypatch: pytest.MonkeyPatch,
    n: int = 2,
) -> SliceRuns:
    """The parent over ``n`` slices, OUT's holders by scope from ``holders``, while ``script`` plays
    the slices' runs."""
    monkeypatch.setattr(slice_runs, "scope_holder", lambda out, scope: holders(scope))
    parameters = {Slice(k, n): {"slice": f"{k}/{n}"} for k in range(1, n + 1)}

    async def main() -> SliceRuns:
        runs = SliceRuns(prefect, uuid.uuid4(), parameters, Path("out"), "parent", log)  # type: ignore[arg-type]
        await asyncio.wait_for(asyncio.gather(runs.run(), script(runs)), timeout=20)  # a failed script fails
        return runs

    return asyncio.run(main())


def by_slice(runs: SliceRuns) -> dict[str, tuple[int | None, int, str]]:
    return {w.part.spec: (w.exit_code, w.attempts, w.detail) for w in runs.watches}


async def ticks(k: int = 5) -> None:
    await asyncio.sleep(k * 0.01 + 0.02)


def test_a_slice_that_lost_its_lease_runs_again_once_its_own_lease_lapsed(
    prefect: FakePrefect, monkeypatch: pytest.MonkeyPatch
) -> None:
    held: dict[str, str] = {}

    async def script(runs: SliceRuns) -> None:
        await ticks()
        first = next(r for r in prefect.runs.values() if r.name == "slice-1-of-2")
        held["slice-1-of-2"] = f"run {first.id} (pid 1 on gone, since then; lease renewed 3 s ago)"
        prefect.publish("slice-1-of-2", 4, "stopped: the lease was not renewed")
        prefect.set("slice-1-of-2", StateType.FAILED)
        prefect.publish("slice-2-of-2", 0)
        prefect.set("slice-2-of-2", StateType.COMPLETED)
        await ticks(10)
        assert prefect.submitted == ["slice-1-of-2", "slice-2-of-2"]  # waits while its own lease lives
        del held["slice-1-of-2"]  # lapsed
        await ticks(10)
        assert prefect.submitted[-1] == "slice-1-of-2-attempt-2"
        prefect.publish("slice-1-of-2-attempt-2", 0)
        prefect.set("slice-1-of-2-attempt-2", StateType.COMPLETED)

    runs = run_parent(prefect, held.get, script, monkeypatch)
    assert by_slice(runs) == {"1/2": (0, 2, ""), "2/2": (0, 1, "")}
    assert all(w.summary is not None and w.summary.ok == 4 for w in runs.watches)  # the last attempt's


def test_a_crashed_slice_whose_part_of_out_another_run_holds_ends_with_exit_4_naming_it(
    prefect: FakePrefect, monkeypatch: pytest.MonkeyPatch
) -> None:
    stranger = "run by-hand (pid 7 on laptop, since 10:00; lease renewed 1 s ago)"

    async def script(runs: SliceRuns) -> None:
        await ticks()
        prefect.set("slice-1-of-2", StateType.CRASHED)
        prefect.publish("slice-2-of-2", 2)
        prefect.set("slice-2-of-2", StateType.COMPLETED)

    runs = run_parent(prefect, {"slice-1-of-2": stranger}.get, script, monkeypatch)
    code, attempts, detail = by_slice(runs)["1/2"]
    assert (code, attempts) == (4, 1)
    assert f"not run again: its part of OUT is still held, {stranger}" in detail
    assert prefect.submitted == ["slice-1-of-2", "slice-2-of-2"]  # not run again
    assert by_slice(runs)["2/2"][0] == 2


def test_a_ctrl_c_cancels_the_running_slices_unforced_and_one_that_had_finished_keeps_its_result(
    prefect: FakePrefect, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def script(runs: SliceRuns) -> None:
        await ticks()
        prefect.publish("slice-2-of-3", 0)
        prefect.set("slice-2-of-3", StateType.COMPLETED)  # finished as the Ctrl-C came
        prefect.set("slice-3-of-3", StateType.SCHEDULED)  # no worker took it yet
        signal.raise_signal(signal.SIGINT)
        await ticks()
        # the runs are cancelled at once, each unforced (Prefect keeps a final state as it is)
        assert sorted(prefect.state_requests) == [
            ("slice-1-of-3", "CANCELLING", False),
            ("slice-3-of-3", "CANCELLING", False),
        ]
        prefect.publish("slice-1-of-3", 143, "interrupted by SIGTERM; rerun to continue")
        prefect.set("slice-1-of-3", StateType.CANCELLED)
        prefect.set("slice-3-of-3", StateType.CANCELLED)  # the server's own answer for a Scheduled run

    runs = run_parent(prefect, lambda scope: "run x", script, monkeypatch, n=3)
    assert runs.stop.reason == "SIGINT"
    assert by_slice(runs) == {
        "1/3": (143, 1, "interrupted by SIGTERM; rerun to continue"),
        "2/3": (0, 1, ""),
        "3/3": (130, 1, "cancelled"),
    }
    assert prefect.submitted == ["slice-1-of-3", "slice-2-of-3", "slice-3-of-3"]  # none run again


def test_a_slice_no_worker_takes_is_said_once_and_waited_for(
    prefect: FakePrefect, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(slice_runs, "UNCLAIMED_WARN_S", 0.05)

    async def script(runs: SliceRuns) -> None:
        await ticks(1)  # both submitted
        for name in ("slice-1-of-2", "slice-2-of-2"):
            prefect.set(name, StateType.SCHEDULED)
        await ticks(20)  # 0.2 s: past the warning, for both
        for name in ("slice-1-of-2", "slice-2-of-2"):
            prefect.publish(name, 0)
            prefect.set(name, StateType.COMPLETED)

    caplog.set_level(logging.WARNING, logger=log.name)
    runs = run_parent(prefect, lambda scope: None, script, monkeypatch)
    said = [r.getMessage() for r in caplog.records if "no worker has taken its run" in r.getMessage()]
    assert len(said) == 1 and "(`prefect worker start --pool <its pool>`); waiting on" in said[0], said
    assert by_slice(runs) == {"1/2": (0, 1, ""), "2/2": (0, 1, "")}


def test_a_submission_whose_answer_was_lost_is_tried_again_with_the_same_key(
    prefect: FakePrefect, monkeypatch: pytest.MonkeyPatch
) -> None:
    lost = ["slice-1-of-2-attempt-2"]

    def answer_lost(name: str) -> None:  # the run is made, its answer never comes back
        if name in lost:
            lost.remove(name)
            raise ConnectionError("the answer was lost")

    prefect.on_submit = answer_lost

    async def script(runs: SliceRuns) -> None:
        await ticks()
        prefect.set("slice-1-of-2", StateType.CRASHED)
        prefect.publish("slice-2-of-2", 0)
        prefect.set("slice-2-of-2", StateType.COMPLETED)
        await ticks(10)
        prefect.publish("slice-1-of-2-attempt-2", 0)
        prefect.set("slice-1-of-2-attempt-2", StateType.COMPLETED)

    runs = run_parent(prefect, lambda scope: None, script, monkeypatch)
    assert prefect.submitted == ["slice-1-of-2", "slice-2-of-2", "slice-1-of-2-attempt-2"]  # made once
    assert by_slice(runs) == {"1/2": (0, 2, ""), "2/2": (0, 1, "")}


def test_a_run_submitted_as_the_ctrl_c_came_is_cancelled_too(
    prefect: FakePrefect, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefect.on_submit = lambda name: signal.raise_signal(signal.SIGINT) if name == "slice-2-of-3" else None

    async def script(runs: SliceRuns) -> None:
        while not runs.stop.is_set:
            await ticks(1)
        await ticks()
        for name in prefect.submitted:  # as the worker or the server confirms
            prefect.set(name, StateType.CANCELLED)

    runs = run_parent(prefect, lambda scope: "run x", script, monkeypatch, n=3)
    cancelled = {name for name, kind, _ in prefect.state_requests if kind == "CANCELLING"}
    assert "slice-2-of-3" in cancelled and cancelled == set(prefect.submitted)
    assert [code for code, _, _ in by_slice(runs).values()] == [130, 130, 130]


def test_a_run_cancelled_by_hand_whose_worker_never_confirms_ends_as_cancelled_not_waited_for(
    prefect: FakePrefect, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(slice_runs, "LOST_AFTER_S", 0.05)

    held = {"slice-1-of-2": "run a", "slice-2-of-2": "run b"}

    async def script(runs: SliceRuns) -> None:
        await ticks()
        prefect.set("slice-1-of-2", StateType.CANCELLING)  # `prefect flow-run cancel`; its worker is gone
        del held["slice-1-of-2"]
        prefect.publish("slice-2-of-2", 0)
        prefect.set("slice-2-of-2", StateType.COMPLETED)

    runs = run_parent(prefect, held.get, script, monkeypatch)
    assert ("slice-1-of-2", "CANCELLED", True) in prefect.state_requests
    assert by_slice(runs)["1/2"][:2] == (130, 1)  # not run again: someone cancelled it
    assert prefect.submitted == ["slice-1-of-2", "slice-2-of-2"]
