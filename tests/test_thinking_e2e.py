"""Thinking off, said explicitly, through the real CLI against the emulator: --no-reasoning (or reasoning
= false in TOML or the environment, or a prompt's reasoning false) sends enable_thinking false; leaving
it unset sends nothing, the server's default. The emulator's stats count thinking_on and thinking_off
(enable_thinking given and false) per request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emulator import EmulatorServer
from tests.builders import images_manifest, prompts_manifest
from tests.cli import rows, vlmbatch

PROMPTS = [
    {"prompt_id": "think", "prompt": "Why?"},
    {"prompt_id": "quick", "prompt": "What?", "reasoning": False},
]


def _args(tmp_path: Path, emulator: EmulatorServer, out: str) -> list[object]:
    images = images_manifest(tmp_path, {"a": ((30, 10), "red"), "b": ((40, 10), "blue")})
    prompts = prompts_manifest(tmp_path, PROMPTS)
    return ["run", images, "--prompts", prompts, "--base-url", emulator.base_url, "--out", tmp_path / out]


def _thinking(emulator: EmulatorServer) -> dict[str, Any]:
    """Requests sent with thinking on and (explicitly) off, from the counters and the request log."""
    stats = emulator.stats()
    logged = [entry["features"] for entry in stats["log"]]
    counted = {"on": stats["thinking_on"], "off": stats["thinking_off"]}
    assert counted == {
        "on": sum("thinking_on" in f for f in logged),
        "off": sum("thinking_off" in f for f in logged),
    }
    return counted


def test_no_reasoning_sends_thinking_off_and_unset_sends_nothing(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    assert vlmbatch(*_args(tmp_path, emulator, "unset")).code == 0
    assert _thinking(emulator) == {"on": 0, "off": 2}  # only the prompt that said false
    emulator.reset()
    assert vlmbatch(*_args(tmp_path, emulator, "off"), "--no-reasoning").code == 0
    assert _thinking(emulator) == {"on": 0, "off": 4}
    emulator.reset()
    assert vlmbatch(*_args(tmp_path, emulator, "on"), "--reasoning").code == 0
    assert _thinking(emulator) == {"on": 2, "off": 2}  # the prompt's false overrides --reasoning
    got = {(r["image_id"], r["prompt_id"]): r for r in rows(tmp_path / "on")}
    assert got[("a", "think")]["reasoning"] and got[("a", "quick")]["reasoning"] is None

    unset = {(r["image_id"], r["prompt_id"]): r["request_key"] for r in rows(tmp_path / "unset")}
    off = {(r["image_id"], r["prompt_id"]): r["request_key"] for r in rows(tmp_path / "off")}
    assert unset[("a", "quick")] == off[("a", "quick")]  # false either way: the same request
    assert unset[("a", "think")] != off[("a", "think")]  # off said vs the server's default


def test_reasoning_false_in_toml_or_the_environment_is_the_flag(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    toml = tmp_path / "vlmbatch.toml"
    toml.write_text("reasoning = false\n")
    assert vlmbatch(*_args(tmp_path, emulator, "toml"), "--config", toml).code == 0
    assert _thinking(emulator) == {"on": 0, "off": 4}
    emulator.reset()
    res = vlmbatch(*_args(tmp_path, emulator, "env"), env={"VLMBATCH_REASONING": "false"})
    assert res.code == 0, res.err
    assert _thinking(emulator) == {"on": 0, "off": 4}
    emulator.reset()
    assert vlmbatch(*_args(tmp_path, emulator, "toml"), "--config", toml).code == 0
    assert emulator.stats()["requests_total"] == 0  # rerun: the same keys


def test_the_responses_api_turns_thinking_off_by_sending_no_reasoning(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """vLLM's Responses API takes no chat_template_kwargs: off is no ``reasoning`` field, as unset."""
    res = vlmbatch(*_args(tmp_path, emulator, "off"), "--api", "responses", "--no-reasoning")
    assert res.code == 0, res.err
    assert _thinking(emulator) == {"on": 0, "off": 0}
    assert all(r["reasoning"] is None for r in rows(tmp_path / "off"))
    off = {r["request_key"] for r in rows(tmp_path / "off")}
    assert vlmbatch(*_args(tmp_path, emulator, "unset"), "--api", "responses").code == 0
    assert {r["request_key"] for r in rows(tmp_path / "unset")} == off  # the same requests
