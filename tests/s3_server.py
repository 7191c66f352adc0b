"""moto's S3 server in a process of its own on a free loopback port (as a real store is: in pytest's
process its thread would wait on pytest's for the GIL, and the CLI's lease renewals with it)."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pyarrow.dataset as ds
from pyarrow import fs as pafs

from tests.prefect_processes import free_port

KEY_ID, SECRET = "AKIAVLMBATCHOUTTEST1", "vlmbatch-out-test-secret"


@contextmanager
def moto_server(log: Path) -> Iterator[str]:
    """The server's URL for the block (its output in ``log``)."""
    port = free_port()
    with log.open("wb") as output:
        server = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    urllib.request.urlopen(f"{url}/moto-api/", timeout=5).close()
                    break
                except OSError:
                    assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
                    time.sleep(0.1)
            yield url
        finally:
            server.terminate()
            server.wait(timeout=30)


def s3_env(url: str) -> dict[str, str]:
    """The environment a user's run would have for an S3-compatible store at ``url``."""
    return {
        "AWS_ENDPOINT_URL": url,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
    }


def s3_client(url: str):  # type: ignore[no-untyped-def]
    return boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )


def plain_rows(url: str, out: str) -> list[dict]:
    """What a plain ``pyarrow.dataset`` reader of ``out`` (s3://…) sees (pyarrow's own S3 filesystem)."""
    filesystem = pafs.S3FileSystem(
        access_key=KEY_ID,
        secret_key=SECRET,
        region="us-east-1",
        endpoint_override=url.removeprefix("http://"),
        scheme="http",
    )
    table = ds.dataset(out.removeprefix("s3://"), filesystem=filesystem, format="parquet").to_table()
    return sorted(table.to_pylist(), key=lambda r: (r["image_id"], r["prompt_id"]))
