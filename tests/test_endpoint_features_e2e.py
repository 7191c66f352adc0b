"""Endpoint features through the real CLI against the emulator: JSON, streaming, Responses, Azure."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from emulator import EmulatorServer, EmulatorSettings
from tests.builders import TAGS_SCHEMA, TAGS_TEXT_SCHEMA, images_manifest, prompts_manifest
from tests.cli import rows, vlmbatch


def _inputs(tmp_path: Path, n: int = 3) -> list[object]:
    images = images_manifest(tmp_path, {f"i{k}": ((20 + k, 10), "green") for k in range(n)})
    prompts = prompts_manifest(
        tmp_path,
        [
            {"prompt_id": "cap", "prompt": "Describe."},
            {"prompt_id": "meta", "prompt": "Tag it.", "json_schema": json.dumps(TAGS_SCHEMA)},
        ],
    )
    return ["run", images, "--prompts", prompts]


@pytest.mark.parametrize("mode", ["openai", "vllm"])
def test_structured_output_is_validated_and_stored(
    tmp_path: Path, emulator: EmulatorServer, mode: str
) -> None:
    args = [*_inputs(tmp_path), "--out", tmp_path / "out", "--base-url", emulator.base_url]
    res = vlmbatch(*args, "--structured-output", mode)
    assert res.code == 0, res.err
    for row in rows(tmp_path / "out"):
        if row["prompt_id"] == "meta":
            jsonschema.validate(json.loads(row["json"]), TAGS_SCHEMA)
            assert row["text"] and json.loads(row["text"]) == json.loads(row["json"])
        else:
            assert row["json"] is None


def test_a_schema_whose_ref_does_not_resolve_stops_the_run_before_anything_is_sent(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    schema = {**TAGS_SCHEMA, "properties": {**TAGS_SCHEMA["properties"], "tags": {"$ref": "#/$defs/tags"}}}
    images = images_manifest(tmp_path, {"i0": ((20, 10), "green")})
    prompts = prompts_manifest(
        tmp_path,
        [
            {"prompt_id": "cap", "prompt": "Describe."},
            {"prompt_id": "meta", "prompt": "Tag it.", "json_schema": json.dumps(schema)},
        ],
    )
    args = ["run", images, "--prompts", prompts, "--base-url", emulator.base_url]
    res = vlmbatch(*args, "--out", tmp_path / "out")
    assert res.code == 1
    assert "prompts.parquet: column 'json_schema' in row 1 (prompt 'meta')" in res.err
    assert "$ref '#/$defs/tags' does not resolve inside the schema" in res.err
    assert emulator.stats()["requests_total"] == 0
    assert not (tmp_path / "out").exists()


def test_invalid_json_gets_one_repair_then_fails(tmp_path: Path, emulator: EmulatorServer) -> None:
    emulator.configure(fault_rate=1.0, fault_kinds=["bad_json"], fault_mode="first_attempt")
    args = [*_inputs(tmp_path, 2), "--out", tmp_path / "o1", "--base-url", emulator.base_url]
    assert vlmbatch(*args).code == 0
    meta = [r for r in rows(tmp_path / "o1") if r["prompt_id"] == "meta"]
    assert all(r["status"] == "ok" and r["attempts"] == 2 for r in meta)  # the repair succeeded
    emulator.configure(fault_mode="any")
    emulator.reset()
    args = [*_inputs(tmp_path, 2), "--out", tmp_path / "o2", "--base-url", emulator.base_url]
    assert vlmbatch(*args).code == 2
    meta = [r for r in rows(tmp_path / "o2") if r["prompt_id"] == "meta"]
    assert all((r["status"], r["error_type"], r["attempts"]) == ("failed", "invalid_json", 2) for r in meta)
    assert "does not match the schema" in meta[0]["error_message"]
    assert {r["http_status"] for r in meta} == {200}  # the last HTTP status, though the answer failed
    # a repaired row counts the tokens of both requests (both are billed)
    emulator.configure(fault_rate=0.0)
    args = [*_inputs(tmp_path, 2), "--out", tmp_path / "o3", "--base-url", emulator.base_url]
    assert vlmbatch(*args).code == 0
    clean = {r["image_id"]: r for r in rows(tmp_path / "o3") if r["prompt_id"] == "meta"}
    repaired = {r["image_id"]: r for r in rows(tmp_path / "o1") if r["prompt_id"] == "meta"}
    for image_id, row in repaired.items():
        assert row["prompt_tokens"] >= 2 * clean[image_id]["prompt_tokens"]


def test_streaming_matches_the_plain_answers(tmp_path: Path, emulator: EmulatorServer) -> None:
    base = [*_inputs(tmp_path), "--base-url", emulator.base_url, "--reasoning"]
    assert vlmbatch(*base, "--out", tmp_path / "plain").code == 0
    emulator.reset()
    assert vlmbatch(*base, "--out", tmp_path / "streamed", "--stream").code == 0
    assert emulator.stats()["streamed"] == 6
    keep = (
        "image_id",
        "prompt_id",
        "text",
        "reasoning",
        "json",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
    )
    plain = [{k: r[k] for k in keep} for r in rows(tmp_path / "plain")]
    assert plain == [{k: r[k] for k in keep} for r in rows(tmp_path / "streamed")]


def test_an_error_event_inside_a_stream_is_retried(tmp_path: Path, emulator: EmulatorServer) -> None:
    emulator.configure(fault_script=["stream_error"])
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url, "--stream")
    assert res.code == 0, res.err
    (row,) = rows(tmp_path / "out")
    assert (row["status"], row["attempts"]) == ("ok", 2) and "10×10 image, mostly red" in row["text"]


def test_responses_api(tmp_path: Path, emulator: EmulatorServer) -> None:
    base = [*_inputs(tmp_path), "--base-url", emulator.base_url, "--api", "responses"]
    res = vlmbatch(*base, "--out", tmp_path / "out", "--reasoning", "--reasoning-effort", "high")
    assert res.code == 0, res.err
    assert emulator.stats()["by_route"].get("/v1/responses") == 6
    for row in rows(tmp_path / "out"):
        assert row["reasoning"] and row["finish_reason"] == "stop" and row["prompt_tokens"] > 0
        if row["prompt_id"] == "meta":
            jsonschema.validate(json.loads(row["json"]), TAGS_SCHEMA)
        else:
            assert "×10 image, mostly green" in row["text"]
    short = ["run", base[1], "--base-url", emulator.base_url, "--api", "responses", "--max-tokens", 4]
    assert vlmbatch(*short, "--out", tmp_path / "short").code == 0  # captions only: a cut answer is ok
    assert {r["finish_reason"] for r in rows(tmp_path / "short")} == {"length"}


def test_azure_gateway_424_and_408(tmp_path: Path) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red"), "b": ((11, 10), "red")})
    settings = EmulatorSettings(latency=0.0, azure_gateway=True, gateway_timeout=0.5, token_seconds=0.05)
    with EmulatorServer(settings) as server:
        base = ["run", images, "--base-url", server.base_url, "--max-retries", 1]
        # a wrapped 400 (max tokens above the context) is not retried
        res = vlmbatch(*base, "--out", tmp_path / "o1", "--max-tokens", 500_000, "--no-preflight")
        assert res.code == 2
        for row in rows(tmp_path / "o1"):
            assert (row["error_type"], row["http_status"], row["attempts"]) == ("bad_request", 424, 1)
        # long answers outlive the gateway's timeout (408, retried, still too slow)...
        res = vlmbatch(*base, "--out", tmp_path / "o2", "--no-preflight")
        assert res.code == 2
        assert {(r["error_type"], r["http_status"], r["attempts"]) for r in rows(tmp_path / "o2")} == {
            ("timeout", 408, 2)
        }
        # ...but stream through it
        res = vlmbatch(*base, "--out", tmp_path / "o3", "--no-preflight", "--stream")
        assert res.code == 0, res.err


def test_text_only_prompts_need_no_images(tmp_path: Path, emulator: EmulatorServer) -> None:
    prompts = prompts_manifest(
        tmp_path,
        [{"prompt_id": "haiku", "prompt": "Write a haiku."}, {"prompt_id": "fact", "prompt": "A fact?"}],
    )
    out = tmp_path / "out"
    res = vlmbatch("run", "--prompts", prompts, "--out", out, "--base-url", emulator.base_url)
    assert res.code == 0, res.err
    got = rows(out)
    assert {r["prompt_id"]: r["image_id"] for r in got} == {"haiku": None, "fact": None}
    assert all(r["text"].startswith("No image.") and r["image_sha256"] is None for r in got)
    emulator.reset()
    assert vlmbatch("run", "--prompts", prompts, "--out", out, "--base-url", emulator.base_url).code == 0
    assert emulator.stats()["requests_total"] == 0  # resumed: nothing to redo
    named = prompts_manifest(tmp_path, [{"prompt_id": "q", "prompt": "?", "image_id": "a"}], "named.parquet")
    res = vlmbatch("run", "--prompts", named, "--out", tmp_path / "o2", "--base-url", emulator.base_url)
    assert res.code == 1 and "no images manifest was given" in res.err
    res = vlmbatch("run", "--out", tmp_path / "o3", "--base-url", emulator.base_url)
    assert res.code == 1 and "give an images manifest, a --prompts manifest, or both" in res.err


def test_several_images_in_one_prompt(tmp_path: Path, emulator: EmulatorServer) -> None:
    import pyarrow as pa

    from tests.builders import write_parquet

    images = images_manifest(
        tmp_path, {"a": ((30, 10), "red"), "b": ((40, 10), "blue"), "c": ((50, 10), "green")}
    )
    prompts = write_parquet(
        tmp_path / "p.parquet",
        {
            "prompt_id": ["compare", "all"],
            "prompt": ["Compare these.", "Which is biggest?"],
            "image_ids": pa.array([["c", "a"], ["a", "b", "c"]], pa.list_(pa.string())),
        },
    )
    out = tmp_path / "out"
    args = ["run", images, "--prompts", prompts, "--out", out, "--base-url", emulator.base_url]
    res = vlmbatch(*args)
    assert res.code == 0, res.err
    got = {r["prompt_id"]: r for r in rows(out)}
    assert set(got) == {"compare", "all"}  # no per-image rows: these prompts name their images
    compare = got["compare"]["text"]
    assert compare.index("50×10 image, mostly green") < compare.index("30×10 image, mostly red")  # in order
    assert got["compare"]["image_id"] == "c" and got["compare"]["task"] == "qa"
    assert "40×10 image, mostly blue" in got["all"]["text"]
    assert emulator.stats()["requests_total"] == 2
    emulator.reset()
    assert vlmbatch(*args).code == 0 and emulator.stats()["requests_total"] == 0  # resumed
    res = vlmbatch(*args, "--max-images-per-prompt", 2)
    assert res.code == 1 and "more images than --max-images-per-prompt (2" in res.err and "row 1" in res.err
    bad = write_parquet(
        tmp_path / "bad.parquet",
        {"prompt_id": ["x"], "prompt": ["?"], "image_ids": pa.array([["a", "zz"]], pa.list_(pa.string()))},
    )
    res = vlmbatch("run", images, "--prompts", bad, "--out", tmp_path / "o2", "--base-url", emulator.base_url)
    assert res.code == 1 and "names images not in the images manifest ('zz')" in res.err
    (tmp_path / "img" / "b.jpg").unlink()  # one of a prompt's images is gone: its row fails, naming it
    res = vlmbatch(
        "run", images, "--prompts", prompts, "--out", tmp_path / "o3", "--base-url", emulator.base_url
    )
    assert res.code == 2
    failed = {r["prompt_id"]: r for r in rows(tmp_path / "o3")}["all"]
    assert failed["error_type"] == "missing_image" and failed["error_message"].startswith("image 'b': ")


def test_auto_concurrency_backs_off_under_429s(tmp_path: Path) -> None:
    images = images_manifest(tmp_path, {f"i{k:03d}": ((10 + k, 10), "red") for k in range(120)})
    settings = EmulatorSettings(latency=0.1, max_concurrency=8, reject_over_capacity=True, retry_after=0.1)
    rejected = {}
    with EmulatorServer(settings) as server:
        for mode in ("64", "auto"):
            server.reset()
            out = tmp_path / f"out-{mode}"
            args = ["run", images, "--out", out, "--base-url", server.base_url, "--concurrency", mode]
            res = vlmbatch(*args, "--max-concurrency", 64, "--max-retries", 20)
            assert res.code == 0, res.err
            assert len(rows(out)) == 120 and all(r["status"] == "ok" for r in rows(out))
            rejected[mode] = server.stats()["by_status"].get("429", 0)
    assert rejected["64"] > 40  # a fixed 64 keeps hitting the hidden capacity of 8
    assert rejected["auto"] < rejected["64"] / 2  # auto backs off to what the endpoint takes


def test_requests_per_minute_are_spaced(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, {f"i{k}": ((10 + k, 10), "red") for k in range(5)})
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url, "--rpm", 120)
    assert res.code == 0, res.err
    arrivals = sorted(entry["t"] for entry in emulator.stats()["log"])
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] >= 4 * 0.5 * 0.9  # 2 per second (transit jitter aside)


def test_json_columns_are_typed(tmp_path: Path, emulator: EmulatorServer) -> None:
    import pyarrow as pa
    import pyarrow.dataset as ds

    schema = TAGS_TEXT_SCHEMA
    images = images_manifest(tmp_path, {"a": ((20, 10), "green"), "b": ((21, 10), "green")})
    prompts = prompts_manifest(
        tmp_path,
        [
            {"prompt_id": "cap", "prompt": "Describe."},
            {"prompt_id": "meta", "prompt": "Tag.", "json_schema": json.dumps(schema)},
        ],
    )
    out = tmp_path / "out"
    base = ["run", images, "--prompts", prompts, "--out", out, "--base-url", emulator.base_url]
    assert vlmbatch(*base, "--json-columns").code == 0
    table = ds.dataset(out).to_table()
    assert table.schema.field("tags").type == pa.list_(pa.string())
    assert table.schema.field("indoor").type == pa.bool_()
    assert table.schema.field("json_text").type == pa.int64()  # "text" is a contract column
    for row in table.to_pylist():
        if row["prompt_id"] == "meta":
            document = json.loads(row["json"])
            assert (row["tags"], row["indoor"], row["json_text"]) == (
                document["tags"],
                document["indoor"],
                document["text"],
            )
        else:
            assert row["tags"] is None and row["indoor"] is None
    res = vlmbatch(*base)  # the same OUT without the typed columns: refused
    assert res.code == 1 and "its files also have caption, indoor, json_text, tags" in res.err
