"""Slices (``--slice K/N``) through the real CLI against the emulator: each slice sends only its own
work items, together they are the job exactly once, each resumes only its own part; and the rule of
OUT's locks between a run of the whole job and slices (tasks/outputs/lock.py)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from emulator import EmulatorServer
from tasks.config import build_config
from tasks.errors import UsageError
from tasks.inputs.work_items import item_id
from tasks.outputs.layout import STATE_DIR, prepare_out_dir, remove_temporaries
from tasks.outputs.lock import OutLock, live_scopes, scope_holder, writer_of
from tasks.outputs.store import read_index
from tasks.run.plan import plan_run
from tasks.slice import Slice
from tests.builders import images_manifest, prompts_manifest
from tests.cli import rows, vlmbatch

IMAGES = {f"im{k:02d}": ((10 + k, 10), "red") for k in range(12)}
PROMPTS = [
    {"prompt_id": "cap", "prompt": "Caption."},
    {"prompt_id": "why", "prompt": "Why?", "parent_prompt_id": "cap"},  # a chain: stays with its image
    {"prompt_id": "only3", "prompt": "Count.", "image_id": "im03"},
    {"prompt_id": "pair", "prompt": "Compare."},  # image_ids ["im01", "im02"]: sliced by prompt id
]


def write_prompts(tmp_path: Path) -> Path:
    path = prompts_manifest(tmp_path, PROMPTS)
    table = pq.read_table(path)
    multi = pa.array([None, None, None, ["im01", "im02"]], pa.list_(pa.string()))
    pq.write_table(table.append_column("image_ids", multi), path)
    return path


def job_items() -> dict[tuple[str, str], str]:
    """Every work item of the job, (image_id, prompt_id) → its slice key."""
    items = {(i, p): i for i in IMAGES for p in ("cap", "why")}
    items[("im03", "only3")] = "im03"
    items[("im01", "pair")] = "pair"  # a multi-image prompt's row names its first image
    return items


def test_every_slice_sends_only_its_own_items_and_together_they_are_the_job_once(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    images = images_manifest(tmp_path, IMAGES)
    prompts = write_prompts(tmp_path)
    out = tmp_path / "out"
    base = ["run", images, "--prompts", prompts, "--out", out, "--base-url", emulator.base_url]
    items, n = job_items(), 3
    for k in range(1, n + 1):
        part = Slice(k, n)
        mine = {item for item, key in items.items() if part.holds(key)}
        emulator.reset()
        res = vlmbatch(*base, "--slice", f"{k}/{n}", "--shard-size", 4)
        assert res.code == 0, res.err
        sent = emulator.stats()["per_item"]
        assert sent == {item_id(i, p): 1 for i, p in mine}  # its own items, each once, nothing else
        assert f"{len(mine)}" in res.err.split("work items")[0]  # the slice's count up front
    got = rows(out)
    keys = [(r["image_id"], r["prompt_id"]) for r in got]
    assert sorted(keys) == sorted(items) and {r["status"] for r in got} == {"ok"}  # exactly once
    names = [p.name for p in out.glob("part-*.parquet")]
    assert names and all(name.startswith("part-slice-") and "-of-3-" in name for name in names)
    assert {p.name for p in (out / STATE_DIR / "slices").iterdir()} == {f"slice-{k}-of-3" for k in (1, 2, 3)}

    # a slice's resume index and image hashes hold its own part only
    config = build_config(
        {"images": str(images), "prompts": str(prompts), "out": str(out), "slice": "2/3"}, environ={}
    )
    plan = plan_run(config)
    index, hashes = read_index(out, plan.scope, plan.row_filter())
    assert len(index) == plan.work_items == sum(Slice(2, 3).holds(key) for key in items.values())
    whole, all_hashes = read_index(out)
    assert len(whole) == len(items) and len(hashes.table) < len(all_hashes.table)

    # a rerun of a slice resumes its own part: nothing to send; so does a run of the whole job
    emulator.reset()
    assert vlmbatch(*base, "--slice", "2/3").code == 0
    assert vlmbatch(*base).code == 0
    assert emulator.stats()["requests_total"] == 0
    # a slice cut another way resumes from every earlier file, and redoes only what failed
    emulator.configure(fault_script=["500"] * 50)
    assert vlmbatch(*base, "--slice", "1/2", "--force", "--max-retries", 0).code == 2
    emulator.configure(fault_script=[])
    emulator.reset()
    res = vlmbatch(*base, "--slice", "1/2")
    assert res.code == 0, res.err
    redone = {item for item, key in items.items() if Slice(1, 2).holds(key)}
    assert emulator.stats()["per_item"] == {item_id(i, p): 1 for i, p in redone}
    again = [(r["image_id"], r["prompt_id"]) for r in rows(out)]
    assert sorted(again) == sorted(items)  # replaced, never doubled


def test_a_slice_of_a_text_only_job_keeps_chains_together(tmp_path: Path, emulator: EmulatorServer) -> None:
    prompts = prompts_manifest(
        tmp_path,
        [{"prompt_id": f"t{k}", "prompt": "Say hi."} for k in range(6)]
        + [{"prompt_id": "t0b", "prompt": "More.", "parent_prompt_id": "t0"}],
    )
    out = tmp_path / "out"
    for k in (1, 2):
        emulator.reset()
        res = vlmbatch(
            "run", "--prompts", prompts, "--out", out, "--base-url", emulator.base_url, "--slice", f"{k}/2"
        )
        assert res.code == 0, res.err
        mine = {f"t{j}" for j in range(6) if Slice(k, 2).holds(f"t{j}")}
        mine |= {"t0b"} if "t0" in mine else set()
        assert set(emulator.stats()["per_item"]) == {item_id(None, p) for p in mine}
    assert sorted(r["prompt_id"] for r in rows(out)) == sorted([f"t{k}" for k in range(6)] + ["t0b"])


def test_a_run_of_the_whole_job_and_slices_never_write_one_out_together(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red"), "b": ((11, 10), "red")})
    out = prepare_out_dir(tmp_path / "out")
    base = ["run", images, "--out", out, "--base-url", emulator.base_url]
    held = OutLock(out, "slice-run", "slice-2-of-4")
    held.acquire()
    try:
        whole = vlmbatch(*base)
        other_cut = vlmbatch(*base, "--slice", "1/2")
        same = vlmbatch(*base, "--slice", "2/4")
        beside = vlmbatch(*base, "--slice", "1/4")  # another slice of the same cut runs beside it
        assert writer_of(out) is not None and "slice-2-of-4: run slice-run" in (writer_of(out) or "")
    finally:
        held.release()
    assert whole.code == 1 and "being written by slices (slice-2-of-4: run slice-run (pid" in whole.err
    assert "a run of the whole job waits until no slice is running" in whole.err
    assert other_cut.code == 1 and "slices cut another way than --slice 1/2" in other_cut.err
    assert same.code == 1 and "slice slice-2-of-4 is being written by run slice-run" in same.err
    assert beside.code == 0, beside.err
    whole_run = OutLock(out, "whole-run")
    whole_run.acquire()
    try:
        refused = vlmbatch(*base, "--slice", "3/4")
    finally:
        whole_run.release()
    assert (
        refused.code == 1 and "being written by run whole-run" in refused.err and "whole job" in refused.err
    )
    sent = emulator.stats()["requests_total"]
    assert sent == sum(Slice(1, 4).holds(i) for i in "ab")  # only the slice that ran sent anything


def test_slice_locks_and_the_cleanup_of_their_scopes(tmp_path: Path) -> None:
    out = prepare_out_dir(tmp_path / "out")
    one, two = OutLock(out, "r1", "slice-1-of-2"), OutLock(out, "r2", "slice-2-of-2")
    one.acquire()
    two.acquire()
    assert live_scopes(out) == {"slice-1-of-2", "slice-2-of-2"}
    assert "run r2" in (scope_holder(out, "slice-2-of-2") or "") and scope_holder(out, "out") is None
    with pytest.raises(UsageError, match="a run of the whole job waits"):
        OutLock(out, "r3").acquire()
    # a killed run's temporaries: a starting writer deletes those of scopes with no live writer
    names = [
        f".tmp-slice-1-of-2-{'a' * 32}-part-x.parquet",  # live: kept
        f".tmp-slice-3-of-4-{'b' * 32}-part-y.parquet",  # dead: removed
        f".tmp-out-{'c' * 32}-part-z.parquet",  # a whole-job run's, dead: removed
        f".tmp-{'d' * 32}-part-w.parquet",  # named before scopes (a whole-job run's): removed
    ]
    for name in names:
        (out / name).write_bytes(b"half")
    (out / STATE_DIR / "hashes" / f".tmp-slice-1-of-2-{'e' * 32}-h.parquet").write_bytes(b"being written")
    assert len(read_index(out, "slice-2-of-2")[1].table) == 0  # another writer's temporary is not read
    assert remove_temporaries(out, live_scopes(out) - {"slice-2-of-2"}) == 3
    assert [p.name for p in out.glob(".tmp-*")] == [names[0]]
    one.release()
    assert remove_temporaries(out, live_scopes(out) - {"slice-2-of-2"}) == 2  # its part and hash temporaries
    two.release()
    assert live_scopes(out) == set() and writer_of(out) is None
    whole = OutLock(out, "r4")
    whole.acquire()  # free again
    assert live_scopes(out) == {"out"}
    whole.release()


def test_slices_need_a_prefect_server(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url, "--slices", 2)
    assert (
        res.code == 1
        and "--slices runs the job's slices on a Prefect work pool: set PREFECT_API_URL" in res.err
    )
    both = vlmbatch("run", images, "--out", tmp_path / "out", "--slices", 2, "--slice", "1/2")
    assert both.code == 1 and "give one of them" in both.err
    assert emulator.stats()["requests_total"] == 0 and not (tmp_path / "out").exists()
