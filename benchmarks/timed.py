"""Benchmark pipelines: the built-in ones plus the time the engine finished each row.

The throughput benchmark needs every system's per-row completion times to compute the same
steady-state figure for each. batchinfer's engine records ``finished_at`` in each result's
timings; these pipelines copy it to a ``_finished_at`` column. Otherwise they are the built-in
``generate`` and ``embed`` pipelines, so the benchmark measures the real code path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa

from batch.engine import EngineResult
from pipelines.embed import Embed
from pipelines.generate import Generate


class TimedGenerate(Generate):
    def output_schema(self) -> pa.Schema:
        return super().output_schema().append(pa.field("_finished_at", pa.float64()))

    def finish(self, row: Mapping[str, Any], result: EngineResult) -> dict[str, Any]:
        return {**super().finish(row, result), "_finished_at": result.timings.get("finished_at")}


class TimedEmbed(Embed):
    def output_schema(self) -> pa.Schema:
        return super().output_schema().append(pa.field("_finished_at", pa.float64()))

    def finish_batch(
        self, rows: Sequence[Mapping[str, Any]], results: Sequence[EngineResult]
    ) -> pa.Table:
        table = super().finish_batch(rows, results)
        done = pa.array([r.timings.get("finished_at") for r in results], pa.float64())
        return table.append_column("_finished_at", done)
