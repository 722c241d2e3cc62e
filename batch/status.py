"""What an output says about its job: progress, totals and who is running it now.

Read from the output alone (job record, markers, manifest, lease), so it works from any
machine that can read the output, while the job runs or after it stopped.
"""

from __future__ import annotations

import json
import time
from typing import Any

from batch import storage, store
from batch.spec import JobSpec, parse_spec


def output_status(spec: JobSpec) -> dict[str, Any]:
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    record = store.read_job_record(fs, root)
    if record is None:
        return {"output": spec.output.path, "state": "empty", "chunks_done": 0}
    markers = store.read_markers(spec, store.list_markers(spec))
    live = store.live_failed_parts(markers)
    chunk_markers = [m for m in markers if not m.get("supersedes")]
    manifest = store.read_output_json(spec, store.MANIFEST)
    lease = store.current_lease(fs, root)
    lease_doc = lease[1] if lease else None
    running = bool(lease_doc and store.lease_is_live(lease_doc))
    last = max((float(m.get("committed_at", 0)) for m in markers), default=record["created_at"])
    end = manifest["finished_at"] if manifest else (time.time() if running else last)
    total = int(record.get("chunks", 0))
    if manifest and len(chunk_markers) >= total:
        state = "complete"
    else:
        state = "running" if running else "incomplete"
    return {
        "output": spec.output.path,
        "job": record["spec"]["name"],
        "fingerprint": record["fingerprint"],
        "state": state,
        "chunks_done": len(chunk_markers),
        "chunks_total": total,
        "input_rows": int(record["input"]["rows"]),
        "rows": sum(int(m["rows"]) for m in markers),
        "failed_rows": sum(int(m["failed_rows"]) for m in markers if m.get("failed_part") in live),
        "input_tokens": sum(int(m["input_tokens"]) for m in markers),
        "output_tokens": sum(int(m["output_tokens"]) for m in markers),
        "retries": len(markers) - len(chunk_markers),
        "started_at": record["created_at"],
        "elapsed_seconds": round(end - record["created_at"], 1),
        "lease": (
            {"held": running, "holder": store.describe_holder(lease_doc)}
            if lease_doc
            else None
        ),
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
