"""Remote image sources through the real CLI: http(s) fetched or passed through, and s3://."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from emulator import EmulatorServer
from tests.builders import COLOURS, image_bytes, write_parquet
from tests.cli import rows, vlmbatch


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def web(tmp_path: Path) -> Iterator[str]:
    """A static web server on loopback serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    (root / "green.png").write_bytes(image_bytes((90, 45), COLOURS["green"], "PNG"))
    (root / "big.jpg").write_bytes(image_bytes((2400, 1600), COLOURS["blue"]))
    (root / "notes.txt").write_text("not an image")
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def _manifest(tmp_path: Path, web: str) -> Path:
    names = ["green.png", "big.jpg", "notes.txt", "missing.jpg"]
    return write_parquet(tmp_path / "m.parquet", {"image_id": names, "image": [f"{web}/{n}" for n in names]})


def test_http_images_are_fetched_prepared_and_checked(
    tmp_path: Path, emulator: EmulatorServer, web: str
) -> None:
    manifest = _manifest(tmp_path, web)
    out = tmp_path / "out"
    res = vlmbatch("run", manifest, "--out", out, "--base-url", emulator.base_url, "--allow-private-urls")
    assert res.code == 2, res.err
    got = {r["image_id"]: r for r in rows(out)}
    assert "90×45 image, mostly green" in got["green.png"]["text"]
    big = got["big.jpg"]
    assert (big["image_width"], big["image_height"]) == (2400, 1600)
    assert big["sent_width"] * big["sent_height"] <= 2304 * 280
    assert f"{big['sent_width']}×{big['sent_height']} image, mostly blue" in big["text"]
    assert (got["notes.txt"]["error_type"], got["missing.jpg"]["error_type"]) == (
        "bad_image",
        "missing_image",
    )
    assert emulator.stats()["requests_total"] == 2


def test_private_addresses_are_refused_by_default(tmp_path: Path, emulator: EmulatorServer, web: str) -> None:
    manifest = _manifest(tmp_path, web)
    res = vlmbatch("run", manifest, "--out", tmp_path / "out", "--base-url", emulator.base_url)
    assert res.code == 2
    for r in rows(tmp_path / "out"):
        assert r["error_type"] == "bad_image" and "--allow-private-urls" in r["error_message"]
    assert emulator.stats()["requests_total"] == 0


def test_pass_mode_sends_the_url_for_the_server_to_fetch(
    tmp_path: Path, emulator: EmulatorServer, web: str
) -> None:
    manifest = write_parquet(tmp_path / "m.parquet", {"image_id": ["g"], "image": [f"{web}/green.png"]})
    out = tmp_path / "out"
    args = ["run", manifest, "--out", out, "--base-url", emulator.base_url, "--image-urls", "pass"]
    res = vlmbatch(*args)
    assert res.code == 0, res.err
    (row,) = rows(out)
    assert "90×45 image, mostly green" in row["text"]  # the emulator fetched it
    assert row["image_sha256"] is None and row["sent_width"] is None
    emulator.reset()
    assert vlmbatch(*args).code == 0
    assert emulator.stats()["requests_total"] == 0  # the URL is the image's identity for resume


def test_s3_images(tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch) -> None:
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds)
        s3.create_bucket(Bucket="photos")
        s3.put_object(Bucket="photos", Key="day1/red.jpg", Body=image_bytes((33, 22), COLOURS["red"]))
        for name, value in {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
        }.items():
            monkeypatch.setenv(name, value)
        manifest = write_parquet(
            tmp_path / "m.parquet",
            {"image_id": ["r", "gone"], "image": ["s3://photos/day1/red.jpg", "s3://photos/day1/nope.jpg"]},
        )
        res = vlmbatch("run", manifest, "--out", tmp_path / "out", "--base-url", emulator.base_url)
        assert res.code == 2, res.err
        got = {r["image_id"]: r for r in rows(tmp_path / "out")}
        assert "33×22 image, mostly red" in got["r"]["text"]
        assert got["gone"]["error_type"] == "missing_image"
    finally:
        server.stop()
