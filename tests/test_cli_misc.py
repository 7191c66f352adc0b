"""Small CLI behaviours: help texts, the emulate command, usage errors."""

from __future__ import annotations

import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from emulator import EmulatorServer
from tests.builders import images_manifest
from tests.cli import rows, vlmbatch

VLMBATCH = Path(sys.executable).with_name("vlmbatch")


def test_emulate_runs_the_emulator_under_its_own_name() -> None:
    res = subprocess.run([VLMBATCH, "emulate", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.startswith("usage: vlmbatch emulate")
    assert "--fault-rate" in res.stdout and "--reject-over-capacity" in res.stdout
    assert "0: any free port (default: 8000)" in res.stdout  # where `vlmbatch run` looks by default
    assert "address to listen on (default: 127.0.0.1)" in res.stdout  # loopback unless told otherwise
    proc = subprocess.Popen(
        [VLMBATCH, "emulate", "--port", "0", "--latency", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("emulator listening on http://127.0.0.1:")
        with urllib.request.urlopen(line.split()[-1] + "/health/ready", timeout=5) as response:
            assert response.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_unknown_flag_is_a_usage_error_exit_1() -> None:
    res = vlmbatch("run", "x.parquet", "--out", "o", "--no-such-flag")
    assert res.code == 1 and "No such option" in res.err


def test_a_crash_inside_vlmbatch_exits_70_and_keeps_what_was_written(
    tmp_path: Path, emulator: EmulatorServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_: object, **__: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr("flows.annotate.publish_summary", broken)  # after every row is written
    images = images_manifest(tmp_path, {"a": ((40, 30), "red"), "b": ((30, 40), "blue")})
    out = tmp_path / "out"
    res = vlmbatch("run", images, "--out", out, "--base-url", emulator.base_url)
    assert res.code == 70
    assert "error: vlmbatch crashed (RuntimeError: boom); the rows written so far are kept" in res.err
    assert [(r["image_id"], r["status"]) for r in rows(out)] == [("a", "ok"), ("b", "ok")]


def test_demo_replaces_its_own_earlier_output_and_nothing_else(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    (mine / "photos").mkdir(parents=True)
    (mine / "photos" / "a.jpg").write_bytes(b"jpeg")
    (mine / "annotations.parquet").write_bytes(b"PAR1")
    res = vlmbatch("demo", "--out", mine, "--latency", "0.01")
    assert res.code == 1 and "is not the output of an earlier demo" in res.err
    assert sorted(p.name for p in mine.rglob("*")) == ["a.jpg", "annotations.parquet", "photos"]

    demo = tmp_path / "demo"
    for _ in range(2):  # the second run replaces the first's output
        assert vlmbatch("demo", "--out", demo, "--latency", "0.01").code == 0
        assert len(rows(demo)) == 7
    (demo / "_vlmbatch" / "demo-output").unlink()  # now an output like any other: kept
    assert vlmbatch("demo", "--out", demo, "--latency", "0.01").code == 1
    assert len(rows(demo)) == 7


def test_run_help_shows_every_default_as_the_config_has_it() -> None:
    """Defaults written in the help by hand: each option with one shows it, and it is the real one."""
    import re

    from tasks.config import SECTIONS, flag_name

    res = vlmbatch("run", "--help", env={"COLUMNS": "1000"})
    text = re.sub(r"\s+", " ", res.out)
    checked = 0
    for model in SECTIONS.values():
        for name, field in model.model_fields.items():
            if field.default is None or isinstance(field.default, bool):
                continue
            flag = flag_name(name)
            found = re.search(re.escape(flag) + r" <[^>]+> [^\[]*?\[default: ([^\]\s]+)", text)
            assert found, f"{flag}: no [default: ...] in run --help"
            shown, default = found.group(1), field.default
            expected = (
                str(int(default)) if isinstance(default, float) and default.is_integer() else str(default)
            )
            assert shown == expected, f"{flag}: help says {shown}, the config {default!r}"
            checked += 1
    assert checked >= 20


def test_a_backfill_submitted_to_a_deployment_keeps_the_deployments_settings_it_was_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only what the command was given (flags, environment, --config file) replaces the deployment's
    config; the rest (endpoint, model, global limit) stays as prefect.yaml has it."""
    import yaml

    from flows.cli.backfill import deployment_config
    from flows.serve import PREFECT_YAML
    from tasks.config import build_config
    from tasks.errors import ConfigError

    deployed = yaml.safe_load(PREFECT_YAML.read_text())["definitions"]["config"]
    deployed["endpoint"]["base_url"] = "http://gpu-box:8000/v1"
    monkeypatch.chdir(tmp_path)
    flags = {"images": "m/date={date}/images.parquet", "out": "o/date={date}", "concurrency": "8"}
    cfg = build_config(flags, environ={"VLMBATCH_MAX_TOKENS": "99"})
    merged = deployment_config(deployed, cfg)
    assert merged["endpoint"]["base_url"] == "http://gpu-box:8000/v1"  # not the CLI's default
    assert merged["endpoint"]["concurrency_limit"] == "vlmbatch-endpoint"
    assert merged["endpoint"]["concurrency"] == 8 and merged["generation"] == {"max_tokens": 99}
    assert merged["images"] == str(tmp_path / "m" / "date={date}" / "images.parquet")
    assert merged["out"] == str(tmp_path / "o" / "date={date}") and merged["prompts"] is None
    assert deployed["endpoint"]["concurrency"] == 32  # the deployment's own dict is left as it was

    with pytest.raises(ConfigError, match=r"config\.endpoint\.concurrency_limit_slots"):
        deployment_config({**deployed, "endpoint": {"concurrency_limit_slots": "many"}}, cfg)
    merged = deployment_config({**deployed, "image": {"image_root": "imgs"}}, cfg)
    assert merged["image"] == {"image_root": "imgs"}  # the worker's, relative to its directory
    cfg = build_config({**flags, "image_root": "mine"}, environ={})
    assert deployment_config(deployed, cfg)["image"] == {"image_root": str(tmp_path / "mine")}
