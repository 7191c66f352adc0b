"""One clear line for an expected stop, not Prefect's traceback.

When a run stops for a reason vlmbatch expects and explains (interrupted, endpoint unusable, a usage
or config error), the CLI prints one ``error:`` line and exits with the contract's status. Prefect
logs the same exception on the console too: its traceback, then "Finished in state Failed". Without
``--verbose`` those two console records are left out; the Prefect API (and its UI) still get them.
"""

from __future__ import annotations

import logging

from prefect.logging.handlers import PrefectConsoleHandler

from tasks.errors import RunStopped, UsageError

EXPECTED = (RunStopped, UsageError)


class ExpectedStops(logging.Filter):
    """Drops a record carrying an expected stop's exception, and the "Finished in state Failed" that
    follows it."""

    def __init__(self, expected: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.expected = expected
        self.stopped = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.expected):
            self.stopped = True
            return False
        return not (self.stopped and record.getMessage().startswith("Finished in state Failed"))


def hide_expected_stops(*more: type[BaseException]) -> None:
    """Filter the console handlers Prefect put on the root logger (import prefect first); ``more``:
    other exceptions the caller reports itself (a backfill's table of partitions)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(
            isinstance(f, ExpectedStops) for f in handler.filters
        ):
            handler.addFilter(ExpectedStops((*EXPECTED, *more)))
