"""Never lose a row: resume, replacement, exactly-once, locks, outages (issue: never lose a row)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import tasks.images.loader
from emulator import EmulatorServer
from tasks.outputs.layout import prepare_out_dir
from tasks.outputs.lock import OutLock
from tests.builders import COLOURS, image_bytes, images_manifest, prompts_manifest
from tests.cli import rows, vlmbatch


def _specs(n: int) -> dict:
    return {f"i{k:03d}": ((10 + k, 10), "red") for k in range(n)}


def _assert_exactly_once(out: Path, expected: set[tuple[str, str]]) -> list[dict]:
    got = rows(out)
    keys = [(r["image_id"], r["prompt_id"]) for r in got]
    assert len(keys) == len(set(keys)), "duplicate rows"
    assert set(keys) == expected
    return got


def test_rerun_of_a_finished_job_sends_nothing_and_reads_no_image(
    tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = images_manifest(tmp_path, _specs(20))
    out = tmp_path / "out"
    args = ["run", images, "--out", out, "--base-url", emulator.base_url, "--shard-size", 7]
    assert vlmbatch(*args).code == 0
    first = {(r["image_id"], r["request_key"]) for r in rows(out)}
    hash_files = sorted((out / "_vlmbatch" / "hashes").iterdir())
    emulator.reset()
    reads = []
    real_read = tasks.images.loader.read_image_bytes
    monkeypatch.setattr(
        tasks.images.loader, "read_image_bytes", lambda *a, **k: reads.append(1) or real_read(*a, **k)
    )
    res = vlmbatch(*args)
    assert res.code == 0, res.err
    assert emulator.stats()["requests_total"] == 0
    assert reads == []  # image hashes came from the cache by path, size and mtime
    assert "skipped (already ok)" in res.out and "20" in res.out
    assert {(r["image_id"], r["request_key"]) for r in rows(out)} == first
    assert sorted((out / "_vlmbatch" / "hashes").iterdir()) == hash_files  # nothing new to cache


def test_ids_that_would_meet_through_a_separator_are_told_apart(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """("a\x1fb", "c") and ("a", "b\x1fc") are two work items: a rerun used to take them for one, delete
    both rows and send both again, every time."""
    images = images_manifest(tmp_path, {"a\x1fb": ((10, 10), "red"), "a": ((12, 10), "blue")})
    prompts = prompts_manifest(
        tmp_path, [{"prompt_id": "c", "prompt": "What?"}, {"prompt_id": "b\x1fc", "prompt": "Why?"}]
    )
    args = ["run", images, "--prompts", prompts, "--out", tmp_path / "out", "--base-url", emulator.base_url]
    assert vlmbatch(*args).code == 0
    expected = {(i, p) for i in ("a\x1fb", "a") for p in ("c", "b\x1fc")}
    _assert_exactly_once(tmp_path / "out", expected)
    emulator.reset()
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 0
    _assert_exactly_once(tmp_path / "out", expected)


def test_changed_prompt_resends_only_its_items(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, _specs(6))
    out = tmp_path / "out"
    base = ["run", images, "--out", out, "--base-url", emulator.base_url]
    p1 = prompts_manifest(
        tmp_path, [{"prompt_id": "cap", "prompt": "Caption."}, {"prompt_id": "q", "prompt": "Old?"}]
    )
    assert vlmbatch(*base, "--prompts", p1).code == 0
    emulator.reset()
    p2 = prompts_manifest(
        tmp_path,
        [{"prompt_id": "cap", "prompt": "Caption."}, {"prompt_id": "q", "prompt": "New?"}],
        "p2.parquet",
    )
    assert vlmbatch(*base, "--prompts", p2).code == 0
    assert emulator.stats()["requests_total"] == 6  # only the changed prompt's items
    got = _assert_exactly_once(out, {(i, p) for i in _specs(6) for p in ("cap", "q")})
    assert all('"New?"' in r["text"] for r in got if r["prompt_id"] == "q")
    emulator.reset()
    assert vlmbatch(*base, "--prompts", p2, "--force").code == 0
    assert emulator.stats()["requests_total"] == 12  # --force re-runs everything
    _assert_exactly_once(out, {(i, p) for i in _specs(6) for p in ("cap", "q")})


def test_failed_rows_are_retried_and_replaced(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, _specs(4))
    (tmp_path / "img" / "i002.jpg").write_bytes(b"broken")
    out = tmp_path / "out"
    args = ["run", images, "--out", out, "--base-url", emulator.base_url]
    assert vlmbatch(*args).code == 2
    assert {r["image_id"]: r["status"] for r in rows(out)}["i002"] == "failed"
    (tmp_path / "img" / "i002.jpg").write_bytes(image_bytes((77, 11), COLOURS["blue"]))
    emulator.reset()
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 1
    got = _assert_exactly_once(out, {(i, "caption") for i in _specs(4)})
    fixed = next(r for r in got if r["image_id"] == "i002")
    assert fixed["status"] == "ok" and "77×11 image, mostly blue" in fixed["text"]


def test_an_answer_is_kept_when_its_image_disappears(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, _specs(2))
    out = tmp_path / "out"
    args = ["run", images, "--out", out, "--base-url", emulator.base_url]
    assert vlmbatch(*args).code == 0
    (tmp_path / "img" / "i001.jpg").unlink()
    assert vlmbatch(*args).code == 0
    assert [r["status"] for r in rows(out)] == ["ok", "ok"]


def test_thirty_percent_first_attempt_faults_all_end_ok_once(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    emulator.configure(
        fault_rate=0.3,
        fault_kinds=["429", "500", "503", "reset", "malformed"],
        fault_mode="first_attempt",
        retry_after=0.3,
        latency=0.02,
    )
    specs = _specs(60)
    images = images_manifest(tmp_path, specs)
    out = tmp_path / "out"
    res = vlmbatch("run", images, "--out", out, "--base-url", emulator.base_url, "--concurrency", 16)
    assert res.code == 0, res.err
    got = _assert_exactly_once(out, {(i, "caption") for i in specs})
    assert all(r["status"] == "ok" for r in got)
    stats = emulator.stats()
    assert 5 <= sum(stats["faults"].values()) <= 35
    assert stats["requests_total"] == 60 + sum(stats["faults"].values())
    by_item: dict[str, list[dict]] = {}
    for entry in stats["log"]:
        by_item.setdefault(entry["item"], []).append(entry)
    waited = [e[1]["t"] - e[0]["t"] for e in by_item.values() if e[0]["fault"] in ("429", "503")]
    assert waited and min(waited) >= 0.3  # Retry-After honoured


def test_a_second_run_into_the_same_out_is_refused(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, _specs(2))
    out = prepare_out_dir(tmp_path / "out")
    lock = OutLock(out, "other-run")
    lock.acquire()
    try:
        res = vlmbatch("run", images, "--out", out, "--base-url", emulator.base_url)
    finally:
        lock.release()
    assert res.code == 1 and "being written by run other-run" in res.err
    assert emulator.stats()["requests_total"] == 0
    assert vlmbatch("run", images, "--out", out, "--base-url", emulator.base_url).code == 0  # free again


def test_unwritable_out_exits_1_before_sending(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, _specs(2))
    (tmp_path / "blocker").write_text("a file in the way")
    res = vlmbatch("run", images, "--out", tmp_path / "blocker" / "out", "--base-url", emulator.base_url)
    assert res.code == 1 and "in the way" in res.err
    assert emulator.stats()["requests_total"] == 0


def test_an_outage_longer_than_the_window_aborts_with_exit_3_and_resumes(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    emulator.configure(latency=0.1)
    specs = _specs(40)
    images = images_manifest(tmp_path, specs)
    out = tmp_path / "out"
    args = ["run", images, "--out", out, "--base-url", emulator.base_url, "--concurrency", 2]
    stop_watching = threading.Event()

    def take_down_after_some_answers() -> None:  # not a timer: start-up takes longer on a busy machine
        while not stop_watching.wait(0.02):
            if emulator.stats()["by_status"].get("200", 0) >= 4:
                emulator.configure(down=True)
                return

    watcher = threading.Thread(target=take_down_after_some_answers)
    watcher.start()
    try:
        res = vlmbatch(*args, "--outage-window", 1)
    finally:
        stop_watching.set()
        watcher.join()
    assert res.code == 3, res.out + res.err
    assert "unreachable" in res.err and "--outage-window 1" in res.err
    kept = rows(out)
    assert 1 <= len(kept) < 40 and all(r["status"] == "ok" for r in kept)  # no item marked failed
    emulator.configure(down=False)
    emulator.reset()
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 40 - len(kept)
    _assert_exactly_once(out, {(i, "caption") for i in specs})


def test_a_short_blip_inside_the_window_is_retried(tmp_path: Path, emulator: EmulatorServer) -> None:
    emulator.configure(fault_script=["reset", "reset", "503"], retry_after=0.1)
    images = images_manifest(tmp_path, _specs(3))
    res = vlmbatch(
        "run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url, "--concurrency", 1
    )
    assert res.code == 0, res.err
    assert sum(r["attempts"] for r in rows(tmp_path / "out")) == 6


def test_a_rerun_with_other_columns_is_refused_before_sending(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    images = images_manifest(tmp_path, _specs(2), title=["a", "b"], score=[1, 2])
    out = tmp_path / "out"
    base = ["run", images, "--out", out, "--base-url", emulator.base_url]
    assert vlmbatch(*base, "--carry", "title").code == 0
    emulator.reset()
    res = vlmbatch(*base, "--carry", "score")
    assert res.code == 1
    assert "its files also have title" in res.err and "this run adds score" in res.err
    assert emulator.stats()["requests_total"] == 0
    assert vlmbatch(*base, "--carry", "title").code == 0  # the same columns: fine (and nothing to redo)
