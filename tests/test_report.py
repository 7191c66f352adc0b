"""``vlmbatch report`` without a browser: the figures against OUT, the stratified sample, thumbnails from
every kind of image cell, escaping, and the command's checks. (tests/test_report_browser.py renders it.)"""

from __future__ import annotations

import base64
import html
import http.server
import io
import json
import random
import re
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.config import ImageConfig
from tasks.inputs.manifests import read_images_manifest
from tasks.outputs import reading, report_data
from tasks.outputs.layout import foreign_entries
from tasks.outputs.report import is_report
from tasks.outputs.report_data import OK, _Sampler, collect_report, outcome_of
from tasks.outputs.report_html import GENERATOR, _pretty_json, render_report
from tasks.outputs.report_images import make_thumbnails
from tasks.outputs.summary import percentile
from tests.builders import COLOURS, image_bytes, write_parquet
from tests.cli import vlmbatch
from tests.report_builders import SCRIPT_ANSWER, every_kind_manifest, make_rows, write_out


@pytest.fixture(scope="module")
def big_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_out(tmp_path_factory.mktemp("report") / "out", make_rows(3000), files=7)


def test_the_figures_are_those_of_the_whole_output(big_out: Path) -> None:
    data = collect_report(big_out, sample=50)
    table = ds.dataset(big_out, format="parquet").to_table()
    assert data.rows == table.num_rows == 3005 and data.files == 7
    statuses = Counter(table["status"].to_pylist())
    assert (data.ok, data.failed) == (statuses["ok"], statuses["failed"])
    assert data.errors == dict(Counter(e for e in table["error_type"].to_pylist() if e))
    assert set(data.errors) == {"timeout", "bad_image", "invalid_json"}
    assert data.prompt_tokens == pc.sum(table["prompt_tokens"]).as_py()
    assert data.completion_tokens == pc.sum(table["completion_tokens"]).as_py()
    assert data.requests == pc.sum(table["attempts"]).as_py()
    ok = table.filter(pc.equal(table["status"], "ok"))
    latencies = ok["latency_ms"].drop_null().to_pylist()
    for got, q in ((data.latency_p50_ms, 50), (data.latency_p95_ms, 95)):
        exact = percentile(latencies, q)
        assert got is not None and exact is not None and abs(got - exact) <= 0.01 * exact + 0.1
    assert data.output_tokens == dict(
        sorted(Counter(ok["completion_tokens"].drop_null().to_pylist()).items())
    )
    by_prompt = Counter(zip(table["prompt_id"].to_pylist(), table["status"].to_pylist(), strict=True))
    for prompt_id, counts in data.prompts.items():
        assert counts.rows == by_prompt[(prompt_id, "ok")] + by_prompt[(prompt_id, "failed")]
        assert counts.ok == by_prompt[(prompt_id, "ok")]
    assert set(data.prompts) == {"caption", "qa", "json", "rare", "text-0", "text-1"}
    assert data.models == {"google/gemma-4-31b-it": 3005}
    assert [(r.run_id, r.rows) for r in data.runs] == [("run-a", 1500), ("run-b", 1505)]
    assert data.rows_per_s is not None and data.rows_per_s > 0


def test_the_sample_shows_every_prompt_and_error_type_and_shares_the_rest(big_out: Path) -> None:
    data = collect_report(big_out, sample=40)
    sample = data.sample
    assert len(sample) == 40
    assert {r.prompt_id for r in sample} == set(data.prompts)
    assert {r.outcome for r in sample} == {OK, *data.errors}
    assert sum(r.status == "failed" for r in sample) == 20  # half for failed rows, half for ok ones
    strata = Counter((r.prompt_id, r.outcome) for r in sample)
    assert strata[("rare", OK)] == 3 and strata[("text-0", OK)] == 1  # small strata whole
    big = [n for (p, o), n in strata.items() if p in ("caption", "qa", "json") and o == OK]
    assert len(big) == 3 and max(big) - min(big) <= 1  # the large strata share what is left evenly
    failed = [n for (_, o), n in strata.items() if o != OK]
    assert max(failed) - min(failed) <= 1
    few = collect_report(big_out, sample=400)  # more than the failed rows: the ok side takes the rest
    assert sum(r.status == "failed" for r in few.sample) == data.failed < 200 and len(few.sample) == 400
    assert len({(r.image_id, r.prompt_id) for r in sample}) == 40
    texts = {r.text for r in sample if r.status == "ok"}
    assert None not in texts  # the answers were read back from the files
    assert sample == sorted(sample, key=lambda r: (r.image_id is None, r.image_id or "", r.prompt_id))


def test_the_same_output_gives_the_same_sample_and_page_however_its_files_are_cut(
    big_out: Path, tmp_path: Path
) -> None:
    first = collect_report(big_out, sample=60)
    again = collect_report(big_out, sample=60)
    assert render_report(first, None) == render_report(again, None)
    rows = make_rows(3000)
    random.Random(3).shuffle(rows)
    other = write_out(tmp_path / "other", rows, files=3)  # the same rows, other files, other order
    recut = collect_report(other, sample=60)
    assert [(r.image_id, r.prompt_id) for r in recut.sample] == [
        (r.image_id, r.prompt_id) for r in first.sample
    ]
    assert (recut.ok, recut.errors, recut.latency_p95_ms) == (first.ok, first.errors, first.latency_p95_ms)


def test_the_sampler_keeps_few_candidates_and_chooses_as_if_it_kept_all() -> None:
    rng = random.Random(5)
    strata = [(f"p{i}", o) for i in range(6) for o in (OK, "timeout", "bad_image")]
    weights = [50 if o == OK else 1 if o == "timeout" else 0.01 for _, o in strata]
    rows = [(rng.choices(strata, weights)[0], rng.getrandbits(64)) for _ in range(20_000)]
    for n in (1, 5, 30, 200):
        pruned, kept_all = _Sampler(n), _Sampler(n)
        most = 0
        for i, (stratum, rank) in enumerate(rows):
            pruned.add(stratum, rank, 0, i)
            kept_all.add(stratum, rank, 0, i)
            if i % 1000 == 999:
                pruned.prune()  # after each "file"
                most = max(most, sum(len(h) for h in pruned.heaps.values()))
        pruned.prune()
        assert sorted(pruned.choose()) == sorted(kept_all.choose())
        assert len(pruned.choose()) == n
        assert most <= n + 2 * len(strata)  # bounded by the sample, not by the rows
    assert _Sampler(0).choose() == []


def test_outcomes() -> None:
    assert outcome_of("ok", None) == "ok" and outcome_of("failed", "timeout") == "timeout"
    assert outcome_of("failed", None) == "failed"


def test_every_value_is_escaped_and_nothing_is_fetched(tmp_path: Path) -> None:
    rows = make_rows(40)
    rows[0].prompt_id = '<img src=x onerror="window.__pwned=2">'
    rows[1].status, rows[1].text, rows[1].error_type = "failed", None, "timeout"
    rows[1].error_message = "</pre><script>window.__pwned=3</script>"
    rows[2].json = '{"caption": "<script>x</script>"}'
    rows[3].reasoning = "</details><script>window.__pwned=4</script>"
    out = write_out(tmp_path / "out", rows, files=1)
    page = render_report(collect_report(out, sample=100), None)
    assert page.count("<script") == 1 and "window.__pwned" not in page.split("<script>")[1]
    assert "&lt;script&gt;window.__pwned = 1&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=&quot;window.__pwned=2&quot;&gt;" in page
    assert "<img" not in page  # no --images, no thumbnails (and the prompt id above is text)
    assert "default-src &#x27;none&#x27;" in page  # the CSP, escaped in its attribute
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page, re.I)
    assert "<link" not in page and "@import" not in page and "url(" not in page


def test_an_answer_that_is_only_a_function_call_is_shown_pretty_printed_and_escaped(tmp_path: Path) -> None:
    rows = make_rows(10)
    arguments = {"count": 3, "label": "<script>window.__pwned=5</script>"}
    calls = json.dumps([{"name": "record_detections", "arguments": arguments}], separators=(",", ":"))
    rows[0].text, rows[0].tool_calls = None, calls
    out = write_out(tmp_path / "out", rows, files=1)
    data = collect_report(out, sample=100)
    (called,) = [r for r in data.sample if r.tool_calls is not None]
    assert (called.text, called.tool_calls) == (None, calls)
    card = next(c for c in render_report(data, None).split("<article")[1:] if "record_detections" in c)
    shown = html.unescape(re.search(r'<pre class="calls"[^>]*>(.*?)</pre>', card, re.S).group(1))
    assert json.loads(shown) == json.loads(calls) and shown == json.dumps(json.loads(calls), indent=2)
    assert "<script>" not in card and "&lt;script&gt;window.__pwned=5&lt;/script&gt;" in card


def test_json_too_deep_to_parse_or_indent_is_shown_as_it_is() -> None:
    # About a thousand levels: Python 3.11's json.loads raises RecursionError, 3.12's parses but
    # json.dumps(indent=2) raises it; far deeper, every version's json.loads does.
    for depth in (990, 1000, 1200, 100_000):
        text = '{"a": ' * depth + "1" + "}" * depth
        shown = _pretty_json(text)
        assert shown == text or json.loads(shown) == json.loads(text)


def test_a_card_shows_json_and_calls_too_deep_to_read_as_they_are_escaped(tmp_path: Path) -> None:
    rows = make_rows(10)
    deep = '{"a": ' * 100_000 + '"<b>deep</b>"' + "}" * 100_000
    calls = '[{"name": "f", "arguments": ' + deep + "}]"
    rows[0].json, (rows[1].text, rows[1].tool_calls) = deep, (None, calls)
    out = write_out(tmp_path / "out", rows, files=1)
    page = render_report(collect_report(out, sample=100), None)
    assert html.escape(deep) in page and html.escape(calls) in page and "<b>deep" not in page


@pytest.fixture
def images(tmp_path: Path) -> Path:
    return every_kind_manifest(tmp_path)


def _decoded(url: str | None) -> Image.Image:
    assert url is not None and url.startswith("data:image/jpeg;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_thumbnails_from_every_kind_of_cell_and_a_note_for_each_failure(images: Path) -> None:
    manifest = read_images_manifest(images)
    wanted = ["path", "file-url", "data-url", "binary", "hf-bytes", "hf-path", "missing", "outside", "broken",
              "ftp", "unknown"]  # fmt: skip
    thumbs = make_thumbnails(manifest, wanted, ImageConfig(), image_root=images)
    sizes = {image_id: _decoded(thumbs[image_id].url).size for image_id in wanted[:6]}
    assert sizes == {"path": (160, 120), "file-url": (160, 120), "data-url": (160, 53), "binary": (160, 53),
                     "hf-bytes": (40, 160), "hf-path": (160, 120)}  # fmt: skip
    notes = {image_id: thumbs[image_id].note or "" for image_id in wanted[6:]}
    assert notes["missing"].startswith("missing_image: image file img/nowhere.jpg does not exist")
    assert notes["outside"].startswith("bad_image: image path ../outside.jpg resolves outside the image root")
    assert notes["broken"].startswith("bad_image: cannot identify image file")
    assert notes["ftp"].startswith("bad_image: unsupported image source scheme ftp://")
    assert notes["unknown"] == "not in the images manifest"
    assert all(thumbs[i].url is None for i in wanted[6:])


class _Images(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = image_bytes((200, 200), COLOURS["blue"])
        self.send_response(200 if self.path == "/cat.jpg" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def http_base() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_images_are_fetched_like_run_does_guard_included(tmp_path: Path, http_base: str) -> None:
    path = write_parquet(
        tmp_path / "images.parquet",
        {"image_id": ["cat", "gone"], "image": [f"{http_base}/cat.jpg", f"{http_base}/x.jpg"]},
    )
    manifest = read_images_manifest(path)
    refused = make_thumbnails(manifest, ["cat"], ImageConfig(), image_root=tmp_path)["cat"]
    assert (
        refused.url is None
        and "private address" in (refused.note or "")
        and "--allow-private-urls" in (refused.note or "")
    )
    allowed = make_thumbnails(
        manifest, ["cat", "gone"], ImageConfig(allow_private_urls=True), image_root=tmp_path
    )
    assert _decoded(allowed["cat"].url).size == (160, 160)
    assert (allowed["gone"].note or "").startswith("missing_image:")


def test_the_report_command(tmp_path: Path, images: Path) -> None:
    rows = make_rows(30, images=3)
    for row, image_id in zip(rows, ["path", "binary", "missing"] * 10, strict=False):
        row.image_id = image_id if row.prompt_id != "rare" else row.image_id
    out = write_out(tmp_path / "out", rows, files=2)
    page = tmp_path / "report.html"
    res = vlmbatch("report", out, "--images", images, "-o", page, "--sample", "25")
    assert res.code == 0, res.err
    assert re.fullmatch(r"wrote .*report\.html \(\d+ KB\): 35 rows, 25 in the gallery, \d thumbnails "
                        r"\(\d images unavailable\)\n", res.out)  # fmt: skip
    text = page.read_text()
    assert text.count('<img src="data:image/jpeg;base64,') >= 2 and "no image: missing_image" in text
    assert SCRIPT_ANSWER not in text
    assert vlmbatch("report", out, "-o", page).code == 0 and "<img" not in page.read_text()  # replaced

    assert vlmbatch("report", out, "-o", out / "r.html").code == 1
    assert not (out / "r.html").exists()
    res = vlmbatch("report", tmp_path, "-o", page)
    assert res.code == 1 and "holds no vlmbatch part files" in res.err
    res = vlmbatch("report", out, "-o", page, "--sample", "-1")
    assert res.code == 1 and "--sample" in res.err
    res = vlmbatch("report", out, "--images", tmp_path / "nope.parquet", "-o", page)
    assert res.code == 1 and "does not exist" in res.err


def test_report_replaces_only_an_earlier_report_unless_forced(tmp_path: Path) -> None:
    out = write_out(tmp_path / "out", make_rows(20), files=1)
    notes = tmp_path / "notes.html"
    notes.write_text("<!doctype html><title>my notes</title>")
    res = vlmbatch("report", out, "-o", notes)
    assert (
        res.code == 1 and f"{notes} exists and is not an earlier report" in res.err and "--force" in res.err
    )
    assert notes.read_text() == "<!doctype html><title>my notes</title>"
    assert vlmbatch("report", out, "-o", notes, "--force").code == 0
    page = notes.read_text()
    assert GENERATOR in page.splitlines()[1] and is_report(notes)
    assert vlmbatch("report", out, "-o", notes, "--sample", "3").code == 0  # an earlier report: replaced
    assert notes.read_text() != page

    before_the_mark = tmp_path / "old.html"  # a report written before GENERATOR: replaced too
    before_the_mark.write_text(page.replace(GENERATOR, ""))
    assert (
        vlmbatch("report", out, "-o", before_the_mark).code == 0 and GENERATOR in before_the_mark.read_text()
    )
    late = tmp_path / "late.html"  # the mark must be in the head, not anywhere in a big file
    late.write_text("<!doctype html>" + "x" * 5000 + GENERATOR)
    assert not is_report(late) and vlmbatch("report", out, "-o", late).code == 1
    (tmp_path / "binary.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    assert vlmbatch("report", out, "-o", tmp_path / "binary.png").code == 1


def test_report_never_writes_inside_out(tmp_path: Path) -> None:
    out = write_out(tmp_path / "out", make_rows(20), files=1)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    (tmp_path / "link.html").symlink_to(out / "r.html")
    for dest in (out / "r.html", out / ".hidden.html", out / "sub" / "r.html", out, tmp_path / "link.html"):
        res = vlmbatch("report", out, "-o", dest, "--force")
        assert res.code == 1 and f"is inside {out}" in res.err, (dest, res.err)
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert foreign_entries(out) == []  # a run would still take OUT


@pytest.mark.parametrize("when", ["listed", "figures", "sample"])
def test_a_part_file_deleted_while_the_report_reads_out_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """A rerun's remove_rows deletes a part file whose rows all moved to its new file: between the
    listing and the reading of OUT's files, or between the figures and the sample."""
    out = write_out(tmp_path / "out", make_rows(40), files=3)
    doomed = sorted(out.glob("part-*.parquet"))[-1]
    listed, read = reading.part_files, report_data.read_part

    def part_files(path: Path) -> list[Path]:
        files = listed(path)
        if when == "listed":
            doomed.unlink(missing_ok=True)
        return files

    def read_part(path: Path, columns: list[str]) -> object:
        if (when == "figures") == (columns == report_data.FIGURE_COLUMNS) and path == doomed:
            doomed.unlink(missing_ok=True)
        return read(path, columns)

    monkeypatch.setattr(reading, "part_files", part_files)
    monkeypatch.setattr(report_data, "read_part", read_part)
    page = tmp_path / "report.html"
    res = vlmbatch("report", out, "-o", page, "--sample", "100")
    assert res.code == 1 and not page.exists()
    named = out if when == "listed" else doomed
    assert res.err == (
        f"error: {named} changed while the report was being made (is a run writing OUT?); try again\n"
    )


def test_an_empty_output_and_one_written_before_a_column_existed(tmp_path: Path) -> None:
    empty = write_out(tmp_path / "empty", [], files=1)
    data = collect_report(empty)
    assert (data.rows, data.sample, data.runs, data.latency_p50_ms) == (0, [], [], None)
    page = render_report(data, {})
    assert "OUT holds no rows." in page and "No answered rows with a latency." in page
    old = write_out(tmp_path / "old", make_rows(30), files=1)
    part = next(old.glob("part-*.parquet"))
    dropped = ["reasoning", "tool_calls", "completion_tokens"]
    pq.write_table(pq.read_table(part).drop_columns(dropped), part)
    data = collect_report(old, sample=10)
    assert data.rows == 35 and data.completion_tokens == 0 and len(data.sample) == 10
    assert all(r.reasoning is None and r.tool_calls is None for r in data.sample)
