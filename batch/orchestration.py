"""What a scheduler needs from a job, without the scheduler: a run id from the schedule's
logical date, overrides given as a mapping, the command that runs a job on the scheduler's
own worker, the wait for a job on a cluster (with its deadline), and the small result a
scheduler passes on (the manifest's URI and the ledger's totals, never rows).

``batch.airflow`` builds its operator on these; importing this module loads no Airflow (nor
Ray or vLLM), so the logic is tested without either.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time as clock
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, time
from pathlib import Path
from typing import Any

from batch import cluster, store
from batch.cluster import make_run_id, resolved_path
from batch.errors import BatchInferError, TerminalError
from batch.spec import JobSpec, load_spec

# The CLI's exit codes (see batch.cli): what a scheduler does about each.
EXIT_OK, EXIT_FAILED, EXIT_SPEC, EXIT_LEASE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130


class OutputIncomplete(TerminalError):
    """The run ended but the output has no manifest (it did not finish, or wrote elsewhere)."""


def overrides_list(overrides: Mapping[str, Any] | Sequence[str] | None) -> list[str]:
    """``{"input.path": "s3://b/dt=2026-01-01/"}`` -> ``["input.path=s3://b/dt=2026-01-01/"]``.

    A string value is passed as written and read as YAML, exactly like ``--set`` (so
    ``"2"`` is a number); any other value (number, list, mapping) is written as JSON, which
    YAML reads. A list of ``"a.b=value"`` strings is taken as it is.
    """
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise TypeError("overrides: give a mapping {'a.b': value} or a list of 'a.b=value'")
    if isinstance(overrides, Mapping):
        items = []
        for key, value in overrides.items():
            # JSON is YAML (flow style) and keeps strings exact, e.g. a stop string "\n\n".
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            items.append(f"{key}={text}")
        return items
    return [str(item) for item in overrides]


def load_job(job: str | Path, overrides: Mapping[str, Any] | Sequence[str] | None) -> JobSpec:
    """The job file with the (already rendered) overrides applied. Raises SpecError."""
    return load_spec(job, overrides_list(overrides))


def schedule_tag(logical_date: datetime | None, fallback: str | None = None) -> str:
    """The part of a run id that names the scheduled run: ``20260101`` for a run at
    midnight UTC (a daily schedule), ``20260101t063000`` otherwise. Retries and re-runs of
    the same schedule slot get the same tag; that is what makes them attach instead of
    running twice. Without a logical date (a manual run in Airflow 3) the scheduler's own
    run id stands in, as a short digest: ``r1a2b3c4d``.
    """
    if logical_date is not None:
        if logical_date.tzinfo is not None:
            logical_date = logical_date.astimezone(UTC)
        if logical_date.time() == time(0, 0):
            return logical_date.strftime("%Y%m%d")
        return logical_date.strftime("%Y%m%dt%H%M%S")
    if fallback:
        return "r" + hashlib.sha256(fallback.encode()).hexdigest()[:8]
    raise ValueError("no logical date and no run id to name the run by: give run_tag")


def run_id_for(spec: JobSpec, tag: str) -> str:
    """``<job name>-<tag>-<digest>``, e.g. ``enrich-reviews-20260101-3f2a...``: the digest is 12
    hex digits over the spec's fingerprint and its output path (``cluster.run_digest``)."""
    return make_run_id(spec, tag=tag)


def output_uri(spec: JobSpec, name: str = "") -> str:
    """The output (or a file in it) as the user wrote it: ``s3://b/enriched/dt=.../_MANIFEST.json``;
    a relative local path is made absolute (the worker's working directory is not the reader's).
    """
    path = resolved_path(spec.output.path)
    return f"{path.rstrip('/')}/{name}" if name else path


def result_summary(spec: JobSpec) -> dict[str, Any]:
    """What a finished run hands downstream (an Airflow XCom): the manifest's URI and the
    ledger's totals. Read from the output with the spec's storage options. Raises
    OutputIncomplete when there is no manifest.
    """
    manifest = store.read_output_json(spec, store.MANIFEST)
    if manifest is None:
        raise OutputIncomplete(
            f"{output_uri(spec, store.MANIFEST)} does not exist: the run did not finish this "
            "output (if the cluster reports the run SUCCEEDED, its output was removed or moved "
            "since: delete that Ray job, `ray job delete <submission id>`, or give the task "
            "another run_tag, to run it again)"
        )
    ledger = store.read_output_json(spec, store.LEDGER) or {}
    batch_prices = [
        c for c in ledger.get("comparisons", []) if isinstance(c.get("batch_usd"), int | float)
    ]
    best = min(batch_prices, key=lambda c: c["batch_usd"], default=None)

    def total(key: str) -> Any:
        return ledger.get(key, manifest.get(key))

    return {
        "manifest": output_uri(spec, store.MANIFEST),
        "rows": total("rows"),
        "failed_rows": total("failed_rows"),
        "input_tokens": total("input_tokens"),
        "output_tokens": total("output_tokens"),
        "run_cost_usd": ledger.get("run_cost_usd"),
        "comparisons_best_batch_usd": best["batch_usd"] if best else None,
        "comparisons_best_batch": f"{best['provider']}/{best['model']}" if best else None,
    }


def local_command(
    batchinfer_bin: str,
    job: str | Path,
    overrides: Mapping[str, Any] | Sequence[str] | None,
    *,
    address: str | None = None,
    wait: bool = True,
) -> list[str]:
    """``batchinfer submit JOB --set ... --wait``: the job run on the scheduler's worker.

    ``--wait``: if another run holds the output (exit 3 otherwise), wait for it; it may
    finish the output, and then this run has nothing left to do.
    """
    cmd = [batchinfer_bin, "submit", str(job)]
    for item in overrides_list(overrides):
        cmd += ["--set", item]
    if address:
        cmd += ["--address", address]
    if wait:
        cmd.append("--wait")
    return cmd


def describe_exit(code: int) -> str:
    """One line on what a ``batchinfer submit`` exit code means for the task."""
    return {
        EXIT_OK: "done",
        EXIT_FAILED: "the job failed (see the lines above); a retry resumes from its markers",
        EXIT_SPEC: "invalid job spec or input; a retry will not help",
        EXIT_LEASE: "another run holds the output (run with wait=True to wait for it)",
        EXIT_INTERRUPTED: "interrupted; committed chunks are kept, a retry resumes",
    }.get(code, f"batchinfer exited {code}")


# --------------------------------------------------------------------------- waiting

TIMEOUT = "TIMEOUT"  # a watch's final state when its deadline passed (the job was stopped)
ERROR = "ERROR"  # a watch's final state when the cluster could not be asked


async def watch_remote(
    address: str,
    submission_id: str,
    *,
    poll_interval: float = 10.0,
    max_poll_errors: int = 10,
    deadline: float | None = None,
    log: Any = None,
) -> dict[str, Any]:
    """Poll a Ray job until it is SUCCEEDED, FAILED or STOPPED; ``{"state": ..., ...}``.

    ``deadline`` (epoch seconds): when it passes first, stop the job and end with state
    ``TIMEOUT``. A scheduler's own timeout only abandons the wait, which would leave the job
    running (Airflow calls no ``on_kill`` for a deferred task that times out), so the wait
    enforces the deadline itself. ``ERROR`` (with ``message``): the cluster refused the
    token, or did not answer ``max_poll_errors`` times in a row. The Jobs API client blocks,
    so each call runs in a thread: an event loop shared with others (Airflow's triggerer)
    never waits on it.
    """
    log = log or logging.getLogger(__name__)
    errors, last = 0, ""
    while True:
        if deadline is not None and clock.time() >= deadline:
            stopped = await stop_quietly(address, submission_id, log=log)
            return {
                "state": TIMEOUT,
                "message": f"the deadline passed; {submission_id} was "
                + ("stopped" if stopped else "not running any more (or could not be stopped)"),
            }
        try:
            state = await asyncio.to_thread(cluster.remote_state, address, submission_id)
            errors = 0
        except BatchInferError as exc:
            errors += 1
            if isinstance(exc, TerminalError) or errors >= max_poll_errors:
                return {"state": ERROR, "message": str(exc)}
            log.warning(
                "asking %s about %s failed (%d of %d): %s",
                address, submission_id, errors, max_poll_errors, exc,
            )  # fmt: skip
            state = ""
        if state and state != last:
            log.info("%s: %s", submission_id, state)
            last = state
        if state in cluster.TERMINAL:
            return {"state": state}
        pause = poll_interval
        if deadline is not None:
            pause = max(0.0, min(pause, deadline - clock.time()))
        await asyncio.sleep(pause)


async def stop_quietly(
    address: str,
    submission_id: str,
    *,
    log: Any = None,
) -> bool:
    """Ask Ray to stop the job; True if it was running. Never raises for the cluster's sake:
    it runs while something else is being torn down, and committed chunks are kept anyway."""
    log = log or logging.getLogger(__name__)
    try:
        stopped = await asyncio.to_thread(cluster.stop_remote, address, submission_id)
    except BatchInferError as exc:
        log.warning("could not stop %s on %s: %s", submission_id, address, exc)
        return False
    log.info("stop %s on %s: %s", submission_id, address, "stopped" if stopped else "not running")
    return stopped
