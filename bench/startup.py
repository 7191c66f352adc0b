"""Start-up: what a command costs before (and around) its work, side by side with a plain script.

    .venv/bin/python bench/startup.py             # every figure, 5 counted runs each (about 8 minutes)
    .venv/bin/python bench/startup.py --quick     # 3 runs each, N=1,500 for the whole-command race

Every command runs as a user runs it: a subprocess of the installed ``vlmbatch``, timed from outside
(wall), after one uncounted warm-up run, with one PREFECT_HOME kept across the runs (as a user's is:
only the very first run creates Prefect's database). Medians are quoted, with min and max beside them.

1. **Fixed cost of ``vlmbatch run``**, the temporary Prefect server included: wall time minus the
   run's own ``elapsed`` (the summary's), for the demo's 7 work items against the emulator (latency
   0.05 s). The same with ``PREFECT_API_URL`` pointing at an already running ``prefect server start``
   shows what the temporary server costs.
2. **Commands that run no flow**: ``run --dry-run`` (the demo's manifests: every image loaded),
   ``inspect`` and ``export`` of the demo's output, ``--help`` and ``--version``: wall time.
3. **``vlmbatch demo``**: wall time (its emulator answers in 0.4 s ± 0.2 s, part of the figure).
4. **The whole command against a plain script**: N distinct small JPEGs × one caption prompt against an
   emulator serving C=64 at once, L=0.25 s each (ideal C/L = 256 requests/s, ``ceil(N/C) × L`` s at
   best); wall time of ``vlmbatch run --concurrency 64`` and of ``bench/plain_client.py`` (asyncio +
   openai, ``Semaphore(64)``), each as ideal ÷ wall. The two run in turns (one of each, then again),
   so that a noisy minute on a shared machine falls on both.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from common import (
    PYTHON,
    ROOT,
    VLMBATCH,
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

DEMO = ROOT / "data" / "demo"
C, L = 64, 0.25


def spread(values: Sequence[float]) -> str:
    return f"**{statistics.median(values):.2f}** ({min(values):.2f}–{max(values):.2f})"


def repeat(runs: int, once: Callable[[], float]) -> list[float]:
    once()  # warm-up, not counted
    return [once() for _ in range(runs)]


def checked(run: Run, what: str) -> Run:
    if run.code != 0:
        raise RuntimeError(f"{what} exited {run.code}:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return run


def demo_run(base_url: str, out: Path, env: dict[str, str], *extra: str) -> Run:
    command = [VLMBATCH, "run", str(DEMO / "images.parquet"), "--prompts", str(DEMO / "prompts.parquet")]
    return run_process([*command, "--out", str(out), "--base-url", base_url, *extra], env=env)


def fixed_cost(base_url: str, work: Path, env: dict[str, str], runs: int) -> list[float]:
    def once() -> float:
        out = work / f"fixed-{time.monotonic_ns()}"
        run = checked(demo_run(base_url, out, env), "vlmbatch run")
        assert run.flow_elapsed_s is not None, run.stdout
        return run.wall_s - run.flow_elapsed_s

    return repeat(runs, once)


def wall(command: Sequence[str], env: dict[str, str], runs: int) -> list[float]:
    return repeat(runs, lambda: checked(run_process(command, env=env), " ".join(command[1:3])).wall_s)


def running_server(env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    """``prefect server start`` on a free port, for the runs that have a server configured."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("prefect server start did not come up")


def whole_command(n: int, runs: int) -> list[list[object]]:
    ideal = math.ceil(n / C) * L
    rows: list[list[object]] = []
    with workdir("startup-race") as work, emulator(latency=L, max_concurrency=C) as emu:
        images = distinct_images(work / "images", n)
        prompts = caption_prompt(work)
        env = prefect_env(work / "prefect-home")

        def ours() -> float:
            out = work / f"vlm-{time.monotonic_ns()}"
            command = [VLMBATCH, "run", str(images), "--prompts", str(prompts), "--out", str(out)]
            command += ["--base-url", emu.base_url, "--concurrency", str(C)]
            return checked(run_process(command, env=env), "vlmbatch run").wall_s

        def plain() -> float:
            out = work / f"plain-{time.monotonic_ns()}.parquet"
            command = [PYTHON, str(ROOT / "bench" / "plain_client.py"), str(images), str(prompts), str(out)]
            command += ["--base-url", emu.base_url, "--concurrency", str(C)]
            return checked(run_process(command, env=env), "plain_client.py").wall_s

        contenders = (("vlmbatch run", ours), ("plain asyncio + openai script", plain))
        walls: dict[str, list[float]] = {name: [] for name, _ in contenders}
        for _, once in contenders:
            once()  # warm-up, not counted
        for k in range(runs):  # interleaved: a noisy minute on a shared machine hits both
            for name, once in contenders:
                walls[name].append(once())
                log(f"whole command, N={n:,}, run {k + 1}: {name} {walls[name][-1]:.2f} s")
        for name, _ in contenders:
            ratios = [ideal / w for w in walls[name]]
            rows.append([name, f"{n:,}", f"{ideal:.1f}", spread(walls[name]), spread(ratios)])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5, help="counted runs of each command (default 5)")
    parser.add_argument("--n", type=int, default=6000, help="work items of the whole-command race")
    parser.add_argument("--quick", action="store_true", help="3 runs each, N=1,500")
    parser.add_argument("--race-only", action="store_true", help="only the whole-command race (point 4)")
    args = parser.parse_args()
    runs, n = (3, 1500) if args.quick else (args.runs, args.n)
    if args.race_only:
        print(f"Whole command, manifest to Parquet: C={C}, L={L} s (ideal {C / L:.0f} requests/s).\n")
        print(table(["client", "N", "ideal s", "wall s", "ideal ÷ wall"], whole_command(n, runs)))
        return

    fixed: list[list[object]] = []
    quick: list[list[object]] = []
    with workdir("startup") as work, emulator(latency=0.05) as emu:
        env = prefect_env(work / "prefect-home")
        log("fixed cost of vlmbatch run (temporary Prefect server)")
        fixed.append(
            ["`vlmbatch run`, temporary Prefect server", spread(fixed_cost(emu.base_url, work, env, runs))]
        )
        server, url = running_server(env)
        try:
            log("fixed cost of vlmbatch run (PREFECT_API_URL: a running server)")
            served = {**env, "PREFECT_API_URL": url}
            fixed.append(
                [
                    "`vlmbatch run`, `PREFECT_API_URL` of a running server",
                    spread(fixed_cost(emu.base_url, work, served, runs)),
                ]
            )
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()

        out = work / "out"
        checked(demo_run(emu.base_url, out, env), "vlmbatch run")
        dry = [VLMBATCH, "run", str(DEMO / "images.parquet"), "--prompts", str(DEMO / "prompts.parquet")]
        commands = {
            "`run --dry-run` (7 work items)": [*dry, "--out", str(work / "dry"), "--dry-run"],
            "`inspect OUT`": [VLMBATCH, "inspect", str(out)],
            "`export OUT FILE`": [VLMBATCH, "export", str(out), str(work / "all.parquet"), "--force"],
            "`--help`": [VLMBATCH, "--help"],
            "`--version`": [VLMBATCH, "--version"],
            "`vlmbatch demo` (emulated latency 0.4 s)": [VLMBATCH, "demo", "--out", str(work / "demo-out")],
        }
        for name, command in commands.items():
            log(f"wall time: {name}")
            quick.append([name, spread(wall(command, env, runs))])

    race = whole_command(n, runs)
    print(header("Start-up"))
    print(f"Medians of {runs} runs after a warm-up, (min–max), seconds.\n")
    print(table(["fixed cost: wall − the run's elapsed", "s"], fixed))
    print()
    print(table(["command", "wall s"], quick))
    print()
    print(f"Whole command, manifest to Parquet: C={C}, L={L} s (ideal {C / L:.0f} requests/s).\n")
    print(table(["client", "N", "ideal s", "wall s", "ideal ÷ wall"], race))


if __name__ == "__main__":
    main()
