"""Shared fixtures: an isolated Prefect home, the endpoint emulator, manifest builders."""

from __future__ import annotations

import os
import tempfile

# Before anything imports prefect: a private home (one embedded database for the whole session),
# no analytics (no network), quiet logs.
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="vlmbatch-test-prefect-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
os.environ.pop("VLMBATCH_API_KEY", None)

from collections.abc import Iterator

import pytest

from emulator import EmulatorServer, EmulatorSettings


@pytest.fixture(scope="session")
def _emulator_session() -> Iterator[EmulatorServer]:
    with EmulatorServer(EmulatorSettings(latency=0.01)) as server:
        yield server


@pytest.fixture
def emulator(_emulator_session: EmulatorServer) -> Iterator[EmulatorServer]:
    """The shared emulator, with clean stats and default faults for each test."""
    _emulator_session.configure(
        latency=0.01, jitter=0.0, fault_rate=0.0, fault_script=[], down=False, retry_after=1.0
    )
    _emulator_session.reset()
    yield _emulator_session
