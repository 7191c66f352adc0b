"""Decode, orient, flatten, downscale and encode one image for the endpoint.

The endpoint takes GIF, JPEG and PNG; Gemma 4 uses at most ``2304 × max_soft_tokens`` pixels of an image.
An image that is already sendable and small enough goes out byte-for-byte; anything else is decoded once
(JPEGs at 1/2, 1/4 or 1/8 scale through libjpeg's draft mode), made RGB on white, downscaled to that area
with a Lanczos-3 filter and sent as a JPEG.

The downscale runs on cykooz-resizer (Rust's fast_image_resize: SIMD, the GIL released) where it is
installed — a wheel exists for Linux x86_64 and macOS, see pyproject.toml — and on Pillow's own LANCZOS
resampler otherwise, 5-7 times slower. Both are the same filter: their outputs differ by rounding (under
one level on average), so the request key does not depend on which one ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import struct
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from math import isqrt
from pathlib import Path
from typing import Any

from PIL import ExifTags, Image, UnidentifiedImageError

from tasks.config import ImageConfig
from tasks.errors import ImageFailure
from tasks.images.data_url import DataUrl
from tasks.images.sources import ImageSource, read_image_bytes

SENDABLE_MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "GIF": "image/gif"}
# Ordinary raster formats only (never EPS, which Pillow hands to Ghostscript); TGA last: no magic number.
# Filtered by what this Pillow build has, since Image.open raises KeyError for an unknown format name.
_WANTED_FORMATS: tuple[str, ...] = (
    "JPEG", "PNG", "GIF", "WEBP", "BMP", "DIB", "TIFF", "AVIF", "JPEG2000", "ICO", "ICNS", "PPM", "QOI",
    "PCX", "SGI", "PSD", "DDS", "XBM", "TGA",
)  # fmt: skip
_LANCZOS3: Any = None
try:  # the SIMD resampler, when installed (not on every platform: see pyproject.toml)
    from cykooz_resizer import FilterType, ResizeAlg, ResizeOptions, Resizer

    _LANCZOS3 = ResizeOptions(resize_alg=ResizeAlg.convolution(FilterType.lanczos3))
except ImportError:
    pass
# cykooz-resizer reads Pillow's C image struct, whose layout it knows for Pillow 10 to 13: other majors
# use Pillow's resampler until checked (tests/test_images_resize.py fails while the fast path is off).
FAST_RESIZE = _LANCZOS3 is not None and 10 <= int(Image.__version__.split(".")[0]) <= 13
try:  # HEIC/HEIF (phones' default) through the optional pillow-heif plugin, when installed
    from pillow_heif import register_heif_opener  # type: ignore[import-not-found]

    register_heif_opener()
    _WANTED_FORMATS = (*_WANTED_FORMATS, "HEIF")
except ImportError:
    pass
Image.init()
OPEN_FORMATS = tuple(name for name in _WANTED_FORMATS if name in Image.OPEN)
# ISO-BMFF brands of images this Pillow build may lack a plugin for, by the bytes 4..12 of the file
_PLUGIN_BRANDS = {
    b"ftypheic": ("HEIC", "pillow-heif"),
    b"ftypheix": ("HEIC", "pillow-heif"),
    b"ftyphevc": ("HEIC", "pillow-heif"),
    b"ftypmif1": ("HEIF", "pillow-heif"),
    b"ftypmsf1": ("HEIF", "pillow-heif"),
    b"ftypavif": ("AVIF", "a Pillow build with AVIF support (Pillow >= 11.3)"),
}
_TRAILERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82", "GIF": b";"}
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}  # the same table as ImageOps.exif_transpose
_ALPHA_MODES = frozenset({"RGBA", "LA", "La", "PA", "RGBa"})
# what Pillow raises on corrupt or hostile input (UnidentifiedImageError is an OSError)
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, KeyError, TypeError)
# warnings.catch_warnings swaps process-wide state: serialise our own uses (only the cheap header parse)
_OPEN_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class PreparedImage:
    """An image ready for a request's ``image_url``, with what the output rows record about it."""

    url: DataUrl  # data:image/...;base64,..., held once as bytes (tasks/endpoint/json_body.py)
    sha256: str  # hex sha256 of the original bytes
    width: int  # original size, after EXIF orientation
    height: int
    sent_width: int  # size of the image actually sent
    sent_height: int
    mime: str  # image/jpeg, image/png or image/gif
    reencoded: bool  # False when the original bytes are sent unchanged


def target_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """The largest size with the same aspect and at most ``max_pixels`` pixels; never upscales."""
    if width < 1 or height < 1 or max_pixels < 1:
        raise ValueError(f"sizes must be positive, got {width}x{height} and max_pixels={max_pixels}")
    if width * height <= max_pixels:
        return width, height
    # floor(side * sqrt(max_pixels / (width * height))), computed exactly in integers
    w = max(1, isqrt(width * max_pixels // height))
    h = max(1, isqrt(height * max_pixels // width))
    if w * h > max_pixels:  # only when a side was clamped to 1: shrink the longer side
        if w >= h:
            w = max(1, max_pixels // h)
        else:
            h = max(1, max_pixels // w)
    return w, h


def load_image(source: ImageSource, config: ImageConfig, *, image_root: Path) -> PreparedImage:
    """Read a source's bytes and prepare them; raises ImageFailure. Thread-safe."""
    return prepare_image(read_image_bytes(source, config, image_root=image_root), config)


def prepare_image(data: bytes, config: ImageConfig, sha256: str | None = None) -> PreparedImage:
    """Turn encoded image bytes into what is sent; raise ImageFailure("bad_image", ...) if they can't be.

    ``sha256``: the bytes' hex digest when the caller has it already (it is not computed twice).
    """
    sha256 = sha256 or hashlib.sha256(data).hexdigest()
    with _decoding(data, config.max_image_pixels) as img:
        return _prepare(img, data, sha256, config)


def thumbnail_jpeg(data: bytes, config: ImageConfig, *, max_side: int = 160, quality: int = 70) -> bytes:
    """A small JPEG of encoded image bytes, for a person to look at (``vlmbatch report``): the same
    checks and conversions as ``prepare_image`` (pixel cap before decoding, EXIF orientation, alpha on
    white, first frame), at most ``max_side`` pixels on its longer side. Raises ImageFailure."""
    with _decoding(data, config.max_image_pixels) as img:
        orientation = _orientation(img)
        if img.format in ("JPEG", "MPO"):
            img.draft("RGB", (max_side, max_side))  # libjpeg's 1/8 scale is plenty for a thumbnail
        out = _to_rgb_or_l(img)
        out.thumbnail((max_side, max_side), Image.Resampling.LANCZOS, reducing_gap=2.0)
        if orientation != 1:
            out = out.transpose(_TRANSPOSE[orientation])
        if out.mode != "RGB":
            out = out.convert("RGB")
        buffer = io.BytesIO()
        out.save(buffer, "JPEG", quality=quality, optimize=True)
        return buffer.getvalue()


@contextlib.contextmanager
def _decoding(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image's header parsed and its size checked against ``max_pixels``; whatever Pillow raises
    on corrupt or hostile input, here or in the caller's block, becomes ImageFailure("bad_image")."""
    fmt = ""
    try:
        with _open(data, max_pixels) as img:
            fmt = img.format or fmt
            width, height = img.size
            if width * height > max_pixels:
                raise ImageFailure(
                    "bad_image",
                    f"image is {width}x{height} = {width * height:,} pixels, over the cap of "
                    f"{max_pixels:,} (possible decompression bomb)",
                )
            yield img
    except UnidentifiedImageError:
        if (plugin := _PLUGIN_BRANDS.get(data[4:12])) is not None:
            raise ImageFailure(
                "bad_image", f"{plugin[0]} image, which needs {plugin[1]} installed to be read"
            ) from None
        raise ImageFailure(
            "bad_image",
            f"cannot identify image file: not a supported image format ({len(data):,} bytes, "
            f"starting {data[:8].hex(' ')})",
        ) from None
    except Image.DecompressionBombError as exc:
        raise ImageFailure("bad_image", f"{exc} (Pillow's limit, possible decompression bomb)") from None
    except _DECODE_ERRORS as exc:
        raise ImageFailure("bad_image", f"cannot decode {fmt or 'the'} image: {exc}") from None


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only. ``max_pixels`` (--max-image-pixels, checked next, before decoding)
    replaces Pillow's own bomb check, which would otherwise refuse anything over 2 × its
    MAX_IMAGE_PIXELS (179 MP) whatever the option says."""
    with _OPEN_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pillows = Image.MAX_IMAGE_PIXELS
        if pillows is not None:  # Pillow refuses over twice this: ours (just after) must come first
            Image.MAX_IMAGE_PIXELS = max(pillows, max_pixels)
        try:
            return Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
        finally:
            Image.MAX_IMAGE_PIXELS = pillows


def _prepare(img: Image.Image, data: bytes, sha256: str, config: ImageConfig) -> PreparedImage:
    fmt = img.format or ""
    width, height = img.size
    orientation = _orientation(img)
    oriented = (height, width) if orientation >= 5 else (width, height)
    over_budget = width * height > config.max_pixels
    mime = SENDABLE_MIME.get(fmt)
    if (
        mime is not None
        and not over_budget
        and orientation == 1
        and img.mode in ("RGB", "L")
        and "transparency" not in img.info
        and (fmt == "MPO" or not getattr(img, "is_animated", False))  # MPO's extra frames are previews
    ):
        if not data.endswith(_TRAILERS[fmt]):
            img.load()  # possibly truncated: fail here as bad_image, not at the endpoint
        return PreparedImage(DataUrl.encode(mime, data), sha256, *oriented, *oriented, mime, False)

    size = target_size(width, height, config.max_pixels)  # in stored orientation (the result is symmetric)
    if over_budget and fmt in ("JPEG", "MPO"):
        img.draft("RGB", size)  # libjpeg decodes at 1/2, 1/4 or 1/8 scale, never below size
    out = _to_rgb_or_l(img)  # decodes the first frame
    if out.size != size:
        out = _resize(out, size)
    if orientation != 1:
        out = out.transpose(_TRANSPOSE[orientation])
    if out.mode != "RGB":
        out = out.convert("RGB")
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=config.jpeg_quality, optimize=False, progressive=False)
    with buffer.getbuffer() as encoded:
        url = DataUrl.encode("image/jpeg", encoded)
    return PreparedImage(url, sha256, *oriented, *out.size, "image/jpeg", True)


def _resize(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos-3 downscale of an RGB or L image: cykooz-resizer's SIMD convolution, else Pillow's."""
    if FAST_RESIZE and img.mode in ("RGB", "L"):
        out = Image.new(img.mode, size, None)  # not initialised: the resizer writes every pixel
        # a Resizer per call: it keeps scratch buffers behind a mutex, and costs nothing to make
        Resizer().resize_pil(img, out, _LANCZOS3)
        return out
    return img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)


def _orientation(img: Image.Image) -> int:
    """EXIF orientation 1-8 (1 when absent or invalid)."""
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # an eXIf chunk after the image data would cost a full decode to find; rare
    if img.format == "TIFF":
        img.load()  # recent Pillow turns a TIFF upright itself as it loads, dropping the tag: not twice
    value = img.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _to_rgb_or_l(img: Image.Image) -> Image.Image:
    """Decode to mode RGB or L: alpha flattened onto white, 16/32-bit and float scaled to 8 bits."""
    mode = img.mode
    if mode == "La":
        img = img.convert("LA")
    if (
        mode in _ALPHA_MODES
        or "transparency" in img.info
        or (mode == "P" and img.palette is not None and img.palette.mode == "RGBA")
    ):
        return _flatten(img)
    if mode in ("RGB", "L"):
        img.load()
        return img
    if mode == "1":
        return img.convert("L")
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _to_8bit(img)
    return img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX, P without transparency


def _flatten(img: Image.Image) -> Image.Image:
    rgba = img if img.mode == "RGBA" else img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba)
    return out


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale high-bit-depth pixels to L: 16-bit by 1/257, others by the range their values use.

    16-bit: the I;16 modes, and PGM/PPM's I (Pillow stretches their maxval to 65535), so that the
    same data comes out as bright whatever the container. Other I (32-bit) and F: from their values.
    """
    scale, offset = 1 / 257, 0.0
    if img.mode.startswith("I;16") or (img.mode == "I" and img.format == "PPM"):
        if img.mode not in ("I;16", "I"):
            img = img.convert("I")
    else:  # I (32-bit) or F: guess the range from the values
        low, high = img.getextrema()
        assert isinstance(low, (int, float)) and isinstance(high, (int, float))
        if img.mode == "F" and low >= 0 and high <= 1:
            scale = 255.0
        elif low >= 0 and high <= 255:
            scale = 1.0
        elif not (low >= 0 and high <= 65535):
            scale = 255 / (high - low) if high > low else 0.0
            offset = -low * scale if high > low else (255.0 if low > 0 else 0.0)  # flat: white or black
    scaled = img.point(lambda value: value * scale + offset, None if img.mode == "F" else "L")
    return scaled.convert("L") if scaled.mode != "L" else scaled
