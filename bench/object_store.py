"""Object-store requests of a run into ``s3://`` (issue 17, point 6): counted at the server, priced.

    .venv/bin/python bench/object_store.py                  # N=3,000 items at 40 items/s (≈ 3 min)
    .venv/bin/python bench/object_store.py --pool           # and `--slices 2` on a Prefect process pool

moto's S3 server (a dev dependency; tests/s3_server.py starts it) runs as its own process on loopback;
its access log (one line per request: method, path, query) is what is counted, so every request of every
library on the client's side (boto3 for OUT's objects, pyarrow when it reads) is in it. ``vlmbatch run``
runs as a subprocess with ``AWS_ENDPOINT_URL`` pointing at it (as tests/test_out_object_store.py does),
the lease's default TTL (30 s: a renewal every 5 s) and the default shard size (1,000), over N distinct
64×64 JPEGs × one caption prompt.

The emulator answers each client at ``--rate`` items/s (``--latency 8/rate``, the client at
``--concurrency 8``, the emulator's cap 16 so that two slices at once get as much each). The default
is about the rate of one 2-core client on phone photos (bench/slices.py), so a shard lasts as long as
it would in a real job, and its about-once-a-second rewrites count as they would. Runs, each request
log cut at its start and end:

1. **first run**: the whole job into ``s3://bench/out``;
2. **rerun**: the same command again (nothing sent, every item skipped): what a resume costs;
3. **two slices**: ``--slice 1/2`` and ``--slice 2/2`` at once into ``s3://bench/sliced``;
4. **slice rerun**: ``--slice 1/2`` again: what one slice's resume reads;
5. with ``--pool``, **``--slices 2`` on a process work pool** (a ``prefect server start``, ``prefect
   deploy --all``, two workers: tests/prefect_processes.py) into ``s3://bench/pool``: the two slices
   as in 3, plus what the parent asks of the store while it watches them.

Requests are sorted by method (GET, LIST = a GET of the bucket, HEAD, PUT, POST, DELETE) and by object
(part files, the hash cache, leases, the start's writability probe, listings of the leases' prefix and
other listings). Per work item and per shard; extrapolated to 10⁶ items with the default shard size;
priced with S3 Standard's request prices.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import (
    VLMBATCH,
    caption_prompt,
    distinct_images,
    emulator,
    header,
    log,
    prefect_env,
    table,
    workdir,
)

from tests.prefect_processes import prefect_server
from tests.s3_server import moto_server, s3_client, s3_env

BUCKET = "bench"
POOL = "vlmbatch-pool"  # prefect.yaml's
SHARD = 1000  # the default --shard-size
TTL = 30.0  # the lease's default time to live: a renewal every TTL/6 s
CONCURRENCY = 8
# S3 Standard, US East (N. Virginia), per request (aws.amazon.com/s3/pricing): PUT, COPY, POST, LIST
# $0.005 per 1,000; GET, SELECT and every other request (HEAD) $0.0004 per 1,000; DELETE free.
PRICE = {"PUT": 5e-6, "POST": 5e-6, "LIST": 5e-6, "GET": 4e-7, "HEAD": 4e-7, "DELETE": 0.0}
METHODS = ["GET", "LIST", "HEAD", "PUT", "POST", "DELETE"]
LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


# --- moto's server and its log -------------------------------------------------------------------------


@dataclass
class Moto:
    url: str
    log: Path

    def mark(self) -> int:
        """Where the log ends now (requests after this belong to what comes next)."""
        return self.log.stat().st_size

    def requests(self, start: int, end: int | None = None) -> list[tuple[str, str, str]]:
        """(method, object kind, key) of each request logged between two marks."""
        with self.log.open("rb") as f:
            f.seek(start)
            text = f.read(None if end is None else end - start).decode(errors="replace")
        found = []
        for method, target, _status in LINE.findall(text):
            path, _, query = target.partition("?")
            key = path.lstrip("/").partition("/")[2]
            if method == "GET" and not key:
                method = "LIST"
            found.append((method, kind(key, query), key))
        return found


def kind(key: str, query: str) -> str:
    if not key:
        if "delete" in query:
            return "batch delete"
        prefix = urllib.parse.parse_qs(query).get("prefix", [""])[0]
        return "lease listing" if "_vlmbatch/leases" in prefix else "listing"
    if "/_vlmbatch/leases/" in f"/{key}":
        return "lease"
    if "/_vlmbatch/hashes/" in f"/{key}":
        return "hash cache"
    name = key.rsplit("/", 1)[-1]
    if name.startswith("part-"):
        return "part file"
    if name.startswith(".probe-"):
        return "probe"
    return "other"


@contextlib.contextmanager
def moto(folder: Path) -> Iterator[Moto]:
    """moto's S3 server in its own process (tests/s3_server.py), with the bucket, and its log."""
    log_path = folder / "moto.log"
    with moto_server(log_path) as url:
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield Moto(url, log_path)


def run_env(base: dict[str, str], url: str) -> dict[str, str]:
    """``base`` pointed at the store (as a user's environment would be)."""
    env = {k: v for k, v in base.items() if not k.startswith(("AWS_", "VLMBATCH_"))}
    return {**env, **s3_env(url)}


# --- runs ----------------------------------------------------------------------------------------------


@dataclass
class Counted:
    name: str
    items: int  # work items the run(s) had
    wall_s: float
    requests: list[tuple[str, str, str]]
    runs: int = 1

    def by_method(self) -> Counter[str]:
        return Counter(method for method, _, _ in self.requests)

    def by_kind(self) -> Counter[tuple[str, str]]:
        return Counter((kind, method) for method, kind, _ in self.requests)

    def distinct(self, kind: str, method: str) -> int:
        return len({key for m, k, key in self.requests if (k, m) == (kind, method)})


def run_clients(commands: Sequence[Sequence[str]], env: dict[str, str]) -> float:
    started = time.perf_counter()
    procs = [
        subprocess.Popen(list(c), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in commands
    ]
    for proc in procs:
        output, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"exited {proc.returncode}:\n{output[-4000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=3000, help="work items (default 3,000: three shards)")
    parser.add_argument("--rate", type=float, default=40.0, help="items/s per client (default 40)")
    parser.add_argument("--pool", action="store_true", help="add `--slices 2` on a Prefect process pool")
    args = parser.parse_args()
    n, rate = args.n, args.rate

    results: list[Counted] = []
    with (
        workdir("object-store") as tmp,
        moto(tmp) as store,
        # each client gets `rate` items/s, two slices at once too
        emulator(latency=CONCURRENCY / rate, max_concurrency=2 * CONCURRENCY) as emu,
    ):
        images = distinct_images(tmp / "manifest", n)
        prompts = caption_prompt(tmp / "manifest")
        env = run_env(prefect_env(tmp / "prefect"), store.url)

        def command(out: str, *extra: str) -> list[str]:
            return [
                VLMBATCH, "run", str(images), "--prompts", str(prompts), "--out", out,
                "--base-url", emu.base_url, "--concurrency", str(CONCURRENCY), *extra,
            ]  # fmt: skip

        log("warm-up (Prefect's database), into s3://bench/warm...")
        run_clients([command(f"s3://{BUCKET}/warm", "--limit", "10")], env)
        plan = [
            ("first run, whole job", [command(f"s3://{BUCKET}/out")], n),
            ("rerun, whole job (nothing sent)", [command(f"s3://{BUCKET}/out")], n),
            (
                "two slices at once",
                [command(f"s3://{BUCKET}/sliced", "--slice", f"{k}/2") for k in (1, 2)],
                n,
            ),
            (
                "rerun of slice 1/2 (nothing sent)",
                [command(f"s3://{BUCKET}/sliced", "--slice", "1/2")],
                n // 2,
            ),
        ]
        for name, commands, items in plan:
            log(f"{name}...")
            sent = emu.stats()["requests_total"]
            start = store.mark()
            wall = run_clients(commands, env)
            counted = Counted(name, items, wall, store.requests(start), runs=len(commands))
            log(f"  {wall:.1f} s, {len(counted.requests)} requests: {dict(counted.by_method())}, "
                f"{emu.stats()['requests_total'] - sent} sent to the endpoint")  # fmt: skip
            results.append(counted)
        if args.pool:
            results.append(on_a_pool(tmp, env, store, command(f"s3://{BUCKET}/pool", "--slices", "2"), n))
    report(results, n, rate)


def on_a_pool(tmp: Path, env: dict[str, str], store: Moto, command: list[str], n: int) -> Counted:
    """``command`` (a run of ``--slices 2``) against a Prefect server and a process pool of two workers
    (tests/prefect_processes.py), its requests counted like the others'."""
    with prefect_server(tmp / "pool-home", tmp / "pool-logs") as (_url, procs):
        procs.env.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # the workers' too
        procs.run("prefect", "work-pool", "create", POOL, "--type", "process")
        procs.run("prefect", "deploy", "--all")
        for name in ("w1", "w2"):
            procs.start(name, "prefect", "worker", "start", "--pool", POOL, "--name", name, "--limit", 1)
        time.sleep(3)  # registered and polling
        log("two slices on a process pool (--slices 2)...")
        start = store.mark()
        wall = run_clients([[*command, "--concurrency-limit", "off"]], {**procs.env, "COLUMNS": "200"})
        counted = Counted("`--slices 2` on a process pool", n, wall, store.requests(start), runs=3)
        log(f"  {wall:.1f} s, {len(counted.requests)} requests: {dict(counted.by_method())}")
        return counted


def report(results: list[Counted], n: int, rate: float) -> None:
    print(header("Object-store requests of a run into s3:// (moto's server)"))
    shards = -(-n // SHARD)
    print(
        f"N={n:,} work items (64×64 JPEGs × 1 caption), default shard size {SHARD:,} ({shards} shards), "
        f"lease TTL {TTL:.0f} s (a renewal every {TTL / 6:.0f} s), the endpoint answering each client at "
        f"{rate:g} items/s (C={CONCURRENCY}, L={CONCURRENCY / rate:.2f} s).\n"
    )
    rows = []
    for c in results:
        methods = c.by_method()
        rows.append([c.name, f"{c.wall_s:.0f}", *(methods.get(m, 0) for m in METHODS), len(c.requests),
                     f"${cost(methods):.6f}"])  # fmt: skip
    print(table(["run", "wall s", *METHODS, "all", "cost"], rows))
    print("\nBy object and method (and how many distinct objects of that kind):\n")
    kinds = sorted({k for c in results for k in c.by_kind()})
    rows = [
        [f"{k} {m}", *(f"{c.by_kind().get((k, m), 0)} ({c.distinct(k, m)})" for c in results)]
        for k, m in kinds
    ]
    print(table(["object, method", *(c.name for c in results)], rows))

    # the first run: what scales with shards, with time (lease renewals) and what each run pays once
    first, rerun = results[0], results[1]
    by_kind = first.by_kind()
    part_puts, hash_puts = by_kind.get(("part file", "PUT"), 0), by_kind.get(("hash cache", "PUT"), 0)
    renewals = by_kind.get(("lease", "PUT"), 0) - 1  # the first PUT takes the lease
    fixed = first.by_method()
    fixed["PUT"] -= part_puts + hash_puts + renewals
    shard_s = SHARD / rate
    per_hour = {"PUT": (part_puts + hash_puts) / shards / shard_s * 3600 + 3600 / (TTL / 6)}
    print(
        f"\nFirst run: per shard ({shard_s:.0f} s at {rate:g} items/s) {part_puts / shards:.1f} part-file "
        f"and {hash_puts / shards:.1f} hash-cache PUTs (about one of each a second); {renewals} lease "
        f"renewals in {first.wall_s:.0f} s (one per {TTL / 6:.0f} s: {3600 / (TTL / 6):.0f} an hour); "
        "once per run: "
        + ", ".join(f"{k} {m}" for m, k in sorted(fixed.items()) if k)
        + f". One writer, writing: **{per_hour['PUT']:,.0f} PUTs an hour, ${cost(per_hour):.3f} an hour**."
    )
    files, gets = rerun.distinct("part file", "GET"), rerun.by_kind().get(("part file", "GET"), 0)
    sliced = results[3].distinct("part file", "GET")
    print(
        f"\nA resume (the rerun): {gets} whole-object GETs of {files} part files ({gets / files:.1f} each: "
        "the code reads each one's schema in `add_later_columns` and its rows for the index, and the newest "
        f"one's schema again in `check_schema`), plus the hash-cache files; the rerun of slice 1/2 read "
        f"{sliced} part files, both slices'."
    )

    if len(results) > 4:
        pool = results[4]
        lists, gets = (
            pool.by_kind().get(("lease listing", "LIST"), 0),
            pool.by_kind().get(("lease", "GET"), 0),
        )
        print(
            f"\nOn the pool (`--slices 2`, 2 workers): {lists} listings of the leases and {gets} lease GETs "
            f"in {pool.wall_s:.0f} s ({lists / pool.wall_s:.1f} and {gets / pool.wall_s:.1f} a second), "
            "against "
            f"{results[2].by_kind().get(('lease listing', 'LIST'), 0)} and "
            f"{results[2].by_kind().get(('lease', 'GET'), 0)} for the same two slices started by hand: the "
            "parent watching its slices' leases."
        )

    # per 10⁶ items, one worker at `rate`: shards scale with items, the lease with time
    million_shards = 1e6 / SHARD
    hours = 1e6 / rate / 3600
    write = Counter({"PUT": (part_puts + hash_puts) / shards * million_shards + hours * 3600 / (TTL / 6)})
    write.update({m: k for m, k in fixed.items() if k})
    part_gets = rerun.by_kind().get(("part file", "GET"), 0) / shards
    hash_gets = rerun.by_kind().get(("hash cache", "GET"), 0) / shards
    resume = Counter(rerun.by_method())
    resume["GET"] = (part_gets + hash_gets) * million_shards + rerun.by_kind().get(("lease", "GET"), 0)
    print(
        f"\nPer 10⁶ work items (1,000 shards) written by one worker at {rate:g} items/s ({hours:.1f} hours, "
        f"{hours * 3600 / (TTL / 6):,.0f} lease renewals), and one start of a run on their OUT:\n"
    )
    rows = [
        [name, *(f"{counts.get(m, 0):,.0f}" for m in METHODS), f"**${cost(counts):.3f}**"]
        for name, counts in (("writing 10⁶ items", write), ("one resume of a 10⁶-item OUT", resume))
    ]
    print(table(["per 10⁶ items", *METHODS, "cost (S3 Standard)"], rows))
    print(
        "\nPrices: S3 Standard, US East (N. Virginia) — PUT/COPY/POST/LIST $0.005 per 1,000, GET and "
        "other requests (HEAD) $0.0004 per 1,000, DELETE free (aws.amazon.com/s3/pricing, the prices of "
        "2026; not checked live: this machine has no network)."
    )


def cost(counts: Mapping[str, float]) -> float:
    return sum(PRICE[m] * counts.get(m, 0) for m in METHODS)


if __name__ == "__main__":
    main()
