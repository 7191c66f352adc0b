"""Tests for tasks.images.object_store against moto's S3 server on loopback (and gs:// URL parsing)."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests")
import boto3
import moto.settings
from moto.server import ThreadedMotoServer
from pyarrow import fs as pafs

from tasks.config import ImageConfig
from tasks.errors import ImageFailure
from tasks.images.object_store import ObjectStore, ObjectURL, parse_object_url
from tasks.images.prepare import prepare_image
from tasks.images.sources import is_http, parse_image_value, read_image_bytes
from tasks.inputs.manifests import read_images_manifest
from tasks.outputs.report_images import make_thumbnails
from tests.builders import write_parquet

BUCKET = "vlmbatch-images"
KEY_ID, SECRET = "AKIAVLMBATCHTESTKEY1", "vlmbatch-test-secret-value"


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


JPEG = _jpeg()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    s3 = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
    )
    s3.create_bucket(Bucket=BUCKET)
    for key, body in {
        "a/cat.jpg": JPEG,
        "a/big.bin": b"x" * 2000,
        "empty.jpg": b"",
        "b c%20d.jpg": JPEG,
    }.items():
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture
def env(endpoint: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": KEY_ID,
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
    }
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def fails(store: ObjectStore, url: str, error_type: str, max_bytes: int = 10_000_000) -> str:
    with pytest.raises(ImageFailure) as excinfo:
        store.read(url, max_bytes)
    assert excinfo.value.error_type == error_type, excinfo.value.message
    return excinfo.value.message


def test_good_object(env: dict[str, str]) -> None:
    store = ObjectStore(env)
    assert store.read(f"s3://{BUCKET}/a/cat.jpg", 10_000_000) == JPEG
    assert store.read(f"s3://{BUCKET}/b c%20d.jpg", 10_000_000) == JPEG  # the key is taken literally


def test_through_read_image_bytes_and_the_environment(env: dict[str, str], tmp_path: Path) -> None:
    source = parse_image_value(f"s3://{BUCKET}/a/cat.jpg", manifest_dir=tmp_path)
    assert source.kind == "url" and not is_http(source)
    data = read_image_bytes(source, ImageConfig(), image_root=tmp_path)
    assert data == JPEG and prepare_image(data, ImageConfig()).width == 256
    with pytest.raises(ImageFailure) as excinfo:
        read_image_bytes(source, ImageConfig(max_image_bytes=100), image_root=tmp_path)
    assert excinfo.value.error_type == "bad_image" and "max_image_bytes" in excinfo.value.message


def test_missing_object_is_missing_image(env: dict[str, str]) -> None:
    store = ObjectStore(env)
    message = fails(store, f"s3://{BUCKET}/a/nope.jpg", "missing_image")
    assert message == f"image s3://{BUCKET}/a/nope.jpg does not exist"
    assert "does not exist" in fails(store, f"s3://{BUCKET}/a", "missing_image")  # a prefix, no object


def test_missing_bucket_is_missing_image(env: dict[str, str]) -> None:
    message = fails(ObjectStore(env), "s3://no-such-bucket/a.jpg", "missing_image")
    assert "no bucket 'no-such-bucket'" in message


def test_over_the_cap_is_bad_image(env: dict[str, str]) -> None:
    store = ObjectStore(env)
    message = fails(store, f"s3://{BUCKET}/a/big.bin", "bad_image", max_bytes=1000)
    assert message == (
        f"image s3://{BUCKET}/a/big.bin is 2,000 bytes, over the cap of 1,000 bytes (max_image_bytes)"
    )
    assert store.read(f"s3://{BUCKET}/a/big.bin", 2000) == b"x" * 2000


def test_empty_object_is_bad_image(env: dict[str, str]) -> None:
    assert "empty" in fails(ObjectStore(env), f"s3://{BUCKET}/empty.jpg", "bad_image")


def test_access_denied_is_bad_image_without_credentials(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # moto now checks the keys
    message = fails(ObjectStore(env), f"s3://{BUCKET}/a/cat.jpg", "bad_image")
    assert message.startswith(f"access denied to image s3://{BUCKET}/a/cat.jpg")
    assert KEY_ID not in message and SECRET not in message


def test_s3_specific_endpoint_wins(env: dict[str, str]) -> None:
    with socket.socket() as probe:  # a closed port: the generic endpoint must not be used
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
    store = ObjectStore({**env, "AWS_ENDPOINT_URL": closed, "AWS_ENDPOINT_URL_S3": env["AWS_ENDPOINT_URL"]})
    assert store.read(f"s3://{BUCKET}/a/cat.jpg", 10_000_000) == JPEG


def test_one_filesystem_per_bucket_shared_by_threads(env: dict[str, str]) -> None:
    store = ObjectStore(env)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: store.read(f"s3://{BUCKET}/a/cat.jpg", 10**7), range(16)))
    assert results == [JPEG] * 16
    assert store.filesystem("s3", BUCKET) is store.filesystem("s3", BUCKET)
    assert store.filesystem("s3", BUCKET) is not store.filesystem("s3", "other-bucket")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket/key.jpg", ObjectURL("s3", "bucket", "key.jpg")),
        ("S3://bucket/a/b/c.jpg", ObjectURL("s3", "bucket", "a/b/c.jpg")),
        (
            "gs://my_bucket.example/dir/file name%20x.png",
            ObjectURL("gs", "my_bucket.example", "dir/file name%20x.png"),
        ),
    ],
)
def test_parse_object_url(url: str, expected: ObjectURL) -> None:
    assert parse_object_url(url) == expected
    assert expected.path == f"{expected.bucket}/{expected.key}"


@pytest.mark.parametrize(
    ("url", "text"),
    [
        ("s3://", "invalid bucket name"),
        ("s3:///key.jpg", "invalid bucket name"),
        ("gs://bu cket/x.jpg", "invalid bucket name"),
        ("gs://bucket", "not an object"),
        ("s3://bucket/prefix/", "not an object"),
        ("http://bucket/x", "not an s3:// or gs:// URL"),
    ],
)
def test_unusable_object_urls(url: str, text: str) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        parse_object_url(url)
    assert excinfo.value.error_type == "bad_image" and text in excinfo.value.message


def test_gcs_emulator_setting_gives_an_anonymous_filesystem() -> None:
    store = ObjectStore({"STORAGE_EMULATOR_HOST": "http://127.0.0.1:4443"})
    filesystem = store.filesystem("gs", "bucket")
    assert isinstance(filesystem, pafs.GcsFileSystem)
    assert store.filesystem("gs", "bucket") is filesystem


def test_report_thumbnails_read_object_store_images(env: dict[str, str], tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "images.parquet",
        {"image_id": ["cat", "gone"], "image": [f"s3://{BUCKET}/a/cat.jpg", f"s3://{BUCKET}/nowhere.jpg"]},
    )
    thumbs = make_thumbnails(read_images_manifest(path), ["cat", "gone"], ImageConfig(), image_root=tmp_path)
    assert (thumbs["cat"].url or "").startswith("data:image/jpeg;base64,")
    assert (thumbs["gone"].note or "").startswith("missing_image:")
