"""Every way a work item or a run can fail, classified once.

Row-level failures (the row gets ``status=failed`` and an ``error_type``)::

    ItemFailure                  error_type, message, http_status, retryable
    ├── ImageFailure             bad_image, missing_image           (no request sent)
    └── RequestFailure           raised by the endpoint client, one per attempt
        ├── transient            rate_limited, timeout, server_error, connection,
        │                        invalid_response                   (retried by tasks.retry)
        └── terminal             bad_request, auth, not_found, invalid_json
    parent_failed                a chained prompt whose parent failed (no request sent)

Run-level failures (nothing is sent, exit 1)::

    UsageError
    ├── ConfigError              an option has a bad value
    └── ManifestError            a manifest is missing, unreadable or inconsistent

Run-level stops, raised after what was done is written (a rerun continues)::

    RunStopped                   carries the run's summary and exit status
    ├── EndpointUnusable         exit 3: unreachable too long, credentials rejected, unknown model
    ├── OutLost                  exit 4: the run's lease on an object-store OUT lapsed or was taken over
    └── RunInterrupted           exit 130 (SIGINT) / 143 (SIGTERM)

The ``error_type`` names are the contract's (README.md, "Error types"); ``ERROR_TYPES`` documents them.
"""

from __future__ import annotations

from collections.abc import Sequence

ERROR_TYPES: dict[str, str] = {
    "missing_image": "the image file or value does not exist (no request sent)",
    "bad_image": "the image could not be read, decoded or is too large (no request sent)",
    "bad_request": "the endpoint rejected the request (400, 413, 422); never retried",
    "auth": "the endpoint rejected the credentials (401, 403)",
    "not_found": "the endpoint does not know the model or route (404)",
    "rate_limited": "the endpoint kept answering 429 until retries ran out",
    "timeout": "the request timed out (client timeout or 408) until retries ran out",
    "server_error": "the endpoint kept failing with 5xx until retries ran out",
    "connection": "the endpoint could not be reached until retries ran out",
    "invalid_response": "the endpoint's answer could not be parsed until retries ran out",
    "invalid_json": "structured output did not parse or validate against the prompt's schema",
    "parent_failed": "the prompt's parent prompt failed for this image, so it was not sent",
    "no_answer": "the model answered with no text, e.g. its output budget went to reasoning",
    "internal_error": "vlmbatch itself failed on this item (a bug; the log has the traceback)",
}

TRANSIENT_TYPES = frozenset({"rate_limited", "timeout", "server_error", "connection", "invalid_response"})


class ItemFailure(Exception):
    """A failure that becomes one output row with ``status=failed``."""

    def __init__(
        self,
        error_type: str,
        message: str,
        *,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        if error_type not in ERROR_TYPES:
            raise ValueError(f"unknown error_type {error_type!r}")
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.http_status = http_status
        self.retry_after = retry_after

    @property
    def retryable(self) -> bool:
        return self.error_type in TRANSIENT_TYPES

    def __str__(self) -> str:
        return f"{self.error_type}: {self.message}"

    def about(self, what: str) -> ItemFailure:
        """The same failure, its message prefixed with what it concerns (e.g. which of several images)."""
        return type(self)(
            self.error_type,
            f"{what}: {self.message}",
            http_status=self.http_status,
            retry_after=self.retry_after,
        )


class ImageFailure(ItemFailure):
    """The image could not be read or prepared; no request is sent for its work items."""


class RequestFailure(ItemFailure):
    """One attempt at the endpoint failed; ``retryable`` says whether tasks.retry tries again."""

    latency_ms: float | None = None  # how long the attempt took (EndpointClient.send sets it)
    # the next attempt goes at once to another replica, one this item has not failed on (ItemSender
    # sets it): tasks.retry waits no backoff and no Retry-After for it, and still counts the attempt
    retry_elsewhere: bool = False


class UsageError(Exception):
    """A problem with what the user asked for: exit 1, nothing sent, nothing written."""


class ConfigError(UsageError):
    """An option, environment variable or config-file key has a bad value."""


MAX_LISTED = 10  # rows or values named in one manifest message


def rows_phrase(positions: Sequence[int]) -> str:
    """``row 3`` or ``rows 1, 4 and 12 more``: the manifest rows (0-based) a message names."""
    shown = ", ".join(str(p) for p in positions[:MAX_LISTED])
    more = f" and {len(positions) - MAX_LISTED} more" if len(positions) > MAX_LISTED else ""
    return f"row{'s' if len(positions) != 1 else ''} {shown}{more}"


class ManifestError(UsageError):
    """A manifest is missing, not Parquet, or has bad columns or rows."""


class RunStopped(Exception):
    """The run stopped early; what was done is written. ``summary`` is a tasks.outputs.summary.RunSummary."""

    exit_code = 1

    def __init__(self, message: str, summary: object) -> None:
        super().__init__(message)
        self.summary = summary


class EndpointUnusable(RunStopped):
    exit_code = 3


class OutLost(RunStopped):
    exit_code = 4


class RunInterrupted(RunStopped):
    def __init__(self, message: str, summary: object, exit_code: int) -> None:
        super().__init__(message, summary)
        self.exit_code = exit_code
