"""Progress reporting, pluggable: a rich bar on a terminal, JSON lines for logs, or nothing.

The runner calls a ``Reporter``; only the CLI picks which one. Everything the reporters
see is the per-chunk stats the commit tasks return, so reporting never touches rows.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Protocol, TextIO

from batch.summary import RunSummary


class Reporter(Protocol):
    def planned(self, plan: dict[str, Any]) -> None: ...
    def engines_starting(self, replicas: int, usd_per_hour: float = 0.0) -> None: ...
    def chunk_done(self, stats: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def finished(self, summary: RunSummary) -> None: ...


class _Totals:
    def __init__(self) -> None:
        self.start = time.time()
        self.first_result: float | None = None
        self.chunks = self.chunks_total = 0
        self.rows = self.rows_total = 0
        self.failed = 0
        self.input_tokens = self.output_tokens = 0
        self.cached = 0  # rows answered by the result cache or an equal prompt (dedup)
        self.engines_at: float | None = None
        self.usd_per_hour = 0.0

    def planned(self, plan: dict[str, Any]) -> None:
        self.chunks_total = int(plan["pending_chunks"])
        self.rows_total = int(plan["pending_rows"])

    def add(self, stats: dict[str, Any]) -> None:
        self.first_result = self.first_result or time.time()
        self.chunks += 1
        self.rows += int(stats["rows"]) + int(stats["failed_rows"])
        self.failed += int(stats["failed_rows"])
        self.input_tokens += int(stats["input_tokens"])
        self.output_tokens += int(stats["output_tokens"])
        self.cached += int(stats.get("cache_hits", 0)) + int(stats.get("dedup_rows", 0))

    def engines_started(self, usd_per_hour: float) -> None:
        self.engines_at = time.time()
        self.usd_per_hour = usd_per_hour

    @property
    def usd_so_far(self) -> float:
        """Accelerator time since the engines started, at the job's rate."""
        if self.engines_at is None:
            return 0.0
        return (time.time() - self.engines_at) / 3600 * self.usd_per_hour

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.time() - self.start
        return (self.input_tokens + self.output_tokens) / elapsed if elapsed > 0 else 0.0

    @property
    def output_tokens_per_second(self) -> float:
        elapsed = time.time() - self.start
        return self.output_tokens / elapsed if elapsed > 0 else 0.0


class NullReporter:
    """--quiet: nothing while running (the CLI still prints the one-line summary)."""

    def planned(self, plan: dict[str, Any]) -> None: ...
    def engines_starting(self, replicas: int, usd_per_hour: float = 0.0) -> None: ...
    def chunk_done(self, stats: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...
    def finished(self, summary: RunSummary) -> None: ...


class JsonLogReporter:
    """One JSON object per line (Airflow and other log collectors); at most one per interval."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0) -> None:
        self.stream = stream or sys.stdout
        self.interval = interval
        self.totals = _Totals()
        self._last = 0.0

    def _emit(self, event: str, **fields: Any) -> None:
        doc = {"ts": round(time.time(), 3), "event": event, **fields}
        self.stream.write(json.dumps(doc) + "\n")
        self.stream.flush()

    def planned(self, plan: dict[str, Any]) -> None:
        self.totals.planned(plan)
        self._emit("planned", **plan)

    def engines_starting(self, replicas: int, usd_per_hour: float = 0.0) -> None:
        self.totals.engines_started(usd_per_hour)
        self._emit("engines_starting", replicas=replicas, usd_per_hour=usd_per_hour)

    def chunk_done(self, stats: dict[str, Any]) -> None:
        t = self.totals
        t.add(stats)
        now = time.time()
        if now - self._last < self.interval and t.chunks < t.chunks_total:
            return
        self._last = now
        self._emit(
            "progress",
            chunks=t.chunks,
            chunks_total=t.chunks_total,
            rows=t.rows,
            rows_total=t.rows_total,
            failed_rows=t.failed,
            cached_rows=t.cached,
            output_tokens=t.output_tokens,
            tokens_per_second=round(t.tokens_per_second, 1),
            usd_so_far=round(t.usd_so_far, 6),
        )

    def message(self, text: str) -> None:
        self._emit("message", text=text)

    def finished(self, summary: RunSummary) -> None:
        self._emit("finished", **summary_fields(summary))


class RichReporter:
    """A live bar: rows and chunks of total, tokens/s, elapsed and ETA."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = Console(stderr=True)
        self.totals = _Totals()
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,.0f}/{task.total:,.0f} rows"),
            TextColumn("{task.fields[chunks]}"),
            TextColumn("{task.fields[speed]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task: Any = None

    def planned(self, plan: dict[str, Any]) -> None:
        self.totals.planned(plan)
        self.console.print(
            f"plan: {plan['files']} files, {plan['rows']:,} rows in {plan['chunks']} chunks "
            f"({plan['committed_chunks']} already committed)"
        )

    def engines_starting(self, replicas: int, usd_per_hour: float = 0.0) -> None:
        # The bar starts once Ray is up, so Ray's own start-up lines print above it.
        self.totals.engines_started(usd_per_hour)
        self.progress.start()
        self.task = self.progress.add_task(
            f"loading {replicas} engine(s)",
            total=max(1, self.totals.rows_total),
            chunks=f"0/{self.totals.chunks_total} chunks",
            speed="",
        )

    def chunk_done(self, stats: dict[str, Any]) -> None:
        t = self.totals
        t.add(stats)
        self.progress.update(
            self.task,
            description="running",
            completed=t.rows,
            chunks=f"{t.chunks}/{t.chunks_total} chunks",
            speed=f"{t.tokens_per_second:,.0f} tok/s ${t.usd_so_far:,.4f}"
            + (f" [green]{t.cached:,} cached[/]" if t.cached else "")
            + (f" [red]{t.failed} failed" if t.failed else ""),
        )

    def message(self, text: str) -> None:
        self.console.print(text)

    def finished(self, summary: RunSummary) -> None:
        if self.task is not None:
            self.progress.update(self.task, description="done")
        self.progress.stop()

    def stop(self) -> None:
        self.progress.stop()


def summary_fields(summary: RunSummary) -> dict[str, Any]:
    return {
        "job": summary.job,
        "output": summary.output,
        "rows": summary.rows,
        "failed_rows": summary.failed_rows,
        "input_tokens": summary.input_tokens,
        "output_tokens": summary.output_tokens,
        "wall_seconds": round(summary.wall_seconds, 2),
        "tokens_per_second": round(summary.tokens_per_second, 1),
        "output_tokens_per_second": round(summary.output_tokens_per_second, 1),
        "chunks": summary.chunks,
        "chunks_run": summary.chunks_run,
        "cached_rows": summary.cached_rows,
    }


def summary_line(summary: RunSummary) -> str:
    """The one line printed when a job ends."""
    if summary.already_complete:
        return (
            f"{summary.job}: already complete: {summary.rows:,} rows, "
            f"{summary.failed_rows:,} failed -> {summary.output}"
        )
    cached = ""
    if summary.cached_rows:
        cached = f" ({summary.cached_rows:,} from the cache or an equal prompt)"
    return (
        f"{summary.job}: {summary.rows:,} rows{cached}, {summary.failed_rows:,} failed, "
        f"{summary.input_tokens:,} in / {summary.output_tokens:,} out tokens in "
        f"{summary.wall_seconds:,.1f}s ({summary.output_tokens_per_second:,.1f} output tok/s) "
        f"-> {summary.output}"
    )
