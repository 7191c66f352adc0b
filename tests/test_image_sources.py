"""Tests for tasks.images.sources: parsing manifest cells and reading image bytes."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from tasks.config import ImageConfig
from tasks.errors import ImageFailure
from tasks.images.sources import ImageSource, is_http, parse_image_value, read_image_bytes

PAYLOAD = b"\x89PNG\r\n\x1a\n not really a png, bytes are bytes here \x00\xff"
CONFIG = ImageConfig()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    images = tmp_path / "root"
    (images / "sub dir").mkdir(parents=True)
    (images / "a.png").write_bytes(PAYLOAD)
    (images / "sub dir" / "b #1.png").write_bytes(PAYLOAD + b"b")
    (tmp_path / "outside.png").write_bytes(b"secret")
    return images


def read(source: ImageSource, root: Path, config: ImageConfig = CONFIG) -> bytes:
    return read_image_bytes(source, config, image_root=root)


def failure(excinfo: pytest.ExceptionInfo[ImageFailure]) -> tuple[str, str]:
    return excinfo.value.error_type, excinfo.value.message


def test_relative_path_resolves_against_manifest_dir(root: Path) -> None:
    source = parse_image_value("sub dir/b #1.png", manifest_dir=root)
    assert source == ImageSource("path", str(root / "sub dir" / "b #1.png"), "sub dir/b #1.png")
    assert read(source, root) == PAYLOAD + b"b"


def test_absolute_path(root: Path, tmp_path: Path) -> None:
    source = parse_image_value(str(root / "a.png"), manifest_dir=tmp_path / "elsewhere")
    assert source.kind == "path" and source.value == str(root / "a.png")
    assert read(source, root) == PAYLOAD


def test_tilde_is_not_expanded(root: Path) -> None:
    source = parse_image_value("~/a.png", manifest_dir=root)
    assert source.value == str(root / "~" / "a.png")


def test_file_url_is_percent_decoded(root: Path) -> None:
    url = "file://" + str(root).replace(" ", "%20") + "/sub%20dir/b%20%231.png"
    source = parse_image_value(url, manifest_dir=Path("/nowhere"))
    assert source == ImageSource("path", str(root / "sub dir" / "b #1.png"), url)
    assert read(source, root) == PAYLOAD + b"b"
    assert parse_image_value(f"file://localhost{root}/a.png", manifest_dir=root).value == str(root / "a.png")
    assert parse_image_value(f"FILE:{root}/a.png", manifest_dir=Path("/x")).value == str(root / "a.png")


@pytest.mark.parametrize(
    "url",
    ["file://server/share/a.png", "file:///a.png?x=1", "file:///a.png#frag", "file:a.png", "file://[x/a.png"],
)
def test_unusable_file_urls(url: str, root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        parse_image_value(url, manifest_dir=root)
    assert excinfo.value.error_type == "bad_image"
    assert "file:// URL" in excinfo.value.message


@pytest.mark.parametrize("value", ["a\x00.png", "file:///a\x00.png", "https://x.test/a\x00.png"])
def test_a_nul_character_is_bad_image(value: str, root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        parse_image_value(value, manifest_dir=root)
    assert excinfo.value.error_type == "bad_image" and "NUL character" in excinfo.value.message


@pytest.mark.parametrize("value", [PAYLOAD, bytearray(PAYLOAD), memoryview(PAYLOAD)])
def test_raw_bytes(value: bytes | bytearray | memoryview, root: Path) -> None:
    source = parse_image_value(value, manifest_dir=root)
    assert source == ImageSource("bytes", PAYLOAD, f"<{len(PAYLOAD)} bytes>")
    assert read(source, root) == PAYLOAD


def test_hf_struct_prefers_bytes(root: Path) -> None:
    source = parse_image_value({"bytes": PAYLOAD, "path": "ignored.png"}, manifest_dir=root)
    assert source.kind == "bytes" and source.value == PAYLOAD


@pytest.mark.parametrize("data", [None, b""])
def test_hf_struct_falls_back_to_path(data: bytes | None, root: Path) -> None:
    source = parse_image_value({"bytes": data, "path": "a.png"}, manifest_dir=root)
    assert source == ImageSource("path", str(root / "a.png"), "a.png")
    assert read(source, root) == PAYLOAD


@pytest.mark.parametrize(
    "value",
    [
        None,
        b"",
        "",
        "   ",
        {"bytes": None, "path": None},
        {"bytes": b"", "path": ""},
        {},
        "data:image/png;base64,",
    ],
)
def test_missing_image(value: object, root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        parse_image_value(value, manifest_dir=root)
    assert excinfo.value.error_type == "missing_image"
    assert excinfo.value.message.startswith("no image")


def test_null_message(root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        parse_image_value(None, manifest_dir=root)
    assert failure(excinfo) == ("missing_image", "no image (the image value is null)")


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64," + base64.b64encode(PAYLOAD).decode(),
        "DATA:image/png;charset=x;BASE64," + base64.b64encode(PAYLOAD).decode(),
        "data:;base64," + base64.b64encode(PAYLOAD).decode().rstrip("="),  # missing padding
        "data:image/png;base64," + base64.b64encode(PAYLOAD).decode().replace("+", "%2B").replace("/", "%2F"),
        "data:image/png;base64,\n" + base64.encodebytes(PAYLOAD).decode(),  # MIME line breaks
        "data:image/png," + "".join(f"%{byte:02X}" for byte in PAYLOAD),
        "data:," + "".join(chr(b) if 0x21 <= b < 0x7F and b != 0x25 else f"%{b:02x}" for b in PAYLOAD),
    ],
)
def test_data_urls(url: str, root: Path) -> None:
    source = parse_image_value(url, manifest_dir=root)
    assert source == ImageSource("bytes", PAYLOAD, f"data: URL ({len(PAYLOAD)} bytes)")


@pytest.mark.parametrize(
    ("url", "expected"),
    [("data:image/png;base64", "no ','"), ("data:image/png;base64,!!!not*base64", "invalid base64")],
)
def test_malformed_data_urls(url: str, expected: str, root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        parse_image_value(url, manifest_dir=root)
    assert excinfo.value.error_type == "bad_image"
    assert "malformed data: URL" in excinfo.value.message and expected in excinfo.value.message


@pytest.mark.parametrize("url", ["http://example.com/a.jpg", "HTTPS://example.com/a.jpg?x=1"])
def test_http_urls_are_left_to_the_async_fetcher(url: str, root: Path) -> None:
    source = parse_image_value(url, manifest_dir=root)
    assert source == ImageSource("url", url, url)
    assert is_http(source)
    with pytest.raises(ImageFailure) as excinfo:
        read(source, root)
    assert excinfo.value.error_type == "bad_image"
    assert "fetched asynchronously by ImageFetcher" in excinfo.value.message and url in excinfo.value.message


@pytest.mark.parametrize("url", ["s3://bucket/a.jpg", "GS://bucket/dir/a.jpg"])
def test_object_store_urls_are_read_synchronously(url: str, root: Path) -> None:
    source = parse_image_value(url, manifest_dir=root)
    assert source == ImageSource("url", url, url) and not is_http(source)


def test_object_store_url_without_a_key_is_bad_image(root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value("s3://bucket", manifest_dir=root), root)
    assert excinfo.value.error_type == "bad_image" and "not an object" in excinfo.value.message


def test_is_http_is_false_for_other_sources(root: Path) -> None:
    assert not is_http(parse_image_value("a.png", manifest_dir=root))
    assert not is_http(parse_image_value(PAYLOAD, manifest_dir=root))
    assert not is_http(parse_image_value("data:,x", manifest_dir=root))


@pytest.mark.parametrize("url", ["ftp://host/a.jpg", "hf://datasets/x/a.jpg", "az://c/a.jpg"])
def test_unknown_scheme(url: str, root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        parse_image_value(url, manifest_dir=root)
    assert excinfo.value.error_type == "bad_image"
    assert "unsupported image source scheme" in excinfo.value.message


@pytest.mark.parametrize("value", [42, 1.5, ["a.png"], {"bytes": "text"}, {"path": 7}])
def test_other_types_are_bad_image(value: object, root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        parse_image_value(value, manifest_dir=root)
    assert excinfo.value.error_type == "bad_image"


def test_inconsistent_source_is_a_programming_error(root: Path) -> None:
    with pytest.raises(TypeError):
        read(ImageSource("path", PAYLOAD, "x"), root)


def test_dotdot_outside_root(root: Path) -> None:
    source = parse_image_value("../outside.png", manifest_dir=root)
    with pytest.raises(ImageFailure) as excinfo:
        read(source, root)
    assert excinfo.value.error_type == "bad_image"
    assert "resolves outside the image root" in excinfo.value.message
    assert "../outside.png" in excinfo.value.message


def test_symlink_outside_root(root: Path, tmp_path: Path) -> None:
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value("link.png", manifest_dir=root), root)
    assert excinfo.value.error_type == "bad_image"
    assert "resolves outside the image root" in excinfo.value.message


def test_symlink_inside_root_is_fine(root: Path) -> None:
    (root / "alias.png").symlink_to(root / "a.png")
    assert read(parse_image_value("alias.png", manifest_dir=root), root) == PAYLOAD


def test_root_given_through_a_symlink(root: Path, tmp_path: Path) -> None:
    (tmp_path / "root-link").symlink_to(root)
    source = parse_image_value("a.png", manifest_dir=tmp_path / "root-link")
    assert read(source, tmp_path / "root-link") == PAYLOAD


def test_missing_file_names_the_path(root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value("nope/missing.png", manifest_dir=root), root)
    assert excinfo.value.error_type == "missing_image"
    assert "nope/missing.png" in excinfo.value.message and "does not exist" in excinfo.value.message


def test_directory_is_bad_image(root: Path) -> None:
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value("sub dir", manifest_dir=root), root)
    assert failure(excinfo)[0] == "bad_image" and "directory" in excinfo.value.message


def test_empty_file_is_bad_image(root: Path) -> None:
    (root / "empty.png").write_bytes(b"")
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value("empty.png", manifest_dir=root), root)
    assert failure(excinfo)[0] == "bad_image" and "empty" in excinfo.value.message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads anything")
def test_unreadable_file_is_bad_image(root: Path) -> None:
    (root / "a.png").chmod(0)
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value("a.png", manifest_dir=root), root)
    assert failure(excinfo)[0] == "bad_image"


def test_byte_cap_on_files_and_bytes(root: Path) -> None:
    config = ImageConfig(max_image_bytes=len(PAYLOAD) - 1)
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value("a.png", manifest_dir=root), root, config)
    assert excinfo.value.error_type == "bad_image"
    assert (
        f"{len(PAYLOAD):,} bytes" in excinfo.value.message
        and f"{len(PAYLOAD) - 1:,}" in excinfo.value.message
    )
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value(PAYLOAD, manifest_dir=root), root, config)
    assert excinfo.value.error_type == "bad_image" and "over the cap" in excinfo.value.message
    exact = ImageConfig(max_image_bytes=len(PAYLOAD))
    assert read(parse_image_value("a.png", manifest_dir=root), root, exact) == PAYLOAD


def test_byte_cap_is_checked_before_reading(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with open(root / "huge.png", "wb") as file:
        file.truncate(CONFIG.max_image_bytes + 1)  # sparse

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("read although over the cap")

    monkeypatch.setattr("tasks.images.sources.open", no_open, raising=False)
    with pytest.raises(ImageFailure) as excinfo:
        read(parse_image_value("huge.png", manifest_dir=root), root)
    assert excinfo.value.error_type == "bad_image" and "max_image_bytes" in excinfo.value.message
