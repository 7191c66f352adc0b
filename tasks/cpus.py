"""How many CPUs this process may use: its CPU affinity (``taskset``, a cpuset) and a cgroup's CPU
quota (a container's CPU limit, e.g. a Kubernetes pod's), not the machine's count, which in a
container is the node's. Sizes the image threads and how many images are prepared at once."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP) -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        count = os.cpu_count() or 2
    quota = cpu_quota(cgroup)
    if quota is not None:
        count = min(count, max(1, math.ceil(quota)))
    return max(1, count)


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The CPU limit, in CPUs, at the root of the cgroup filesystem as this process sees it (cgroup v2
    ``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``): a container's own limit where
    the container has its cgroup namespace (Docker's and Kubernetes' default); None when there is none
    or it cannot be read. (A limit set deeper, e.g. systemd's ``CPUQuota`` on a host, is not seen.)"""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().partition(" ")
        if quota.strip() == "max":
            return None
        return int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None
