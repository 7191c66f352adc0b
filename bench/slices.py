"""Slices: one worker against two on an image-preparation-bound job (issue 17, point 6).

    .venv/bin/python bench/slices.py                       # N=600 photos, 3 rounds of (a) and (b)
    .venv/bin/python bench/slices.py --n 300 --rounds 5    # smaller, more rounds
    .venv/bin/python bench/slices.py --pool                # adds (c): a Prefect process work pool

The job: N distinct photo-like 12-megapixel JPEGs (4032×3024, quality 90, about 3.3 MB each: bench/
images.py's ``make_photo``) × one caption prompt. The photos are made once into a cache outside the
repository (``$VLMBATCH_BENCH_CACHE``, default /tmp/vlmbatch-bench-cache) and reused by later runs; the
first round's reads warm the page cache for all. The endpoint is fast, so that preparing the images
(decode at 1/4 scale, resize, encode: ~40 ms of CPU each) is the bound: the emulator (its own process)
answers after 20 ms with no cap on concurrency, and each client runs ``--concurrency 32``.

Every ``vlmbatch run`` talks to one ``prefect server start`` (``PREFECT_API_URL``, as workers on several
machines would), started once for the benchmark, so no run pays a temporary server's start-up and the
two slices do not start two servers on the same two cores. ``--concurrency-limit off``: the endpoint is
not what is measured.

Variants, each into a fresh OUT (a local directory), interleaved: round 1 runs every variant once, then
round 2, with the order turned each round, so a busy minute of a shared machine falls on all of them:

(a) **plain**: one ``vlmbatch run`` of the whole job, against two ``vlmbatch run --slice K/2`` started at
    once into one OUT;
(b) **pinned**: the same with each process pinned to one core (``os.sched_setaffinity`` before exec,
    inherited by its threads), the single run to core 0, the two slices to cores 0 and 1 — a stand-in
    for "one core = one machine": what a second machine of the same size buys;
(c) ``--pool``: a process work pool (``prefect work-pool create --type process``, ``prefect deploy
    --all``) and ``vlmbatch run … --slices 2``, polled by one worker (``--limit 1``: the two slices one
    after the other) against two workers (one slice each, at once); then the same with the workers
    pinned, one core each. Workers are started for each run and stopped after it. The wall time is the
    parent's (``vlmbatch run --slices 2``), which waits for its slices; each slice's flow run starts a
    new Python process on its worker (Prefect's process pool).

Figures per variant: wall time from the first launch to the last exit (the whole command, Python's and
Prefect's start-up included) and images/s = N ÷ wall; the longest of the runs' own ``elapsed`` (from
their summaries: manifest read → last row written) and N ÷ that; the clients' CPU (user + system,
``os.wait4``), the emulator's, and everything else's on the machine meanwhile (/proc/stat's busy time
less those two: the Prefect server, and other people's work on a shared machine — the noise).
Speed-up = the single run's wall ÷ the two's, per round (the two ran minutes apart at most). Every OUT
is checked: read with ``pyarrow.dataset``, each (image, prompt) once, N rows, every status ok. Load
averages (``os.getloadavg``) are printed before each run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, VLMBATCH, Emulator, caption_prompt, emulator, header, log, table, workdir
from images import make_photo

from tests.prefect_processes import Processes, descendants, prefect_server

CACHE = Path(os.environ.get("VLMBATCH_BENCH_CACHE", "/tmp/vlmbatch-bench-cache"))
LATENCY, CONCURRENCY = 0.02, 32
POOL = "vlmbatch-pool"  # prefect.yaml's
QUIET_S = 3.0  # a run during which everything else on the machine used less CPU than this is "quiet"


# --- the photos ----------------------------------------------------------------------------------------


def _make_one(path: Path, seed: int) -> int:
    data = make_photo(seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.rename(path)
    return len(data)


def photo_manifest(n: int) -> Path:
    """``n`` photo-like 12 MP JPEGs in the cache (made once, by all cores) and a manifest naming them."""
    folder = CACHE / "photos-4032x3024-q90"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"photo-{i:05d}.jpg" for i in range(n)]
    missing = [i for i, name in enumerate(names) if not (folder / name).exists()]
    if missing:
        log(f"making {len(missing)} photo-like 12 MP JPEGs into {folder} (once; ~0.7 s each per core)...")
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(_make_one, [folder / names[i] for i in missing], missing))
    manifest = CACHE / f"photos-{n}.parquet"
    ids = [name.removesuffix(".jpg") for name in names]
    images = [f"{folder.name}/{name}" for name in names]  # relative to the manifest's folder
    pq.write_table(pa.table({"image_id": ids, "image": images}), manifest)
    return manifest


# --- running clients -----------------------------------------------------------------------------------


@dataclass
class Client:
    """One ``vlmbatch`` process: launched, then reaped with its CPU time."""

    process: subprocess.Popen[str]
    stdout: object
    started: float = field(default_factory=time.perf_counter)
    ended: float = 0.0
    cpu_s: float = 0.0
    code: int | None = None
    text: str = ""

    def reap(self) -> None:
        if self.code is not None:  # reaped already
            return
        _, status, usage = os.wait4(self.process.pid, 0)
        self.ended = time.perf_counter()
        self.process.returncode = self.code = os.waitstatus_to_exitcode(status)
        self.cpu_s = usage.ru_utime + usage.ru_stime
        self.stdout.seek(0)  # type: ignore[attr-defined]
        self.text = self.stdout.read()  # type: ignore[attr-defined]
        self.stdout.close()  # type: ignore[attr-defined]

    @property
    def elapsed_s(self) -> float:
        """The run's own elapsed time, from its summary (NaN if it printed none)."""
        found = re.search(r"elapsed\s*[│|]?\s*([\d.]+) s", self.text)
        return float(found.group(1)) if found else float("nan")


def launch(command: Sequence[str], env: dict[str, str], cpu: int | None) -> Client:
    """``command`` as a child; with ``cpu``, pinned to that core (its threads and children inherit it)."""
    out = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed by Client.reap
    pin: Callable[[], None] | None = None
    if cpu is not None:
        pin = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731 - runs in the child before exec
    process = subprocess.Popen(
        list(command), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, preexec_fn=pin
    )
    return Client(process, out)


@dataclass
class Measured:
    wall_s: float
    elapsed_s: float  # the longest of the runs' own elapsed
    client_cpu_s: float
    emulator_cpu_s: float
    other_cpu_s: float  # the machine's busy CPU time meanwhile, less the clients' and the emulator's
    load: tuple[float, float, float]
    sent: int


def machine_busy_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat: all but idle and iowait)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


@dataclass
class Variant:
    name: str
    processes: int
    run: Callable[[Path], list[Client]]  # launches its clients into OUT (or runs them to the end)
    results: list[Measured] = field(default_factory=list)


def measure(variant: Variant, out: Path, n: int, emu: Emulator) -> Measured:
    load = os.getloadavg()
    emu.reset()
    emulator_cpu, busy = emu.cpu_s(), machine_busy_s()
    clients = variant.run(out)
    for client in clients:
        client.reap()
    busy = machine_busy_s() - busy
    wall = max(c.ended for c in clients) - min(c.started for c in clients)  # first launch → last exit
    for client in clients:
        if client.code != 0:
            raise RuntimeError(f"{variant.name}: exited {client.code}:\n{client.text[-4000:]}")
    verify(out, n)
    sent = int(emu.stats()["requests_total"])
    if sent != n:
        raise RuntimeError(f"{variant.name}: {sent} requests for {n} work items")
    client_cpu, emulator_cpu = sum(client.cpu_s for client in clients), emu.cpu_s() - emulator_cpu
    return Measured(
        wall_s=wall,
        elapsed_s=max(client.elapsed_s for client in clients),
        client_cpu_s=client_cpu,
        emulator_cpu_s=emulator_cpu,
        other_cpu_s=busy - client_cpu - emulator_cpu,
        load=load,
        sent=sent,
    )


def verify(out: Path, n: int) -> None:
    """OUT as a plain reader sees it: N rows, each (image, prompt) once, every status ok."""
    rows = ds.dataset(out, format="parquet").to_table(columns=["image_id", "prompt_id", "status"])
    pairs = set(zip(rows["image_id"].to_pylist(), rows["prompt_id"].to_pylist(), strict=True))
    statuses = set(rows["status"].to_pylist())
    if rows.num_rows != n or len(pairs) != n or statuses != {"ok"}:
        raise RuntimeError(f"{out}: {rows.num_rows} rows, {len(pairs)} distinct, statuses {statuses}")


# --- the variants --------------------------------------------------------------------------------------


def cli_variants(images: Path, prompts: Path, emu: Emulator, env: dict[str, str]) -> list[Variant]:
    def command(out: Path, *extra: str) -> list[str]:
        return [
            VLMBATCH, "run", str(images), "--prompts", str(prompts), "--out", str(out),
            "--base-url", emu.base_url, "--concurrency", str(CONCURRENCY), "--concurrency-limit", "off",
            *extra,
        ]  # fmt: skip

    def single(cpu: int | None) -> Callable[[Path], list[Client]]:
        return lambda out: [launch(command(out), env, cpu)]

    def two(cpus: tuple[int | None, int | None]) -> Callable[[Path], list[Client]]:
        return lambda out: [launch(command(out, "--slice", f"{k + 1}/2"), env, cpus[k]) for k in (0, 1)]

    return [
        Variant("(a) 1 process, whole job", 1, single(None)),
        Variant("(a) 2 processes, `--slice 1/2` + `--slice 2/2` at once", 2, two((None, None))),
        Variant("(b) 1 process pinned to core 0", 1, single(0)),
        Variant("(b) 2 slices, pinned to cores 0 and 1", 2, two((0, 1))),
    ]


@contextlib.contextmanager
def pool_workers(procs: Processes, cpus: Sequence[int | None]) -> Iterator[None]:
    """A process worker per entry of ``cpus`` polling the pool, one slice at a time each (pinned to that
    core: its flow runs' processes inherit it), all stopped with their descendants afterwards."""
    started = []
    for cpu in cpus:
        name = f"bench-w{len(started) + 1}-{time.monotonic_ns()}"
        with (procs.logs / f"{name}.log").open("wb") as sink:
            command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name]
            started.append(
                subprocess.Popen(
                    [*command, "--limit", "1"],
                    cwd=ROOT,
                    env=procs.env,
                    stdin=subprocess.DEVNULL,
                    stdout=sink,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=None if cpu is None else functools.partial(os.sched_setaffinity, 0, {cpu}),
                )
            )
    try:
        time.sleep(3)  # registered and polling (PREFECT_WORKER_QUERY_SECONDS=1)
        yield
    finally:
        for proc in started:
            stop(proc)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """A worker and every process below it (its flow runs' processes)."""
    family = [proc.pid, *descendants(proc.pid)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    for pid in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=10)


def pool_variants(images: Path, prompts: Path, emu: Emulator, procs: Processes) -> list[Variant]:
    procs.run("prefect", "work-pool", "create", POOL, "--type", "process")
    procs.run("prefect", "deploy", "--all")
    env = {**procs.env, "PREFECT_LOGGING_LEVEL": "WARNING", "COLUMNS": "200"}

    def slices(cpus: Sequence[int | None]) -> Callable[[Path], list[Client]]:
        def go(out: Path) -> list[Client]:
            with pool_workers(procs, cpus):
                client = launch(
                    [
                        VLMBATCH, "run", str(images), "--prompts", str(prompts), "--out", str(out),
                        "--base-url", emu.base_url, "--concurrency", str(CONCURRENCY),
                        "--concurrency-limit", "off", "--slices", "2",
                    ],
                    env,
                    None,
                )  # fmt: skip
                client.reap()
                return [client]

        return go

    return [
        Variant("(c) `--slices 2`, 1 worker (`--limit 1`)", 1, slices([None])),
        Variant("(c) `--slices 2`, 2 workers (`--limit 1` each)", 2, slices([None, None])),
        Variant("(c) `--slices 2`, 1 worker pinned to core 0", 1, slices([0])),
        Variant("(c) `--slices 2`, 2 workers pinned to cores 0 and 1", 2, slices([0, 1])),
    ]


# --- the report ----------------------------------------------------------------------------------------


def spread(values: Sequence[float], digits: int = 1) -> str:
    return f"**{statistics.median(values):.{digits}f}** ({min(values):.{digits}f}–{max(values):.{digits}f})"


def report(variants: list[Variant], n: int, rounds: int) -> None:
    print(header("Slices: 1 vs 2 workers, image preparation bound"))
    print(
        f"N={n} distinct 4032×3024 JPEGs (~3.3 MB) × 1 caption prompt; emulator latency {LATENCY * 1000:.0f}"
        f" ms, no cap; `--concurrency {CONCURRENCY} --concurrency-limit off`; a running Prefect server "
        f"(`PREFECT_API_URL`). Medians of {rounds} interleaved rounds (min–max).\n"
    )
    rows = []
    for v in variants:
        walls = [m.wall_s for m in v.results]
        elapsed = [m.elapsed_s for m in v.results]
        loads = [m.load[0] for m in v.results]
        rows.append(
            [
                v.name,
                spread(walls),
                spread([n / w for w in walls]),
                spread(elapsed),
                spread([n / e for e in elapsed]),
                spread([m.client_cpu_s for m in v.results]),
                spread([m.emulator_cpu_s for m in v.results]),
                spread([m.other_cpu_s for m in v.results]),
                f"{min(loads):.1f}–{max(loads):.1f}",
            ]
        )
    print(
        table(
            ["variant", "wall s", "images/s (wall)", "elapsed s", "images/s (elapsed)", "client CPU s",
             "emulator CPU s", "other CPU s", "load (1 min) before"],
            rows,
        )
    )  # fmt: skip
    print(
        f"\nThe quiet runs only (the rest of the machine used < {QUIET_S:g} CPU s meanwhile; (a) and (b): for"
        " (c) the slices' own processes count as other CPU):\n"
    )
    rows = []
    for v in variants:
        quiet = [m for m in v.results if m.other_cpu_s < QUIET_S]
        if quiet and not v.name.startswith("(c)"):
            rows.append([v.name, len(quiet), spread([n / m.wall_s for m in quiet]),
                         spread([n / m.elapsed_s for m in quiet])])  # fmt: skip
    print(table(["variant", "quiet runs", "images/s (wall)", "images/s (elapsed)"], rows))
    print("\nSpeed-up, 2 ÷ 1, per round (the single run's wall ÷ the two's; elapsed likewise):\n")
    pairs = []
    for one, two in zip(variants[0::2], variants[1::2], strict=True):
        by_wall = [a.wall_s / b.wall_s for a, b in zip(one.results, two.results, strict=True)]
        by_elapsed = [a.elapsed_s / b.elapsed_s for a, b in zip(one.results, two.results, strict=True)]
        pairs.append([f"{two.name} vs {one.name}", spread(by_wall, 2), spread(by_elapsed, 2)])
    print(table(["pair", "speed-up (wall)", "speed-up (elapsed)"], pairs))
    print(f"\nEvery OUT read back with pyarrow.dataset: {n} rows, each item once, all ok; {n} requests.")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=600, help="photos, work items (default 600)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every variant (default 3)")
    parser.add_argument("--pool", action="store_true", help="add (c): a Prefect process work pool")
    parser.add_argument("--only", default="", help="run only variants whose name has this text: a, b, c")
    args = parser.parse_args()

    images = photo_manifest(args.n)
    with (
        workdir("slices") as tmp,
        emulator(latency=LATENCY, max_concurrency=0) as emu,
        prefect_server(tmp / "prefect-home", tmp / "logs") as (url, procs),
    ):
        prompts = caption_prompt(tmp / "prompts")
        env = {**procs.env, "PREFECT_LOGGING_LEVEL": "WARNING", "COLUMNS": "200"}
        log(f"Prefect server at {url}; warm-up run (page cache, Prefect's database)...")
        warm = launch([VLMBATCH, "run", str(images), "--prompts", str(prompts), "--out", str(tmp / "warm"),
                       "--base-url", emu.base_url, "--concurrency-limit", "off"], env, None)  # fmt: skip
        warm.reap()
        if warm.code != 0:
            raise RuntimeError(warm.text[-4000:])
        variants = cli_variants(images, prompts, emu, env)
        if args.pool:
            variants += pool_variants(images, prompts, emu, procs)
        if args.only:
            variants = [v for v in variants if f"({args.only})" in v.name]
        for r in range(args.rounds):
            turned = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in turned:
                out = tmp / f"out-{time.monotonic_ns()}"
                m = measure(v, out, args.n, emu)
                v.results.append(m)
                log(
                    f"round {r + 1}: {v.name}: wall {m.wall_s:.1f} s ({args.n / m.wall_s:.1f} images/s), "
                    f"elapsed {m.elapsed_s:.1f} s, client CPU {m.client_cpu_s:.1f} s, "
                    f"emulator CPU {m.emulator_cpu_s:.1f} s, other CPU {m.other_cpu_s:.1f} s, "
                    f"load {m.load[0]:.1f}"
                )
    report(variants, args.n, args.rounds)


if __name__ == "__main__":
    main()
