"""Shared pieces of the throughput benchmarks: the emulator as a separate process, manifests, the CLI.

Every benchmark runs ``vlmbatch run`` as a subprocess (the way a user runs it) with its own fresh
``PREFECT_HOME`` (so no benchmark inherits another's database), against ``python -m emulator`` started
as another process (so the endpoint's CPU is not the client's). ``run_process`` reports the child's wall
time, and its CPU time and peak RSS from ``os.wait4``: those of the ``vlmbatch`` process itself, plus any
descendant it waited for before it exited — none in a normal run. The temporary Prefect API server that
``vlmbatch run`` starts (flows/prefect_server.py, under flows/server_guard.py) is sent SIGTERM at exit and
not waited for, so it is reaped by another process and neither its CPU nor its RSS is in these figures
(nor is the emulator's, which is not a descendant). Also the peak RSS of the ``vlmbatch`` process
(``VmHWM`` polled from /proc); ``ru_maxrss`` therefore matches it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
VLMBATCH = str(Path(PYTHON).parent / "vlmbatch")
CAPTION = "Describe this image in one or two sentences."


# --- machine -------------------------------------------------------------------------------------------


def machine() -> str:
    """Cores, CPU model, Python and the versions of the packages on the request path."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    packages = ", ".join(
        f"{name} {version(name)}" for name in ("prefect", "openai", "aiohttp", "httpx", "pyarrow", "pillow")
    )
    return (
        f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, {packages}, "
        f"{platform.system()} {platform.release()}"
    )


def header(title: str) -> str:
    return f"### {title}\n\nMeasured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}.\n"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the emulator --------------------------------------------------------------------------------------


@dataclass
class Emulator:
    process: subprocess.Popen[str]
    base_url: str  # http://HOST:PORT/v1

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/_emulator/stats", timeout=60) as response:
            return json.load(response)

    def cpu_s(self) -> float:
        """User + system CPU seconds the emulator process has used so far (from /proc)."""
        return process_cpu_s(self.process.pid)

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.root}/_emulator/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=60):
            pass


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (``/proc/PID/stat`` fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def emulator(*, latency: float, max_concurrency: int = 0, extra: Sequence[str] = ()) -> Iterator[Emulator]:
    """``python -m emulator`` in its own process; yields once it prints its URL, stops it afterwards."""
    command = [PYTHON, "-m", "emulator", "--port", "0", "--latency", str(latency)]
    command += ["--max-concurrency", str(max_concurrency), *extra]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        if not match:
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield Emulator(process, match.group(1))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --- manifests -----------------------------------------------------------------------------------------


def small_jpeg(index: int, size: int = 64) -> bytes:
    """A tiny distinct JPEG (random colour, a rectangle, the index drawn in)."""
    rng = random.Random(index)
    img = Image.new("RGB", (size, size), (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw = ImageDraw.Draw(img)
    draw.rectangle((rng.randrange(size // 2), rng.randrange(size // 2), size - 4, size - 4), outline="white")
    draw.text((4, 4), str(index), fill="black")
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def distinct_images(folder: Path, n: int) -> Path:
    """``n`` distinct small JPEGs in ``folder/images`` and ``folder/images.parquet`` naming them."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    ids = [f"img{i:07d}" for i in range(n)]
    for i, image_id in enumerate(ids):
        (folder / "images" / f"{image_id}.jpg").write_bytes(small_jpeg(i))
    table = pa.table({"image_id": ids, "image": [f"images/{image_id}.jpg" for image_id in ids]})
    pq.write_table(table, folder / "images.parquet")
    return folder / "images.parquet"


def first_rows(manifest: Path, n: int) -> Path:
    """A manifest of the first ``n`` rows of ``manifest``, beside it (relative image paths still hold)."""
    table = pq.read_table(manifest)
    if n >= table.num_rows:
        return manifest
    path = manifest.with_name(f"{manifest.stem}-{n}.parquet")
    pq.write_table(table.slice(0, n), path)
    return path


def one_image_manifest(folder: Path, n: int, batch: int = 100_000) -> Path:
    """A manifest of ``n`` rows that all reference one small JPEG by path (cheap at a million rows)."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "one.jpg").write_bytes(small_jpeg(0))
    schema = pa.schema([("image_id", pa.string()), ("image", pa.string())])
    with pq.ParquetWriter(folder / "images.parquet", schema) as writer:
        for start in range(0, n, batch):
            ids = [f"img{i:07d}" for i in range(start, min(n, start + batch))]
            writer.write_table(pa.table({"image_id": ids, "image": ["images/one.jpg"] * len(ids)}, schema))
    return folder / "images.parquet"


def caption_prompt(folder: Path) -> Path:
    """The prompts manifest: one caption prompt for every image."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt_id": ["caption"], "prompt": [CAPTION]}), folder / "prompts.parquet")
    return folder / "prompts.parquet"


def text_prompts(folder: Path, n: int) -> Path:
    """``n`` distinct text-only prompts (no images manifest: every prompt is one work item)."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"p{i:07d}" for i in range(n)]
    table = pa.table(
        {"prompt_id": ids, "prompt": [f"Write one sentence about the number {i}." for i in range(n)]}
    )
    pq.write_table(table, folder / "prompts.parquet")
    return folder / "prompts.parquet"


# --- running the CLI -----------------------------------------------------------------------------------


@dataclass
class Run:
    code: int
    wall_s: float
    cpu_s: float  # user + system from wait4: the child, and descendants it reaped (not the Prefect server)
    maxrss_mb: float  # ru_maxrss from wait4: the largest of the child and the descendants it reaped
    main_hwm_mb: float  # VmHWM of the vlmbatch process itself (polled until it exits)
    stdout: str
    stderr: str

    @property
    def flow_elapsed_s(self) -> float | None:
        """The flow's own elapsed time, from the summary table's ``elapsed`` line."""
        match = re.search(r"elapsed\s*[│|]?\s*([\d.]+) s", self.stdout)
        return float(match.group(1)) if match else None

    def summary_value(self, label: str) -> str | None:
        match = re.search(rf"{re.escape(label)}\s*[│|]\s*([^│|\n]+)", self.stdout)
        return match.group(1).strip() if match else None


def prefect_env(home: Path) -> dict[str, str]:
    """The environment of a run: a fresh PREFECT_HOME, no analytics, quiet logs."""
    env = dict(os.environ)
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_LOGGING_LEVEL="WARNING",
        COLUMNS="200",
    )
    env.pop("PREFECT_API_URL", None)
    return env


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_process(command: Sequence[str], env: dict[str, str] | None = None, cwd: Path = ROOT) -> Run:
    """Run ``command`` to the end; wall time, CPU and peak memory of it (and of what it reaped)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out, stderr=err, text=True)
        peak = 0
        done = threading.Event()

        def poll() -> None:
            nonlocal peak
            while not done.wait(0.05):
                peak = max(peak, _hwm_kb(process.pid))

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        done.set()
        poller.join()
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return Run(
            code=process.returncode,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            maxrss_mb=usage.ru_maxrss / 1024,
            main_hwm_mb=peak / 1024,
            stdout=out.read(),
            stderr=err.read(),
        )


def vlmbatch_run(
    images: Path | None,
    prompts: Path,
    out: Path,
    base_url: str,
    *,
    prefect_home: Path,
    concurrency: int = 32,
    extra: Sequence[str] = (),
    check: bool = True,
) -> Run:
    """``vlmbatch run`` as a subprocess with its own PREFECT_HOME; raises on a non-zero exit (``check``)."""
    command = [VLMBATCH, "run", *([str(images)] if images else []), "--prompts", str(prompts)]
    command += ["--out", str(out), "--base-url", base_url, "--concurrency", str(concurrency), *extra]
    run = run_process(command, env=prefect_env(prefect_home))
    if check and run.code != 0:
        raise RuntimeError(f"vlmbatch run exited {run.code}:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return run


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"vlmbatch-bench-{prefix}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def table(columns: Sequence[str], rows: Sequence[Sequence[object]], align: str = "") -> str:
    """A Markdown table; ``align`` one letter per column (l or r; default: first l, the rest r)."""
    align = align or "l" + "r" * (len(columns) - 1)
    lines = ["| " + " | ".join(columns) + " |"]
    lines.append("|" + "|".join("---" if a == "l" else "---:" for a in align) + "|")
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
