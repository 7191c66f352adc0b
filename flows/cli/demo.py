"""``vlmbatch demo``: the whole pipeline on the demo data, against the built-in endpoint emulator."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from typing import Annotated

import typer

from flows.cli.common import Opt, fail
from flows.cli.run import execute
from tasks.outputs.layout import STATE_DIR

DEMO_MARKER = "demo-output"  # in OUT's state directory: this OUT is the demo's to replace


def demo_data() -> Path:
    """The demo's manifests and images: the package ``vlmbatch_demo``, which is data/demo in the
    repository (pyproject.toml maps it) and a folder of its own in an installed wheel."""
    spec = importlib.util.find_spec("vlmbatch_demo")
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(__file__).resolve().parents[2] / "data" / "demo"  # a checkout that is not installed


def demo(
    out: Annotated[Path, Opt(help="Where the demo output goes.")] = Path("demo-out"),
    latency: Annotated[float, Opt(help="Emulated model latency, seconds.")] = 0.4,
) -> None:
    """Run the whole pipeline on data/demo against the built-in endpoint emulator."""
    from emulator import EmulatorServer, EmulatorSettings  # its web server: a quarter second, demo only

    demo_dir = demo_data()
    marker = out / STATE_DIR / DEMO_MARKER  # left by a demo: its output may be replaced, nothing else
    if out.exists():
        if not out.is_dir() or (any(out.iterdir()) and not marker.is_file()):
            raise fail(
                f"{out} exists and is not the output of an earlier demo, which is all the demo replaces; "
                "choose another --out"
            )
        shutil.rmtree(out)
    with EmulatorServer(EmulatorSettings(latency=latency, jitter=latency / 2)) as server:
        typer.echo(f"endpoint emulator (a stand-in for the model) on {server.base_url}")
        flags = {
            "images": str(demo_dir / "images.parquet"),
            "prompts": str(demo_dir / "prompts.parquet"),
            "out": str(out),
            "base_url": server.base_url,
            "carry": ["title"],
        }
        code = execute(flags)
    if (out / STATE_DIR).is_dir():
        marker.write_text("written by `vlmbatch demo`, which replaces it on its next run\n")
    typer.echo(f"output: {out.resolve()}  (read it with pyarrow.dataset.dataset({str(out)!r}))")
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command()(demo)
