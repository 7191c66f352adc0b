"""What a report of OUT shows (``vlmbatch report``): its figures and a sample of its rows, in one pass.

Memory does not grow with OUT's rows. Part files are read one at a time, and of each only the columns
the figures need (``read_part``); what is kept is counters (by status, error type, prompt, model, run),
the latency histogram of tasks/outputs/summary.py, an exact count of output tokens by value (bounded by
the largest output budget), and for the sample each candidate's identity (file, row, hash) alone. The
sampled rows' answers are read from their files at the end.

The sample is **stratified** by prompt and outcome (``ok``, or the row's error type): a stratum is a
(prompt, outcome) pair. Within a stratum rows are ranked by a hash of their identity (image_id and
prompt_id), not by chance or file order, so the same OUT gives the same sample however its files were
written. Half of the ``n`` rows go to failed rows and half to ok ones (a side with fewer rows gives the
rest to the other): a run with 2 % failures shows enough of them to see why, and enough answers to
judge. Each side is taken as: on the failed side first, for every error type, its lowest-ranked row
(so every error type shows up); then a round over the side's strata taking each one's lowest-ranked
row not yet taken, then a second round, and so on (within a round, by rank), until the side's share is
taken. Every prompt and every error type is therefore in the sample when ``n`` allows, and the strata
of a side share it evenly (a stratum of 3 rows gives its 3; the large ones share the rest).

Keeping a stratum's lowest ``n`` ranks would need memory for ``n`` per stratum; but a side's rounds
never go past the level ``L`` at which ``sum(min(count, L))`` over its strata reaches its share, and
that level only falls as rows arrive. Each stratum keeps ``L + 1`` candidates (one when there are more
strata than rows to show).

At most ``MAX_PROMPTS`` prompts are told apart (charts and strata); rows of any further prompt count
as one prompt, ``OTHER_PROMPTS``.
"""

from __future__ import annotations

import hashlib
import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from tasks.errors import UsageError
from tasks.latency import LatencyHistogram
from tasks.outputs.object_path import OutPath
from tasks.outputs.reading import output_files, read_part

MAX_PROMPTS = 1000
OTHER_PROMPTS = "(other prompts)"
OK = "ok"

FIGURE_COLUMNS = [
    "image_id", "prompt_id", "status", "error_type", "finish_reason", "latency_ms", "prompt_tokens",
    "completion_tokens", "attempts", "model", "run_id", "finished_at",
]  # fmt: skip
SAMPLE_COLUMNS = [
    "image_id", "prompt_id", "task", "status", "text", "reasoning", "json", "tool_calls", "finish_reason",
    "error_type", "error_message", "http_status", "latency_ms", "prompt_tokens", "completion_tokens", "model",
]  # fmt: skip


def row_rank(image_id: str | None, prompt_id: str | None) -> int:
    """A row's place in its stratum: a 64-bit hash of its identity (the work item)."""
    key = f"{image_id or ''}\x00{prompt_id or ''}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


def outcome_of(status: str | None, error_type: str | None) -> str:
    return OK if status == OK else (error_type or "failed")


@dataclass(slots=True)
class SampledRow:
    image_id: str | None
    prompt_id: str
    task: str | None
    status: str
    text: str | None
    reasoning: str | None
    json: str | None
    tool_calls: str | None  # JSON [{"name", "arguments"}]; null in an OUT written before the column
    finish_reason: str | None
    error_type: str | None
    error_message: str | None
    http_status: int | None
    latency_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    model: str | None

    @property
    def outcome(self) -> str:
        return outcome_of(self.status, self.error_type)


@dataclass(slots=True)
class PromptCounts:
    rows: int = 0
    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return self.rows - self.ok


@dataclass(slots=True)
class RunSpan:
    run_id: str | None
    rows: int
    first: datetime | None
    last: datetime | None

    @property
    def seconds(self) -> float:
        return (self.last - self.first).total_seconds() if self.first and self.last else 0.0


@dataclass
class ReportData:
    out: str
    files: int
    rows: int
    ok: int
    failed: int
    errors: dict[str, int]
    finish_reasons: dict[str, int]
    prompt_tokens: int
    completion_tokens: int
    requests: int
    latency: LatencyHistogram  # ok rows (as inspect's percentiles)
    output_tokens: dict[int, int]  # completion tokens of ok rows: value → rows
    prompts: dict[str, PromptCounts]  # by prompt_id, most rows first
    models: dict[str, int]
    runs: list[RunSpan]  # oldest first; each from its first request sent to its last row finished
    sample: list[SampledRow]
    sample_size: int  # what was asked for

    @property
    def latency_p50_ms(self) -> float | None:
        return self.latency.percentile(50)

    @property
    def latency_p95_ms(self) -> float | None:
        return self.latency.percentile(95)

    @property
    def first(self) -> datetime | None:
        return min((r.first for r in self.runs if r.first), default=None)

    @property
    def last(self) -> datetime | None:
        return max((r.last for r in self.runs if r.last), default=None)

    @property
    def rows_per_s(self) -> float | None:
        """Rows over the time the runs took (each from its first request to its last row, summed: the
        gaps between runs do not count); None when no run spans any time."""
        spans = [r for r in self.runs if r.seconds > 0]
        seconds = sum(r.seconds for r in spans)
        return sum(r.rows for r in spans) / seconds if seconds else None


Candidate = tuple[int, int, int]  # (-rank, file, row): heapq keeps the highest rank on top


class _Sampler:
    """Candidates per stratum, as described in the module's docstring."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.level = {True: n, False: n}  # by side (ok or not): the rounds never go past level + 1
        self.counts: Counter[tuple[str, str]] = Counter()
        self.heaps: dict[tuple[str, str], list[Candidate]] = {}

    def add(self, stratum: tuple[str, str], rank: int, file: int, row: int) -> None:
        self.counts[stratum] += 1
        if self.n <= 0:
            return
        heap = self.heaps.setdefault(stratum, [])
        if len(heap) <= self.level[stratum[1] == OK]:
            heapq.heappush(heap, (-rank, file, row))
        elif -heap[0][0] > rank:
            heapq.heapreplace(heap, (-rank, file, row))

    def budgets(self) -> dict[bool, int]:
        """Rows for the ok side and the failed side: half each, a side's unused half to the other."""
        ok = sum(c for (_, outcome), c in self.counts.items() if outcome == OK)
        failed = self.counts.total() - ok
        for_failed = min(failed, max(self.n // 2, self.n - ok))
        return {True: min(ok, self.n - for_failed), False: for_failed}

    def prune(self) -> None:
        """Lower each side's level to what the counts so far allow, and drop candidates above it."""
        budgets = self.budgets()
        for side, budget in budgets.items():
            counts = [c for (_, outcome), c in self.counts.items() if (outcome == OK) == side]
            while self.level[side] > 0 and sum(min(c, self.level[side]) for c in counts) > budget:
                self.level[side] -= 1
        for (_, outcome), heap in self.heaps.items():
            while len(heap) > self.level[outcome == OK] + 1:
                heapq.heappop(heap)

    def choose(self) -> list[Candidate]:
        """The sample: failed rows (one per error type first), then ok rows, each side in rounds."""
        ranked = {s: sorted((-c[0], c[1], c[2]) for c in heap) for s, heap in self.heaps.items()}
        chosen: list[Candidate] = []
        for side, budget in sorted(self.budgets().items()):  # failed (False) first
            strata = sorted(s for s in ranked if (s[1] == OK) == side)
            picked: dict[tuple[int, int], Candidate] = {}
            for outcome in sorted({o for _, o in strata}):
                if len(picked) < budget:
                    best = min(ranked[s][0] for s in strata if s[1] == outcome)
                    picked.setdefault(best[1:], best)
            depth = max((len(ranked[s]) for s in strata), default=0)
            for level in range(depth):
                for candidate in sorted(ranked[s][level] for s in strata if len(ranked[s]) > level):
                    if len(picked) < budget:
                        picked.setdefault(candidate[1:], candidate)
            chosen += picked.values()
        return chosen


def collect_report(out: OutPath, *, sample: int = 200) -> ReportData:
    """The figures and the sample of OUT; UsageError unless OUT is a vlmbatch output, or if a run changed
    it while it was read."""
    files = report_files(out)
    status: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    finish: Counter[str] = Counter()
    models: Counter[str] = Counter()
    output_tokens: Counter[int] = Counter()
    prompts: dict[str, PromptCounts] = {}
    runs: dict[str | None, RunSpan] = {}
    latency = LatencyHistogram()
    sampler = _Sampler(sample)
    prompt_tokens = completion_tokens = requests = rows = 0

    for index, path in enumerate(files):
        table = _read_part(path, FIGURE_COLUMNS)
        rows += table.num_rows
        status.update(_counts(table["status"]))
        errors.update(_counts(table["error_type"]))
        finish.update(_counts(table["finish_reason"]))
        models.update(_counts(table["model"]))
        prompt_tokens += int(pc.sum(table["prompt_tokens"]).as_py() or 0)
        completion_tokens += int(pc.sum(table["completion_tokens"]).as_py() or 0)
        requests += int(pc.sum(table["attempts"]).as_py() or 0)
        answered = table.filter(pc.equal(table["status"], OK))
        latency.add_many(answered["latency_ms"])
        output_tokens.update(_counts(answered["completion_tokens"]))
        _count_prompts(table, prompts)
        _count_runs(table, runs)
        for row, (image_id, prompt_id, row_status, error_type) in enumerate(
            zip(
                table["image_id"].to_pylist(),
                table["prompt_id"].to_pylist(),
                table["status"].to_pylist(),
                table["error_type"].to_pylist(),
                strict=True,
            )
        ):
            stratum = (
                prompt_id if prompt_id in prompts else OTHER_PROMPTS,
                outcome_of(row_status, error_type),
            )
            sampler.add(stratum, row_rank(image_id, prompt_id), index, row)
        sampler.prune()

    return ReportData(
        out=str(out),
        files=len(files),
        rows=rows,
        ok=status[OK],
        failed=rows - status[OK],
        errors=dict(errors.most_common()),
        finish_reasons=dict(finish.most_common()),
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        requests=requests,
        latency=latency,
        output_tokens=dict(sorted(output_tokens.items())),
        prompts=dict(sorted(prompts.items(), key=lambda p: (-p[1].rows, p[0]))),
        models=dict(models.most_common()),
        runs=sorted(runs.values(), key=lambda r: (r.first is None, r.first or datetime.min, r.run_id or "")),
        sample=_read_sample(files, sampler.choose()),
        sample_size=sample,
    )


def _counts(column: pa.ChunkedArray) -> dict:
    found = pc.value_counts(column.drop_null())
    return dict(zip(found.field("values").to_pylist(), found.field("counts").to_pylist(), strict=True))


def _count_prompts(table: pa.Table, prompts: dict[str, PromptCounts]) -> None:
    groups = table.group_by(["prompt_id", "status", "error_type"]).aggregate([([], "count_all")])
    seen = sorted(
        groups.to_pylist(), key=lambda g: (g["prompt_id"] or "", g["status"] or "", g["error_type"] or "")
    )
    for group in seen:
        prompt_id = group["prompt_id"] or ""
        counts = prompts.get(prompt_id)
        if counts is None:
            if len(prompts) >= MAX_PROMPTS and prompt_id != OTHER_PROMPTS:
                prompt_id = OTHER_PROMPTS
            counts = prompts.setdefault(prompt_id, PromptCounts())
        n = group["count_all"]
        counts.rows += n
        if group["status"] == OK:
            counts.ok += n
        else:
            counts.errors[outcome_of(group["status"], group["error_type"])] += n


def _count_runs(table: pa.Table, runs: dict[str | None, RunSpan]) -> None:
    """Rows, and from when to when, by run: from the earliest request (a row's ``finished_at`` less its
    ``latency_ms``) to the last row finished."""
    latency_us = pc.cast(pc.round(pc.multiply(table["latency_ms"], 1000.0)), pa.int64())
    sent = pc.subtract(table["finished_at"], pc.cast(latency_us, pa.duration("us")))
    started = pc.coalesce(sent, table["finished_at"])
    groups = (
        table.select(["run_id", "finished_at"])
        .append_column("started", started)
        .group_by("run_id")
        .aggregate([([], "count_all"), ("started", "min"), ("finished_at", "max")])
    )
    for group in groups.to_pylist():
        run = runs.setdefault(group["run_id"], RunSpan(group["run_id"], 0, None, None))
        run.rows += group["count_all"]
        first, last = group["started_min"], group["finished_at_max"]
        if first is not None:
            run.first = first if run.first is None else min(run.first, first)
        if last is not None:
            run.last = last if run.last is None else max(run.last, last)


def _read_sample(files: Sequence[OutPath], chosen: Sequence[Candidate]) -> list[SampledRow]:
    """The chosen rows, read from their files (each file once), in image and prompt order."""
    by_file: dict[int, list[Candidate]] = {}
    for candidate in chosen:
        by_file.setdefault(candidate[1], []).append(candidate)
    sampled = []
    for index, candidates in sorted(by_file.items()):
        table = _read_part(files[index], SAMPLE_COLUMNS)
        wanted = [row for _, _, row in candidates]
        if max(wanted) >= table.num_rows:
            raise _changed(files[index])
        for (rank, _, _), record in zip(candidates, table.take(wanted).to_pylist(), strict=True):
            if row_rank(record["image_id"], record["prompt_id"]) != rank:
                raise _changed(files[index])
            sampled.append(SampledRow(**record))
    return sorted(sampled, key=lambda r: (r.image_id is None, r.image_id or "", r.prompt_id))


def report_files(out: OutPath) -> list[OutPath]:
    """OUT's part files (``output_files``), a part file that a run deleted while they were listed
    reported as ``_changed``."""
    try:
        return output_files(out)
    except OSError as exc:
        raise _unreadable(Path(exc.filename) if exc.filename else out, exc) from None


def _read_part(path: OutPath, columns: Sequence[str]) -> pa.Table:
    """``read_part``, a part file that a run deleted since OUT was listed (its ``remove_rows``, on a
    rerun) reported as ``_changed``."""
    try:
        return read_part(path, columns)
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _unreadable(path: OutPath, exc: OSError) -> UsageError:
    if isinstance(exc, FileNotFoundError):
        return _changed(path)
    return UsageError(f"cannot read {path}: {exc.strerror or exc}")


def _changed(path: OutPath) -> UsageError:
    return UsageError(f"{path} changed while the report was being made (is a run writing OUT?); try again")
