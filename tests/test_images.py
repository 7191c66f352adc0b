"""Tests for tasks/images/prepare.py: target sizes, pass-through, re-encoding, failures (images made here)."""

from __future__ import annotations

import base64
import hashlib
import io
import random
import struct
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from PIL import ExifTags, Image, ImageFile, ImageOps, JpegImagePlugin

from tasks.config import PIXELS_PER_SOFT_TOKEN, ImageConfig
from tasks.errors import ImageFailure
from tasks.images import prepare as images
from tasks.images.prepare import PreparedImage, load_image, prepare_image, target_size
from tasks.images.sources import parse_image_value

CONFIG = ImageConfig()
RED, GREEN, BLUE, YELLOW, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 255, 255)
Colour = tuple[int, ...]


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def sent_bytes(prepared: PreparedImage) -> bytes:
    prefix, url = f"data:{prepared.mime};base64,", str(prepared.url)
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix) :], validate=True)


def sent_image(prepared: PreparedImage) -> Image.Image:
    img = Image.open(io.BytesIO(sent_bytes(prepared)))
    assert img.size == (prepared.sent_width, prepared.sent_height)
    return img


def close(actual: object, expected: Colour, tolerance: int = 12) -> bool:
    assert isinstance(actual, tuple)
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def quadrants(size: tuple[int, int], colours: tuple[Colour, Colour, Colour, Colour]) -> Image.Image:
    """Top-left, top-right, bottom-left, bottom-right blocks of colour."""
    width, height = size
    img = Image.new("RGB", size)
    boxes = [(0, 0), (width // 2, 0), (0, height // 2), (width // 2, height // 2)]
    for (x, y), colour in zip(boxes, colours, strict=True):
        img.paste(colour, (x, y, x + width // 2, y + height // 2))
    return img


def corner_colours(img: Image.Image) -> list[object]:
    width, height = img.size
    rgb = img.convert("RGB")
    return [
        rgb.getpixel((x, y)) for y in (height // 4, 3 * height // 4) for x in (width // 4, 3 * width // 4)
    ]


def reference_target_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The spec literally: scale by sqrt, floor, then shrink the longer side by 1 px while over."""
    if width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    w, h = max(1, int(width * scale)), max(1, int(height * scale))
    while w * h > max_pixels:
        if w >= h:
            w -= 1
        else:
            h -= 1
    return w, h


# --- target_size ---------------------------------------------------------------------------------------


def test_target_size_small_grid_matches_the_spec() -> None:
    for max_pixels in (1, 2, 7, 50, 99, 400):
        for width in range(1, 41):
            for height in range(1, 41):
                assert target_size(width, height, max_pixels) == reference_target_size(
                    width, height, max_pixels
                )


def test_target_size_properties_on_random_and_extreme_sizes() -> None:
    rng = random.Random(1234)
    sizes = [(rng.randint(1, 20000), rng.randint(1, 20000)) for _ in range(3000)]
    sizes += [(100000, 3), (3, 100000), (100000, 1), (1, 100000), (65535, 65535), (1, 1), (4000, 3000)]
    sizes += [(rng.randint(1, 200000), rng.randint(1, 20)) for _ in range(500)]
    for width, height in sizes:
        for max_pixels in (PIXELS_PER_SOFT_TOKEN * 70, PIXELS_PER_SOFT_TOKEN * 280, 1000, 1):
            w, h = target_size(width, height, max_pixels)
            assert 1 <= w <= width and 1 <= h <= height
            if width * height <= max_pixels:
                assert (w, h) == (width, height)
                continue
            assert w * h <= max_pixels
            assert (w + 1) * (h + 1) > max_pixels  # as large as possible
            if min(w, h) >= 100:  # aspect kept to within flooring
                assert abs(w / h - width / height) <= (width / height) * 2.5 / min(w, h)


def test_target_size_examples() -> None:
    assert target_size(4000, 3000, 645120) == (927, 695)
    assert target_size(100000, 3, 1000) == (1000, 1)
    assert target_size(803, 803, 645120) == (803, 803)
    with pytest.raises(ValueError):
        target_size(0, 10, 100)


# --- sent unchanged -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "mode", "mime"),
    [
        ("JPEG", "RGB", "image/jpeg"),
        ("PNG", "RGB", "image/png"),
        ("JPEG", "L", "image/jpeg"),
        ("PNG", "L", "image/png"),
    ],
)
def test_in_budget_images_are_sent_byte_identical(fmt: str, mode: str, mime: str) -> None:
    data = encode(quadrants((320, 240), (RED, GREEN, BLUE, YELLOW)).convert(mode), fmt)
    prepared = prepare_image(data, CONFIG)
    assert sent_bytes(prepared) == data
    assert prepared == PreparedImage(
        prepared.url, hashlib.sha256(data).hexdigest(), 320, 240, 320, 240, mime, False
    )


def test_exif_orientation_1_is_sent_unchanged() -> None:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 1
    data = encode(Image.new("RGB", (40, 30), RED), "JPEG", exif=exif.tobytes())
    assert sent_bytes(prepare_image(data, CONFIG)) == data


def test_mpo_is_sent_as_jpeg() -> None:
    data = encode(
        Image.new("RGB", (40, 30), RED), "MPO", save_all=True, append_images=[Image.new("RGB", (40, 30))]
    )
    assert Image.open(io.BytesIO(data)).format == "MPO"
    prepared = prepare_image(data, CONFIG)
    assert (prepared.mime, prepared.reencoded, sent_bytes(prepared)) == ("image/jpeg", False, data)


def test_still_gif_is_reencoded_because_it_is_palette_based() -> None:
    data = encode(Image.new("RGB", (40, 30), RED), "GIF")
    assert Image.open(io.BytesIO(data)).mode == "P"
    prepared = prepare_image(data, CONFIG)
    assert (prepared.mime, prepared.reencoded, prepared.sent_width, prepared.sent_height) == (
        "image/jpeg",
        True,
        40,
        30,
    )
    assert close(sent_image(prepared).getpixel((20, 15)), RED, 20)


# --- downscaling ----------------------------------------------------------------------------------------


def test_big_jpeg_is_downscaled_through_draft(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(quadrants((4000, 3000), (RED, GREEN, BLUE, YELLOW)), "JPEG", quality=80)
    drafts: list[tuple[object, ...]] = []
    resized_from: list[tuple[int, int]] = []
    real_draft, real_resize = JpegImagePlugin.JpegImageFile.draft, images._resize

    def spy_draft(self: JpegImagePlugin.JpegImageFile, mode: str | None, size: tuple[int, int] | None) -> Any:
        drafts.append((mode, size))
        return real_draft(self, mode, size)

    def spy_resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
        resized_from.append(img.size)
        return real_resize(img, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy_draft)
    monkeypatch.setattr(images, "_resize", spy_resize)
    prepared = prepare_image(data, CONFIG)

    target = target_size(4000, 3000, CONFIG.max_pixels)
    assert drafts == [("RGB", target)]
    assert resized_from == [(1000, 750)]  # libjpeg decoded at 1/4 scale, not 4000x3000
    assert (prepared.width, prepared.height, prepared.reencoded, prepared.mime) == (
        4000,
        3000,
        True,
        "image/jpeg",
    )
    assert (prepared.sent_width, prepared.sent_height) == target
    assert prepared.sent_width * prepared.sent_height <= PIXELS_PER_SOFT_TOKEN * CONFIG.max_soft_tokens
    assert abs(prepared.sent_width / prepared.sent_height - 4 / 3) / (4 / 3) < 0.01
    assert [
        close(c, e, 20)
        for c, e in zip(corner_colours(sent_image(prepared)), (RED, GREEN, BLUE, YELLOW), strict=True)
    ] == [True] * 4
    assert prepared.sha256 == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("soft_tokens", [70, 1120])
def test_big_png_follows_the_token_budget(soft_tokens: int) -> None:
    data = encode(Image.new("RGB", (3800, 2000), BLUE), "PNG")
    prepared = prepare_image(data, ImageConfig(max_soft_tokens=soft_tokens))
    assert prepared.sent_width * prepared.sent_height <= PIXELS_PER_SOFT_TOKEN * soft_tokens
    assert prepared.reencoded and prepared.mime == "image/jpeg"
    assert abs(prepared.sent_width / prepared.sent_height - 1.9) / 1.9 < 0.01


def test_jpeg_quality_is_used() -> None:
    noise = Image.effect_noise((200, 200), 64).convert("RGB")
    data = encode(noise, "BMP")
    low = prepare_image(data, ImageConfig(jpeg_quality=20))
    high = prepare_image(data, ImageConfig(jpeg_quality=95))
    assert len(sent_bytes(low)) < len(sent_bytes(high))


# --- orientation ----------------------------------------------------------------------------------------


def exif_bytes(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif.tobytes()


def test_exif_orientation_6_rotates_the_pixels() -> None:
    img = Image.new("RGB", (300, 200), WHITE)
    img.paste(RED, (0, 0, 60, 60))  # top-left as stored
    prepared = prepare_image(encode(img, "JPEG", exif=exif_bytes(6)), CONFIG)
    assert (prepared.width, prepared.height, prepared.sent_width, prepared.sent_height) == (
        200,
        300,
        200,
        300,
    )
    sent = sent_image(prepared).convert("RGB")
    assert close(sent.getpixel((200 - 30, 30)), RED, 30)  # rotated 90° clockwise: now top-right
    assert close(sent.getpixel((30, 30)), WHITE, 30)
    assert ExifTags.Base.Orientation not in sent_image(prepared).getexif()  # EXIF stripped


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF"])
def test_every_orientation_matches_exif_transpose(orientation: int, fmt: str) -> None:
    """TIFF too: recent Pillow turns it upright itself as it loads, which must not happen twice."""
    img = quadrants((120, 80), (RED, GREEN, BLUE, YELLOW))
    data = encode(img, fmt, exif=exif_bytes(orientation))
    reference = encode(img, "PNG", exif=exif_bytes(orientation))  # exif_transpose of a PNG: the truth
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(reference)))
    prepared = prepare_image(data, CONFIG)
    assert prepared.reencoded and (prepared.width, prepared.height) == expected.size
    sent = sent_image(prepared)
    assert sent.size == expected.size
    assert all(close(a, b, 30) for a, b in zip(corner_colours(sent), corner_colours(expected), strict=True))


def test_orientation_with_downscaling() -> None:
    data = encode(Image.new("RGB", (2000, 1000), RED), "JPEG", exif=exif_bytes(8))
    prepared = prepare_image(data, CONFIG)
    assert (prepared.width, prepared.height) == (1000, 2000)
    assert (prepared.sent_height, prepared.sent_width) == target_size(2000, 1000, CONFIG.max_pixels)


# --- modes and formats ----------------------------------------------------------------------------------


def half_transparent(mode: str, opaque: Colour) -> Image.Image:
    """Left half fully transparent (black underneath), right half opaque ``opaque``."""
    img = Image.new(mode, (64, 64), (0,) * len(mode))
    img.paste(opaque, (32, 0, 64, 64))
    return img


@pytest.mark.parametrize(
    ("make", "fmt", "right"),
    [
        (lambda: half_transparent("RGBA", (*BLUE, 255)), "PNG", BLUE),
        (lambda: half_transparent("LA", (0, 255)), "PNG", (0, 0, 0)),
        (lambda: half_transparent("RGBA", (*GREEN, 255)), "WEBP", GREEN),
        (lambda: half_transparent("RGBA", (*RED, 255)), "TIFF", RED),
    ],
)
def test_alpha_is_flattened_onto_white(make: Callable[[], Image.Image], fmt: str, right: Colour) -> None:
    prepared = prepare_image(encode(make(), fmt, **({"lossless": True} if fmt == "WEBP" else {})), CONFIG)
    sent = sent_image(prepared)
    assert prepared.reencoded and sent.mode == "RGB" and prepared.mime == "image/jpeg"
    assert close(sent.getpixel((8, 32)), WHITE) and close(sent.getpixel((56, 32)), right)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt: str) -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, *RED, *BLUE] + [0] * (253 * 3))
    img.paste(1, (32, 0, 64, 64))
    data = encode(img, fmt, transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    sent = sent_image(prepare_image(data, CONFIG))
    assert close(sent.getpixel((8, 32)), WHITE) and close(sent.getpixel((56, 32)), RED)


def test_palette_without_transparency() -> None:
    img = Image.new("P", (64, 64), 1)
    img.putpalette([0, 0, 0, *BLUE] + [0] * (254 * 3))
    assert close(sent_image(prepare_image(encode(img, "PNG"), CONFIG)).getpixel((8, 8)), BLUE)


def test_rgb_png_with_transparent_colour() -> None:
    img = Image.new("RGB", (64, 64), (1, 2, 3))
    img.paste(GREEN, (32, 0, 64, 64))
    sent = sent_image(prepare_image(encode(img, "PNG", transparency=(1, 2, 3)), CONFIG))
    assert close(sent.getpixel((8, 32)), WHITE) and close(sent.getpixel((56, 32)), GREEN)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    prepared = prepare_image(data, CONFIG)
    assert prepared.reencoded and (prepared.sent_width, prepared.sent_height) == (64, 48)
    assert close(sent_image(prepared).getpixel((32, 24)), RED, 20)


@pytest.mark.parametrize(("value", "grey"), [(32768, 128), (0, 0), (65535, 255), (16384, 64)])
def test_16_bit_grayscale_png_is_scaled_to_8_bits(value: int, grey: int) -> None:
    data = encode(Image.new("I;16", (64, 64), value), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert close(sent_image(prepare_image(data, CONFIG)).getpixel((32, 32)), (grey,) * 3, 10)


@pytest.mark.parametrize(
    ("maxval", "value", "grey"), [(65535, 200, 1), (65535, 32768, 128), (4095, 4095, 255)]
)
def test_a_16_bit_pgm_is_as_bright_as_the_same_png(maxval: int, value: int, grey: int) -> None:
    """Pillow opens it as I with its maxval stretched to 65535: 16-bit, not a range to guess."""
    pixels = struct.pack(">" + "H" * 64 * 64, *[value] * 64 * 64)
    data = f"P5 64 64 {maxval}\n".encode() + pixels
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert close(sent_image(prepare_image(data, CONFIG)).getpixel((32, 32)), (grey,) * 3, 3)


def test_a_flat_32_bit_image_out_of_16_bit_range_is_white_not_black() -> None:
    sent = sent_image(prepare_image(encode(Image.new("I", (16, 16), 100_000), "TIFF"), CONFIG))
    assert close(sent.getpixel((8, 8)), WHITE, 3)


@pytest.mark.parametrize(
    ("mode", "value", "grey"), [("F", 0.5, 128), ("F", 200.0, 200), ("I", 40000, 156), ("I", 100, 100)]
)
def test_32_bit_tiff_is_scaled_to_8_bits(mode: str, value: float, grey: int) -> None:
    img = Image.new(mode, (64, 64), value)
    img.paste(0, (0, 0, 8, 8))
    sent = sent_image(prepare_image(encode(img, "TIFF"), CONFIG))
    assert close(sent.getpixel((32, 32)), (grey,) * 3, 10) and close(sent.getpixel((2, 2)), (0, 0, 0), 10)


def test_one_bit_image() -> None:
    img = Image.new("1", (64, 64), 0)
    img.paste(1, (32, 0, 64, 64))
    sent = sent_image(prepare_image(encode(img, "PNG"), CONFIG))
    assert close(sent.getpixel((8, 32)), (0, 0, 0)) and close(sent.getpixel((56, 32)), WHITE)


def test_animated_gif_sends_its_first_frame_as_jpeg() -> None:
    frames = [Image.new("RGB", (64, 48), colour) for colour in (RED, BLUE, GREEN)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert Image.open(io.BytesIO(data)).n_frames == 3
    prepared = prepare_image(data, CONFIG)
    assert (prepared.mime, prepared.reencoded, prepared.width, prepared.height) == (
        "image/jpeg",
        True,
        64,
        48,
    )
    assert close(sent_image(prepared).getpixel((32, 24)), RED, 20)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF"])
def test_other_formats_become_jpeg(fmt: str) -> None:
    data = encode(quadrants((96, 64), (RED, GREEN, BLUE, YELLOW)), fmt)
    prepared = prepare_image(data, CONFIG)
    assert (prepared.mime, prepared.reencoded) == ("image/jpeg", True)
    assert (prepared.width, prepared.height, prepared.sent_width, prepared.sent_height) == (96, 64, 96, 64)
    assert sent_image(prepared).format == "JPEG"
    assert all(
        close(c, e, 30)
        for c, e in zip(corner_colours(sent_image(prepared)), (RED, GREEN, BLUE, YELLOW), strict=True)
    )


# --- failures -------------------------------------------------------------------------------------------


def bad(data: bytes, config: ImageConfig = CONFIG) -> str:
    with pytest.raises(ImageFailure) as excinfo:
        prepare_image(data, config)
    assert excinfo.value.error_type == "bad_image"
    return excinfo.value.message


def test_undecodable_bytes() -> None:
    assert "cannot identify image file" in bad(b"this is not an image, just some text")


def test_eps_is_not_opened() -> None:
    assert "cannot identify image file" in bad(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")


@pytest.mark.parametrize(("size", "fmt"), [((300, 200), "JPEG"), ((3000, 2000), "JPEG"), ((300, 200), "PNG")])
def test_truncated_images(size: tuple[int, int], fmt: str) -> None:
    data = encode(quadrants(size, (RED, GREEN, BLUE, YELLOW)), fmt)
    message = bad(data[: len(data) // 2])
    assert fmt in message or "truncated" in message or "cannot identify" in message


def test_pixel_cap_is_checked_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    data = encode(Image.new("RGB", (100, 100), RED), "PNG")

    def no_load(self: ImageFile.ImageFile) -> None:
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    message = bad(data, ImageConfig(max_image_pixels=1000))
    assert "10,000 pixels, over the cap of 1,000 (possible decompression bomb)" in message


def test_pillow_bomb_warning_is_suppressed_and_its_error_is_bad_image(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = encode(Image.new("RGB", (100, 100), RED), "JPEG")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # 10,000 px: a warning (an error under pytest)
    assert prepare_image(data, CONFIG).width == 100
    monkeypatch.setattr(
        Image, "MAX_IMAGE_PIXELS", 4000
    )  # over twice Pillow's limit: --max-image-pixels rules
    assert prepare_image(data, CONFIG).width == 100 and Image.MAX_IMAGE_PIXELS == 4000  # restored
    assert "over the cap of 5,000" in bad(data, ImageConfig(max_image_pixels=5000))


def test_max_image_pixels_can_be_raised_past_pillows_own_limit() -> None:
    """Pillow refuses over 2 × its MAX_IMAGE_PIXELS (179 MP) on its own; the option is the cap."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 15000, 14000, 8, 2, 0, 0, 0)  # 210 MP, and almost no pixel data
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
    assert "over the cap of 150,000,000" in bad(data)  # the default cap: refused, by ours
    message = bad(data, ImageConfig(max_image_pixels=300_000_000))  # raised: read, then found truncated
    assert "Pillow's limit" not in message and "cannot decode" in message


# --- sha256, sources, threads ---------------------------------------------------------------------------


def test_sha256_is_of_the_original_bytes() -> None:
    for data in (
        encode(Image.new("RGB", (20, 20), RED), "PNG"),
        encode(Image.new("RGB", (20, 20), RED), "BMP"),
    ):
        assert prepare_image(data, CONFIG).sha256 == hashlib.sha256(data).hexdigest()


def test_load_image_from_a_path(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (30, 20), GREEN), "PNG")
    (tmp_path / "x.png").write_bytes(data)
    prepared = load_image(parse_image_value("x.png", manifest_dir=tmp_path), CONFIG, image_root=tmp_path)
    assert sent_bytes(prepared) == data
    with pytest.raises(ImageFailure) as excinfo:
        load_image(parse_image_value("y.png", manifest_dir=tmp_path), CONFIG, image_root=tmp_path)
    assert excinfo.value.error_type == "missing_image"


def test_thread_pool_gives_the_same_results() -> None:
    inputs = [
        encode(Image.new("RGB", (400 + i, 900), (i, 0, 0)), "JPEG", exif=exif_bytes(6)) for i in range(8)
    ]
    inputs += [encode(half_transparent("RGBA", (*BLUE, 255)), "PNG"), b"junk"]

    def run(data: bytes) -> PreparedImage | str:
        try:
            return prepare_image(data, CONFIG)
        except ImageFailure as exc:
            return str(exc)

    serial = [run(data) for data in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, inputs * 3)) == serial * 3


def test_heic_without_its_plugin_names_the_plugin() -> None:
    from tasks.config import ImageConfig
    from tasks.errors import ImageFailure
    from tasks.images.prepare import OPEN_FORMATS, prepare_image

    if "HEIF" in OPEN_FORMATS:
        pytest.skip("pillow-heif is installed")
    heic = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    with pytest.raises(ImageFailure, match="HEIC image, which needs pillow-heif installed"):
        prepare_image(heic, ImageConfig())


def test_a_lab_image_is_converted_to_srgb_not_read_as_rgb() -> None:
    # Pillow's 8-bit LAB: L scaled to 0-255, a and b offset by 128. L=53 a=80 b=67 is sRGB red.
    data = encode(Image.new("LAB", (32, 32), (136, 208, 195)), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "LAB"
    assert close(sent_image(prepare_image(data, CONFIG)).convert("RGB").getpixel((16, 16)), RED, 25)
