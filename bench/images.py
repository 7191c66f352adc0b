"""Images per second on 12-megapixel JPEGs: vlmbatch's prepare_image against plain Pillow, in one run.

    .venv/bin/python bench/images.py [--n 24] [--budget 280] [--passes 3] [--alternatives]

Makes ``--n`` photo-like 4032×3024 JPEGs (gradients, shapes, lines, sensor-like noise; quality 90) in a
temporary directory, reads them into memory, then times over the same bytes:

(a) plain Pillow: ``open → convert("RGB") → thumbnail(target) → save JPEG``, target = our pixel budget;
(b) ``tasks.images.prepare.prepare_image``, single-threaded;
(c) libjpeg's reduced-size decode alone: ``img.draft("RGB", target); img.load()``;
(d) ``prepare_image`` on a thread pool sized to the cores.

Prints a Markdown table (the median of ``--passes`` interleaved passes over all images) and where (b)'s time
goes.
``--alternatives`` adds a table of other ways to do (b)'s work after the decode (resamplers, filters, a YCbCr
pipeline; OpenCV and pyvips when importable), each timed end to end and scored by PSNR against a
full-resolution reference.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageStat, features

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tasks.config import PIXELS_PER_SOFT_TOKEN, ImageConfig
from tasks.images import prepare as vlm_images
from tasks.images.prepare import prepare_image, target_size

WIDTH, HEIGHT = 4032, 3024
Resampling = Image.Resampling


def make_photo(seed: int, quality: int = 90) -> bytes:
    """A photo-like 4032×3024 JPEG: smooth gradients and blurred shapes, texture and fine noise, lines."""
    rng = random.Random(seed)
    small = (WIDTH // 8, HEIGHT // 8)
    channels = (
        Image.linear_gradient("L").rotate(rng.uniform(0, 360)).resize(small),
        Image.radial_gradient("L").resize(small),
        Image.linear_gradient("L").transpose(Image.Transpose.ROTATE_90).resize(small),
    )
    base = Image.merge("RGB", channels)
    draw = ImageDraw.Draw(base)
    for _ in range(60):
        x, y, side = rng.randrange(small[0]), rng.randrange(small[1]), rng.randrange(10, 200)
        box = (x, y, x + side, y + int(side * rng.uniform(0.3, 1.5)))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    photo = base.filter(ImageFilter.GaussianBlur(1.5)).resize((WIDTH, HEIGHT), Resampling.BICUBIC)
    texture = Image.effect_noise((WIDTH // 4, HEIGHT // 4), 40).resize((WIDTH, HEIGHT), Resampling.BICUBIC)
    noise = ImageChops.add(texture, Image.effect_noise((WIDTH, HEIGHT), 6), 2.0, 0)
    photo = ImageChops.add(photo, Image.merge("RGB", (noise, noise, noise)), 1.0, -128)
    draw = ImageDraw.Draw(photo)
    for _ in range(40):
        x, y = rng.randrange(WIDTH), rng.randrange(HEIGHT)
        end = (x + rng.randrange(-800, 800), y + rng.randrange(-800, 800))
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        draw.line((x, y, *end), fill=colour, width=rng.randrange(2, 12))
    buffer = io.BytesIO()
    photo.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def plain_pillow(data: bytes, target: tuple[int, int]) -> None:
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB")
    rgb.thumbnail(target)
    rgb.save(io.BytesIO(), "JPEG", quality=90)


def draft_decode(data: bytes, target: tuple[int, int]) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", target)
        img.load()


def median_seconds(runs: dict[str, Callable[[], None]], passes: int) -> dict[str, float]:
    """Each method's median pass; the passes interleave, so a busy moment of the machine hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(passes):
        for name, run_pass in runs.items():
            started = time.perf_counter()
            run_pass()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def breakdown(
    data: bytes, config: ImageConfig, target: tuple[int, int], rounds: int = 5
) -> list[tuple[str, float]]:
    """Approximate ms per stage of prepare_image on one image (its steps, redone with public calls)."""
    stages: dict[str, list[float]] = {name: [] for name in ("decode", "resize", "encode", "hash")}
    for _ in range(rounds):
        t0 = time.perf_counter()
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", target)
        img.load()
        t1 = time.perf_counter()
        out = vlm_images._resize(img, target)  # the resampler prepare_image uses
        t2 = time.perf_counter()
        buffer = io.BytesIO()
        out.save(buffer, "JPEG", quality=config.jpeg_quality, optimize=False, progressive=False)
        t3 = time.perf_counter()
        hashlib.sha256(data).hexdigest()
        base64.b64encode(buffer.getvalue())
        t4 = time.perf_counter()
        for name, seconds in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            stages[name].append(seconds)
    decoded = f"{img.size[0]}×{img.size[1]}"
    labels = {
        "decode": f"JPEG decode at reduced size ({decoded})",
        "resize": f"{resampler()} resize {decoded} → {target[0]}×{target[1]}",
        "encode": f"JPEG encode (quality {config.jpeg_quality})",
        "hash": "sha256 of the original + base64 of the result",
    }
    return [(labels[name], statistics.median(values) * 1000) for name, values in stages.items()]


def resampler() -> str:
    if vlm_images.FAST_RESIZE:
        return f"Lanczos-3 (cykooz-resizer {version('cykooz-resizer')})"
    return "LANCZOS (Pillow)"


def psnr(a: Image.Image, b: Image.Image) -> float:
    diff = ImageChops.difference(a.convert("RGB"), b.convert("RGB"))
    mse = sum(value**2 for value in ImageStat.Stat(diff).rms) / 3
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def encode_jpeg(img: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=quality, optimize=False, progressive=False)
    return buffer.getvalue()


def alternatives(
    images: list[bytes], config: ImageConfig, target: tuple[int, int], passes: int
) -> list[tuple[str, float, float, float, float]]:
    """(name, ms per image end to end, ratio to the RGB draft decode alone, PSNR vs LANCZOS, vs BICUBIC).

    End to end = draft decode + resize + JPEG encode + sha256 of the original + base64, as prepare_image
    does (its header checks and EXIF lookup left out). PSNR: the decoded JPEG sent against a LANCZOS and a
    BICUBIC resize of the full-resolution decode, averaged over the first three images.
    """
    quality = config.jpeg_quality

    def pillow(fil: Resampling) -> Callable[[Image.Image], Image.Image]:
        return lambda img: img.resize(target, fil, reducing_gap=3.0 if fil == Resampling.LANCZOS else None)

    ways: dict[str, tuple[str, Callable[[Image.Image], Image.Image]]] = {
        "Pillow LANCZOS (`prepare_image` before)": ("RGB", pillow(Resampling.LANCZOS)),
        "Pillow BICUBIC": ("RGB", pillow(Resampling.BICUBIC)),
        "Pillow BILINEAR": ("RGB", pillow(Resampling.BILINEAR)),
        'YCbCr end to end (`draft("YCbCr")`, resize, save YCbCr), Pillow LANCZOS': (
            "YCbCr",
            pillow(Resampling.LANCZOS),
        ),
        "YCbCr end to end, Pillow BILINEAR": ("YCbCr", pillow(Resampling.BILINEAR)),
    }
    if vlm_images.FAST_RESIZE:
        from cykooz_resizer import FilterType, ResizeAlg, ResizeOptions, Resizer

        def cykooz(filter_type: FilterType) -> Callable[[Image.Image], Image.Image]:
            options = ResizeOptions(resize_alg=ResizeAlg.convolution(filter_type))

            def run(img: Image.Image) -> Image.Image:
                out = Image.new(img.mode, target)
                Resizer().resize_pil(img, out, options)
                return out

            return run

        ways["cykooz-resizer Lanczos-3 (`prepare_image` now)"] = ("RGB", cykooz(FilterType.lanczos3))
        ways["cykooz-resizer Catmull-Rom (bicubic)"] = ("RGB", cykooz(FilterType.catmull_rom))
        ways["cykooz-resizer bilinear"] = ("RGB", cykooz(FilterType.bilinear))
    try:
        import cv2  # type: ignore[import-not-found]
        import numpy

        cv2.setNumThreads(1)

        def opencv(interpolation: int) -> Callable[[Image.Image], Image.Image]:
            return lambda img: Image.fromarray(
                cv2.resize(numpy.asarray(img), target, interpolation=interpolation)
            )

        ways[f"OpenCV {cv2.__version__} INTER_CUBIC (no antialias)"] = ("RGB", opencv(cv2.INTER_CUBIC))
        ways["OpenCV INTER_LINEAR (no antialias)"] = ("RGB", opencv(cv2.INTER_LINEAR))
        ways["OpenCV INTER_AREA"] = ("RGB", opencv(cv2.INTER_AREA))
    except ImportError:
        pass
    try:
        os.environ.setdefault("VIPS_CONCURRENCY", "1")
        import pyvips  # type: ignore[import-not-found]

        pyvips.cache_set_max(0)

        def vips(img: Image.Image) -> Image.Image:
            width, height = img.size
            v = pyvips.Image.new_from_memory(img.tobytes(), width, height, 3, "uchar")
            v = v.resize(target[0] / width, vscale=target[1] / height, kernel="lanczos3")
            return Image.frombytes("RGB", target, v.write_to_memory())

        ways[f"pyvips {pyvips.__version__} lanczos3 (1 thread, through memory)"] = ("RGB", vips)
    except (ImportError, OSError):
        pass

    def decode(data: bytes, mode: str) -> Image.Image:
        img = Image.open(io.BytesIO(data))
        img.draft(mode, target)
        img.load()
        return img

    def end_to_end(mode: str, resize: Callable[[Image.Image], Image.Image]) -> Callable[[bytes], bytes]:
        def run(data: bytes) -> bytes:
            sent = encode_jpeg(resize(decode(data, mode)), quality)
            hashlib.sha256(data).hexdigest()
            base64.b64encode(sent)
            return sent

        return run

    runs = {name: end_to_end(mode, resize) for name, (mode, resize) in ways.items()}
    runs["decode alone, RGB (the floor above)"] = lambda data: decode(data, "RGB") and b""
    runs["decode alone, YCbCr"] = lambda data: decode(data, "YCbCr") and b""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(passes):  # interleaved, so a busy moment of the machine hits every way alike
        for name, run in runs.items():
            started = time.perf_counter()
            for data in images:
                run(data)
            times[name].append((time.perf_counter() - started) / len(images))
    references = []
    for data in images[:3]:
        with Image.open(io.BytesIO(data)) as img:
            full = img.convert("RGB")
        references.append((full.resize(target, Resampling.LANCZOS), full.resize(target, Resampling.BICUBIC)))
    floor = statistics.median(times["decode alone, RGB (the floor above)"])
    rows = []
    for name, run in runs.items():
        scores = [(math.nan, math.nan)]
        if not name.startswith("decode alone"):
            scores = []
            for data, (lanczos, bicubic) in zip(images, references, strict=False):
                sent = Image.open(io.BytesIO(run(data)))
                scores.append((psnr(sent, lanczos), psnr(sent, bicubic)))
        ms = statistics.median(times[name]) * 1000
        rows.append(
            (
                name,
                ms,
                ms / (floor * 1000),
                statistics.mean(s[0] for s in scores),
                statistics.mean(s[1] for s in scores),
            )
        )
    return rows


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    turbo = " (libjpeg-turbo)" if features.check_feature("libjpeg_turbo") else ""
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, Pillow {Image.__version__}, "
        f"libjpeg {features.version('jpg')}{turbo}, {platform.system()} {platform.release()}; "
        f"resampler: {resampler()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=24, help="number of 12-megapixel JPEGs (default 24)")
    parser.add_argument("--budget", type=int, default=280, help="max soft tokens (default 280)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per method; the median counts")
    parser.add_argument(
        "--alternatives", action="store_true", help="also time other resamplers/pipelines, with PSNR"
    )
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    config = ImageConfig(max_soft_tokens=args.budget)
    target = target_size(WIDTH, HEIGHT, config.max_pixels)

    print(f"making {args.n} photo-like {WIDTH}×{HEIGHT} JPEGs...", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="vlmbatch-bench-") as tmp, ThreadPoolExecutor(cores) as pool:
        paths = [Path(tmp) / f"photo{i:03d}.jpg" for i in range(args.n)]
        for path, data in zip(paths, pool.map(make_photo, range(args.n)), strict=True):
            path.write_bytes(data)
        images = [path.read_bytes() for path in paths]  # all methods work from the same bytes in memory

    for data in images[:2]:  # warm-up, and a check of what is sent
        prepared = prepare_image(data, config)
        assert prepared.sent_width * prepared.sent_height <= config.max_pixels
        assert (prepared.sent_width, prepared.sent_height) == target
    plain_pillow(images[0], target)
    draft_decode(images[0], target)

    def each(function: Callable[[bytes], object]) -> Callable[[], None]:
        def run_pass() -> None:
            for data in images:
                function(data)

        return run_pass

    with ThreadPoolExecutor(max_workers=cores, thread_name_prefix="bench") as pool:

        def on_the_pool() -> None:
            list(pool.map(lambda data: prepare_image(data, config), images))

        print("timing...", file=sys.stderr)
        seconds = median_seconds(
            {
                "plain Pillow (open → convert → thumbnail → save)": each(
                    lambda data: plain_pillow(data, target)
                ),
                "vlmbatch `prepare_image`, 1 thread": each(lambda data: prepare_image(data, config)),
                "libjpeg reduced-size decode alone (`draft` + `load`)": each(
                    lambda data: draft_decode(data, target)
                ),
                f"vlmbatch `prepare_image`, thread pool ({cores} threads)": on_the_pool,
            },
            args.passes,
        )
    per_image = {name: value / len(images) for name, value in seconds.items()}
    plain, ours, draft = list(per_image.values())[:3]

    size_mb = statistics.mean(len(data) for data in images) / 1e6
    print(f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.\n")
    print(
        f"{len(images)} JPEGs of {WIDTH}×{HEIGHT} (mean {size_mb:.1f} MB, quality 90) → "
        f"{target[0]}×{target[1]} "
        f"(budget {args.budget} soft tokens = {args.budget * PIXELS_PER_SOFT_TOKEN:,} px); median of "
        f"{args.passes} interleaved passes.\n"
    )
    print("| method | images/s | ms/image | speed-up vs plain Pillow | ratio to draft decode alone |")
    print("|---|---:|---:|---:|---:|")
    for name, value in per_image.items():
        print(
            f"| {name} | {1 / value:.1f} | {value * 1000:.1f} | {plain / value:.2f}× | {value / draft:.2f}× |"
        )
    print(
        f"\nTargets (single-threaded): ≥ 3× plain Pillow — {plain / ours:.2f}× "
        f"({'met' if plain / ours >= 3 else 'NOT met'}); within 1.3× of the reduced-size decode — "
        f"{ours / draft:.2f}× ({'met' if ours / draft <= 1.3 else 'NOT met'}).\n"
    )
    print("Where `prepare_image`'s time goes (one image, approximate):\n")
    print("| stage | ms |")
    print("|---|---:|")
    for label, ms in breakdown(images[0], config, target):
        print(f"| {label} | {ms:.1f} |")
    if args.alternatives:
        print(
            "\nOther ways to do the work after the decode (end to end: draft decode, resize, JPEG encode, "
            "sha256, base64; interleaved passes, median; PSNR of the JPEG sent against a full-resolution "
            "LANCZOS / BICUBIC resize, mean of 3 images):\n"
        )
        print("| way | ms/image | ratio to draft decode alone | PSNR vs LANCZOS / BICUBIC reference |")
        print("|---|---:|---:|---|")
        for name, ms, ratio, vs_lanczos, vs_bicubic in alternatives(
            images, config, target, max(args.passes, 5)
        ):
            quality = "—" if math.isnan(vs_lanczos) else f"{vs_lanczos:.1f} / {vs_bicubic:.1f} dB"
            print(f"| {name} | {ms:.1f} | {ratio:.2f}× | {quality} |")


if __name__ == "__main__":
    main()
