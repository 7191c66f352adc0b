"""The wheel is the product: built from the project, installed into a fresh virtual environment, it
runs ``vlmbatch demo`` — every subpackage and data file the demo needs is in it.

The fresh environment gets the wheel alone (``--no-deps``, no index); the dependencies come from the
development environment through a path line in a ``.pth`` file, which adds that site-packages folder to
``sys.path`` without running the ``.pth`` files in it — so the editable install of this checkout is not
seen, and every module of vlmbatch is the wheel's. The command runs in an empty folder, so nothing is
imported from the checkout either.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pyarrow.dataset as ds
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the project's wheel installed; returns its bin folder."""
    where = tmp_path_factory.mktemp("wheel")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(where / "dist")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (where / "dist").glob("vlmbatch-*.whl")
    env_dir = where / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installing = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert installing.returncode == 0, installing.stderr[-3000:]
    return env_dir / "bin"


def _clean_env() -> dict[str, str]:
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PREFECT_API_URL", "VLMBATCH_"))
    }


def test_the_wheel_holds_every_package_and_the_demo_data(installed: Path, tmp_path: Path) -> None:
    probe = (
        "import flows.cli, tasks.run.shard_runner, emulator, importlib.util, pathlib\n"
        "spec = importlib.util.find_spec('vlmbatch_demo')\n"
        "demo = pathlib.Path(next(iter(spec.submodule_search_locations)))\n"
        "print(flows.cli.__file__); print(demo)\n"
        "print(sorted(p.name for p in demo.rglob('*') if p.is_file()))\n"
    )
    shown = subprocess.run(
        [str(installed / "python"), "-c", probe],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_clean_env(),
    )
    assert shown.returncode == 0, shown.stderr
    cli_file, demo_dir, files = shown.stdout.splitlines()
    venv_root = str(installed.parent)
    assert cli_file.startswith(venv_root) and demo_dir.startswith(venv_root), (
        shown.stdout
    )  # not the checkout's
    for name in ("images.parquet", "prompts.parquet", "chelsea-cat.jpg", "retina.jpg"):
        assert name in files


def test_the_installed_wheel_runs_the_demo(installed: Path, tmp_path: Path) -> None:
    out = tmp_path / "demo-out"
    env = {**_clean_env(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    done = subprocess.run(
        [str(installed / "vlmbatch"), "demo", "--out", str(out), "--latency", "0.05"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    rows = ds.dataset(out, format="parquet").to_table().to_pylist()
    assert len(rows) == 7
    assert {r["status"] for r in rows} == {"ok"}
    assert {r["title"] for r in rows} >= {"Chelsea the cat"}
