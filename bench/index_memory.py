"""Memory of the resume index per worker (issue 17, point 6): a whole job's and a slice's.

    .venv/bin/python bench/index_memory.py                     # 100k and 1M rows, 3 runs each (≈ 8 min)
    .venv/bin/python bench/index_memory.py --sizes 100000 --runs 1

OUT is written directly, not by running the endpoint: a run of one work item (the emulator, latency 0)
gives a real row and OUT's hash-cache file; the row is repeated with every image id of an N-row images
manifest (every row naming one 64×64 JPEG, bench/common.py's ``one_image_manifest``: the request key
does not depend on the image id, so every repeated row is ``ok`` with the key a run computes) into part
files of 1,000 rows (the default shard size), in the project's output schema (tasks/row.py). Then:

1. **The index alone**, in a fresh ``python`` process: ``tasks.outputs.store.read_index`` as a run calls
   it (tasks/run/job.py), for the whole job and for slices 1/2 and 1/4 (the row filter
   ``SliceKeys.row_filter``); RSS (``VmRSS``) before and after, and the peak (``VmHWM``) during the
   load (after one part file read, so that pyarrow's readers are loaded and its memory pool warm).
   What the index keeps is after − before; MB per million rows kept = that ÷ rows kept. RSS also keeps
   what the allocators hold after the load's temporaries are freed, so the same load is also run under
   ``tracemalloc``: what Python's allocator holds for the index after it (its arrays) and at most during
   it (pyarrow's buffers are not traced).
2. **The whole command**: ``vlmbatch run`` resuming that OUT (a subprocess, the temporary Prefect
   server; nothing is sent: checked at the emulator), whole and ``--slice 1/4``; the peak RSS of the
   ``vlmbatch`` process (``VmHWM``) and its steady RSS, the median ``VmRSS`` sampled every 0.1 s over
   the second half of its life (index built, items being skipped). Against the same command with
   ``--limit 1`` into an empty OUT (the manifest read and planned, no index): what the index adds.

Each figure is measured ``--runs`` times (min, median, max).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PYTHON,
    ROOT,
    VLMBATCH,
    caption_prompt,
    emulator,
    header,
    log,
    one_image_manifest,
    prefect_env,
    table,
    vlmbatch_run,
    workdir,
)

ROWS_PER_FILE = 1000
SLICES = (None, "1/2", "1/4")

# Runs in a fresh interpreter: RSS before and after read_index, and its peak (a slice: its row filter);
# with "trace", what Python's allocator holds for it after, and at most, instead (tracemalloc).
PROBE = """
import gc, json, sys, tracemalloc
from pathlib import Path
from tasks.inputs.slice_keys import SliceKeys
from tasks.outputs.index import INDEX_COLUMNS
from tasks.outputs.layout import OUT_SCOPE, part_files, read_table
from tasks.outputs.store import read_index
from tasks.slice import Slice

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
out, spec, trace = Path(sys.argv[1]), sys.argv[2], sys.argv[3] == "trace"
part = Slice.parse(spec) if spec != "-" else None
keep = SliceKeys([], []).row_filter(part) if part else None
read_table(part_files(out)[0], columns=INDEX_COLUMNS)  # pyarrow's readers loaded, its pool warm
gc.collect()
if trace:
    tracemalloc.start()
before = status("VmRSS")
index, hashes = read_index(out, part.scope if part else OUT_SCOPE, keep)
gc.collect()
found = {"rows": len(index), "before": before, "after": status("VmRSS"), "peak": status("VmHWM")}
if trace:
    held, most = tracemalloc.get_traced_memory()
    found.update(held=held / 2**20, most=most / 2**20)
print(json.dumps(found))
"""


def spread(values: Sequence[float], digits: int = 0) -> str:
    return f"**{statistics.median(values):.{digits}f}** ({min(values):.{digits}f}–{max(values):.{digits}f})"


def synthetic_out(template: Path, out: Path, n: int) -> None:
    """OUT with the template's one row repeated for img0000000 … (n rows), and its hash cache."""
    (row,) = [ds.dataset(template, format="parquet").to_table()]
    assert row.num_rows == 1, row.num_rows
    hashes = template / "_vlmbatch" / "hashes"
    (out / "_vlmbatch" / "hashes").mkdir(parents=True)
    for path in hashes.glob("*.parquet"):
        (out / "_vlmbatch" / "hashes" / path.name).write_bytes(path.read_bytes())
    index = row.schema.get_field_index("image_id")
    for shard, start in enumerate(range(0, n, ROWS_PER_FILE)):
        count = min(ROWS_PER_FILE, n - start)
        part = row.take([0] * count)
        ids = pa.array([f"img{i:07d}" for i in range(start, start + count)], pa.string())
        part = part.set_column(index, row.schema.field(index), ids)
        pq.write_table(part, out / f"part-{shard:06d}-bench0000000000.parquet", compression="zstd")


def index_alone(out: Path, spec: str | None, trace: bool = False) -> dict[str, float]:
    command = [PYTHON, "-c", PROBE, str(out), spec or "-", "trace" if trace else "rss"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def rss_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cli_memory(command: Sequence[str], env: dict[str, str]) -> tuple[float, float, float]:
    """(peak, steady, wall) of the vlmbatch process: VmHWM, the median VmRSS over the 2nd half of its life."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    samples: list[tuple[float, int]] = []
    peak = 0

    def poll() -> None:
        nonlocal peak
        while proc.poll() is None:
            rss, hwm = rss_kb(proc.pid, "VmRSS"), rss_kb(proc.pid, "VmHWM")
            if rss:
                samples.append((time.perf_counter(), rss))
                peak = max(peak, hwm)
            time.sleep(0.1)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    output, _ = proc.communicate()
    poller.join()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"exited {proc.returncode}:\n{output[-3000:]}")
    half = started + wall / 2
    steady = statistics.median(rss for t, rss in samples if t >= half) if samples else 0
    return peak / 1024, steady / 1024, wall


def fresh(command: list[str], tmp: Path) -> list[str]:
    return [*command, str(tmp / f"empty-{time.monotonic_ns()}")]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="100000,1000000", help="rows of OUT, comma-separated")
    parser.add_argument("--runs", type=int, default=3, help="runs of each figure (default 3)")
    parser.add_argument("--no-cli", action="store_true", help="only the index alone (part 1)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    alone_rows, cli_rows = [], []
    with workdir("index-memory") as tmp, emulator(latency=0.0, max_concurrency=0) as emu:
        prompts = caption_prompt(tmp / "prompts")
        home = tmp / "prefect"
        env = prefect_env(home)
        for n in sizes:
            manifest = one_image_manifest(tmp / f"m{n}", n)
            template = tmp / f"template-{n}"
            vlmbatch_run(manifest, prompts, template, emu.base_url, prefect_home=home, extra=["--limit", "1"])
            out = tmp / f"out-{n}"
            started = time.perf_counter()
            synthetic_out(template, out, n)
            log(f"{n:,} rows written in {time.perf_counter() - started:.0f} s")

            for spec in SLICES:
                probes = [index_alone(out, spec) for _ in range(args.runs)]
                kept = probes[0]["rows"]
                grown = [p["after"] - p["before"] for p in probes]
                peaks = [p["peak"] - p["before"] for p in probes]
                traced = index_alone(out, spec, trace=True)  # deterministic: once is enough
                grew = statistics.median(grown)
                log(f"  index alone, {spec or 'whole job'}: {kept:,} rows, +{grew:.1f} MB")
                alone_rows.append([
                    f"{n:,}", spec or "whole job", f"{kept:,}", spread([p["before"] for p in probes]),
                    spread(grown, 1), spread(peaks, 1), f"{grew / kept * 1e6:.0f}",
                    f"{traced['held']:.1f}", f"{traced['most']:.1f}", f"{traced['held'] / kept * 1e6:.1f}",
                ])  # fmt: skip
            if args.no_cli:
                continue

            base = [VLMBATCH, "run", str(manifest), "--prompts", str(prompts), "--base-url", emu.base_url]
            empty = [*base, "--limit", "1", "--out"]  # + a new OUT each time
            resume = [*base, "--out", str(out)]
            variants: list[tuple[str, Callable[[], list[str]], int, int]] = [
                ("`--limit 1` into an empty OUT (no index)",
                 functools.partial(fresh, empty, tmp), 0, 1),
                ("resume, whole job", functools.partial(list, resume), n, 0),
                ("resume, `--slice 1/4`", functools.partial(list, [*resume, "--slice", "1/4"]),
                 int(index_alone(out, "1/4")["rows"]), 0),
            ]  # fmt: skip
            for name, command, kept, sends in variants:
                sent = emu.stats()["requests_total"]
                measured = [cli_memory(command(), env) for _ in range(args.runs)]
                resent = emu.stats()["requests_total"] - sent
                if resent != sends * args.runs:
                    raise RuntimeError(f"{name}: {resent} requests sent, expected {sends * args.runs}")
                log(f"  {name}: peak {statistics.median(m[0] for m in measured):.0f} MB")
                cli_rows.append([
                    f"{n:,}", name, f"{kept:,}", spread([m[0] for m in measured]),
                    spread([m[1] for m in measured]), spread([m[2] for m in measured], 1),
                ])  # fmt: skip

    print(header("Resume index memory per worker"))
    print(f"Synthetic OUT: part files of {ROWS_PER_FILE:,} rows, one caption row per image; medians of "
          f"{args.runs} runs (min–max).\n")  # fmt: skip
    print("The index alone (`read_index` in a fresh interpreter):\n")
    print(table(["OUT rows", "slice", "rows kept", "RSS before MB", "RSS after − before, MB",
                 "RSS peak − before, MB", "RSS MB per 10⁶ rows kept", "traced: held MB", "traced: peak MB",
                 "traced MB per 10⁶ rows kept"], alone_rows))  # fmt: skip
    if cli_rows:
        print("\nThe whole command (`vlmbatch run` resuming OUT; nothing sent):\n")
        print(table(["OUT rows", "run", "rows kept", "peak RSS MB", "steady RSS MB", "wall s"], cli_rows))


if __name__ == "__main__":
    main()
