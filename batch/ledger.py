"""The cost ledger: what the run used (tokens, rows, time, accelerator-seconds).

Token counts are the engine's own (its tokenizer, chat template included). This issue's
ledger holds usage; prices and API comparisons are added on top of these fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batch.spec import JobSpec


def build_ledger(
    spec: JobSpec,
    markers: Sequence[dict[str, Any]],
    *,
    wall_seconds: float,
    gpu_seconds: float,
    engines: int,
) -> dict[str, Any]:
    """Totals over every committed chunk (all runs of the job), plus this run's time."""
    rows = sum(int(m["rows"]) for m in markers)
    superseded = {m["supersedes"] for m in markers if m.get("supersedes")}
    failed = sum(int(m["failed_rows"]) for m in markers if m.get("failed_part") not in superseded)
    inp = sum(int(m["input_tokens"]) for m in markers)
    out = sum(int(m["output_tokens"]) for m in markers)
    return {
        "job": spec.name,
        "model": spec.model.path,
        "task": spec.model.task,
        "rows": rows,
        "failed_rows": failed,
        "chunks": sum(1 for m in markers if not m.get("supersedes")),
        "input_tokens": inp,
        "output_tokens": out,
        "wall_seconds": round(wall_seconds, 3),
        "gpu_seconds": round(gpu_seconds, 3),
        "engine_replicas": engines,
        "device": spec.resources.device,
        "output_tokens_per_second": round(out / wall_seconds, 3) if wall_seconds else 0.0,
        "notes": "gpu_seconds: accelerator-seconds held by engine actors of the last run, from "
        "actor start (model load included) to release; on device cpu they are CPU-seconds.",
    }
