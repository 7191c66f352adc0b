"""Which requests fail, and how.

Two sources, the script first:

* ``fault_script``: outcomes (``"ok"`` or a kind) for successive model requests (chat completions and
  responses, one script for both) in arrival order; once it runs out, requests are normal (the rate
  below is not consulted while a script is set).
* ``fault_rate`` with ``fault_kinds``: a hash of (seed, work item, attempt number) decides whether an
  attempt fails and with which kind, so the outcome of an attempt does not depend on arrival order
  under concurrency. With ``fault_mode="first_attempt"`` only attempt 1 of each work item may fail.

Kinds split by where they happen (see :mod:`emulator.server` for the full order):
a gateway in front of the model answers ``429``/``503``/``408`` and drops connections (``reset``) before
the request is validated; the engine produces ``500``, ``hang``, ``malformed``, ``bad_json``,
``broken_json`` and ``stream_error`` only for valid requests. ``bad_json`` (JSON that breaks the schema)
and ``broken_json`` (JSON cut in half) spoil the content of a request asking for structured output or
the arguments of an answer that calls a function (:mod:`emulator.tools`); other answers are normal and
no fault is recorded. ``stream_error`` on a request that does not stream is a plain ``500``.
"""

from __future__ import annotations

import hashlib

from emulator.settings import EmulatorSettings

GATEWAY_FAULTS = frozenset({"429", "503", "408", "reset"})
ENGINE_FAULTS = frozenset({"500", "hang", "malformed", "bad_json", "broken_json", "stream_error"})


def rate_fault(seed: int, item: str, attempt: int, rate: float, kinds: tuple[str, ...]) -> str | None:
    """The fault kind of ``attempt`` (1-based) of work item ``item`` under ``rate``, or None."""
    if rate <= 0.0 or not kinds:
        return None
    digest = hashlib.sha256(f"{seed}\x00{item}\x00{attempt}".encode("utf-8", "surrogatepass")).digest()
    draw = int.from_bytes(digest[:8], "big") / 2.0**64
    if draw >= rate:
        return None
    return kinds[int.from_bytes(digest[8:16], "big") % len(kinds)]


class FaultPlanner:
    """Decides the fault of each arriving request; used from the event loop only."""

    def __init__(self) -> None:
        self.script_position = 0

    def decide(self, settings: EmulatorSettings, item: str, attempt: int) -> str | None:
        script = settings.fault_script
        if script:
            if self.script_position >= len(script):
                return None
            step = script[self.script_position]
            self.script_position += 1
            return None if step == "ok" else step
        if settings.fault_mode == "first_attempt" and attempt > 1:
            return None
        return rate_fault(settings.seed, item, attempt, settings.fault_rate, settings.fault_kinds)

    def reset(self) -> None:
        self.script_position = 0
