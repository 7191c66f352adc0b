"""Test data: images with known sizes and colours, manifests around them, and a shard runner on them."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tasks.config import RunConfig
from tasks.row import ResultRow
from tasks.run.shard_runner import ShardRunner
from tasks.stopping import StopSwitch

TAGS_SCHEMA = {  # a JSON Schema for structured-output tests: a caption, tags and a flag
    "type": "object",
    "properties": {
        "caption": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "indoor": {"type": "boolean"},
    },
    "required": ["caption", "tags", "indoor"],
    "additionalProperties": False,
}

TAGS_TEXT_SCHEMA = {  # also "text", a property named like a contract column (→ json_text)
    **TAGS_SCHEMA,
    "properties": {**TAGS_SCHEMA["properties"], "text": {"type": "integer"}},
    "required": [*TAGS_SCHEMA["required"], "text"],
}

COLOURS = {"red": (220, 20, 20), "green": (20, 180, 40), "blue": (20, 40, 220), "yellow": (240, 220, 20)}


def image_bytes(size: tuple[int, int], colour: tuple[int, int, int], fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def write_images(folder: Path, specs: dict[str, tuple[tuple[int, int], str]]) -> dict[str, Path]:
    """Write one JPEG per image id: {id: ((w, h), colour name)} → {id: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for image_id, (size, colour) in specs.items():
        path = folder / f"{image_id}.jpg"
        path.write_bytes(image_bytes(size, COLOURS[colour]))
        paths[image_id] = path
    return paths


def write_parquet(path: Path, columns: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = columns if isinstance(columns, pa.Table) else pa.table(columns)
    pq.write_table(table, path)
    return path


def images_manifest(tmp: Path, specs: dict[str, tuple[tuple[int, int], str]], **extra: list[Any]) -> Path:
    """A manifest whose image column holds paths relative to the manifest's folder."""
    write_images(tmp / "img", specs)
    ids = list(specs)
    return write_parquet(
        tmp / "images.parquet", {"image_id": ids, "image": [f"img/{i}.jpg" for i in ids], **extra}
    )


def prompts_manifest(tmp: Path, rows: list[dict[str, Any]], name: str = "prompts.parquet") -> Path:
    columns: dict[str, pa.Array] = {}
    names = list(dict.fromkeys(k for row in rows for k in row))
    for key in names:
        values = [row.get(key) for row in rows]
        typ = {"max_tokens": pa.int64(), "reasoning": pa.bool_()}.get(key, pa.string())
        columns[key] = pa.array(values, type=typ)
    return write_parquet(tmp / name, columns)


class Clock:
    """A clock for tests: ``now`` is set by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def shard_runner(tmp_path: Path, config: RunConfig, rows: list[ResultRow]) -> ShardRunner:
    """A shard runner on images under ``tmp_path``; every row it emits is appended to ``rows``.
    Create it inside the event loop that runs it."""
    return ShardRunner(
        config,
        image_root=tmp_path,
        manifest_dir=tmp_path,
        run_id="test",
        stop=StopSwitch(),
        on_row=lambda row: rows.append(row) if row is not None else None,
    )
