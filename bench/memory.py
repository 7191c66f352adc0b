"""Peak memory of ``vlmbatch run`` as the manifest grows: is it flat in manifest size?

    .venv/bin/python bench/memory.py                   # 10k and 100k work items
    .venv/bin/python bench/memory.py --big             # and 1M
    .venv/bin/python bench/memory.py --sizes 1000,20000
    .venv/bin/python bench/memory.py --photos 64         # instead: 64 phone photos in flight at once

Each images manifest has one row per work item, every row referencing the same small JPEG by path
(so a million-row manifest costs a few MB and a few seconds to make), with one caption prompt. The
emulator runs as its own process with latency 0 and no concurrency cap; the client at ``--concurrency``
64. Reported per size: the peak RSS of the ``vlmbatch`` process itself (``VmHWM`` from /proc, polled
until it exits) and ``ru_maxrss`` from ``os.wait4`` (the ``vlmbatch`` process and any child it reaped;
the temporary Prefect API server it starts is not one, so the two agree: bench/common.py). A
``--limit 1`` run gives the start-up floor.

``--photos K`` measures the other side of memory: what a request in flight holds. K distinct photo-like
12-megapixel JPEGs (about 3.3 MB each, bench/images.py's), ``--concurrency K`` and an emulator latency of
3 s, so all K requests are in flight at once; the peak RSS against the same run with one photo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    caption_prompt,
    emulator,
    header,
    log,
    one_image_manifest,
    table,
    vlmbatch_run,
    workdir,
)

TARGET_MB = 400


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000", help="work items, comma-separated")
    parser.add_argument("--big", action="store_true", help="add 1,000,000 work items")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--photos", type=int, default=0, help="K phone photos in flight at once, instead")
    args = parser.parse_args()
    if args.photos:
        photos(args.photos)
        return
    sizes = [int(size) for size in args.sizes.split(",")] + ([1_000_000] if args.big else [])

    rows = []
    with workdir("memory") as tmp, emulator(latency=0.0, max_concurrency=0) as emu:
        prompts = caption_prompt(tmp / "prompts")
        home = tmp / "prefect"
        floor = None
        for n in [1, *sizes]:
            manifest = one_image_manifest(tmp / f"m{n}", n)
            log(f"{n:,} work items...")
            run = vlmbatch_run(
                manifest,
                prompts,
                tmp / f"out{n}",
                emu.base_url,
                prefect_home=home,
                concurrency=args.concurrency,
            )
            flow_s = run.flow_elapsed_s or float("nan")
            log(
                f"  main peak {run.main_hwm_mb:.0f} MB, ru_maxrss {run.maxrss_mb:.0f} MB, flow {flow_s:.1f} s"
            )
            if n == 1:
                floor = run.main_hwm_mb
                label = "1 (start-up floor)"
            else:
                label = f"{n:,}"
            rows.append(
                [
                    label,
                    f"**{run.main_hwm_mb:.0f}**",
                    f"{run.main_hwm_mb - (floor or 0):+.0f}" if n > 1 else "—",
                    f"{run.maxrss_mb:.0f}",
                    f"{flow_s:.1f}",
                    f"{n / flow_s:.0f}" if n > 1 else "—",
                    f"{run.wall_s:.1f}",
                ]
            )
            emu.reset()  # the emulator's per-item counters grow with the run, not ours

    print(header("Peak memory"))
    print(
        "One small JPEG referenced by path from every row × 1 caption prompt; emulator latency 0, "
        f"client concurrency {args.concurrency}.\n"
    )
    columns = [
        "work items",
        "peak RSS of vlmbatch, MB",
        "over the floor, MB",
        "ru_maxrss from wait4, MB",
        "flow elapsed s",
        "rows/s",
        "wall s",
    ]
    print(table(columns, rows))
    peaks = [float(row[1].strip("*")) for row in rows[1:]]
    largest = sizes[-1]
    per_item = (peaks[-1] - peaks[0]) * 1024 / max(1, largest - sizes[0])
    extrapolated = peaks[-1] + per_item * max(0, 1_000_000 - largest) / 1024
    if largest >= 1_000_000:
        verdict = "met" if peaks[-1] <= TARGET_MB else "NOT met"
    else:
        verdict = f"1M not run (use --big); linear extrapolation to 1M: {extrapolated:.0f} MB"
    print(
        f"\nTarget ≤ {TARGET_MB} MB at 1M work items and flat in manifest size — {peaks[-1]:.0f} MB at "
        f"{largest:,} ({verdict}); growth from {sizes[0]:,} to {largest:,}: {peaks[-1] - peaks[0]:+.0f} MB "
        f"({per_item:.2f} KB per work item)."
    )


def photos(k: int) -> None:
    """Peak RSS with k phone photos' requests in flight at once, against one photo's."""
    from images import make_photo

    rows = []
    with workdir("memory-photos") as tmp, emulator(latency=3.0, max_concurrency=0) as emu:
        prompts = caption_prompt(tmp / "prompts")
        log(f"making {k} photo-like 12-megapixel JPEGs...")
        names = [f"p{i:03d}.jpg" for i in range(k)]
        sizes = [(tmp / name).write_bytes(make_photo(i)) for i, name in enumerate(names)]
        for n in (1, k):
            manifest = tmp / f"images{n}.parquet"
            pq.write_table(
                pa.table({"image_id": [name[:-4] for name in names[:n]], "image": names[:n]}), manifest
            )
            log(f"{n} photo(s) in flight...")
            run = vlmbatch_run(
                manifest, prompts, tmp / f"out{n}", emu.base_url, prefect_home=tmp / "prefect", concurrency=n
            )
            in_flight = emu.stats()["max_in_flight"]
            rows.append(
                [f"{n}", f"{sum(sizes[:n]) / 2**20:.0f}", f"{in_flight}", f"**{run.main_hwm_mb:.0f}**"]
            )
            emu.reset()
    print(header("Peak memory with photos in flight"))
    print(
        f"{k} distinct 4032×3024 JPEGs (quality 90) × 1 caption prompt; emulator latency 3 s, "
        f"concurrency {k}.\n"
    )
    print(
        table(
            [
                "photos in flight",
                "their files, MB",
                "max in flight at the emulator",
                "peak RSS of vlmbatch, MB",
            ],
            rows,
        )
    )
    grown = float(rows[1][3].strip("*")) - float(rows[0][3].strip("*"))
    print(
        f"\n{k} requests in flight cost {grown:+.0f} MB over one: {grown * 1024 / max(1, k - 1):.0f} KB each."
    )


if __name__ == "__main__":
    main()
