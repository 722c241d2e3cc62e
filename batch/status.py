"""What an output says about its job: progress, totals, garbage and who is running it now.

Read from the output alone (job record, markers, manifest, lease, runs), so it works from any
machine that can read the output, while the job runs or after it stopped. Every figure comes
from :mod:`batch.store`; this module only puts them together.
"""

from __future__ import annotations

import json
import time
from typing import Any

from batch import storage, store
from batch.ledger import runs_summary
from batch.spec import JobSpec, parse_spec


def output_status(spec: JobSpec, *, repair: bool = False, force: bool = False) -> dict[str, Any]:
    """The output's state. ``repair`` removes parts no marker names (``force``: also those of
    uncommitted chunks younger than the grace period, for when no run can still be writing),
    and rewrites a stale manifest of a complete output."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    record = store.read_job_record(fs, root)
    if record is None:
        return {"output": spec.output.path, "state": "empty", "chunks_done": 0}
    lease = store.current_lease(fs, root)
    lease_doc = lease[1] if lease else None
    running = bool(lease_doc and store.lease_is_live(lease_doc))
    markers = store.read_markers(spec, write_back=repair and not running)
    t = store.totals(markers)
    grace = 0.0 if force else store.GARBAGE_GRACE_SECONDS
    repaired: dict[str, Any] = {}
    if repair:
        if running:
            repaired["refused"] = "a run holds the output's lease; repair when it has finished"
        else:
            garbage = store.collect_garbage(spec, markers, grace=grace)
            repaired["removed_parts"] = garbage.removed
            if store.is_complete(record, t):
                doc = store.manifest_doc(spec, record, t, started=float(record["created_at"]))
                repaired["manifest_rewritten"] = store.publish_manifest(spec, doc)
    garbage = store.find_garbage(spec, markers, grace=grace)
    committed = {str(m["chunk_id"]) for m in markers}
    in_flight = store.pending_attempts(spec, committed)
    manifest = store.read_output_json(spec, store.MANIFEST)
    total = int(record.get("chunks", 0))
    complete = store.is_complete(record, t)
    stale = bool(
        complete
        and (
            manifest is None
            or manifest.get("data_parts") != t.data_parts
            or manifest.get("failed_parts") != t.failed_parts
        )
    )
    if running:
        state = "running"
    elif complete and not stale and not garbage.removable and not garbage.young:
        state = "complete"
    elif complete:
        state = "complete, needs repair"
    else:
        state = "incomplete"
    runs, paid = runs_summary(store.read_runs(spec), markers)
    last = max((float(m.get("committed_at", 0)) for m in markers), default=record["created_at"])
    end = manifest["finished_at"] if manifest and complete else (time.time() if running else last)
    return {
        "output": spec.output.path,
        "job": record["spec"]["name"],
        "fingerprint": record["fingerprint"],
        "state": state,
        "chunks_done": t.chunks,
        "chunks_total": total,
        "chunks_pending": max(0, total - t.chunks),
        "chunks_with_attempts_not_committed": in_flight,
        "input_rows": int(record["input"]["rows"]),
        "rows": t.rows,
        "failed_rows": t.failed_rows,
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "retries": t.retries,
        "parts_committed": len(t.data_parts) + len(t.failed_parts),
        "parts_orphaned": sorted(garbage.removable + garbage.young),
        "parts_orphaned_young": garbage.young,
        "manifest": "missing" if manifest is None else ("stale" if stale else "current"),
        "runs": runs,
        "paid_not_committed": paid,
        "started_at": record["created_at"],
        "elapsed_seconds": round(end - record["created_at"], 1),
        "lease": (
            {"held": running, "holder": store.describe_holder(lease_doc)} if lease_doc else None
        ),
        **({"repair": repaired} if repair else {}),
    }


def spec_from_output(
    output: str, storage_options: dict[str, Any], overrides: list[str]
) -> JobSpec | None:
    """The job spec stored in an output, with the caller's storage options and overrides."""
    fs, root = storage.open_fs(output, storage_options)
    record = store.read_job_record(fs, root)
    if record is None:
        return None
    doc = record["spec"]
    doc["output"]["path"] = output
    doc["output"]["storage_options"] = storage_options
    doc["input"]["storage_options"] = storage_options
    return parse_spec(json.dumps(doc), source=f"{output}/{store.JOB_RECORD}",
                      overrides=overrides)  # fmt: skip
