"""Rerun of a completed job: nothing to send, so how long does finding that out take?

    .venv/bin/python bench/rerun.py                    # 20,000 work items
    .venv/bin/python bench/rerun.py --big              # 100,000 work items (the issue's size)

Makes ``--n`` distinct small JPEGs × one caption prompt, runs ``vlmbatch run`` into a fresh OUT against
the emulator (its own process, latency 0, no cap), then the same command again into the same OUT. The
rerun must send nothing: the emulator's request counter is checked before and after it. Compared: the
flow's own elapsed time (from the summary) and the wall time of the whole command (Prefect's start-up
included), first run vs rerun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import caption_prompt, distinct_images, emulator, header, log, table, vlmbatch_run, workdir

TARGET = 0.05


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000, help="work items (default 20,000)")
    parser.add_argument("--big", action="store_true", help="100,000 work items")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    n = 100_000 if args.big else args.n

    with workdir("rerun") as tmp, emulator(latency=0.0, max_concurrency=0) as emu:
        log(f"making {n:,} small JPEGs...")
        images = distinct_images(tmp / "manifest", n)
        prompts = caption_prompt(tmp / "manifest")
        home, out = tmp / "prefect", tmp / "out"
        log("warm-up (fresh PREFECT_HOME)...")
        vlmbatch_run(images, prompts, tmp / "warm", emu.base_url, prefect_home=home, extra=["--limit", "1"])
        emu.reset()
        log("first run...")
        first = vlmbatch_run(
            images, prompts, out, emu.base_url, prefect_home=home, concurrency=args.concurrency
        )
        sent_first = emu.stats()["requests_total"]
        log(f"  flow {first.flow_elapsed_s} s, wall {first.wall_s:.1f} s, {sent_first} requests")
        log("rerun...")
        again = vlmbatch_run(
            images, prompts, out, emu.base_url, prefect_home=home, concurrency=args.concurrency
        )
        sent_rerun = emu.stats()["requests_total"] - sent_first
        log(f"  flow {again.flow_elapsed_s} s, wall {again.wall_s:.1f} s, {sent_rerun} requests")
        skipped = again.summary_value("skipped (already ok)")

    flow_1, flow_2 = first.flow_elapsed_s or float("nan"), again.flow_elapsed_s or float("nan")
    print(header("Rerun of a completed job"))
    print(f"{n:,} work items (distinct 64×64 JPEGs × 1 caption prompt); emulator latency 0, no cap.\n")
    rows = [
        ["first run", f"{flow_1:.2f}", f"{first.wall_s:.1f}", f"{first.cpu_s:.1f}", sent_first, "—"],
        [
            "rerun (same OUT)",
            f"{flow_2:.2f}",
            f"{again.wall_s:.1f}",
            f"{again.cpu_s:.1f}",
            sent_rerun,
            skipped,
        ],
        [
            "rerun ÷ first",
            f"**{flow_2 / flow_1:.1%}**",
            f"{again.wall_s / first.wall_s:.1%}",
            f"{again.cpu_s / first.cpu_s:.1%}",
            "",
            "",
        ],
    ]
    print(table(["", "flow elapsed s", "wall s", "CPU s", "requests sent", "skipped"], rows))
    note = "" if n >= 100_000 else f"; at {n:,} items, the target is for 100k"
    verdict = "met" if flow_2 / flow_1 <= TARGET and sent_rerun == 0 else "NOT met"
    print(
        f"\nTarget: a rerun in ≤ 5 % of the first run's time, sending nothing — flow {flow_2 / flow_1:.1%}, "
        f"wall {again.wall_s / first.wall_s:.1%} (Prefect's start-up included), {sent_rerun} requests sent "
        f"({verdict}, on the flow's time{note})."
    )


if __name__ == "__main__":
    main()
