"""An OUT written directly (no run): rows of several prompts, outcomes and runs, for the report's tests."""

from __future__ import annotations

import base64
import io
import os
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
from PIL import Image

from tasks.outputs.layout import STATE_DIR, write_atomic
from tasks.outputs.table import rows_to_table
from tasks.row import OUTPUT_SCHEMA, ResultRow
from tests.builders import COLOURS, image_bytes, write_parquet

SCRIPT_ANSWER = "<script>window.__pwned = 1</script> and <b>bold</b> & 'quotes\""
START = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def make_rows(n: int, *, seed: int = 1, images: int | None = None) -> list[ResultRow]:
    """``n`` rows: mostly ``caption`` (some failed by timeout), a ``qa`` prompt (some bad_image), a
    ``json`` prompt (a few invalid_json), a rare prompt of three rows and two text-only rows."""
    rng = random.Random(seed)
    images = images or n
    rows = []
    for i in range(n):
        image_id = f"img{i % images:05d}"
        kind = i % 10
        prompt = "caption" if kind < 6 else "qa" if kind < 9 else "json"
        row = ResultRow(
            image_id=image_id, prompt_id=prompt, task="caption" if prompt == "caption" else "qa", status="ok"
        )
        row.run_id = "run-a" if i < n // 2 else "run-b"
        row.finished_at = (
            START + timedelta(seconds=i * 0.01) + (timedelta(hours=1) if i >= n // 2 else timedelta())
        )
        row.model = "google/gemma-4-31b-it"
        row.attempts = 1
        row.request_key = f"key{i}"
        failure = rng.random()
        if prompt == "caption" and failure < 0.03:
            row.status, row.error_type, row.error_message = "failed", "timeout", "timed out after 300 s"
            row.http_status, row.attempts, row.latency_ms = 408, 7, 300_000.0
        elif prompt == "qa" and failure < 0.05:
            row.status, row.error_type, row.error_message = "failed", "bad_image", "cannot decode the image"
            row.attempts = 0
        elif prompt == "json" and failure < 0.1:
            row.status, row.error_type, row.error_message = (
                "failed",
                "invalid_json",
                "'tags' is a required property",
            )
            row.latency_ms, row.prompt_tokens, row.completion_tokens = 900.0, 300, 40
        else:
            row.latency_ms = round(rng.lognormvariate(6, 0.5), 1)
            row.prompt_tokens, row.completion_tokens = 280 + rng.randrange(40), 10 + rng.randrange(60)
            row.text = f"answer {i} to {prompt}"
            row.finish_reason = "stop"
            if prompt == "json":
                row.json = '{"caption": "a cat", "tags": ["cat"], "indoor": true}'
            if prompt == "qa" and i % 7 == 0:
                row.reasoning = f"thinking about {i}"
        rows.append(row)
    for j in range(3):
        rows.append(
            ResultRow(
                image_id=f"img{j + 1:05d}",
                prompt_id="rare",
                task="qa",
                status="ok",
                text=f"rare answer {j}",
                latency_ms=500.0,
                prompt_tokens=300,
                completion_tokens=5,
                run_id="run-b",
                model="google/gemma-4-31b-it",
                attempts=1,
                finish_reason="stop",
                finished_at=START + timedelta(hours=2),
            )
        )
    for i in range(2):
        rows.append(
            ResultRow(
                image_id=None,
                prompt_id=f"text-{i}",
                task="caption",
                status="ok",
                text=SCRIPT_ANSWER if i == 0 else "a text-only answer",
                latency_ms=400.0,
                prompt_tokens=20,
                completion_tokens=30,
                run_id="run-b",
                attempts=1,
                model="google/gemma-4-31b-it",
                finish_reason="stop",
                finished_at=START + timedelta(hours=2),
            )
        )
    return rows


def write_out(out: Path, rows: list[ResultRow], files: int = 4) -> Path:
    """``rows`` in ``files`` part files (oldest first, by modification time)."""
    (out / STATE_DIR).mkdir(parents=True, exist_ok=True)
    size = -(-len(rows) // files)
    for k in range(files):
        path = out / f"part-{k:06d}-test.parquet"
        write_atomic(rows_to_table(rows[k * size : (k + 1) * size], OUTPUT_SCHEMA), path)
        os.utime(path, ns=(1_700_000_000_000_000_000 + k, 1_700_000_000_000_000_000 + k))
    return out


KINDS_SHOWN = ["path", "file-url", "data-url", "binary", "hf-bytes", "hf-path"]
KINDS_FAILING = ["missing", "outside", "broken", "ftp"]


def every_kind_manifest(tmp: Path) -> Path:
    """An images manifest (a folder) with every kind of cell, binary ones in files of their own:
    ``KINDS_SHOWN`` can be read, ``KINDS_FAILING`` cannot."""
    folder = tmp / "manifest"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "path.jpg").write_bytes(image_bytes((640, 480), COLOURS["red"]))
    (folder / "img" / "broken.jpg").write_bytes(b"not an image at all")
    (tmp / "outside.jpg").write_bytes(image_bytes((64, 64), COLOURS["blue"]))
    jpeg = image_bytes((300, 100), COLOURS["green"])
    write_parquet(
        folder / "paths.parquet",
        {
            "image_id": ["path", "file-url", "data-url", "missing", "outside", "broken", "ftp"],
            "image": [
                "img/path.jpg",
                (folder / "img" / "path.jpg").as_uri(),
                "data:image/jpeg;base64," + base64.b64encode(jpeg).decode(),
                "img/nowhere.jpg",
                "../outside.jpg",
                "img/broken.jpg",
                "ftp://example.invalid/a.jpg",
            ],
        },
    )
    write_parquet(folder / "binary.parquet", {"image_id": ["binary"], "image": pa.array([jpeg], pa.binary())})
    png = io.BytesIO()
    Image.new("RGBA", (50, 200), (*COLOURS["yellow"], 128)).save(png, "PNG")
    struct = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    write_parquet(
        folder / "hf.parquet",
        {
            "image_id": ["hf-bytes", "hf-path"],
            "image": pa.array(
                [{"bytes": png.getvalue(), "path": None}, {"bytes": None, "path": "img/path.jpg"}], struct
            ),
        },
    )
    return folder
