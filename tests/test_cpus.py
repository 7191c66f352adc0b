"""The CPUs a run sizes its image threads by: affinity and a container's CPU quota, not the machine's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks.cpus import cpu_quota, usable_cpus


@pytest.fixture
def four_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


def test_a_cgroup_v2_quota_caps_the_cpus_rounded_up(tmp_path: Path, four_cpus: None) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a pod limited to 1.5 CPUs
    assert cpu_quota(tmp_path) == 1.5 and usable_cpus(tmp_path) == 2


def test_no_quota_leaves_the_affinity(tmp_path: Path, four_cpus: None) -> None:
    assert usable_cpus(tmp_path) == 4  # no cgroup files at all
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(tmp_path) is None and usable_cpus(tmp_path) == 4


def test_a_cgroup_v1_quota_and_a_quota_above_the_affinity(tmp_path: Path, four_cpus: None) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # unlimited
    assert usable_cpus(tmp_path) == 4
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")  # half a CPU: still one thread
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("800000\n")  # 8 CPUs allowed, 4 in the cpuset
    assert usable_cpus(tmp_path) == 4


def test_this_process_gets_at_least_one_and_no_more_than_its_affinity() -> None:
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
