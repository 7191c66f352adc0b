"""Replicas: three emulators as three replicas of the model, steady state and one of them killed mid-run.

    .venv/bin/python bench/replicas.py                  # N=12,000: steady state, then one killed mid-run
    .venv/bin/python bench/replicas.py --n 6000         # smaller: less time after the kill to settle in

Three ``python -m emulator`` processes, each ``--max-concurrency 32 --latency 0.25``: each serves at most
32 requests at once for 0.25 s, 128 requests/s; the three together 384 (ideal). ``vlmbatch run`` (a
subprocess, as a user runs it) gets the three as ``--base-url`` and ``--concurrency 32`` (per replica),
over N distinct small JPEGs × one caption prompt.

(a) **Steady state**: every arrival at the three emulators (their stats logs, put on the machine's
    monotonic clock with each one's ``monotonic_start``); the rate between the 10th and the 90th
    percentile arrival (the job's middle: no first wave, no tail), ÷ 384. Target ≥ 95 %.
(b) **One killed**: once half the items have arrived, one emulator is killed (SIGKILL: its requests in
    flight are cut, its port closed) and the run goes on with two: ideal 256 requests/s. The arrivals
    at the two survivors per second after the kill, and the rate from 10 s after the kill to the 90th
    percentile arrival ("settled"), ÷ 256. Target: settled ≥ 95 % within 10 s. The run must still end
    with exit 0 and every row ok (the killed replica's requests in flight answered by the others).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    VLMBATCH,
    Emulator,
    caption_prompt,
    distinct_images,
    emulator,
    header,
    log,
    prefect_env,
    table,
    workdir,
)

REPLICAS, CONCURRENCY, LATENCY = 3, 32, 0.25
TARGET = 0.95
SETTLE_S = 10.0


def brief_stats(emu: Emulator) -> dict[str, Any]:
    """The counters without the log (cheap to poll while the run goes)."""
    with urllib.request.urlopen(f"{emu.root}/_emulator/stats?log=0", timeout=60) as response:
        return dict(json.load(response))


def arrivals(stats: dict[str, Any]) -> list[float]:
    """An emulator's arrivals on the machine's monotonic clock."""
    return sorted(stats["monotonic_start"] + entry["t"] for entry in stats["log"])


def percentile_window(times: list[float]) -> tuple[float, float, float]:
    """The 10th and 90th percentile arrivals and the rate between them."""
    low, high = len(times) // 10, len(times) * 9 // 10
    return times[low], times[high], (high - low) / (times[high] - times[low])


@contextmanager
def replicas() -> Iterator[list[Emulator]]:
    with ExitStack() as stack:
        yield [
            stack.enter_context(emulator(latency=LATENCY, max_concurrency=CONCURRENCY))
            for _ in range(REPLICAS)
        ]


def run(
    images: Path, prompts: Path, out: Path, emus: list[Emulator], home: Path, kill_at: int | None
) -> dict[str, Any]:
    """``vlmbatch run`` against the replicas; with ``kill_at``, the first replica is killed once that many
    requests have arrived in all. Returns what was measured."""
    command = [VLMBATCH, "run", str(images), "--prompts", str(prompts), "--out", str(out)]
    for emu in emus:
        command += ["--base-url", emu.base_url]
    command += ["--concurrency", str(CONCURRENCY)]
    started = time.monotonic()
    process = subprocess.Popen(
        command, env=prefect_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    victim: dict[str, Any] | None = None
    killed_at = None
    if kill_at is not None:
        while process.poll() is None:
            if sum(brief_stats(emu)["requests_total"] for emu in emus) >= kill_at:
                victim = emus[0].stats()  # what it saw, read just before it dies
                os.kill(emus[0].process.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                emus[0].process.wait()
                log(f"  killed {emus[0].base_url} after {kill_at} arrivals")
                break
            time.sleep(0.05)
    stdout, stderr = process.communicate()
    wall = time.monotonic() - started
    if process.returncode != 0:
        raise RuntimeError(f"vlmbatch run exited {process.returncode}:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    statuses = ds.dataset(out).to_table(columns=["status", "replica"]).to_pylist()
    survivors = emus[1:] if kill_at is not None else emus
    stats = [emu.stats() for emu in survivors]
    every = sorted(t for s in ([victim] if victim else []) + stats for t in arrivals(s))
    sent = re.search(r"requests sent\s*[│|]\s*(\d+)", stdout)
    return {
        "wall": wall,
        "sent": int(sent.group(1)) if sent else None,
        "rows": len(statuses),
        "failed": sum(1 for r in statuses if r["status"] != "ok"),
        "all": every,
        "survivors": sorted(t for s in stats for t in arrivals(s)),
        "killed_at": killed_at,
        "stdout": stdout,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=12_000, help="work items per run (default 12,000)")
    args = parser.parse_args()
    ideal, ideal_two = REPLICAS * CONCURRENCY / LATENCY, (REPLICAS - 1) * CONCURRENCY / LATENCY

    with workdir("replicas") as tmp:
        log(f"making {args.n} small JPEGs...")
        images = distinct_images(tmp / "manifest", args.n)
        prompts = caption_prompt(tmp / "manifest")

        log(f"steady state: {REPLICAS} replicas × C={CONCURRENCY} / L={LATENCY} s, N={args.n}...")
        with replicas() as emus:
            steady = run(images, prompts, tmp / "out-steady", emus, tmp / "prefect", None)
        _, _, rate = percentile_window(steady["all"])
        window = steady["all"][-1] + LATENCY - steady["all"][0]
        log(f"  steady {rate:.0f} req/s ({rate / ideal:.1%}), window {window:.1f} s")

        log("one killed at mid-run...")
        with replicas() as emus:
            killed = run(images, prompts, tmp / "out-killed", emus, tmp / "prefect", args.n // 2)
    kill = killed["killed_at"]
    before_low, _, _ = percentile_window(killed["all"])
    before = [t for t in killed["all"] if before_low <= t < kill]
    rate_before = len(before) / (kill - before_low) if kill > before_low else float("nan")
    _, end, _ = percentile_window(killed["all"])
    survivors = killed["survivors"]
    per_second = [
        sum(1 for t in survivors if kill + i <= t < kill + i + 1) for i in range(int(min(15, end - kill)))
    ]
    settled_from = kill + SETTLE_S
    settled = [t for t in survivors if settled_from <= t < end]
    settled_rate = len(settled) / (end - settled_from) if end > settled_from else float("nan")
    # when it settled: the first second from which every 2-s mean up to the 90th percentile holds ≥ 95 %
    means = [(per_second[i] + per_second[i + 1]) / 2 for i in range(len(per_second) - 1)]
    settle_s = next((i for i in range(len(means)) if all(m >= TARGET * ideal_two for m in means[i:])), None)

    print(header("Replicas"))
    print(
        f"{REPLICAS} emulators (`python -m emulator --max-concurrency {CONCURRENCY} --latency {LATENCY}`, "
        f"each its own process) as replicas; `vlmbatch run --concurrency {CONCURRENCY}` with the three "
        f"`--base-url`s, N={args.n:,} distinct 64×64 JPEGs × 1 caption prompt.\n"
    )
    rows = [
        [
            "steady state, 3 replicas",
            f"{ideal:.0f}",
            f"{rate:.0f}",
            f"**{rate / ideal:.1%}**",
            f"{args.n / window / ideal:.1%}",
            steady["sent"],
            f"{steady['rows']:,} ok" if not steady["failed"] else f"{steady['failed']} failed",
        ],
        [
            "one killed at mid-run: before the kill",
            f"{ideal:.0f}",
            f"{rate_before:.0f}",
            f"{rate_before / ideal:.1%}",
            "",
            "",
            "",
        ],
        [
            f"one killed: settled ({SETTLE_S:g} s after the kill → 90th percentile arrival)",
            f"{ideal_two:.0f}",
            f"{settled_rate:.0f}",
            f"**{settled_rate / ideal_two:.1%}**",
            "",
            killed["sent"],
            f"{killed['rows']:,} ok" if not killed["failed"] else f"{killed['failed']} failed",
        ],
    ]
    print(
        table(
            ["run", "ideal req/s", "achieved req/s", "÷ ideal", "whole window ÷ ideal", "requests", "rows"],
            rows,
        )
    )
    print(
        "\nArrivals per second at the two survivors after the kill (ideal "
        f"{ideal_two:.0f}): "
        + ", ".join(str(n) for n in per_second)
        + (
            f"; every 2-s mean ≥ 95 % from second {settle_s} on."
            if settle_s is not None
            else "; never settled."
        )
    )
    print(
        "\nsteady: arrivals between the 10th and 90th percentile arrival ÷ that time (all three emulators' "
        "logs on one clock); whole window: N ÷ (first arrival → last arrival + L). requests: sent by "
        "vlmbatch (its summary), retries included."
    )
    settled_met = settled_rate / ideal_two >= TARGET and settle_s is not None and settle_s <= SETTLE_S
    verdicts = [
        f"steady {rate / ideal:.1%} ({'met' if rate / ideal >= TARGET else 'NOT met'})",
        f"after a kill {settled_rate / ideal_two:.1%} of the survivors' ideal from {SETTLE_S:g} s on "
        f"({'met' if settled_met else 'NOT met'})",
    ]
    print("\nTargets ≥ 95 % — " + "; ".join(verdicts) + ".")
    print("\nThe killed run's summary:\n\n```\n" + killed["stdout"].strip() + "\n```")


if __name__ == "__main__":
    main()
