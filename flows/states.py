"""The final state of a run whose rows did not all succeed, for those who watch deployments.

The CLI exits 2 when some rows failed. A flow run of a deployment has no exit status, and a run that
returns normally ends ``Completed``, so a nightly run with failed rows looked like a perfect one to
whoever alerts on states. Such a run ends in a Completed state named ``CompletedWithFailures``
instead, with the counts in its message: it is still a completed run (no retry, no crash alert;
its result is the same), and Prefect emits ``prefect.flow-run.CompletedWithFailures``, which an
automation can match.
"""

from __future__ import annotations

from typing import TypeVar, cast

from prefect.states import Completed

FAILED_ROWS = "CompletedWithFailures"
T = TypeVar("T")


def with_failed_rows(result: T, message: str) -> T:
    """Return this from a flow: its caller (a parent flow, the CLI) still gets ``result``."""
    return cast(T, Completed(name=FAILED_ROWS, message=message, data=result))
