"""The downscale step both ways: cykooz-resizer's SIMD Lanczos-3 where installed, Pillow's LANCZOS otherwise.

Each test of prepare_image's resizing behaviour runs under both resamplers (the ``resampler`` fixture
switches ``tasks.images.prepare.FAST_RESIZE``), and the two must agree to within rounding.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import math
import random
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat

from tasks.config import PIXELS_PER_SOFT_TOKEN, ImageConfig
from tasks.images import prepare as images
from tasks.images.prepare import PreparedImage, prepare_image, target_size

CYKOOZ_INSTALLED = importlib.util.find_spec("cykooz_resizer") is not None
CONFIG = ImageConfig()


@pytest.fixture(params=["fast", "pillow"])
def resampler(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "fast" and not images.FAST_RESIZE:
        pytest.skip("cykooz-resizer is not installed here (no wheel for this platform)")
    monkeypatch.setattr(images, "FAST_RESIZE", request.param == "fast")
    yield request.param


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def sent_image(prepared: PreparedImage) -> Image.Image:
    data = base64.b64decode(str(prepared.url).split(",", 1)[1], validate=True)
    img = Image.open(io.BytesIO(data))
    assert img.size == (prepared.sent_width, prepared.sent_height)
    return img


def photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Photo-like: gradients, blurred shapes, noise and thin lines (what a resampler can get wrong)."""
    rng = random.Random(seed)
    width, height = size
    base = Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize(size),
            Image.radial_gradient("L").resize(size),
            Image.linear_gradient("L").rotate(90).resize(size),
        ),
    )
    draw = ImageDraw.Draw(base)
    for _ in range(30):
        x, y, side = rng.randrange(width), rng.randrange(height), rng.randrange(20, 300)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.ellipse((x, y, x + side, y + side), fill=colour)
    img = base.filter(ImageFilter.GaussianBlur(2))
    noise = Image.effect_noise(size, 20)
    img = ImageChops.add(img, Image.merge("RGB", (noise, noise, noise)), 1.0, -128)
    draw = ImageDraw.Draw(img)
    for _ in range(20):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.line((x, y, x + rng.randrange(-400, 400), y + rng.randrange(-400, 400)), fill=(255, 255, 255))
    return img


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = ImageChops.difference(a.convert("RGB"), b.convert("RGB"))
    mse = sum(value**2 for value in ImageStat.Stat(diff).rms) / 3
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def test_fast_resize_is_on_wherever_cykooz_resizer_is_installed() -> None:
    """Fails when a new Pillow major turns the fast path off: check cykooz-resizer supports it, then widen."""
    if not CYKOOZ_INSTALLED:
        pytest.skip("cykooz-resizer is not installed here (no wheel for this platform)")
    assert images.FAST_RESIZE, f"fast path off with Pillow {Image.__version__}: see tasks/images/prepare.py"


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_both_resamplers_agree_to_within_rounding(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not images.FAST_RESIZE:
        pytest.skip("cykooz-resizer is not installed here (no wheel for this platform)")
    src = photo((1008, 756)).convert(mode)
    size = (927, 695)  # the 0.92 step that a 4032×3024 JPEG takes after its 1/4-scale draft decode
    fast = images._resize(src, size)
    monkeypatch.setattr(images, "FAST_RESIZE", False)
    slow = images._resize(src, size)
    assert (fast.mode, fast.size) == (slow.mode, slow.size) == (mode, size)
    assert psnr(fast, slow) > 45
    # under one level on average; up to ~40 at a few pixels of thin bright lines, where the two clip the
    # Lanczos overshoot between their passes differently
    assert max(ImageStat.Stat(ImageChops.difference(fast, slow)).mean) < 1


def test_fast_resize_matches_a_full_resolution_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Draft decode + the resampler stays as close to a full-size Lanczos as Pillow's own path does."""
    data = encode(photo((2016, 1512), seed=3), "JPEG", quality=92)
    size = target_size(2016, 1512, CONFIG.max_pixels)
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize(size, Image.Resampling.LANCZOS)
    scores = {}
    for fast in sorted({False, images.FAST_RESIZE}):
        with monkeypatch.context() as patch:
            patch.setattr(images, "FAST_RESIZE", fast)
            scores[fast] = psnr(sent_image(prepare_image(data, CONFIG)), reference)
    assert min(scores.values()) > 30, scores
    assert max(scores.values()) - min(scores.values()) < 0.3, scores


@pytest.mark.parametrize("soft_tokens", [70, 280, 1120])
def test_big_jpeg_budget_aspect_and_colours(resampler: str, soft_tokens: int) -> None:
    img = Image.new("RGB", (4032, 3024), (200, 30, 30))
    img.paste((30, 30, 200), (2016, 0, 4032, 3024))
    config = ImageConfig(max_soft_tokens=soft_tokens)
    prepared = prepare_image(encode(img, "JPEG", quality=85), config)
    assert (prepared.sent_width, prepared.sent_height) == target_size(4032, 3024, config.max_pixels)
    assert prepared.sent_width * prepared.sent_height <= PIXELS_PER_SOFT_TOKEN * soft_tokens
    sent = sent_image(prepared).convert("RGB")
    width, height = sent.size
    left, right = sent.getpixel((width // 4, height // 2)), sent.getpixel((3 * width // 4, height // 2))
    assert all(abs(a - e) <= 12 for a, e in zip(left, (200, 30, 30), strict=True)), left  # type: ignore[arg-type]
    assert all(abs(a - e) <= 12 for a, e in zip(right, (30, 30, 200), strict=True)), right  # type: ignore[arg-type]


def test_grayscale_jpeg_is_resized_as_grayscale(resampler: str) -> None:
    data = encode(photo((3000, 2000)).convert("L"), "JPEG", quality=90)
    prepared = prepare_image(data, CONFIG)
    assert (prepared.sent_width, prepared.sent_height) == target_size(3000, 2000, CONFIG.max_pixels)
    assert sent_image(prepared).mode == "RGB"  # sent as RGB, as before


def test_big_transparent_png_is_flattened_then_resized(resampler: str) -> None:
    img = Image.new("RGBA", (2400, 1600), (0, 0, 0, 0))
    img.paste((0, 0, 255, 255), (1200, 0, 2400, 1600))
    prepared = prepare_image(encode(img, "PNG"), CONFIG)
    sent = sent_image(prepared).convert("RGB")
    width, height = sent.size
    assert (width, height) == target_size(2400, 1600, CONFIG.max_pixels)
    assert sent.getpixel((width // 4, height // 2)) >= (245, 245, 245)  # type: ignore[operator]
    blue = sent.getpixel((3 * width // 4, height // 2))
    assert isinstance(blue, tuple) and blue[2] > 230 and blue[0] < 20


def test_exif_rotation_after_a_resize(resampler: str) -> None:
    img = Image.new("RGB", (3000, 1000), (255, 255, 255))
    img.paste((255, 0, 0), (0, 0, 300, 300))  # top-left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    prepared = prepare_image(encode(img, "JPEG", exif=exif.tobytes()), CONFIG)
    assert (prepared.width, prepared.height) == (1000, 3000)
    sent = sent_image(prepared).convert("RGB")
    assert sent.size == target_size(3000, 1000, CONFIG.max_pixels)[::-1]
    red = sent.getpixel((sent.width - 10, 10))  # now top-right
    assert isinstance(red, tuple) and red[0] > 200 and red[1] < 60


def test_results_are_deterministic_and_thread_safe(resampler: str) -> None:
    inputs = [encode(photo((1600 + 8 * i, 1200), seed=i), "JPEG", quality=90) for i in range(4)]
    serial = [prepare_image(data, CONFIG) for data in inputs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(lambda data: prepare_image(data, CONFIG), inputs * 3)) == serial * 3


def test_without_cykooz_resizer_pillow_resizes() -> None:
    """Where the wheel is missing (Linux aarch64, musl) the import fails and Pillow's resampler runs."""
    code = (
        "import io, sys\n"
        "sys.modules['cykooz_resizer'] = None  # import fails as if not installed\n"
        "from PIL import Image\n"
        "from tasks.images import prepare as images\n"
        "from tasks.config import ImageConfig\n"
        "assert not images.FAST_RESIZE\n"
        "buffer = io.BytesIO()\n"
        "Image.new('RGB', (2400, 1800), (10, 200, 10)).save(buffer, 'JPEG')\n"
        "prepared = images.prepare_image(buffer.getvalue(), ImageConfig())\n"
        "print(prepared.sent_width, prepared.sent_height)\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert tuple(map(int, done.stdout.split())) == target_size(2400, 1800, CONFIG.max_pixels)
