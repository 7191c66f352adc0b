"""Counts, tokens, latency percentiles and throughput of a run or of an output dataset, and with several
replicas the same per replica."""

from __future__ import annotations

import json
import math
from array import array
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, Field

from tasks.endpoint.replicas import Replica
from tasks.latency import LatencyHistogram
from tasks.row import ResultRow


class ReplicaSummary(BaseModel):
    """One replica's part of a run (of OUT's rows, for ``inspect``: the attempts and failures of the
    rows it answered or failed last, and no ejections, which rows do not record)."""

    replica: str = Field(description="its base URL, without credentials")
    requests: int = Field(0, description="attempts sent to it")
    answered: int = Field(0, description="ok rows it answered")
    failures: int = Field(0, description="attempts that failed there (inspect: failed rows it failed last)")
    ejections: int | None = Field(None, description="times it was set aside (None: not known)")
    latency_p50_ms: float | None = None


class RunSummary(BaseModel):
    out: str | None = None
    work_items: int = 0
    skipped: int = Field(0, description="already ok in OUT with the same request key; not sent")
    ok: int = 0
    failed: int = 0
    errors: dict[str, int] = Field(default_factory=dict, description="failed rows by error_type")
    finish_reasons: dict[str, int] = Field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = Field(0, description="attempts sent, retries included")
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    elapsed_s: float = 0.0
    rows_per_s: float = 0.0
    dry_run: bool = False
    replicas: list[ReplicaSummary] = Field(
        default_factory=list, description="per replica, when the run had several (or OUT's rows name several)"
    )

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else 0

    @property
    def errors_text(self) -> str:
        """``bad_image: 2, timeout: 1``."""
        return ", ".join(f"{kind}: {n}" for kind, n in self.errors.items())


def percentile(values: list[float] | array, q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return round(ordered[rank], 1)


class SummaryBuilder:
    """Accumulates rows as they finish, in constant memory."""

    def __init__(self) -> None:
        self.status: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.finish: Counter[str] = Counter()
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.requests = 0
        self.latencies = LatencyHistogram()
        self.answered: Counter[str] = Counter()  # ok rows by replica

    def add(self, row: ResultRow) -> None:
        self.status[row.status] += 1
        if row.status == "ok" and row.replica is not None:
            self.answered[row.replica] += 1
        self.requests += row.attempts
        if row.error_type:
            self.errors[row.error_type] += 1
        if row.finish_reason:
            self.finish[row.finish_reason] += 1
        self.prompt_tokens += row.prompt_tokens or 0
        self.completion_tokens += row.completion_tokens or 0
        if row.latency_ms is not None and row.status == "ok":  # answers' latency; failed rows have theirs too
            self.latencies.add(row.latency_ms)

    def build(
        self,
        *,
        work_items: int,
        elapsed_s: float,
        out: str | None,
        skipped: int = 0,
        dry_run: bool = False,
        replicas: Sequence[Replica] = (),
    ) -> RunSummary:
        done = self.status["ok"] + self.status["failed"]
        return RunSummary(
            out=out,
            work_items=work_items,
            skipped=skipped,
            ok=self.status["ok"],
            failed=self.status["failed"],
            errors=dict(self.errors.most_common()),
            finish_reasons=dict(self.finish.most_common()),
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            requests=self.requests,
            latency_p50_ms=self.latencies.percentile(50),
            latency_p95_ms=self.latencies.percentile(95),
            elapsed_s=round(elapsed_s, 3),
            rows_per_s=round(done / elapsed_s, 2) if elapsed_s > 0 else 0.0,
            dry_run=dry_run,
            replicas=[
                ReplicaSummary(
                    replica=r.name,
                    requests=r.requests,
                    answered=self.answered[r.name],
                    failures=r.failures,
                    ejections=r.ejections,
                    latency_p50_ms=r.latencies.percentile(50),
                )
                for r in replicas
            ],
        )


class SampleAnswer(BaseModel):
    prompt_id: str
    image_id: str | None
    answer: str  # its first words


def calls_text(tool_calls: str | None) -> str | None:
    """A ``tool_calls`` cell as calls read: ``record_detections(count=3, labels=["cat"])``, calls
    joined by ``; ``; the cell as it is when it is not such a list."""
    if not tool_calls:
        return None
    try:
        calls = json.loads(tool_calls)
        if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls
        ):
            return tool_calls
        shown = []
        for call in calls:
            arguments = call.get("arguments")
            if isinstance(arguments, dict):
                inside = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in arguments.items())
            else:
                inside = "" if arguments is None else json.dumps(arguments, ensure_ascii=False)
            shown.append(f"{call['name']}({inside})")
        return "; ".join(shown)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read back
        return tool_calls


class AnswerSample:
    """The first answers of a run, a few per prompt, for the summary artifact: what was produced, not only
    how much. Bounded whatever the run's size: at most ``per_prompt`` rows for each of the first
    ``prompts`` prompts, each answer (its text, else its JSON, else its function calls as
    ``calls_text`` writes them) cut to its first ``words`` words."""

    def __init__(self, *, per_prompt: int = 2, prompts: int = 10, words: int = 12) -> None:
        self.per_prompt, self.prompts, self.words = per_prompt, prompts, words
        self._kept: dict[str, list[SampleAnswer]] = {}

    def add(self, row: ResultRow) -> None:
        answer = row.text if row.text and row.text.strip() else row.json or calls_text(row.tool_calls)
        if row.status != "ok" or not answer:
            return
        kept = self._kept.get(row.prompt_id)
        if kept is None:
            if len(self._kept) >= self.prompts:
                return
            kept = self._kept[row.prompt_id] = []
        if len(kept) < self.per_prompt:
            kept.append(
                SampleAnswer(prompt_id=row.prompt_id, image_id=row.image_id, answer=self._first_words(answer))
            )

    def _first_words(self, text: str) -> str:
        words = text.split()
        shown = " ".join(words[: self.words])
        cut = len(words) > self.words
        if len(shown) > 10 * self.words:  # long "words": a URL, JSON without spaces
            shown, cut = shown[: 10 * self.words], True
        return shown + ("…" if cut else "")

    @property
    def rows(self) -> list[SampleAnswer]:
        return [answer for kept in self._kept.values() for answer in kept]


def summarize_table(table: pa.Table, out: str) -> RunSummary:
    """A summary of an output dataset (``vlmbatch inspect``)."""

    def counts(column: str, where: pa.ChunkedArray | None = None) -> dict[str, int]:
        values = table[column] if where is None else table[column].filter(where)
        vc = pc.value_counts(values.drop_null())
        pairs = sorted(
            zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True),
            key=lambda p: -p[1],
        )
        return dict(pairs)

    status = counts("status")
    answered = pc.equal(table["status"], "ok")
    latencies = table["latency_ms"].filter(answered).drop_null().to_pylist()
    return RunSummary(
        out=out,
        work_items=table.num_rows,
        ok=status.get("ok", 0),
        failed=status.get("failed", 0),
        errors=counts("error_type"),
        finish_reasons=counts("finish_reason"),
        prompt_tokens=int(pc.sum(table["prompt_tokens"]).as_py() or 0),
        completion_tokens=int(pc.sum(table["completion_tokens"]).as_py() or 0),
        requests=int(pc.sum(table["attempts"]).as_py() or 0),
        latency_p50_ms=percentile(latencies, 50),
        latency_p95_ms=percentile(latencies, 95),
        replicas=_replicas_of(table),
    )


def _replicas_of(table: pa.Table) -> list[ReplicaSummary]:
    """Per replica, from the rows (only when they name more than one: OUT of a multi-replica run)."""
    if "replica" not in table.column_names:
        return []
    names = [n for n in pc.unique(table["replica"].drop_null()).to_pylist() if n]
    if len(names) < 2:
        return []
    found = []
    for name in sorted(names):
        rows = table.filter(pc.equal(table["replica"], name))
        ok = pc.equal(rows["status"], "ok")
        found.append(
            ReplicaSummary(
                replica=name,
                requests=int(pc.sum(rows["attempts"]).as_py() or 0),
                answered=int(pc.sum(ok).as_py() or 0),
                failures=rows.num_rows - int(pc.sum(ok).as_py() or 0),
                latency_p50_ms=percentile(rows["latency_ms"].filter(ok).drop_null().to_pylist(), 50),
            )
        )
    return found
