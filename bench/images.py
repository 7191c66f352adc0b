"""Images per second on 12-megapixel JPEGs: vlmbatch's prepare_image against plain Pillow, in one run.

    .venv/bin/python bench/images.py [--n 24] [--budget 280] [--passes 3]

Makes ``--n`` photo-like 4032×3024 JPEGs (gradients, shapes, lines, sensor-like noise; quality 90) in a
temporary directory, reads them into memory, then times over the same bytes:

(a) plain Pillow: ``open → convert("RGB") → thumbnail(target) → save JPEG``, target = our pixel budget;
(b) ``tasks.images.prepare_image``, single-threaded;
(c) libjpeg's reduced-size decode alone: ``img.draft("RGB", target); img.load()``;
(d) ``prepare_image`` on a thread pool sized to the cores.

Prints a Markdown table (the median of ``--passes`` passes over all images) and where (b)'s time goes.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
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
from pathlib import Path

from PIL import Image, ImageChops, ImageDraw, ImageFilter, features

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tasks.config import PIXELS_PER_SOFT_TOKEN, ImageConfig
from tasks.images import prepare_image, target_size

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


def median_seconds(run_pass: Callable[[], None], passes: int) -> float:
    times = []
    for _ in range(passes):
        started = time.perf_counter()
        run_pass()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


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
        out = img.resize(target, Resampling.LANCZOS, reducing_gap=3.0)
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
        "resize": f"LANCZOS resize {decoded} → {target[0]}×{target[1]}",
        "encode": f"JPEG encode (quality {config.jpeg_quality})",
        "hash": "sha256 of the original + base64 of the result",
    }
    return [(labels[name], statistics.median(values) * 1000) for name, values in stages.items()]


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
        f"libjpeg {features.version('jpg')}{turbo}, {platform.system()} {platform.release()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=24, help="number of 12-megapixel JPEGs (default 24)")
    parser.add_argument("--budget", type=int, default=280, help="max soft tokens (default 280)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes per method; the median counts")
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
        seconds = {
            "plain Pillow (open → convert → thumbnail → save)": median_seconds(
                each(lambda data: plain_pillow(data, target)), args.passes
            ),
            "vlmbatch `prepare_image`, 1 thread": median_seconds(
                each(lambda data: prepare_image(data, config)), args.passes
            ),
            "libjpeg reduced-size decode alone (`draft` + `load`)": median_seconds(
                each(lambda data: draft_decode(data, target)), args.passes
            ),
            f"vlmbatch `prepare_image`, thread pool ({cores} threads)": median_seconds(
                on_the_pool, args.passes
            ),
        }
    per_image = {name: value / len(images) for name, value in seconds.items()}
    plain, ours, draft = list(per_image.values())[:3]

    size_mb = statistics.mean(len(data) for data in images) / 1e6
    print(f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.\n")
    print(
        f"{len(images)} JPEGs of {WIDTH}×{HEIGHT} (mean {size_mb:.1f} MB, quality 90) → "
        f"{target[0]}×{target[1]} "
        f"(budget {args.budget} soft tokens = {args.budget * PIXELS_PER_SOFT_TOKEN:,} px); median of "
        f"{args.passes} passes.\n"
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


if __name__ == "__main__":
    main()
