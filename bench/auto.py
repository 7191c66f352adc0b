"""Adaptive concurrency: does ``--concurrency auto`` find an endpoint's hidden capacity?

    .venv/bin/python bench/auto.py            # K=32 (L=0.25 s) and K=96 (L=0.75 s), N=2,500 (≈ 5 min)
    .venv/bin/python bench/auto.py --full     # N=6,000, 0.5, 1, 1.5, 2, 4 × K fixed at both (≈ 15 min)
    .venv/bin/python bench/auto.py --quick    # smoke run: K=32 only, auto, K and 2K, N=1,500
    .venv/bin/python bench/auto.py --setting 64:0.5 --n 6000 --fixed 0.5,1,2 --timeline

For each hidden capacity K the emulator runs as its own process with ``--max-concurrency K --latency L
--reject-over-capacity``: it serves at most K requests at once, each for L seconds, and answers 429 (with
``Retry-After: 1``) at once to any request beyond K, like a gateway in front of a full server. Its best
possible rate is K/L requests/s. N distinct small JPEGs × one caption prompt go through ``vlmbatch run``
(a subprocess, one ``PREFECT_HOME`` warmed by a one-item run first) once with ``--concurrency auto
--max-concurrency 256`` and once per fixed ``--concurrency`` around K (``--fixed`` multiples of K: by
default 1, 1.5, 2 and 4 × K for the first setting, 1 and 1.5 × K for the others; ``--full`` adds 0.5 × K
and runs all five at every setting), every run with ``--max-retries 50`` so that no item fails for having
been rejected too often, against the same emulator with its stats reset.

Measured at the endpoint, from the arrival times of the answered (200) requests in the emulator's stats
log (an answered request holds one of the K slots from its arrival for L seconds):

- **steady rate**: answered requests per second between the 10th and the 90th percentile arrival, i.e.
  after auto's ramp and before the last shard drains;
- **job rate**: N ÷ (first arrival → last answered arrival + L), the ramp and the tail included;
- **slots busy**: the mean number of the K slots serving a request over the steady part (= steady rate × L),
  the level the adaptive limit settled at as the endpoint saw it;
- **429s**: rejected requests (each is retried after its ``Retry-After``).

The headline is auto's rate ÷ the best fixed setting's rate (target ≥ 0.90). ``--timeline`` also prints
each run's slots busy and 429s per second.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    VLMBATCH,
    Emulator,
    Run,
    caption_prompt,
    distinct_images,
    emulator,
    header,
    log,
    prefect_env,
    run_process,
    table,
    workdir,
)

TARGET = 0.90
MAX_CONCURRENCY = 256
LOG_SIZE = 20_000  # the emulator keeps the last 20,000 requests in its stats log (emulator/stats.py)


@dataclass
class Result:
    capacity: int
    setting: str  # "auto" or the fixed concurrency
    n: int
    answered: list[float]  # arrival times of the 200s, sorted
    rejected: list[float]  # arrival times of the 429s, sorted
    other: int  # requests that got neither 200 nor 429
    max_in_flight: int  # requests inside the emulator at once, rejected ones included
    latency: float
    run: Run

    @property
    def steady_rate(self) -> float:
        lo, hi = int(0.1 * len(self.answered)), int(0.9 * len(self.answered)) - 1
        return (hi - lo) / (self.answered[hi] - self.answered[lo])

    @property
    def window(self) -> float:
        return self.answered[-1] + self.latency - self.answered[0]

    @property
    def job_rate(self) -> float:
        return len(self.answered) / self.window

    def timeline(self, step: float = 1.0) -> list[tuple[float, float, int]]:
        """Per ``step`` seconds from the first arrival: mean slots busy serving answered requests, 429s."""
        start = self.answered[0]
        buckets = int(self.window / step) + 1
        busy = [0.0] * buckets
        for t in self.answered:  # the request holds a slot over [t, t + L]
            a, b = t - start, t - start + self.latency
            for k in range(int(a / step), min(buckets, int(b / step) + 1)):
                busy[k] += max(0.0, min(b, (k + 1) * step) - max(a, k * step)) / step
        rejected = [0] * buckets
        for t in self.rejected:
            if 0 <= (k := int((t - start) / step)) < buckets:
                rejected[k] += 1
        return [(k * step, busy[k], rejected[k]) for k in range(buckets)]


def parse_setting(text: str) -> tuple[int, float]:
    capacity, latency = text.split(":")
    return int(capacity), float(latency)


def fixed_multiples(args: argparse.Namespace, *, first: bool) -> list[float]:
    if args.fixed:
        return [float(part) for part in args.fixed.split(",") if part.strip()]
    if args.quick:
        return [1, 2]
    if args.full:
        return [0.5, 1, 1.5, 2, 4]
    return [1, 1.5, 2, 4] if first else [1, 1.5]


def run_setting(
    emu: Emulator,
    images: Path,
    prompts: Path,
    tmp: Path,
    capacity: int,
    setting: str,
    n: int,
    latency: float,
    *,
    warm: bool = False,
) -> Result:
    emu.reset()
    out = tmp / ("warm" if warm else f"out-{capacity}-{setting}")
    command = [VLMBATCH, "run", str(images), "--prompts", str(prompts), "--out", str(out)]
    command += ["--base-url", emu.base_url, "--concurrency", setting, "--max-retries", "50"]
    if setting == "auto":
        command += ["--max-concurrency", str(MAX_CONCURRENCY)]
    if warm:
        command += ["--limit", "1"]
    run = run_process(command, env=prefect_env(tmp / "prefect"))
    if run.code != 0:
        raise RuntimeError(f"vlmbatch run exited {run.code}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    if warm:
        return Result(capacity, setting, 1, [], [], 0, 0, latency, run)
    stats = emu.stats()
    if stats["requests_total"] > LOG_SIZE:
        log(f"warning: {stats['requests_total']} requests, the stats log kept only the last {LOG_SIZE}")
    answered = sorted(e["t"] for e in stats["log"] if e["status"] == 200)
    rejected = sorted(e["t"] for e in stats["log"] if e["status"] == 429)
    if len(answered) != n:
        log(f"warning: {len(answered)} answered requests for {n} items")
    other = stats["requests_total"] - stats["by_status"].get("200", 0) - stats["by_status"].get("429", 0)
    return Result(capacity, setting, n, answered, rejected, other, stats["max_in_flight"], latency, run)


def _row(result: Result, best_steady: Result, best_job: Result) -> list[object]:
    steady = result.steady_rate / best_steady.steady_rate
    job = result.job_rate / best_job.job_rate
    name = f"**{result.setting}**" if result.setting == "auto" else f"fixed {result.setting}"
    flow = result.run.flow_elapsed_s
    return [
        f"K={result.capacity}, L={result.latency:g} s",
        name,
        f"{result.steady_rate:.0f}",
        f"{result.steady_rate / (result.capacity / result.latency):.0%}",
        _pct(steady, result.setting),
        f"{result.job_rate:.0f}",
        _pct(job, result.setting),
        f"{result.steady_rate * result.latency:.1f}",
        f"{len(result.rejected):,}",
        result.max_in_flight,
        f"{flow:.1f}" if flow is not None else "?",
        f"{result.run.cpu_s:.1f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, help="work items (default 2,500; --full 6,000; --quick 1,500)")
    parser.add_argument(
        "--setting",
        action="append",
        type=parse_setting,
        help="K:L, hidden capacity and seconds per answered request, repeatable (default 32:0.25, 96:0.75)",
    )
    parser.add_argument("--fixed", help="fixed settings as multiples of K, for every setting (e.g. 1,1.5)")
    parser.add_argument("--full", action="store_true", help="N=6,000, 0.5,1,1.5,2,4 × K at every setting")
    parser.add_argument("--quick", action="store_true", help="smoke run: K=32 only, auto, K and 2K, N=1,500")
    parser.add_argument("--timeline", action="store_true", help="each run's slots busy and 429s per second")
    args = parser.parse_args()
    settings = args.setting or ([(32, 0.25)] if args.quick else [(32, 0.25), (96, 0.75)])
    n = args.n or (1500 if args.quick else 6000 if args.full else 2500)

    results: dict[int, list[Result]] = {}
    with workdir("auto") as tmp:
        log(f"making {n} small JPEGs...")
        images = distinct_images(tmp / "manifest", n)
        prompts = caption_prompt(tmp / "manifest")
        for index, (capacity, latency) in enumerate(settings):
            fixed = sorted({max(1, round(m * capacity)) for m in fixed_multiples(args, first=index == 0)})
            extra = ["--reject-over-capacity"]
            with emulator(latency=latency, max_concurrency=capacity, extra=extra) as emu:
                if index == 0:
                    log("warming PREFECT_HOME with a one-item run...")
                    run_setting(emu, images, prompts, tmp, capacity, "32", n, latency, warm=True)
                for setting in ["auto", *(str(c) for c in fixed)]:
                    log(f"K={capacity} L={latency}: --concurrency {setting}...")
                    result = run_setting(emu, images, prompts, tmp, capacity, setting, n, latency)
                    results.setdefault(capacity, []).append(result)
                    log(
                        f"  steady {result.steady_rate:.0f}/s, job {result.job_rate:.0f}/s, "
                        f"{len(result.rejected)} 429s, flow {result.run.flow_elapsed_s} s, "
                        f"wall {result.run.wall_s:.1f} s"
                    )

    print(header("Adaptive concurrency"))
    print(
        f"N = {n:,} work items (distinct 64×64 JPEGs × 1 caption prompt); the emulator in its own process "
        "with `--max-concurrency K --latency L --reject-over-capacity` (429 with "
        "`Retry-After: 1` beyond K); `vlmbatch run --max-retries 50`, auto with "
        f"`--max-concurrency {MAX_CONCURRENCY}`.\n"
    )
    columns = [
        "endpoint",
        "--concurrency",
        "steady req/s",
        "steady ÷ K/L",
        "steady ÷ best fixed",
        "job req/s",
        "job ÷ best fixed",
        "slots busy (steady)",
        "429s",
        "max in flight",
        "flow s",
        "client CPU s",
    ]
    rows = []
    verdicts = []
    for capacity, runs in results.items():
        fixed = [r for r in runs if r.setting != "auto"]
        auto = next(r for r in runs if r.setting == "auto")
        best_steady = max(fixed, key=lambda r: r.steady_rate)
        best_job = max(fixed, key=lambda r: r.job_rate)
        rows += [_row(r, best_steady, best_job) for r in runs]
        s, j = auto.steady_rate / best_steady.steady_rate, auto.job_rate / best_job.job_rate
        verdicts.append(
            f"K={capacity}: auto ÷ best fixed = {s:.0%} steady (best: fixed {best_steady.setting}), "
            f"{j:.0%} whole job (best: fixed {best_job.setting}), {len(auto.rejected):,} 429s "
            f"({'met' if min(s, j) >= TARGET else 'NOT met'})"
        )
    print(table(columns, rows, "ll" + "r" * (len(columns) - 2)))
    print(
        "\nsteady: answered requests/s between the 10th and 90th percentile arrival at the endpoint. "
        "job: N ÷ (first arrival → last answered arrival + L). slots busy: steady rate × L, the mean "
        "number of the K slots serving. 429s: rejected attempts (retried after `Retry-After`). max in "
        "flight: requests inside the emulator at once, rejected ones included. flow s: the summary's "
        "elapsed (start-up excluded). client CPU: the vlmbatch process from wait4, start-up included "
        "(its temporary Prefect server not counted)."
    )
    print("\nTarget ≥ 90 % of the best fixed setting — " + "; ".join(verdicts) + ".")
    if args.timeline:
        print("\nSlots busy per second (429s in brackets):")
        for capacity, runs in results.items():
            for r in runs:
                seconds = r.timeline()
                line = ", ".join(f"{busy:.0f}" + (f" ({rej})" if rej else "") for _, busy, rej in seconds)
                print(f"\n- K={capacity}, {r.setting}: {line}")


def _pct(ratio: float, setting: str) -> str:
    return f"**{ratio:.0%}**" if setting == "auto" else f"{ratio:.0%}"


if __name__ == "__main__":
    main()
