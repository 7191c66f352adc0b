"""The annotate path end to end: the real CLI against the emulator on a free port."""

from __future__ import annotations

import base64
import re
import struct
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from emulator import EmulatorServer
from tests.builders import COLOURS, image_bytes, images_manifest, prompts_manifest, write_parquet
from tests.cli import rows, vlmbatch

SPECS = {
    "a": ((64, 48), "red"),
    "b": ((120, 30), "green"),
    "c": ((33, 77), "blue"),
    "d": ((1600, 1200), "yellow"),  # over the pixel budget: downscaled
}


def test_every_row_answers_its_own_image_and_prompt(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, SPECS, title=[f"T-{k}" for k in SPECS])
    prompts = prompts_manifest(
        tmp_path,
        [
            {"prompt_id": "cap", "prompt": "Describe the picture.", "image_id": None},
            {"prompt_id": "q-b", "prompt": "What is in image b?", "image_id": "b"},
            {"prompt_id": "q-d", "prompt": "Is d yellow?", "image_id": "d"},
        ],
    )
    out = tmp_path / "out"
    res = vlmbatch(
        "run", images, "--prompts", prompts, "--out", out, "--base-url", emulator.base_url, "--carry", "title"
    )
    assert res.code == 0, res.err
    got = rows(out)
    assert [(r["image_id"], r["prompt_id"]) for r in got] == [
        ("a", "cap"),
        ("b", "cap"),
        ("b", "q-b"),
        ("c", "cap"),
        ("d", "cap"),
        ("d", "q-d"),
    ]
    prompts_by_id = {"cap": "Describe the picture.", "q-b": "What is in image b?", "q-d": "Is d yellow?"}
    for r in got:
        (w, h), colour = SPECS[r["image_id"]]
        assert r["status"] == "ok" and r["error_type"] is None
        assert (r["image_width"], r["image_height"]) == (w, h)
        assert f"{r['sent_width']}×{r['sent_height']} image, mostly {colour}" in r["text"]
        assert f'Prompt: "{prompts_by_id[r["prompt_id"]]}"' in r["text"]
        assert r["title"] == f"T-{r['image_id']}"
        assert r["attempts"] == 1 and r["http_status"] == 200
        assert r["prompt_tokens"] > 0 and r["completion_tokens"] > 0
        assert r["model"] == "google/gemma-4-31b-it" and r["finish_reason"] == "stop"
        assert len(r["request_key"]) == 64 and len(r["image_sha256"]) == 64
        assert r["task"] == ("caption" if r["prompt_id"] == "cap" else "qa")
    big = next(r for r in got if r["image_id"] == "d")
    assert big["sent_width"] * big["sent_height"] <= 2304 * 280 < 1600 * 1200
    stats = emulator.stats()
    assert stats["requests_total"] == 6
    assert sorted(stats["per_item"].values()) == [1] * 6
    assert "summary" in res.out and "6" in res.out


def test_hugging_face_struct_binary_and_data_url_sources(tmp_path: Path, emulator: EmulatorServer) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "p.png").write_bytes(image_bytes((40, 40), COLOURS["green"], "PNG"))
    hf_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    hf = write_parquet(
        tmp_path / "hf.parquet",
        pa.table(
            {
                "image_id": ["bytes", "path"],
                "image": pa.array(
                    [
                        {"bytes": image_bytes((50, 20), COLOURS["red"]), "path": "ignored.jpg"},
                        {"bytes": None, "path": "img/p.png"},
                    ],
                    type=hf_type,
                ),
            }
        ),
    )
    res = vlmbatch("run", hf, "--out", tmp_path / "o1", "--base-url", emulator.base_url)
    assert res.code == 0, res.err
    texts = {r["image_id"]: r["text"] for r in rows(tmp_path / "o1")}
    assert "50×20 image, mostly red" in texts["bytes"] and "40×40 image, mostly green" in texts["path"]

    data_url = "data:image/jpeg;base64," + base64.b64encode(image_bytes((30, 60), COLOURS["blue"])).decode()
    binary = write_parquet(
        tmp_path / "bin.parquet",
        {
            "image_id": [1, 2],
            "image": pa.array([image_bytes((70, 10), COLOURS["yellow"]), None], pa.binary()),
        },
    )
    res = vlmbatch("run", binary, "--out", tmp_path / "o2", "--base-url", emulator.base_url)
    assert res.code == 2
    got = rows(tmp_path / "o2")
    assert "70×10 image, mostly yellow" in got[0]["text"] and got[0]["image_id"] == "1"
    assert got[1]["error_type"] == "missing_image" and got[1]["attempts"] == 0
    urls = write_parquet(tmp_path / "urls.parquet", {"image_id": ["u"], "image": [data_url]})
    res = vlmbatch("run", urls, "--out", tmp_path / "o3", "--base-url", emulator.base_url)
    assert res.code == 0 and "30×60 image, mostly blue" in rows(tmp_path / "o3")[0]["text"]


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb) with almost no data."""
    small = image_bytes((1, 1), (0, 0, 0), "PNG")
    ihdr = struct.pack(">II", width, height) + small[24:29]
    chunk = b"IHDR" + ihdr
    return small[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + small[33:]


def test_bad_images_become_failed_rows_and_good_ones_succeed(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    folder = tmp_path / "m"
    (folder / "img").mkdir(parents=True)
    (folder / "img" / "good.jpg").write_bytes(image_bytes((20, 20), COLOURS["red"]))
    (folder / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "img" / "text.jpg").write_bytes(b"just some text, no image at all")
    (folder / "img" / "bomb.png").write_bytes(_png_claiming(40_000, 40_000))
    (tmp_path / "outside.jpg").write_bytes(image_bytes((20, 20), COLOURS["red"]))
    manifest = write_parquet(
        folder / "images.parquet",
        {
            "image_id": ["good", "missing", "corrupt", "text", "bomb", "outside", "null"],
            "image": [
                "img/good.jpg",
                "img/nope.jpg",
                "img/corrupt.jpg",
                "img/text.jpg",
                "img/bomb.png",
                "../outside.jpg",
                None,
            ],
        },
    )
    out = tmp_path / "out"
    res = vlmbatch("run", manifest, "--out", out, "--base-url", emulator.base_url)
    assert res.code == 2, res.err
    got = {r["image_id"]: r for r in rows(out)}
    assert len(got) == 7
    assert got["good"]["status"] == "ok"
    expected = {
        "missing": ("missing_image", "nope.jpg"),
        "corrupt": ("bad_image", "cannot decode the image: Truncated"),
        "text": ("bad_image", "cannot identify image file"),
        "bomb": ("bad_image", "decompression bomb"),
        "outside": ("bad_image", "outside the image root"),
        "null": ("missing_image", "null"),
    }
    for image_id, (error_type, words) in expected.items():
        row = got[image_id]
        assert (row["status"], row["error_type"], row["attempts"]) == ("failed", error_type, 0)
        assert words in row["error_message"]
        assert row["text"] is None
    assert emulator.stats()["requests_total"] == 1  # only the good image was sent
    assert "bad_image" in res.out and "missing_image" in res.out


def test_a_400_is_sent_once_and_never_retried(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red"), "b": ((12, 10), "blue")})
    out = tmp_path / "out"
    # more output tokens than the model's context: the server answers 400
    res = vlmbatch("run", images, "--out", out, "--base-url", emulator.base_url, "--max-tokens", 500_000)
    assert res.code == 2
    for r in rows(out):
        assert (r["status"], r["error_type"], r["http_status"], r["attempts"]) == (
            "failed",
            "bad_request",
            400,
            1,
        )
        assert "max_tokens" in r["error_message"] or "too large" in r["error_message"]
    stats = emulator.stats()
    assert stats["requests_total"] == 2 and sorted(stats["per_item"].values()) == [1, 1]


def test_a_429_with_retry_after_is_retried_after_the_delay(tmp_path: Path, emulator: EmulatorServer) -> None:
    emulator.configure(fault_script=["429"], retry_after=1.0)
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url)
    assert res.code == 0, res.err
    (row,) = rows(tmp_path / "out")
    assert (row["status"], row["attempts"], row["http_status"]) == ("ok", 2, 200)
    log = emulator.stats()["log"]
    assert [entry["status"] for entry in log] == [429, 200]
    assert log[1]["t"] - log[0]["t"] >= 1.0  # Retry-After honoured


def test_transient_faults_are_retried_until_every_row_is_ok(tmp_path: Path, emulator: EmulatorServer) -> None:
    emulator.configure(
        fault_rate=0.5,
        fault_kinds=["500", "503", "reset", "malformed"],
        fault_mode="first_attempt",
        retry_after=0.1,
    )
    specs = {f"i{k}": ((10 + k, 10), "red") for k in range(12)}
    images = images_manifest(tmp_path, specs)
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url)
    assert res.code == 0, res.err
    got = rows(tmp_path / "out")
    assert len(got) == 12 and all(r["status"] == "ok" for r in got)
    stats = emulator.stats()
    faults = sum(stats["faults"].values())
    assert faults > 0
    assert sum(r["attempts"] for r in got) == stats["requests_total"] == 12 + faults


def test_requests_in_flight_are_bounded_by_concurrency(tmp_path: Path, emulator: EmulatorServer) -> None:
    emulator.configure(latency=0.15)
    specs = {f"i{k}": ((10 + k, 10), "red") for k in range(16)}
    images = images_manifest(tmp_path, specs)
    res = vlmbatch(
        "run",
        images,
        "--out",
        tmp_path / "out",
        "--base-url",
        emulator.base_url,
        "--concurrency",
        3,
        "--shard-size",
        5,
    )
    assert res.code == 0, res.err
    assert emulator.stats()["max_in_flight"] == 3
    assert len(rows(tmp_path / "out")) == 16
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 4  # one file per shard


def test_preflight_wrong_model_or_unreachable_endpoint_exit_3_before_sending(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    res = vlmbatch(
        "run", images, "--out", tmp_path / "o1", "--base-url", emulator.base_url, "--model", "nope"
    )
    assert res.code == 3
    assert "does not serve the model 'nope'; it serves: google/gemma-4-31b-it" in res.err
    assert emulator.stats()["requests_total"] == 0 and not (tmp_path / "o1").exists()
    unreachable = ["--base-url", "http://127.0.0.1:9/v1", "--outage-window", 1.5]
    res = vlmbatch("run", images, "--out", tmp_path / "o2", *unreachable)
    assert res.code == 3
    assert "cannot reach the endpoint at http://127.0.0.1:9/v1/models" in res.err
    assert re.search(r"\(after \d+ s of trying\)", res.err)  # retried first, as the run would be
    root = emulator.base_url.removesuffix("/v1")  # the commonest mistake: the base URL without /v1
    res = vlmbatch("run", images, "--out", tmp_path / "o3", "--base-url", root)
    assert res.code == 3
    assert f"the base URL lacks its /v1; use --base-url {root}/v1" in res.err
    assert emulator.stats()["requests_total"] == 0 and not (tmp_path / "o3").exists()


def test_without_preflight_the_requests_tell_the_same(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    base = ["run", images, "--no-preflight"]
    res = vlmbatch(*base, "--out", tmp_path / "o1", "--base-url", emulator.base_url, "--model", "nope")
    assert res.code == 3
    assert "404" in res.err and "does not exist" in res.err
    assert emulator.stats()["requests_total"] == 1
    res = vlmbatch(*base, "--out", tmp_path / "o2", "--base-url", "http://127.0.0.1:9/v1", "--max-retries", 1)
    assert res.code == 3
    assert "could not be reached" in res.err and "http://127.0.0.1:9/v1" in res.err


def test_a_gateway_asking_to_wait_for_hours_stops_the_run_with_exit_3(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """Retry-After beyond what a run waits (300 s): the endpoint is unusable for this run. Without the
    verdict each item waited out the cap on every retry, for hours, and failed anyway."""
    images = images_manifest(tmp_path, {f"i{k}": ((10 + k, 10), "red") for k in range(6)})
    emulator.configure(fault_rate=1.0, fault_kinds=["429"], retry_after=86400)
    res = vlmbatch(
        "run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url, "--concurrency", 2
    )
    assert res.code == 3, res.err
    assert "asks to wait 86400 s before trying again (Retry-After, HTTP 429)" in res.err
    assert emulator.stats()["requests_total"] <= 2  # those in flight when the first answer came
    assert rows(tmp_path / "out") == []  # nothing failed for it: the rerun asks every item
    res = vlmbatch(
        "run", images, "--out", tmp_path / "once", "--base-url", emulator.base_url, "--max-retries", 0
    )
    assert res.code == 3 and rows(tmp_path / "once") == []  # not a rate_limited row either, retries or not


def test_reasoning_shown_hidden_and_per_prompt(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    prompts = write_parquet(
        tmp_path / "p.parquet",
        {"prompt_id": ["think", "quick"], "prompt": ["Why?", "What?"], "reasoning": pa.array([None, False])},
    )
    base = ["run", images, "--prompts", prompts, "--base-url", emulator.base_url]
    assert vlmbatch(*base, "--out", tmp_path / "o1", "--reasoning").code == 0
    got = {r["prompt_id"]: r for r in rows(tmp_path / "o1")}
    assert got["think"]["reasoning"] and '"Why?"' in got["think"]["reasoning"]
    assert got["quick"]["reasoning"] is None  # the prompt's own column turned it off
    assert vlmbatch(*base, "--out", tmp_path / "o2", "--reasoning", "--hide-reasoning").code == 0
    assert all(r["reasoning"] is None for r in rows(tmp_path / "o2"))
    assert vlmbatch(*base, "--out", tmp_path / "o3").code == 0
    assert all(r["reasoning"] is None for r in rows(tmp_path / "o3"))


def test_limit_dry_run_and_config_file(tmp_path: Path, emulator: EmulatorServer) -> None:
    specs = {f"i{k}": ((10 + k, 10), "red") for k in range(5)}
    images = images_manifest(tmp_path, specs)
    toml = tmp_path / "vlmbatch.toml"
    toml.write_text(f'base-url = "{emulator.base_url}"\nlimit = 3\n')
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--config", toml)
    assert res.code == 0, res.err
    assert [r["image_id"] for r in rows(tmp_path / "out")] == ["i0", "i1", "i2"]

    emulator.reset()
    (tmp_path / "img" / "i4.jpg").write_bytes(b"garbage")
    res = vlmbatch("run", images, "--out", tmp_path / "dry", "--base-url", emulator.base_url, "--dry-run")
    assert res.code == 2  # one image would fail
    assert emulator.stats()["requests_total"] == 0
    assert not (tmp_path / "dry").exists()
    assert "dry run" in res.out and "bad_image" in res.out
    assert "would fail: image 'i4', prompt 'caption': bad_image: " in res.out  # which one, and why


def test_api_key_is_sent_and_never_shown(tmp_path: Path) -> None:
    from emulator import EmulatorSettings

    images = images_manifest(tmp_path, {f"i{k}": ((10 + k, 10), "red") for k in range(4)})
    with EmulatorServer(EmulatorSettings(latency=0.0, api_key="sk-right-key")) as server:
        res = vlmbatch(
            "run",
            images,
            "--out",
            tmp_path / "ok",
            "--base-url",
            server.base_url,
            env={"VLMBATCH_API_KEY": "sk-right-key"},
        )
        assert res.code == 0, res.err
        wrong = {"MY_KEY": "sk-wrong-key-123"}
        bad = ["run", images, "--base-url", server.base_url, "--concurrency", 1, "--api-key-env", "MY_KEY"]
        res = vlmbatch(*bad, "--out", tmp_path / "bad", env=wrong)
        assert res.code == 3
        assert "rejected the credentials (HTTP 401); check the key in $MY_KEY" in res.err
        assert server.stats()["requests_total"] == 4  # the preflight refused it: no chat request sent
        assert "sk-wrong-key-123" not in res.out + res.err
        res = vlmbatch(*bad, "--out", tmp_path / "bad", "--no-preflight", env=wrong)
        assert res.code == 3
        assert "rejected the credentials" in res.err
        assert server.stats()["requests_total"] == 4 + 3  # aborted after three refusals in a row
        assert "sk-wrong-key-123" not in res.out + res.err
        for path in (tmp_path / "bad").rglob("*"):
            assert not path.is_file() or b"sk-wrong-key-123" not in path.read_bytes()


@pytest.mark.parametrize(
    ("images_cols", "prompt_rows", "message"),
    [
        ({"image_id": ["a", "a"], "image": ["x", "y"]}, None, "duplicate image_id values 'a' in rows 0, 1"),
        ({"id": ["a"], "image": ["x"]}, None, "missing column 'image_id'"),
        (
            {"image_id": ["a"], "image": ["x"]},
            [{"prompt_id": "p", "prompt": "q", "image_id": "zz"}],
            "names images not",
        ),
        (
            {"image_id": ["a"], "image": ["x"]},
            [{"prompt_id": "p", "prompt": ""}],
            "'prompt' is null or empty in row 0",
        ),
    ],
)
def test_bad_manifest_exits_1_before_anything_is_sent_or_written(
    tmp_path: Path, emulator: EmulatorServer, images_cols: dict, prompt_rows: list | None, message: str
) -> None:
    images = write_parquet(tmp_path / "images.parquet", images_cols)
    args = ["run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url]
    if prompt_rows is not None:
        args += ["--prompts", prompts_manifest(tmp_path, prompt_rows)]
    res = vlmbatch(*args)
    assert res.code == 1
    assert message in res.err and str(tmp_path) in res.err
    assert emulator.stats()["requests_total"] == 0
    assert not (tmp_path / "out").exists()


def test_not_parquet_and_bad_option_exit_1(tmp_path: Path, emulator: EmulatorServer) -> None:
    bogus = tmp_path / "images.parquet"
    bogus.write_text("image_id,image\na,b\n")
    res = vlmbatch("run", bogus, "--out", tmp_path / "out", "--base-url", emulator.base_url)
    assert res.code == 1 and "is not a readable Parquet file" in res.err and "images.parquet" in res.err
    res = vlmbatch("run", bogus, "--out", tmp_path / "out", "--concurrency", 0)
    assert res.code == 1 and "--concurrency" in res.err
    assert emulator.stats()["requests_total"] == 0
    assert not (tmp_path / "out").exists()


def test_inspect_summarises_an_output(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    (tmp_path / "img" / "b.jpg").write_bytes(b"nope")
    manifest = write_parquet(
        tmp_path / "two.parquet", {"image_id": ["a", "b"], "image": ["img/a.jpg", "img/b.jpg"]}
    )
    assert images.exists()
    vlmbatch("run", manifest, "--out", tmp_path / "out", "--base-url", emulator.base_url)
    res = vlmbatch("inspect", tmp_path / "out")
    assert res.code == 0
    assert "work items" in res.out and "bad_image" in res.out and "latency p50" in res.out
    assert vlmbatch("inspect", tmp_path / "nothing").code == 1
    # a file of an older run without latency_ms, listed first, and a run writing OUT right now
    from tasks.outputs.lock import OutLock
    from tasks.row import OUTPUT_SCHEMA

    row = {name: None for name in OUTPUT_SCHEMA.names} | {"image_id": "z", "prompt_id": "p", "status": "ok"}
    old = pa.Table.from_pylist([row], OUTPUT_SCHEMA).drop_columns(["latency_ms"])
    write_parquet(tmp_path / "out" / "part-000000-0ld.parquet", old)
    lock = OutLock(tmp_path / "out", "run-9")
    lock.acquire()
    try:
        res = vlmbatch("inspect", tmp_path / "out")
    finally:
        lock.release()
    assert res.code == 0, res.err
    assert "is being written by run run-9" in res.err and "snapshot" in res.err
    counts = {
        line.split("│")[1].strip(): line.split("│")[2].strip()
        for line in res.out.splitlines()
        if line.count("│") == 3
    }
    assert (counts["work items"], counts["ok"], counts["failed"]) == ("3", "2", "1")


def test_a_hung_request_times_out_and_is_retried(tmp_path: Path, emulator: EmulatorServer) -> None:
    emulator.configure(fault_script=["hang"], hang_seconds=5.0)
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    res = vlmbatch(
        "run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url, "--request-timeout", 0.5
    )
    assert res.code == 0, res.err
    (row,) = rows(tmp_path / "out")
    assert (row["status"], row["attempts"]) == ("ok", 2)
    assert row["latency_ms"] < 500  # of the last attempt


def test_a_length_cut_answer_is_an_ok_row_and_counted(tmp_path: Path, emulator: EmulatorServer) -> None:
    images = images_manifest(tmp_path, {"a": ((10, 10), "red"), "b": ((11, 10), "red")})
    res = vlmbatch(
        "run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url, "--max-tokens", 3
    )
    assert res.code == 0, res.err
    for row in rows(tmp_path / "out"):
        assert (row["status"], row["finish_reason"], row["error_type"]) == ("ok", "length", None)
        assert row["completion_tokens"] <= 3 and len(row["text"]) <= 12
    assert "length: 2" in res.out


def test_no_answer_text_is_a_failed_row_not_an_ok_one(tmp_path: Path, emulator: EmulatorServer) -> None:
    """With reasoning on, a small budget can go entirely to the reasoning: no text, so not ok."""
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    base = ["run", images, "--base-url", emulator.base_url, "--reasoning", "--max-tokens", 3]
    res = vlmbatch(*base, "--out", tmp_path / "out")
    assert res.code == 2, res.err
    (row,) = rows(tmp_path / "out")
    assert (row["status"], row["error_type"], row["text"]) == ("failed", "no_answer", None)
    assert row["error_message"] == (
        "the model gave no answer text: the output budget ran out (3 tokens, on reasoning); "
        "raise --max-tokens or the prompt's max_tokens"
    )
    assert (row["finish_reason"], row["completion_tokens"], row["attempts"]) == ("length", 3, 1)
    assert emulator.stats()["requests_total"] == 1  # not retried: the same budget gives the same answer


def test_api_key_from_a_prefect_secret_block_stays_out_of_parameters(tmp_path: Path) -> None:
    import asyncio

    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    from emulator import EmulatorSettings

    Secret(value="sk-from-block-42").save("vlmbatch-test-key", overwrite=True)
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")})
    with EmulatorServer(EmulatorSettings(latency=0.0, api_key="sk-from-block-42")) as server:
        base = ["run", images, "--base-url", server.base_url]
        res = vlmbatch(*base, "--out", tmp_path / "ok", "--api-key-secret", "vlmbatch-test-key")
        assert res.code == 0, res.err
        res = vlmbatch(*base, "--out", tmp_path / "no", "--api-key-secret", "no-such-block")
        assert res.code == 1 and "no Prefect Secret block named 'no-such-block'" in res.err

    async def parameters() -> list[dict]:
        async with get_client() as client:
            runs = await client.read_flow_runs(limit=5, sort=FlowRunSort.START_TIME_DESC)
            return [run.parameters for run in runs]

    dumped = repr(asyncio.run(parameters()))
    assert "vlmbatch-test-key" in dumped and "sk-from-block-42" not in dumped


def test_a_manifest_of_large_strings_as_pandas_3_writes_runs(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    import pyarrow.parquet as pq

    images = images_manifest(tmp_path, {"a": ((10, 10), "red"), "b": ((12, 10), "blue")})
    table = pq.read_table(images)
    large = pa.schema([pa.field(f.name, pa.large_string()) for f in table.schema])
    pq.write_table(table.cast(large), images)  # pandas 3 stores str columns as large_string
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url)
    assert res.code == 0, res.err
    assert [(r["image_id"], r["status"]) for r in rows(tmp_path / "out")] == [("a", "ok"), ("b", "ok")]


def test_a_run_with_failed_rows_ends_in_a_state_that_says_so(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """A deployment's run has no exit status: its state must tell a run with failed rows from a clean one."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import FlowRunSort

    images = images_manifest(tmp_path, {"a": ((10, 10), "red"), "b": ((12, 10), "blue")})

    async def last_state() -> tuple[str | None, str | None]:
        async with get_client() as client:
            (run,) = await client.read_flow_runs(limit=1, sort=FlowRunSort.START_TIME_DESC)
            assert run.state is not None and run.state.is_completed()
            return run.state.name, run.state.message

    base = ["run", images, "--base-url", emulator.base_url]
    assert vlmbatch(*base, "--out", tmp_path / "clean").code == 0
    assert asyncio.run(last_state())[0] == "Completed"
    (tmp_path / "img" / "b.jpg").write_bytes(b"not an image")
    res = vlmbatch(*base, "--out", tmp_path / "failed")
    assert res.code == 2, res.err
    assert "more" not in res.out and "would fail" not in res.out  # lists of failures are for dry runs
    assert asyncio.run(last_state()) == (
        "CompletedWithFailures",
        "1 of 2 rows failed (bad_image: 1); a rerun retries them",
    )


def test_a_carried_column_non_nullable_in_one_file_and_null_in_another(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """The output's carried column took the first file's nullability: the writer refused the nulls of the
    second after every request was sent, and every rerun sent them again (exit 70)."""
    from tests.builders import write_images, write_parquet

    write_images(tmp_path / "m" / "img", {"a": ((10, 10), "red"), "b": ((12, 10), "blue")})
    strict = pa.schema(
        [("image_id", pa.string()), ("image", pa.string()), pa.field("lbl", pa.string(), False)]
    )
    write_parquet(tmp_path / "m" / "1.parquet", pa.table([["a"], ["img/a.jpg"], ["x"]], schema=strict))
    write_parquet(
        tmp_path / "m" / "2.parquet",
        {"image_id": ["b"], "image": ["img/b.jpg"], "lbl": pa.array([None], pa.string())},
    )
    args = [
        "run",
        tmp_path / "m",
        "--out",
        tmp_path / "out",
        "--base-url",
        emulator.base_url,
        "--carry",
        "lbl",
    ]
    res = vlmbatch(*args)
    assert res.code == 0, res.err
    assert [(r["image_id"], r["lbl"]) for r in rows(tmp_path / "out")] == [("a", "x"), ("b", None)]
    emulator.reset()
    assert vlmbatch(*args).code == 0 and emulator.stats()["requests_total"] == 0


def test_nanosecond_times_are_carried_exactly_without_pandas(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    """As Python objects they need pandas (not a dependency: the run crashed, exit 70) and lose the ns."""
    ns = 1704067200000000001
    carried = {
        "ts": pa.array([ns], pa.timestamp("ns", tz="UTC")),
        "t": pa.array([ns % 86_400_000_000_000], pa.time64("ns")),
        "d": pa.array([7], pa.duration("ns")),
    }
    images = images_manifest(tmp_path, {"a": ((10, 10), "red")}, **carried)
    args = ["--carry", "ts", "--carry", "t", "--carry", "d"]
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url, *args)
    assert res.code == 0, res.err
    table = ds.dataset(tmp_path / "out", format="parquet").to_table()
    for name, column in carried.items():
        assert table[name].combine_chunks().equals(column), name


def test_an_empty_manifest_leaves_an_output_with_the_contracts_columns(
    tmp_path: Path, emulator: EmulatorServer
) -> None:
    from tests.builders import write_parquet

    images = write_parquet(
        tmp_path / "images.parquet",
        {"image_id": pa.array([], pa.string()), "image": pa.array([], pa.string())},
    )
    res = vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url)
    assert res.code == 0, res.err
    dataset = ds.dataset(tmp_path / "out", format="parquet")
    assert dataset.schema.names[:4] == ["image_id", "prompt_id", "task", "status"]
    assert dataset.count_rows() == 0
    shown = vlmbatch("inspect", tmp_path / "out")
    assert shown.code == 0, shown.err
    assert vlmbatch("run", images, "--out", tmp_path / "out", "--base-url", emulator.base_url).code == 0
    assert len(list((tmp_path / "out").glob("part-*.parquet"))) == 1  # not one more per rerun
