"""A job's run, driver side: plan, lease and run record, the Ray stages, then finalize.

``run_job`` (``batchinfer submit``) and ``retry_failed`` are the two finishing operations of
an output. Both hold the output's lease with a run record that beats with it, run the
pending chunks through the stages of :mod:`batch.runner`, and end in :func:`finalize`, which
removes garbage parts, rewrites the ledger from every run and, once every input chunk is
committed, the manifest. Everything they read or write in the output goes through
:mod:`batch.store`.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import re
import time
from typing import Any

import pyarrow as pa

from batch import cache, openai_files, storage, store
from batch import plan as planning
from batch.errors import BatchInferError, LeaseLost, TerminalError
from batch.progress import Reporter
from batch.runner import (
    build_dataset,
    configure_ray_data,
    feed_window,
    local_model,
    ray_session,
    reap,
    start_gate,
)
from batch.spec import JobSpec
from batch.summary import RunSummary

log = logging.getLogger(__name__)


def run_job(
    spec: JobSpec,
    reporter: Reporter,
    *,
    address: str | None = None,
    verbose: bool = False,
    wait: bool = False,
    lease_ttl: float = 60.0,
) -> RunSummary:
    """Run (or resume) a job to completion. Raises BatchInferError with a one-line reason.

    Resuming is what a second call does: chunks with a marker are skipped. A call on an output
    made by a different spec is refused; while another run holds the output's lease, the call
    waits (``wait``) or raises ``LeaseHeld``. A call on a complete output only repairs it
    (a stale manifest, parts no marker names) and reports it.
    """
    from batch import ledger
    from pipelines import load_pipeline

    started = time.time()
    pipeline = load_pipeline(spec)  # fails fast on a bad pipeline before anything starts
    usd_per_hour = ledger.check(spec)  # and on a bad price override or comparator
    plan = planning.make_plan(spec, required_columns=pipeline.required_columns())
    check_input = getattr(pipeline, "check_input_schema", None)  # user pipelines may lack it
    if check_input is not None:
        check_input(plan.schema)  # typed columns may not overwrite input columns
    record = store.job_record(
        spec,
        fingerprint=plan.fingerprint,
        listing=plan.listing,
        files=len(plan.files),
        rows=plan.total_rows,
        chunks=len(plan.chunks),
    )
    record = store.ensure_job_record(spec, record)  # refuses an output made by another spec
    reporter.planned(planning.describe(plan))
    if not plan.pending and _manifest_current(spec):
        reporter.message("output already complete; nothing to do")
        return _summary(spec, plan, record, chunks_run=0, wall=0.0, gpu=0.0, complete=True)
    with _LeaseAndRun(spec, "submit", ttl=lease_ttl, wait=wait) as held:
        if wait:  # the run we waited for may have committed chunks meanwhile
            plan = planning.make_plan(spec, required_columns=pipeline.required_columns())
        return _run_pending(
            spec, plan, record, reporter, started, held, address=address, verbose=verbose,
            usd_per_hour=usd_per_hour,
        )  # fmt: skip


def _manifest_current(spec: JobSpec) -> bool:
    """The manifest lists exactly what the markers commit (no repair needed)."""
    manifest = store.read_output_json(spec, store.MANIFEST)
    if manifest is None:
        return False
    t = store.totals(store.read_markers(spec))
    return bool(
        manifest.get("data_parts") == t.data_parts
        and manifest.get("failed_parts") == t.failed_parts
    )


class _LeaseAndRun:
    """Hold the output's lease with a run record that beats with it; a lost lease interrupts
    the driver's main thread, which then stops the run with ``LeaseLost``."""

    def __init__(self, spec: JobSpec, kind: str, *, ttl: float, wait: bool) -> None:
        self.spec, self.kind, self.ttl, self.wait = spec, kind, ttl, wait
        self.run: store.Run | None = None
        self.lease: store.Lease | None = None
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> _LeaseAndRun:
        self.lease = self._stack.enter_context(
            store.hold_lease(
                self.spec, ttl=self.ttl, wait=self.wait, on_beat=self._beat, on_lost=_interrupt
            )
        )
        self.run = store.start_run(self.spec, self.kind)
        return self

    def _beat(self) -> None:
        if self.run is not None:
            self.run.beat()

    @property
    def lost(self) -> bool:
        return bool(self.lease and self.lease.lost)

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._stack.close()
        if exc_type is KeyboardInterrupt and self.lost:  # the interrupt came from the lease
            raise _lease_lost(self.spec) from None


def _lease_lost(spec: JobSpec) -> LeaseLost:
    return LeaseLost(
        f"another run took over the lease on {spec.output.path} (this run could not renew it "
        "in time); this run stopped, its committed chunks are kept. Check `batchinfer status` "
        "before running again."
    )


def _interrupt() -> None:
    import _thread

    _thread.interrupt_main()


def _run_pending(
    spec: JobSpec,
    plan: planning.Plan,
    record: dict[str, Any],
    reporter: Reporter,
    started: float,
    held: _LeaseAndRun,
    *,
    address: str | None,
    verbose: bool,
    usd_per_hour: float = 0.0,
) -> RunSummary:
    assert held.run is not None
    run = held.run
    model_path = spec.model.path
    if spec.model.engine == "vllm" and not address and plan.pending:
        from batch.models import resolve_model

        # Prepare a bundled model once, before any engine starts, so its one-off conversion
        # is not billed as engine time; engine actors then find it cached.
        model_path = resolve_model(spec.model.path)
    engines: dict[str, dict[str, Any]] = {}
    released: float | None = None
    state = "failed"
    try:
        if plan.pending:
            # The result cache (and dedup): the model digested, the namespace recorded, here
            # on the driver, so a bad or unreachable cache fails before any engine starts.
            ctx = cache.context(spec, run.run_id)
            flusher = cache.Flusher(ctx)
            rollups = store.RollupWriter(spec)
            try:
                with ray_session(
                    address, verbose=verbose, hub_offline=local_model(spec)
                ) as session:
                    configure_ray_data(verbose)
                    gate = start_gate(spec)
                    ds = build_dataset(spec, plan, model_path, session, run.run_id, ctx, gate)
                    reporter.engines_starting(spec.resources.replicas, usd_per_hour)
                    step = max(1, feed_window(spec) // 8)
                    try:
                        for n, row in enumerate(ds.iter_rows(), 1):
                            if n % step == 0:  # the feed may hand out more chunks
                                gate.set_committed.remote(n)
                            stats = pickle.loads(row["stats"])
                            engines[stats["engine"].get("actor", "")] = stats["engine"]
                            flusher.add(stats.pop("cache_fragments", []))
                            rollups.add(stats.pop("rollup", None))
                            reporter.chunk_done(stats)
                        released = time.time()
                        _close_cache(flusher, reporter)
                    except KeyboardInterrupt:
                        if held.lost:
                            raise _lease_lost(spec) from None
                        state = "interrupted"
                        raise
                    except Exception as exc:
                        raise _one_line(exc) from exc
                    finally:
                        released = released or time.time()
                        rollups.flush()  # the markers committed so far, killed run or not
                        if flusher.pending:  # a failed run: keep what it committed
                            with contextlib.suppress(Exception):
                                flusher.close()
            finally:
                if not address:  # on a cluster the engines' machines are Ray's to clean
                    reap(engines)
        state = "finished"
    finally:
        run.finish(state=state, released_at=released)
    return finalize(
        spec, record, plan, reporter, started, chunks_run=len(plan.pending), run_id=run.run_id
    )


def _close_cache(flusher: cache.Flusher, reporter: Reporter) -> None:
    """Commit the run's last cache entries and fold them into the index (the engines are
    released by now; this is not billed as engine time). A cache that fails here costs the
    next run hits, never this run's output."""
    try:
        info = flusher.close()
    except Exception as exc:
        reporter.message(f"the result cache was not updated: {str(exc)[:200]}")
        return
    if info.get("added"):
        log.info("result cache: %d answers added (%s)", info["added"], info)


def finalize(
    spec: JobSpec,
    record: dict[str, Any],
    plan: planning.Plan,
    reporter: Reporter,
    started: float,
    *,
    chunks_run: int,
    run_id: str = "",
) -> RunSummary:
    """What every finishing operation does last: remove parts no marker names, rewrite the
    ledger from every run, and, when every input chunk is committed, the manifest."""
    from batch.ledger import build_ledger

    markers = store.read_markers(spec, write_back=True)
    t = store.totals(markers)
    store.collect_garbage(spec, markers)
    led = build_ledger(spec, markers, store.read_runs(spec))
    store.write_json(spec, store.LEDGER, led, create_only=False)
    complete = store.is_complete(record, t)
    if complete:
        store.publish_manifest(spec, store.manifest_doc(spec, record, t, started=started))
        if openai_files.applies(spec):  # the provider's output and error files, from the parts
            openai_files.write_files(spec, record, markers)
    this_run = [r for r in led["runs"] if r["run_id"] == run_id]
    summary = _summary(
        spec, plan, record, chunks_run=chunks_run, wall=time.time() - started,
        gpu=float(this_run[0]["gpu_seconds"]) if this_run else 0.0, complete=False,
    )  # fmt: skip
    if not complete:
        reporter.message(
            f"{int(record.get('chunks', 0)) - t.chunks} input chunks are not committed yet: "
            "run `batchinfer submit` with this job to finish them (no manifest until then)"
        )
    reporter.finished(summary)
    return summary


_RETRY_ID = re.compile(r"^(?P<base>.+?)\.retry(?P<n>\d+)$")


def retry_chunk_id(chunk_id: str) -> str:
    """The retry of a chunk's failed rows: ``<id>.retry1``; a retry of a retry counts up."""
    m = _RETRY_ID.match(chunk_id)
    return f"{m['base']}.retry{int(m['n']) + 1}" if m else f"{chunk_id}.retry1"


def retry_failed(
    spec: JobSpec,
    reporter: Reporter,
    *,
    address: str | None = None,
    verbose: bool = False,
    wait: bool = False,
    lease_ttl: float = 60.0,
) -> RunSummary:
    """Reprocess only the rows in ``_failed/`` (e.g. after raising max_model_len).

    Each failed part becomes a retry chunk whose parts and marker are committed like any
    chunk; its marker names the failed part it takes over (see :mod:`batch.store`). A row
    therefore ends up in ``data/`` or still in ``_failed/`` (with its attempt count one
    higher), never both. The spec must be the job's own (speed settings aside): a changed
    model, prompt or pipeline would mix two jobs in one output.
    """
    started = time.time()
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    record = store.read_job_record(fs, root)
    if record is None:
        raise TerminalError(
            f"{spec.output.path} holds no batchinfer job (no {store.JOB_RECORD}): run "
            "`batchinfer submit` first"
        )
    store.check_retry_spec(spec, record)
    with _LeaseAndRun(spec, "retry-failed", ttl=lease_ttl, wait=wait) as held:
        markers = store.read_markers(spec)
        owner = {m["failed_part"]: m["chunk_id"] for m in markers if m.get("failed_part")}
        chunks = []
        files = []
        for part in store.totals(markers).failed_parts:
            rows, _ = planning.read_footer(fs, storage.join(root, part))
            cid = retry_chunk_id(str(owner[part]))
            chunks.append(store.Chunk(cid, part, part, 0, rows, retry_of=part))
            files.append(planning.InputFile(part, part, rows))
        plan = planning.Plan(files=files, chunks=chunks, done=set(), schema=pa.schema([]),
                             protocol="file")  # fmt: skip
        plan.pending = list(chunks)
        plan.fingerprint = str(record["fingerprint"])
        reporter.planned(planning.describe(plan))
        return _run_pending(
            spec, plan, record, reporter, started, held, address=address, verbose=verbose
        )


def _summary(
    spec: JobSpec,
    plan: planning.Plan,
    record: dict[str, Any],
    *,
    chunks_run: int,
    wall: float,
    gpu: float,
    complete: bool,
) -> RunSummary:
    manifest = store.read_output_json(spec, store.MANIFEST) or {}
    led = store.read_output_json(spec, store.LEDGER) or {}
    cached = led.get("cache") or {}
    return RunSummary(
        job=spec.name,
        output=spec.output.path,
        chunks=int(record.get("chunks", len(plan.chunks))),
        chunks_run=chunks_run,
        rows=int(led.get("rows", manifest.get("rows", 0))),
        failed_rows=int(led.get("failed_rows", manifest.get("failed_rows", 0))),
        input_tokens=int(led.get("input_tokens", 0)),
        output_tokens=int(led.get("output_tokens", 0)),
        wall_seconds=wall,
        gpu_seconds=gpu,
        already_complete=complete,
        cached_rows=int(cached.get("hit_rows", 0)) + int(cached.get("dedup_rows", 0)),
    )


_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Crash|Failure)): (.+)$")


def _one_line(exc: BaseException) -> BatchInferError:
    """The root cause of an error raised through Ray, as one line the user can act on.

    Ray Data re-raises a worker's exception as ``RayTaskError(UserCodeException)`` whose
    chain no longer holds the original object, only its formatted traceback; the first
    non-Ray exception line in it is the root cause.
    """
    seen: BaseException = exc
    for _ in range(20):
        if isinstance(seen, BatchInferError):
            return seen
        nxt = getattr(seen, "cause", None) or seen.__cause__
        if not isinstance(nxt, BaseException) or nxt is seen:
            break
        seen = nxt
    for line in str(exc).splitlines():
        m = _EXC_LINE.match(line.strip())
        if m and not m.group(1).startswith("ray."):
            name = m.group(1).rsplit(".", 1)[-1]
            return TerminalError(f"{name}: {m.group(2).strip()[:400]}")
    text = [ln.strip() for ln in str(seen).splitlines() if ln.strip()]
    return TerminalError(f"{type(seen).__name__}: {(text[0] if text else '')[:400]}")
