"""The report as one self-contained HTML page: figures, inline SVG charts, and a filterable gallery.

Nothing is fetched when the page is opened: the CSS and the one small script are inline, the charts are
inline SVG, thumbnails are ``data:`` URLs, and there are no fonts, links or frames to load. The page's
Content-Security-Policy says so to the browser too (``default-src 'none'``, images only from ``data:``,
the style and script only by their hashes), so even a mistake in escaping could not load or run
anything. Every value from OUT or a manifest is HTML-escaped where it is written (``_e``): an answer
holding ``<script>`` is shown as text.

The same ``ReportData`` gives the same page, byte for byte (no clock, no randomness).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
from collections import Counter
from collections.abc import Sequence
from datetime import datetime

from tasks.outputs.report_data import OK, ReportData, SampledRow
from tasks.outputs.report_images import Thumbnail


def _e(value: object) -> str:
    """HTML-escaped text, for element content and attribute values alike."""
    return html.escape("" if value is None else str(value), quote=True)


def _n(value: int) -> str:
    return f"{value:,}"


def _short(value: int) -> str:
    """A count for an axis: 1,234 · 135k · 1.2M."""
    if value < 10_000:
        return _n(value)
    if value < 1_000_000:
        return f"{value / 1000:.0f}k"
    return f"{value / 1_000_000:.1f}M"


def _ms(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f} %" if whole else "–"


def _when(value: datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


STYLE = """
:root{--ok:#2f855a;--bad:#c53030;--ink:#1a202c;--mute:#5a6475;--line:#e2e8f0;--bar:#4a6fa5;--bg:#f7f9fb}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;
  color:var(--ink);background:var(--bg)}
main{max-width:1240px;margin:0 auto;padding:18px 22px 40px}h1{font-size:22px;margin:0 0 2px}
h2{font-size:16px;margin:26px 0 10px}.sub{color:var(--mute);margin:0 0 16px;overflow-wrap:anywhere}
.stats{display:grid;grid-template-columns:repeat(auto-fill,minmax(175px,1fr));gap:10px}
.facts{margin:10px 0 0;overflow-wrap:anywhere}
.stat{background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 12px}
.stat b{display:block;font-size:18px;font-weight:600}.stat span{color:var(--mute);font-size:12px}
.stat ul{margin:4px 0 0;padding-left:16px;font-size:12px}.stat.bad b{color:var(--bad)}
.stat.good b{color:var(--ok)}
table{border-collapse:collapse;background:#fff;border:1px solid var(--line);font-size:13px}
td,th{padding:4px 10px;border-bottom:1px solid var(--line);text-align:left;vertical-align:top}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(520px,1fr));gap:12px}
figure{margin:0;background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px 12px}
figcaption{font-weight:600;margin-bottom:4px}figure p{color:var(--mute);margin:6px 0}
svg{width:100%;height:auto;display:block}svg text{font:11px system-ui,sans-serif;fill:#4a5568}
.filters{display:flex;flex-wrap:wrap;gap:8px 18px;align-items:center;margin:8px 0 12px}
.group{display:flex;flex-wrap:wrap;gap:4px;align-items:center}
.group>span{color:var(--mute);margin-right:2px}
.chip{border:1px solid #cbd5e0;background:#fff;border-radius:14px;padding:2px 10px;font:inherit;
  cursor:pointer}
.chip.on{background:var(--ink);color:#fff;border-color:var(--ink)}#shown{color:var(--mute)}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(560px,1fr));gap:12px}
.card{display:flex;gap:12px;background:#fff;border:1px solid var(--line);border-radius:8px;padding:10px;
  min-width:0}
.card[hidden]{display:none}.card.failed{border-left:4px solid var(--bad)}
.card.ok{border-left:4px solid var(--ok)}.thumb{flex:0 0 160px;width:160px}
.thumb img{max-width:160px;max-height:160px;display:block;border-radius:4px}
.thumb.none{height:110px;border:1px dashed #cbd5e0;border-radius:4px;color:var(--mute);font-size:12px;
  padding:8px;overflow:hidden;overflow-wrap:anywhere}
.body{flex:1;min-width:0}
.meta{display:flex;flex-wrap:wrap;gap:4px 10px;align-items:baseline;margin-bottom:4px}
.badge{font-size:11px;font-weight:600;border-radius:4px;padding:0 6px;color:#fff}
.badge.ok{background:var(--ok)}.badge.failed{background:var(--bad)}
.id{color:var(--mute);overflow-wrap:anywhere}
.answer{white-space:pre-wrap;overflow-wrap:anywhere;max-height:14em;overflow:auto}
.error{white-space:pre-wrap;overflow-wrap:anywhere;color:var(--bad)}
pre{white-space:pre-wrap;overflow-wrap:anywhere;background:var(--bg);border-radius:4px;padding:6px;
  margin:4px 0;max-height:16em;overflow:auto;font-size:12px}
details summary{cursor:pointer;color:var(--mute);font-size:12px}
.small{color:var(--mute);font-size:12px;margin-top:4px}
footer{color:var(--mute);font-size:12px;margin-top:30px}
"""

SCRIPT = """
(function () {
  var filters = {prompt: "", status: ""};
  var cards = Array.prototype.slice.call(document.querySelectorAll(".card"));
  function show() {
    var shown = 0;
    cards.forEach(function (card) {
      var s = filters.status;
      var visible = (!filters.prompt || card.dataset.prompt === filters.prompt) &&
        (!s || card.dataset.status === s || card.dataset.outcome === s);
      card.hidden = !visible;
      if (visible) { shown += 1; }
    });
    document.getElementById("shown").textContent = shown + " of " + cards.length + " shown";
    document.getElementById("none").hidden = shown > 0;
  }
  document.querySelectorAll(".group[data-filter]").forEach(function (group) {
    group.addEventListener("click", function (event) {
      var chip = event.target.closest("button.chip");
      if (!chip) { return; }
      filters[group.dataset.filter] = chip.dataset.value;
      group.querySelectorAll("button.chip").forEach(function (other) {
        other.classList.toggle("on", other === chip);
        other.setAttribute("aria-pressed", other === chip ? "true" : "false");
      });
      show();
    });
  });
  show();
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = (
    f"default-src 'none'; img-src data:; style-src {_csp_hash(STYLE)}; script-src {_csp_hash(SCRIPT)}; "
    "base-uri 'none'; form-action 'none'"
)


# In every page's first line: what `report` may replace without --force (tasks/outputs/report.py).
GENERATOR = '<meta name="generator" content="vlmbatch report">'


def render_report(data: ReportData, thumbnails: dict[str, Thumbnail] | None) -> str:
    """The page. ``thumbnails``: by image id (None: the report was made without ``--images``)."""
    parts = [
        "<!doctype html>",
        f'<html lang="en"><head><meta charset="utf-8">{GENERATOR}',
        f'<meta http-equiv="Content-Security-Policy" content="{_e(CSP)}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>vlmbatch report: {_e(data.out)}</title>",
        f"<style>{STYLE}</style></head>",
        "<body><main>",
        "<h1>vlmbatch report</h1>",
        f'<p class="sub">{_e(data.out)} · {_n(data.rows)} rows in {_n(data.files)} part '
        f"file{'s' if data.files != 1 else ''}</p>",
        _figures(data),
        _runs(data),
        _charts(data),
        _gallery(data, thumbnails),
        "<footer>Made by <code>vlmbatch report</code>. This page is one file: nothing is fetched when it "
        "is opened.</footer>",
        f"</main><script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(parts) + "\n"


def _stat(value: str, label: str, extra: str = "", kind: str = "") -> str:
    return f'<div class="stat {kind}"><b>{value}</b><span>{label}</span>{extra}</div>'


def _figures(data: ReportData) -> str:
    errors = "".join(f"<li>{_e(kind)}: {_n(n)}</li>" for kind, n in data.errors.items())
    rate = data.rows_per_s
    boxes = [
        _stat(_n(data.rows), "work items (rows)"),
        _stat(_n(data.ok), f"ok ({_pct(data.ok, data.rows)})", kind="good"),
        _stat(
            _n(data.failed),
            f"failed ({_pct(data.failed, data.rows)})",
            f"<ul>{errors}</ul>" if errors else "",
            kind="bad" if data.failed else "",
        ),
        _stat(
            f"{_n(data.prompt_tokens)} / {_n(data.completion_tokens)}",
            f"prompt / completion tokens ({_n(data.requests)} requests)",
        ),
        _stat(f"{_ms(data.latency_p50_ms)} / {_ms(data.latency_p95_ms)}", "latency p50 / p95 (ok rows)"),
        _stat("–" if rate is None else f"{rate:,.2f}", "rows per second (while the runs ran)"),
    ]
    facts = [
        ("model" if len(data.models) == 1 else "models")
        + ": "
        + (", ".join(f"{_e(model)} ({_n(n)})" for model, n in data.models.items()) or "–")
    ]
    if data.first and data.last:
        span = _duration((data.last - data.first).total_seconds())
        runs = f"{_n(len(data.runs))} run{'s' if len(data.runs) != 1 else ''}"
        facts.append(f"{runs} from {_e(_when(data.first))} to {_e(_when(data.last))} ({span})")
    if data.finish_reasons:
        facts.append(
            "finish reasons: " + ", ".join(f"{_e(k)}: {_n(v)}" for k, v in data.finish_reasons.items())
        )
    return f'<section class="stats">{"".join(boxes)}</section><p class="facts">{" · ".join(facts)}</p>'


def _runs(data: ReportData) -> str:
    if not data.runs:
        return ""
    rows = []
    for run in data.runs:
        rate = f"{run.rows / run.seconds:,.2f}" if run.seconds > 0 else "–"
        rows.append(
            f"<tr><td><code>{_e(run.run_id or '–')}</code></td><td class=num>{_n(run.rows)}</td>"
            f"<td>{_e(_when(run.first))}</td><td>{_e(_when(run.last))}</td><td class=num>{rate}</td></tr>"
        )
    head = (
        "<tr><th>run id</th><th class=num>rows</th><th>first request</th><th>last row</th>"
        "<th class=num>rows/s</th></tr>"
    )
    return f"<h2>Runs</h2><table>{head}{''.join(rows)}</table>"


# --- charts ---------------------------------------------------------------------------------------------

W, H = 520, 180
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 14, 34
BINS = 30


def _charts(data: ReportData) -> str:
    return (
        '<h2>Charts</h2><section class="charts">'
        + _figure("Latency distribution (ok rows, log scale)", _latency_chart(data))
        + _figure("Output tokens distribution (ok rows)", _tokens_chart(data))
        + _figure("Failures by error type", _failures_by_type(data))
        + _figure("Failures by prompt", _failures_by_prompt(data))
        + "</section>"
    )


def _figure(caption: str, body: str) -> str:
    return f"<figure><figcaption>{_e(caption)}</figcaption>{body}</figure>"


def _empty(text: str) -> str:
    return f"<p>{_e(text)}</p>"


def _latency_chart(data: ReportData) -> str:
    buckets = data.latency.buckets()
    if not buckets:
        return _empty("No answered rows with a latency.")
    lo, hi = buckets[0][0], buckets[-1][0]
    count = 1 if hi <= lo else min(BINS, len(buckets))
    ratio = math.log(hi / lo) if hi > lo else 1.0
    counts = [0] * count
    for value, n in buckets:
        counts[min(count - 1, int(math.log(value / lo) / ratio * count))] += n
    edges = [lo * math.exp(ratio * i / count) for i in range(count + 1)] if hi > lo else [lo, lo]
    bins = [
        (_ms(edges[i]), f"{_ms(edges[i])} – {_ms(edges[i + 1])}: {_n(n)} rows", n)
        for i, n in enumerate(counts)
    ]
    markers = []
    for name, mark in (("p50", data.latency_p50_ms), ("p95", data.latency_p95_ms)):
        if mark is not None and hi > lo:
            markers.append((min(1.0, max(0.0, math.log(max(mark, lo) / lo) / ratio)), f"{name} {_ms(mark)}"))
    return _histogram(bins, markers)


def _tokens_chart(data: ReportData) -> str:
    values = data.output_tokens
    if not values:
        return _empty("No answered rows with token counts.")
    lo, hi = min(values), max(values)
    width = max(1, math.ceil((hi - lo + 1) / BINS))
    count = (hi - lo) // width + 1
    counts = [0] * count
    for value, n in values.items():
        counts[(value - lo) // width] += n
    bins = []
    for i, n in enumerate(counts):
        start, end = lo + i * width, lo + (i + 1) * width - 1
        label = f"{start}" if width == 1 else f"{start}–{end}"
        bins.append((str(start), f"{label} tokens: {_n(n)} rows", n))
    return _histogram(bins, [])


def _histogram(bins: Sequence[tuple[str, str, int]], markers: Sequence[tuple[float, str]]) -> str:
    """Vertical bars: (x label, tooltip, count) each; markers at a fraction of the x axis."""
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    top = max(n for _, _, n in bins) or 1
    step = plot_w / len(bins)
    out = [f'<svg viewBox="0 0 {W} {H}" role="img">']
    out.append(
        f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{W - RIGHT}" y2="{TOP + plot_h}" stroke="#a0aec0"/>'
    )
    for frac in (0.0, 0.5, 1.0):
        y = TOP + plot_h * (1 - frac)
        out.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_short(round(top * frac))}</text>'
        )
    labels_every = max(1, math.ceil(len(bins) / 6))
    for i, (label, tip, n) in enumerate(bins):
        h = plot_h * n / top
        x = LEFT + i * step
        out.append(
            f'<rect x="{x + 0.5:.1f}" y="{TOP + plot_h - h:.1f}" width="{max(1.0, step - 1):.1f}" '
            f'height="{h:.1f}" fill="#4a6fa5"><title>{_e(tip)}</title></rect>'
        )
        if i % labels_every == 0:
            out.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 14}">{_e(label)}</text>')
    for frac, label in markers:
        x = LEFT + plot_w * frac
        out.append(
            f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{TOP + plot_h}" stroke="#c05621" '
            'stroke-dasharray="4 3"/>'
        )
        anchor = "end" if frac > 0.8 else "start"
        dx = -3 if anchor == "end" else 3
        y = TOP + 10 + 12 * markers.index((frac, label))
        out.append(
            f'<text x="{x + dx:.1f}" y="{y}" text-anchor="{anchor}" fill="#c05621" paint-order="stroke" '
            f'stroke="#fff" stroke-width="3">{_e(label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _failures_by_type(data: ReportData) -> str:
    if not data.errors:
        return _empty("No failed rows.")
    items = [
        (kind, n, f"{kind}: {_n(n)} rows ({_pct(n, data.rows)} of all)") for kind, n in data.errors.items()
    ]
    return _hbars(items, colour="#c53030")


def _failures_by_prompt(data: ReportData) -> str:
    failing = sorted(
        ((p, c) for p, c in data.prompts.items() if c.failed), key=lambda pc: (-pc[1].failed, pc[0])
    )
    if not failing:
        return _empty("No failed rows.")
    items = []
    for prompt_id, counts in failing:
        kinds = ", ".join(f"{k}: {_n(v)}" for k, v in counts.errors.most_common())
        tip = f"{prompt_id}: {_n(counts.failed)} of {_n(counts.rows)} rows failed ({kinds})"
        items.append((prompt_id, counts.failed, tip, f"{_n(counts.failed)} of {_short(counts.rows)}"))
    return _hbars(items, colour="#dd6b20")


MAX_BARS = 15


def _hbars(items: Sequence[tuple], *, colour: str) -> str:
    """Horizontal bars: (label, value, tooltip[, value text]) each, the first MAX_BARS."""
    shown = list(items[:MAX_BARS])
    label_w, row_h = 150, 22
    height = TOP + row_h * len(shown) + 8
    plot_w = W - label_w - RIGHT - 130  # room for "12,345 of 1,000,000" after the longest bar
    top = max(item[1] for item in shown) or 1
    out = [f'<svg viewBox="0 0 {W} {height}" role="img">']
    for i, item in enumerate(shown):
        label, value, tip = item[0], item[1], item[2]
        text = item[3] if len(item) > 3 else _n(value)
        y = TOP + i * row_h
        short = label if len(label) <= 22 else label[:21] + "…"
        w = max(1.0, plot_w * value / top)
        out.append(
            f"<g><title>{_e(tip)}</title>"
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{_e(short)}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{row_h - 6}" fill="{colour}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 14}">{_e(text)}</text></g>'
        )
    out.append("</svg>")
    more = len(items) - len(shown)
    return "".join(out) + (f"<p>and {_n(more)} more</p>" if more > 0 else "")


# --- the gallery ----------------------------------------------------------------------------------------


def _gallery(data: ReportData, thumbnails: dict[str, Thumbnail] | None) -> str:
    sample = data.sample
    head = "<h2>Sample of rows</h2>"
    if not sample:
        return head + _empty("No rows sampled (--sample 0)." if data.rows else "OUT holds no rows.")
    if len(sample) < data.rows:
        note = (
            f"{_n(len(sample))} of {_n(data.rows)} rows: a sample stratified by prompt and outcome (every "
            "prompt and every error type shows up while the sample size allows), chosen by a hash of each "
            "row's image and prompt ids, so the same output gives the same sample."
        )
    else:
        note = f"All {_n(data.rows)} rows."
    if thumbnails is None:
        note += " Made without --images: no thumbnails."
    prompts = Counter(r.prompt_id for r in sample)
    outcomes = Counter(r.outcome for r in sample if r.status != OK)
    statuses = Counter(r.status for r in sample)
    prompt_chips = _chips("prompt", "Prompt", sorted(prompts.items()))
    status_items = [(OK, statuses[OK]), ("failed", len(sample) - statuses[OK])]
    status_items += sorted(outcomes.items())
    status_chips = _chips("status", "Status", status_items)
    cards = "".join(_card(row, thumbnails) for row in sample)
    return (
        f'{head}<p class="sub">{_e(note)}</p>'
        f'<div class="filters">{prompt_chips}{status_chips}<span id="shown"></span></div>'
        f'<p id="none" hidden>No sampled rows match these filters.</p>'
        f'<section class="gallery" id="gallery">{cards}</section>'
    )


def _chips(name: str, label: str, items: Sequence[tuple[str, int]]) -> str:
    chips = ['<button type="button" class="chip on" data-value="" aria-pressed="true">all</button>']
    for value, n in items:
        if n:
            chips.append(
                f'<button type="button" class="chip" data-value="{_e(value)}" aria-pressed="false">'
                f"{_e(value)} ({_n(n)})</button>"
            )
    return (
        f'<div class="group" data-filter="{name}" role="group"><span>{_e(label)}</span>{"".join(chips)}</div>'
    )


def _card(row: SampledRow, thumbnails: dict[str, Thumbnail] | None) -> str:
    thumb = ""
    if thumbnails is not None and row.image_id is not None:
        found = thumbnails.get(row.image_id) or Thumbnail(None, "no thumbnail")
        if found.url is not None:
            thumb = f'<div class="thumb"><img src="{_e(found.url)}" alt="image {_e(row.image_id)}"></div>'
        else:
            thumb = f'<div class="thumb none" title="{_e(found.note)}">no image: {_e(found.note)}</div>'
    status = OK if row.status == OK else "failed"
    image = "text-only" if row.image_id is None else f"image {row.image_id}"
    meta = (
        f'<div class="meta"><span class="badge {status}">{_e(row.outcome)}</span>'
        f"<b>{_e(row.prompt_id)}</b><span class=id>{_e(image)}</span>"
        f"<span class=id>{_e(f'task {row.task}' if row.task else '')}</span></div>"
    )
    body = []
    if row.text is not None:
        body.append(f'<div class="answer">{_e(row.text)}</div>')
    if row.json is not None:
        body.append(f'<pre class="json">{_e(_pretty_json(row.json))}</pre>')
    if row.tool_calls is not None:
        body.append(f'<pre class="calls" title="function calls">{_e(_pretty_json(row.tool_calls))}</pre>')
    if row.reasoning:
        body.append(
            f"<details><summary>reasoning ({_n(len(row.reasoning))} characters)</summary>"
            f"<pre>{_e(row.reasoning)}</pre></details>"
        )
    if row.status != OK:
        http = f" (HTTP {row.http_status})" if row.http_status else ""
        body.append(
            f'<div class="error"><b>{_e(row.error_type or "failed")}</b>{_e(http)}: '
            f"{_e(row.error_message or '')}</div>"
        )
    facts = [
        row.model,
        _ms(row.latency_ms) if row.latency_ms is not None else None,
        f"{row.prompt_tokens or 0} + {row.completion_tokens or 0} tokens"
        if row.prompt_tokens is not None or row.completion_tokens is not None
        else None,
        f"finish: {row.finish_reason}" if row.finish_reason else None,
    ]
    small = " · ".join(_e(f) for f in facts if f)
    return (
        f'<article class="card {status}" data-prompt="{_e(row.prompt_id)}" data-status="{status}" '
        f'data-outcome="{_e(row.outcome)}">{thumb}<div class="body">{meta}{"".join(body)}'
        f'<div class="small">{small}</div></div></article>'
    )


def _pretty_json(text: str) -> str:
    """``text`` indented, or as it is when it is not JSON or is nested too deep for Python's recursion
    (about a thousand levels: parsing or indenting it raises RecursionError)."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return text
