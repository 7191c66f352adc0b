"""Client CPU per request: what ``vlmbatch run`` spends per request, image work excluded.

    .venv/bin/python bench/client_cpu.py               # 5,000 text-only requests, --concurrency 64
    .venv/bin/python bench/client_cpu.py --n 2000 --concurrency 32

The emulator runs as its own process with latency 0 and no concurrency cap. The prompts manifest holds
``--n`` distinct text-only prompts and no images manifest is given, so every work item is one request
without any image to read or prepare. CPU time is user + system of the ``vlmbatch`` process from
``os.wait4``; the temporary Prefect API server it starts is not counted (it is not reaped by vlmbatch:
bench/common.py). Start-up is removed by
subtracting a baseline run of the same command with ``--limit 1`` (one request):

    CPU per request = (CPU(N requests) − CPU(1 request)) ÷ (N − 1)

A first ``--limit 1`` run warms the fresh PREFECT_HOME (database creation) and is not counted; the
baseline is the mean of a ``--limit 1`` run before and after the full run. The same figure is measured for
the plain asyncio + openai script's request path (``bench/plain_client.py`` has images; here the script
is given the same tiny image for each item, which costs it a file read and base64 of 1 KB).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    PYTHON,
    ROOT,
    caption_prompt,
    emulator,
    header,
    log,
    one_image_manifest,
    run_process,
    table,
    text_prompts,
    vlmbatch_run,
    workdir,
)

TARGET_MS = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=5000, help="requests (default 5,000)")
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight (default 64)")
    parser.add_argument("--no-plain", action="store_true", help="skip the plain asyncio + openai script")
    args = parser.parse_args()
    n, concurrency = args.n, args.concurrency

    rows = []
    with workdir("cpu") as tmp, emulator(latency=0.0, max_concurrency=0) as emu:
        prompts = text_prompts(tmp / "manifest", n)
        home = tmp / "prefect"

        def run(name: str, *extra: str):
            result = vlmbatch_run(
                None,
                prompts,
                tmp / name,
                emu.base_url,
                prefect_home=home,
                concurrency=concurrency,
                extra=extra,
            )
            log(
                f"  {name}: wall {result.wall_s:.1f} s, CPU {result.cpu_s:.2f} s, "
                f"flow {result.flow_elapsed_s} s"
            )
            return result

        log("warm-up (fresh PREFECT_HOME)...")
        run("warm", "--limit", "1")
        before = run("base1", "--limit", "1")
        emu.reset()
        log(f"{n} text-only requests...")
        full = run("full")
        sent = emu.stats()["requests_total"]
        after = run("base2", "--limit", "1")
        baseline = (before.cpu_s + after.cpu_s) / 2
        per_request = (full.cpu_s - baseline) / (n - 1)
        flow_s = full.flow_elapsed_s or float("nan")
        rows.append(
            [
                "`vlmbatch run`, text-only prompts",
                f"{n:,}",
                sent,
                f"{full.cpu_s:.2f}",
                f"{baseline:.2f}",
                f"**{per_request * 1000:.2f}**",
                f"{flow_s:.1f}",
                f"{n / flow_s:.0f}",
            ]
        )

        if not args.no_plain:
            images = one_image_manifest(tmp / "plain", n)
            caption_prompt(tmp / "plain")
            one = one_image_manifest(tmp / "plain1", 1)
            caption_prompt(tmp / "plain1")

            def plain(manifest: Path, name: str):
                command = [PYTHON, str(ROOT / "bench" / "plain_client.py"), str(manifest)]
                command += [str(manifest.parent / "prompts.parquet"), str(tmp / f"{name}.parquet")]
                command += ["--base-url", emu.base_url, "--concurrency", str(concurrency)]
                result = run_process(command)
                if result.code != 0:
                    raise RuntimeError(result.stderr[-3000:])
                elapsed = json.loads(result.stdout.strip().splitlines()[-1])["elapsed_s"]
                log(
                    f"  plain {name}: wall {result.wall_s:.1f} s, CPU {result.cpu_s:.2f} s, "
                    f"elapsed {elapsed:.1f}"
                )
                return result, elapsed

            log("plain asyncio + openai script...")
            base_a, _ = plain(one, "plain-base1")
            full_plain, elapsed = plain(images, "plain-full")
            base_b, _ = plain(one, "plain-base2")
            baseline = (base_a.cpu_s + base_b.cpu_s) / 2
            per_request = (full_plain.cpu_s - baseline) / (n - 1)
            rows.append(
                [
                    "plain asyncio + openai (default AsyncOpenAI), 1 KB image",
                    f"{n:,}",
                    n,
                    f"{full_plain.cpu_s:.2f}",
                    f"{baseline:.2f}",
                    f"{per_request * 1000:.2f}",
                    f"{elapsed:.1f}",
                    f"{n / elapsed:.0f}",
                ]
            )

    print(header("Client CPU per request"))
    print(f"Emulator: latency 0, no concurrency cap, its own process. Client concurrency {concurrency}.\n")
    columns = [
        "client",
        "work items",
        "requests seen by the emulator",
        "CPU s (N)",
        "CPU s (baseline, 1 item)",
        "CPU ms / request",
        "client elapsed s",
        "requests/s",
    ]
    print(table(columns, rows))
    ours = float(rows[0][5].strip("*"))
    verdict = "met" if ours <= TARGET_MS else "NOT met"
    print(f"\nTarget ≤ {TARGET_MS:g} ms of client CPU per request — {ours:.2f} ms ({verdict}).")


if __name__ == "__main__":
    main()
