"""Time and peak memory of ``vlmbatch report`` on a large synthetic OUT: is it flat in OUT's size?

    .venv/bin/python bench/report.py                          # 100k and 1M rows
    .venv/bin/python bench/report.py --sizes 10000,100000     # other sizes
    .venv/bin/python bench/report.py --keep /tmp/report.html  # keep the 1M report to look at

OUT is written directly (no run, no images: the report's work on images is a handful of thumbnails,
whatever OUT's size), as a run with the default shard size writes it: a part file per 1,000 rows. Rows:
three prompts (a caption, a question, a JSON prompt), answers of about 100 characters, 2 % failed over
four error types, latencies log-normal around 0.7 s, two runs. Then ``vlmbatch report OUT -o FILE`` runs
as a subprocess (the way a user runs it) with the default sample of 200; reported are its wall time and
peak RSS (``ru_maxrss`` from ``os.wait4``), and the page's size. The target: 1M rows in under a minute
on 2 cores, with memory flat in OUT's size.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VLMBATCH, header, log, run_process, table, workdir

from tasks.row import OUTPUT_SCHEMA

TARGET_S = 60.0
ROWS_PER_FILE = 1000
PROMPTS = [("caption", "caption"), ("colour", "qa"), ("tags", "qa")]
FAILURES = [("timeout", 408), ("rate_limited", 429), ("bad_image", None), ("invalid_json", None)]
WORDS = ["a", "grey", "cat", "sits", "on", "the", "red", "sofa", "by", "window", "in", "soft", "light", "cup"]
START = datetime(2026, 11, 1, tzinfo=UTC)


def write_out(out: Path, rows: int, seed: int = 1) -> None:
    """``rows`` rows in part files of ROWS_PER_FILE, as a run writes them."""
    rng = random.Random(seed)
    (out / "_vlmbatch").mkdir(parents=True)
    images = rows // len(PROMPTS) + 1
    for start in range(0, rows, ROWS_PER_FILE):
        n = min(ROWS_PER_FILE, rows - start)
        columns: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
        for i in range(start, start + n):
            prompt_id, task = PROMPTS[i % len(PROMPTS)]
            failed = rng.random() < 0.02
            error = FAILURES[rng.randrange(len(FAILURES))] if failed else None
            latency = rng.lognormvariate(6.5, 0.4)
            text = None if failed else " ".join(rng.choices(WORDS, k=18))
            values = {
                "image_id": f"img{i // len(PROMPTS) % images:08d}",
                "prompt_id": prompt_id,
                "task": task,
                "status": "failed" if failed else "ok",
                "text": text,
                "reasoning": None,
                "json": '{"tags": ["cat", "sofa"], "indoor": true}'
                if prompt_id == "tags" and not failed
                else None,
                "finish_reason": None if failed else "stop",
                "error_type": error[0] if error else None,
                "error_message": f"{error[0]} after 7 attempts" if error else None,
                "http_status": (error[1] if error else 200),
                "attempts": 7 if error and error[1] else 1,
                "latency_ms": None if error and error[1] is None else latency,
                "prompt_tokens": None if failed else 300 + rng.randrange(40),
                "completion_tokens": None if failed else 10 + rng.randrange(80),
                "model": "google/gemma-4-31b-it",
                "request_key": f"{i:064x}",
                "image_sha256": f"{i // len(PROMPTS):064x}",
                "image_width": 640,
                "image_height": 480,
                "sent_width": 640,
                "sent_height": 480,
                "run_id": "run-1" if i < rows // 2 else "run-2",
                "finished_at": START + timedelta(milliseconds=4 * i),
            }
            for name, value in values.items():
                columns[name].append(value)
        part = pa.table(columns, schema=OUTPUT_SCHEMA)
        pq.write_table(part, out / f"part-{start // ROWS_PER_FILE:06d}-bench.parquet", compression="zstd")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000", help="rows of OUT, comma-separated")
    parser.add_argument("--keep", type=Path, help="copy the largest size's report here")
    args = parser.parse_args()
    results = []
    with workdir("report") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            out = tmp / f"out-{size}"
            started = time.perf_counter()
            write_out(out, size)
            megabytes = sum(p.stat().st_size for p in out.glob("*.parquet")) / 1e6
            log(f"{size:,} rows in {size // ROWS_PER_FILE:,} files ({megabytes:,.0f} MB) written in "
                f"{time.perf_counter() - started:.0f} s")  # fmt: skip
            page = tmp / f"report-{size}.html"
            run = run_process([VLMBATCH, "report", str(out), "-o", str(page)])
            if run.code != 0:
                raise SystemExit(f"vlmbatch report exited {run.code}: {run.stderr}")
            log(run.stdout.strip())
            results.append(
                (size, megabytes, run.wall_s, run.cpu_s, run.maxrss_mb, page.stat().st_size / 1024)
            )
            if args.keep is not None:
                shutil.copy(page, args.keep)
            shutil.rmtree(out)
    print(header("vlmbatch report on a synthetic OUT (no images), default sample of 200"))
    rows = [
        (f"{size:,}", f"{mb:,.0f}", f"{wall:.1f}", f"{cpu:.1f}", f"{rss:.0f}", f"{kb:.0f}",
         "met" if wall < TARGET_S or size < 1_000_000 else "not met")
        for size, mb, wall, cpu, rss, kb in results
    ]  # fmt: skip
    print(
        table(
            ["rows", "OUT MB", "wall s", "CPU s", "peak RSS MB", "page KB", f"< {TARGET_S:.0f} s at 1M"], rows
        )
    )


if __name__ == "__main__":
    main()
