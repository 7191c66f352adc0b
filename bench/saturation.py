"""Saturation: how close vlmbatch gets to an endpoint's capacity, against a plain asyncio + openai script.

    .venv/bin/python bench/saturation.py                   # C=64 L=0.25 N=4,000; C=256 L=0.5 N=16,000, 4,000
    .venv/bin/python bench/saturation.py --quick           # smoke run: C=64 L=0.25 s, N=1,000
    .venv/bin/python bench/saturation.py --setting 32:0.1:2000 [--setting C:L[:N] ...]

For each setting C:L the emulator runs as its own process with ``--max-concurrency C --latency L``: it
serves at most C requests at once, each for L seconds, so its capacity (ideal) is C/L requests/s. N
distinct small JPEGs × one caption prompt are generated (images manifest in Parquet), then, against the
same emulator (stats reset in between):

(a) ``vlmbatch run`` end to end as a subprocess with ``--concurrency C`` (manifest read → Parquet written);
(b) ``bench/plain_client.py``: AsyncOpenAI with default settings, ``Semaphore(C)``, ``gather`` over all
    items, Parquet written at the end;
(c) the same script with ``--minimal``, a yardstick rather than an alternative: all request bodies built
    before its clock starts, then only posted on bare aiohttp and the answers parsed; about the least
    client work per request there can be, so about the most this machine and emulator allow any client.

Achieved rate, measured at the endpoint: N ÷ (last arrival + L − first arrival), from the arrival
timestamps in the emulator's stats log (the last request completes L after it arrives, no earlier).
The figure is achieved ÷ ideal. No client reaches 100 % of it: the job is ceil(N / C) rounds of L
at best (the last one partly empty), so a perfect client gets N / (ceil(N / C) × C): 97.7 % at C=256
and N=4,000 (16 rounds), 99.4 % at N=16,000 — the "perfect client" column. N=16,000 at C=256 is the
same 62.5 rounds as N=4,000 at C=64. The client's own elapsed time (the flow's ``elapsed`` from the summary,
the script's from manifest read to Parquet written) gives a second, end-to-end figure. Prefect's start
(its temporary API server, imports, flow set-up) is the rest of the wall time and is reported separately.
The emulator's own CPU time during each client's run (from /proc) says whether the emulator, one event
loop sharing the cores with the client, was what limited the rate.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PYTHON,
    ROOT,
    Emulator,
    caption_prompt,
    distinct_images,
    emulator,
    first_rows,
    header,
    log,
    run_process,
    table,
    vlmbatch_run,
    workdir,
)

TARGET = 0.95


def endpoint_window(emu: Emulator, latency: float, n: int) -> tuple[float, int, float]:
    """Seconds from the first arrival to the last completion (last arrival + L), the most requests in
    flight, and the steady rate: arrivals per second between the 10th and the 90th percentile arrival
    (the middle of the job, without its first wave and its tail)."""
    stats = emu.stats()
    arrivals = sorted(entry["t"] for entry in stats["log"])
    if stats["requests_total"] != n or len(arrivals) != n:
        log(f"warning: the emulator saw {stats['requests_total']} requests for {n} items")
    low, high = arrivals[len(arrivals) // 10], arrivals[len(arrivals) * 9 // 10]
    steady = (len(arrivals) * 9 // 10 - len(arrivals) // 10) / (high - low) if high > low else float("nan")
    return arrivals[-1] + latency - arrivals[0], stats["max_in_flight"], steady


def parse_setting(text: str) -> tuple[int, float, int | None]:
    concurrency, latency, *n = text.split(":")
    return int(concurrency), float(latency), int(n[0]) if n else None


def _row(
    client: str,
    concurrency: int,
    latency: float,
    n: int,
    window: float,
    steady: float,
    elapsed: float,
    in_flight: object,
    proc: Any,
    emulator_cpu: float,
) -> list[object]:
    """One table row: the endpoint's view (window) and the client's own (elapsed), against the ideal C/L."""
    ideal = concurrency / latency
    rounds = math.ceil(n / concurrency)
    return [
        client,
        f"{concurrency} / {latency:g} s",
        f"{n:,}",
        f"{ideal:.0f}",
        f"{rounds * latency:.1f}",
        f"{n / (rounds * concurrency):.1%}",
        f"{window:.1f}",
        f"{n / window:.0f}",
        f"**{n / window / ideal:.1%}**",
        f"{steady / ideal:.1%}",
        f"{elapsed:.1f}",
        f"{n / elapsed / ideal:.1%}",
        in_flight,
        f"{proc.wall_s - elapsed:.1f}",
        f"{proc.cpu_s:.1f}",
        f"{emulator_cpu:.1f}",
        f"{emulator_cpu / window:.0%}",
    ]


PLAIN_CLIENTS = [("plain asyncio + openai", []), ("minimal client (yardstick)", ["--minimal"])]


def plain_row(
    client: str,
    flags: list[str],
    emu: Emulator,
    images: Path,
    prompts: Path,
    out: Path,
    concurrency: int,
    latency: float,
    n: int,
) -> list[object]:
    """Run bench/plain_client.py (with ``flags``) against ``emu``; its table row."""
    emulator_before = emu.cpu_s()
    script = [PYTHON, str(ROOT / "bench" / "plain_client.py"), str(images), str(prompts), str(out)]
    plain = run_process([*script, "--base-url", emu.base_url, "--concurrency", str(concurrency), *flags])
    if plain.code != 0:
        raise RuntimeError(plain.stderr[-3000:])
    result = json.loads(plain.stdout.strip().splitlines()[-1])
    emulator_cpu = emu.cpu_s() - emulator_before
    window, in_flight, steady = endpoint_window(emu, latency, n)
    elapsed = result["elapsed_s"]
    log(f"  endpoint window {window:.1f} s, script {elapsed:.1f} s ({result})")
    return _row(client, concurrency, latency, n, window, steady, elapsed, in_flight, plain, emulator_cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=4000, help="N of a setting given without (default 4,000)")
    parser.add_argument(
        "--setting",
        action="append",
        type=parse_setting,
        help="C:L or C:L:N, repeatable (default 64:0.25:4000, 256:0.5:16000 and 256:0.5:4000)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: C=64 L=0.25, N=1,000")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain asyncio scripts")
    args = parser.parse_args()
    default = [(64, 0.25, None)] if args.quick else [(64, 0.25, 4000), (256, 0.5, 16000), (256, 0.5, 4000)]
    n_default = 1000 if args.quick and args.n == 4000 else args.n
    settings = [(c, lat, n or n_default) for c, lat, n in args.setting or default]

    rows = []
    with workdir("saturation") as tmp:
        most = max(n for _, _, n in settings)
        log(f"making {most} small JPEGs...")
        all_images = distinct_images(tmp / "manifest", most)
        prompts = caption_prompt(tmp / "manifest")
        for concurrency, latency, n in settings:
            images = first_rows(all_images, n)
            with emulator(latency=latency, max_concurrency=concurrency) as emu:
                log(f"C={concurrency} L={latency} N={n}: vlmbatch run...")
                emulator_before = emu.cpu_s()
                run = vlmbatch_run(
                    images,
                    prompts,
                    tmp / f"out-{concurrency}-{n}",
                    emu.base_url,
                    prefect_home=tmp / "prefect",
                    concurrency=concurrency,
                )
                emulator_cpu = emu.cpu_s() - emulator_before
                window, in_flight, steady = endpoint_window(emu, latency, n)
                flow_s = run.flow_elapsed_s or float("nan")
                rows.append(
                    _row(
                        "vlmbatch run",
                        *(concurrency, latency, n, window, steady, flow_s, in_flight, run, emulator_cpu),
                    )
                )
                log(
                    f"  endpoint window {window:.1f} s, flow {flow_s:.1f} s, wall {run.wall_s:.1f} s, "
                    f"emulator CPU {emulator_cpu:.1f} s"
                )
                if args.no_plain:
                    continue
                for client, flags in PLAIN_CLIENTS:
                    emu.reset()
                    log(f"C={concurrency} L={latency} N={n}: {client} script...")
                    out = tmp / f"plain-{concurrency}-{n}.parquet"
                    rows.append(plain_row(client, flags, emu, images, prompts, out, concurrency, latency, n))

    print(header("Saturation"))
    print(
        "N work items: distinct 64×64 JPEGs × 1 caption prompt; the emulator in its own process, "
        "on the same machine.\n"
    )
    columns = [
        "client",
        "C / L",
        "N",
        "ideal req/s",
        "ideal s",
        "perfect client",
        "endpoint window s",
        "achieved req/s",
        "achieved ÷ ideal",
        "steady ÷ ideal",
        "client elapsed s",
        "end to end ÷ ideal",
        "max in flight",
        "start-up s",
        "client CPU s",
        "emulator CPU s",
        "emulator busy",
    ]
    print(table(columns, rows, "ll" + "r" * (len(columns) - 2)))
    print(
        "\nideal s: ceil(N / C) rounds of L, the shortest job any client can have; perfect client: "
        "N ÷ (that × C/L), the best achieved ÷ ideal it allows. "
        "endpoint window: first arrival → last arrival + L (emulator stats log). steady: arrivals per "
        "second between the 10th and 90th percentile arrival, ÷ C/L (the job's middle; the window also "
        "holds the first wave, whose answers all come back together, and the tail). client elapsed: "
        "the flow's `elapsed` (vlmbatch) or manifest read → Parquet written (script). "
        "start-up: wall − client elapsed "
        "(for vlmbatch: imports, waiting for its temporary Prefect server, flow set-up and tear-down). "
        "client CPU: user + system of the client process from wait4, start-up included (vlmbatch's "
        "temporary Prefect server not counted). emulator CPU: user + system of the "
        "emulator process during the client's run; emulator busy: that ÷ the endpoint window (the emulator "
        "is one event loop: near 100 % it, not the client, sets the pace)."
    )
    ours = [row for row in rows if row[0] == "vlmbatch run"]
    achieved = columns.index("achieved ÷ ideal")
    verdicts = [
        f"{row[1]}, N={row[2]}: {row[achieved].strip('*')} "
        f"({'met' if float(row[achieved].strip('*%')) / 100 >= TARGET else 'NOT met'})"
        for row in ours
    ]
    print("\nTarget ≥ 95 % of ideal — " + "; ".join(verdicts) + ".")


if __name__ == "__main__":
    main()
