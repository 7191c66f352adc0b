"""Run the real ``vlmbatch`` CLI in-process. Without PREFECT_API_URL a run starts Prefect's temporary API
server (flows/prefect_server.py) once per test session: later runs reuse it while it is up."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyarrow.dataset as ds
from typer.testing import CliRunner

from flows.cli.app import app


@dataclass
class Result:
    code: int
    out: str
    err: str


def vlmbatch(*args: object, env: dict[str, str] | None = None) -> Result:
    result = CliRunner().invoke(app, [str(a) for a in args], env=env, catch_exceptions=False)
    return Result(result.exit_code, result.stdout, result.stderr)


def rows(out: Path) -> list[dict]:
    return sorted(
        ds.dataset(out, format="parquet").to_table().to_pylist(),
        key=lambda r: (r["image_id"], r["prompt_id"]),
    )
