"""Helpers of the object-store OUT tests (S3 on moto, GCS on fake-gcs-server)."""

from __future__ import annotations

import threading

from tasks.errors import UsageError
from tasks.outputs.lease import Lease


def race(leases: list[Lease]) -> tuple[list[str], Lease]:
    """Every lease tries to acquire at the same moment, each on a thread of its own: the outcomes
    ("held", or the refusal's message) and the one lease that is held (asserted: exactly one)."""
    outcomes: list[str] = []
    gate = threading.Barrier(len(leases))

    def take(lease: Lease) -> None:
        gate.wait()
        try:
            lease.acquire()
            outcomes.append("held")
        except UsageError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=take, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("held") == 1, outcomes
    return outcomes, next(lease for lease in leases if lease.held)
