"""Shared fixtures: an isolated Prefect home, the endpoint emulator, manifest builders."""

from __future__ import annotations

import dataclasses
import os
import tempfile

# Before anything imports prefect: a private home (one Prefect database for the whole session),
# no analytics (no network), quiet logs.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="vlmbatch-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.pop("VLMBATCH_API_KEY", None)

from collections.abc import Iterator

import pytest

from emulator import EmulatorServer, EmulatorSettings
from emulator.settings import STARTUP_ONLY

SESSION_SETTINGS = EmulatorSettings(latency=0.01)


@pytest.fixture(scope="session")
def _emulator_session() -> Iterator[EmulatorServer]:
    with EmulatorServer(SESSION_SETTINGS) as server:
        yield server


@pytest.fixture
def emulator(_emulator_session: EmulatorServer) -> Iterator[EmulatorServer]:
    """The shared emulator with clean stats and every runtime setting back to the session's: what one
    test configured (a fault mode, a concurrency cap) must not reach the next."""
    defaults = {
        f.name: getattr(SESSION_SETTINGS, f.name)
        for f in dataclasses.fields(SESSION_SETTINGS)
        if f.name not in STARTUP_ONLY
    }
    _emulator_session.configure(**defaults)
    _emulator_session.reset()
    yield _emulator_session
