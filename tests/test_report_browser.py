"""The report in a real browser: headless Chromium renders the page, its script runs, and the test reads
the DOM as it then is — thumbnails decoded, filters that change what is shown, an answer holding
``<script>`` shown as inert text, nothing fetched — and saves a screenshot in the test's folder.

Skipped, saying why, where no Chromium is installed (Debian's ``chromium``; .ci/run installs it).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tests.browser import chromium_page, find_chromium
from tests.cli import vlmbatch
from tests.report_builders import (
    KINDS_FAILING,
    KINDS_SHOWN,
    SCRIPT_ANSWER,
    every_kind_manifest,
    make_rows,
    write_out,
)

CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="no Chromium on this machine (apt-get install chromium; .ci/run installs it): the report is not "
    "checked in a browser",
)

VISIBLE = "Array.from(document.querySelectorAll('.card')).filter(c => !c.hidden && c.offsetParent !== null)"
CARDS = "Array.from(document.querySelectorAll('.card'))"


def test_the_report_in_headless_chromium(tmp_path: Path) -> None:
    images = every_kind_manifest(tmp_path)
    rows = make_rows(60, images=10)
    kinds = KINDS_SHOWN + KINDS_FAILING
    for row in rows:
        if row.image_id is not None:
            row.image_id = kinds[int(row.image_id[3:8]) % len(kinds)]
        if row.prompt_id == "rare":  # answers that are only a function call
            row.text, row.tool_calls = None, '[{"name": "record_detections", "arguments": {"count": 3}}]'
    out = write_out(tmp_path / "out", rows, files=2)
    page_path = tmp_path / "report.html"
    res = vlmbatch("report", out, "--images", images, "-o", page_path, "--sample", "40")
    assert res.code == 0, res.err
    screenshot = tmp_path / "report.png"
    assert CHROMIUM is not None
    found = asyncio.run(asyncio.wait_for(_look(CHROMIUM, page_path, tmp_path / "profile", screenshot), 90))

    # thumbnails decoded: every <img> loaded with a natural size; failing images got a placeholder
    assert found["images"] and all(complete and width > 0 for complete, width in found["images"])
    assert len(found["images"]) >= len(KINDS_SHOWN)
    assert any("missing_image" in text for text in found["placeholders"])
    assert any("resolves outside the image root" in text for text in found["placeholders"])
    # the <script> answer: shown as text, never run
    assert found["pwned"] == "undefined"
    assert SCRIPT_ANSWER in found["script_answer"] and found["script_answer_visible"]
    # a function-call answer: shown, pretty-printed
    assert found["calls"] and all(
        visible and '"name": "record_detections"' in t for t, visible in found["calls"]
    )
    # filters: prompt, then status, then an error type; each changes what is shown, as the counts say
    total = found["total"]
    assert found["shown"][0] == (total, f"{total} of {total} shown")
    qa, qa_failed, bad_image, back = found["shown"][1:]
    assert qa == (found["expected"]["qa"], f"{found['expected']['qa']} of {total} shown")
    assert 0 < qa[0] < total and qa_failed[0] == found["expected"]["qa_failed"] and 0 < qa_failed[0] < qa[0]
    assert bad_image[0] == found["expected"]["bad_image"] > 0
    assert back[0] == total
    assert found["filtered_ok"]
    # nothing fetched, no script error, no content-security-policy complaint
    assert found["requests"] == [page_path.as_uri()]
    assert found["exceptions"] == [] and found["security"] == [] and found["styled"] == "flex"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000


async def _look(executable: str, page_path: Path, profile: Path, screenshot: Path) -> dict:
    found: dict = {}
    async with chromium_page(executable, profile) as page:
        await page.open(page_path.as_uri())
        await page.evaluate("Promise.all(Array.from(document.images).map(i => i.decode().catch(() => null)))")
        found["images"] = await page.evaluate(
            "Array.from(document.querySelectorAll('.thumb img')).map(i => [i.complete, i.naturalWidth])"
        )
        found["placeholders"] = await page.evaluate(
            "Array.from(document.querySelectorAll('.thumb.none')).map(e => e.textContent)"
        )
        found["styled"] = await page.evaluate(  # the inline style applied (its CSP hash matches)
            "getComputedStyle(document.querySelector('.card')).display"
        )
        found["pwned"] = await page.evaluate("typeof window.__pwned")
        found["script_answer"], found["script_answer_visible"] = await page.evaluate(
            f"(() => {{ const a = {CARDS}.map(c => c.querySelector('.answer'))"
            f".find(a => a && a.textContent.includes({json.dumps('<script>')}));"
            " return [a.textContent, a.offsetParent !== null && a.getClientRects().length > 0]; })()"
        )
        found["calls"] = await page.evaluate(
            f"{CARDS}.filter(c => c.dataset.prompt === 'rare').map(c => c.querySelector('.calls'))"
            ".map(p => p ? [p.textContent, p.getClientRects().length > 0] : ['', false])"
        )
        found["total"] = await page.evaluate(f"{CARDS}.length")
        found["expected"] = await page.evaluate(
            f"(() => {{ const c = {CARDS}; return {{"
            " qa: c.filter(x => x.dataset.prompt === 'qa').length,"
            " qa_failed: c.filter(x => x.dataset.prompt === 'qa' && x.dataset.status === 'failed').length,"
            " bad_image: c.filter(x => x.dataset.outcome === 'bad_image').length}; })()"
        )
        shown = []

        async def count() -> None:
            shown.append(
                tuple(
                    await page.evaluate(f"[{VISIBLE}.length, document.getElementById('shown').textContent]")
                )
            )

        await count()
        await page.click('[data-filter="prompt"] button[data-value="qa"]')
        await count()
        await page.click('[data-filter="status"] button[data-value="failed"]')
        await count()
        found["filtered_ok"] = await page.evaluate(
            f"{VISIBLE}.every(c => c.dataset.prompt === 'qa' && c.dataset.status === 'failed')"
        )
        await page.click('[data-filter="prompt"] button[data-value=""]')
        await page.click('[data-filter="status"] button[data-value="bad_image"]')
        await count()
        found["filtered_ok"] &= await page.evaluate(
            f"{VISIBLE}.every(c => c.dataset.outcome === 'bad_image')"
        )
        await page.click('[data-filter="status"] button[data-value=""]')
        await count()
        found["shown"] = shown
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(screenshot)
        found["requests"] = [
            e["params"]["request"]["url"]
            for e in page.events
            if e["method"] == "Network.requestWillBeSent"
            and not e["params"]["request"]["url"].startswith("data:")
        ]
        found["exceptions"] = [e["params"] for e in page.events if e["method"] == "Runtime.exceptionThrown"]
        found["security"] = [
            e["params"]["entry"]["text"]
            for e in page.events
            if e["method"] == "Log.entryAdded" and e["params"]["entry"].get("source") == "security"
        ]
    return found
