"""Reading the received images into what the answers describe: size, dominant colour and fingerprint.

Image URLs are read the way vLLM reads them: ``data:<mime>;base64,...`` is decoded (the mime is
ignored), ``http(s)://`` is fetched, anything else is refused. Decoded infos are cached by the hash
of the URL string (LRU), so a repeated image costs one hash and no Pillow work.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import cast

import aiohttp
from PIL import Image

from emulator.errors import ApiError

PIXELS_PER_TOKEN = 48 * 48  # Gemma 4: one visual token covers 48×48 px
MAX_IMAGE_TOKENS = 280  # Gemma 4's default max_soft_tokens
SUPPORTED_FORMATS = frozenset({"GIF", "JPEG", "MPO", "PNG"})  # MPO: Pillow's name for many camera JPEGs
OFFLOAD_BYTES = 512 * 1024  # larger payloads are decoded in a worker thread, off the event loop
PALETTE: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("black", (0, 0, 0)),
    ("white", (255, 255, 255)),
    ("grey", (128, 128, 128)),
    ("red", (220, 30, 30)),
    ("orange", (255, 140, 0)),
    ("yellow", (250, 220, 30)),
    ("green", (40, 160, 60)),
    ("cyan", (0, 200, 210)),
    ("blue", (30, 70, 220)),
    ("purple", (130, 50, 170)),
    ("pink", (245, 150, 190)),
    ("brown", (130, 80, 40)),
)


def _palette_image() -> Image.Image:
    image = Image.new("P", (1, 1))
    entries = [PALETTE[index % len(PALETTE)][1] for index in range(256)]
    image.putpalette([channel for rgb in entries for channel in rgb])
    return image


_PALETTE_IMAGE = _palette_image()


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What the emulator tells about one received image."""

    width: int
    height: int
    colour: str
    fingerprint: str  # first 8 hex digits of the sha256 of the received bytes

    @property
    def tokens(self) -> int:
        return min(MAX_IMAGE_TOKENS, math.ceil(self.width * self.height / PIXELS_PER_TOKEN))


def describe_bytes(data: bytes) -> ImageInfo:
    """Size, dominant colour and fingerprint of encoded image bytes; ApiError 400 when unusable."""
    fingerprint = hashlib.sha256(data).hexdigest()[:8]
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in SUPPORTED_FORMATS:
                raise ApiError(400, f"Unsupported image format {image.format}; supported: GIF, JPEG, PNG.")
            width, height = image.size
            if image.format in ("JPEG", "MPO"):
                image.draft("RGB", (64, 64))  # libjpeg DCT scaling: decode at 1/8 size at most
            colour = dominant_colour(image)
    except ApiError:
        raise
    except Image.DecompressionBombError as exc:
        raise ApiError(400, f"Failed to load image: {exc}") from None
    except (OSError, SyntaxError, ValueError) as exc:  # UnidentifiedImageError is an OSError
        raise ApiError(400, f"Failed to load image: {exc}") from None
    return ImageInfo(width, height, colour, fingerprint)


def dominant_colour(image: Image.Image) -> str:
    """The palette name most pixels of a small copy of ``image`` are nearest to."""
    image.thumbnail((24, 24), Image.Resampling.BOX)
    rgb = _flatten(image)
    counts = rgb.quantize(palette=_PALETTE_IMAGE, dither=Image.Dither.NONE).getcolors() or [(0, 0)]
    index = cast(int, max(counts)[1])  # quantized: palette indexes
    return PALETTE[index % len(PALETTE)][0]


def _flatten(image: Image.Image) -> Image.Image:
    """RGB, with any transparency flattened onto white (as vLLM does)."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    try:
        return image.convert("RGB")
    except ValueError:  # e.g. 16-bit greyscale modes without a direct conversion
        return image.convert("L").convert("RGB")


class ImageLoader:
    """Reads image URLs into :class:`ImageInfo`, with an LRU cache keyed by the URL's sha256."""

    def __init__(self, cache_size: int) -> None:
        self._cache: OrderedDict[bytes, ImageInfo] = OrderedDict()
        self._cache_size = cache_size
        self.hits = 0
        self.misses = 0

    async def load(self, url: str, session: aiohttp.ClientSession | None, fetch_timeout: float) -> ImageInfo:
        key = hashlib.sha256(url.encode("utf-8", "surrogatepass")).digest()
        info = self._cache.get(key)
        if info is not None:
            self._cache.move_to_end(key)
            self.hits += 1
            return info
        self.misses += 1
        data = await read_url(url, session, fetch_timeout)
        if len(data) > OFFLOAD_BYTES:
            info = await asyncio.get_running_loop().run_in_executor(None, describe_bytes, data)
        else:
            info = describe_bytes(data)
        self._cache[key] = info
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return info

    def clear(self) -> None:
        self._cache.clear()


async def read_url(url: str, session: aiohttp.ClientSession | None, fetch_timeout: float) -> bytes:
    """The bytes behind an image URL, or the ApiError vLLM sends for it."""
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma:
            raise ApiError(400, "Invalid data URL: no ',' before the data.")
        if not header.lower().endswith(";base64"):
            raise ApiError(501, "Only base64 data URLs are supported for now.")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ApiError(400, f"Invalid base64 data in the image data URL: {exc}") from None
    if scheme.startswith(("http://", "https://")) and session is not None:
        return await _fetch(url, session, fetch_timeout)
    shown = url if len(url) <= 80 else url[:77] + "..."
    raise ApiError(400, f"Unsupported image URL {shown!r}: use http(s):// or a base64 data: URL.")


async def _fetch(url: str, session: aiohttp.ClientSession, fetch_timeout: float) -> bytes:
    shown = url if len(url) <= 200 else url[:197] + "..."
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=fetch_timeout)) as response:
            if 400 <= response.status < 500:
                raise ApiError(422, f"Failed to fetch image from {shown}: HTTP {response.status}")
            if response.status >= 300:
                raise ApiError(500, f"Failed to fetch image from {shown}: HTTP {response.status}")
            return await response.read()
    except TimeoutError:
        raise ApiError(500, f"Timed out after {fetch_timeout:g} s fetching image from {shown}") from None
    except aiohttp.ClientError as exc:
        raise ApiError(500, f"Failed to fetch image from {shown}: {exc}") from None
