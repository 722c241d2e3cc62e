"""The Ray stages of a job: read+prepare -> engine actor pool -> finish+commit.

Each pending chunk is one Ray Data row from start to end, so a chunk is never split or
merged on its way: the read task reads the chunk's row range and prepares requests, the
engine stage (an actor pool, one vLLM engine per replica, several chunks in flight per
engine) runs them, and the commit task finishes the rows and writes the chunk's parts and
marker. The driver only sees each chunk's small stats dict; it never holds rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
import pickle
import socket
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from batch import cpus, storage, store
from batch import plan as planning
from batch.cache import CacheContext
from batch.engine import EngineRequest, EngineResult
from batch.spec import JobSpec

log = logging.getLogger(__name__)


@dataclass
class ChunkWork:
    """A chunk on its way through the stages (pickled into one Ray Data row)."""

    chunk: planning.Chunk
    table: pa.Table
    requests: list[EngineRequest]
    failures: dict[int, tuple[str, str]]
    results: list[EngineResult] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    engine: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0  # engine failures before this attempt, plus this one
    attempts_started: int = 0  # attempt records of the chunk, this one included
    prior_attempts: list[int] = field(default_factory=list)  # per row, for retried rows
    shared: dict[int, int] = field(default_factory=dict)  # row -> the row with its prompt
    cached: list[EngineResult] = field(default_factory=list)  # answers from the result cache


# --------------------------------------------------------------------------- stages


def prepare_chunk(
    row: dict[str, Any], spec_json: str, protocol: str, cache: CacheContext | None = None
) -> dict[str, Any]:
    """Read task: the chunk's rows -> engine requests (bad rows become failures, not errors).

    With a cache context, each request gets its cache key; rows whose prompt an earlier row of
    the chunk has are left out (dedup), and the answers the cache holds are taken from it: only
    the rest goes to the engine.
    """
    from batch.errors import RowError
    from pipelines import load_pipeline

    spec = JobSpec.model_validate_json(spec_json)
    chunk: planning.Chunk = pickle.loads(row["chunk"])
    t0 = time.perf_counter()
    # The file must still be the one planned (rows, size, footer): else InputChanged stops the
    # job rather than commit rows of another file under this chunk's id.
    table = planning.read_chunk(spec, chunk, protocol, expected=row.get("identity") or None)
    prior: list[int] = []
    if chunk.retry_of:
        if store.ATTEMPT in table.column_names:
            prior = [int(a or 0) for a in table[store.ATTEMPT].to_pylist()]
        drop = [c for c in (store.ERROR_CLASS, store.ERROR_MESSAGE, store.ATTEMPT,
                            store.OUTPUT_TEXT)
                if c in table.column_names]  # fmt: skip
        table = table.drop_columns(drop)
    t1 = time.perf_counter()
    pipeline = load_pipeline(spec)
    requests: list[EngineRequest] = []
    # Rows the reader could not parse (text inputs' _parse_error) fail before the pipeline.
    failures: dict[int, tuple[str, str]] = planning.malformed_rows(spec, table)
    for key, values in enumerate(table.to_pylist()):
        if key in failures:
            continue
        try:
            model_input = pipeline.prepare(values)
        except RowError as exc:
            failures[key] = (exc.kind, exc.message)
            continue
        except Exception as exc:  # a user pipeline's bug on this row: still that row's failure
            failures[key] = (type(exc).__name__, str(exc)[:500])
            continue
        if isinstance(model_input, EngineRequest):  # a pipeline with per-request sampling
            requests.append(dataclasses.replace(model_input, key=key))
        elif isinstance(model_input, str):
            requests.append(EngineRequest(key=key, text=model_input))
        else:
            requests.append(EngineRequest(key=key, messages=tuple(model_input)))
    work = ChunkWork(
        chunk=chunk, table=table, requests=requests, failures=failures, prior_attempts=prior
    )
    work.timings.update(read_s=t1 - t0, prepare_s=time.perf_counter() - t1)
    if cache is not None:
        t2 = time.perf_counter()
        _use_cache(work, cache)
        work.timings["cache_s"] = time.perf_counter() - t2
    return {"chunk_id": chunk.chunk_id, "work": pickle.dumps(work, protocol=5)}


def _use_cache(work: ChunkWork, cache: CacheContext) -> None:
    """Key the requests, share equal prompts within the chunk, serve cached answers."""
    from batch.cache import lookup, result_from_json, row_key

    first: dict[bytes, int] = {}
    unique: list[EngineRequest] = []
    for r in work.requests:
        key = row_key(cache.namespace, r)
        if cache.dedup and key in first:
            work.shared[r.key] = first[key]
            continue
        first.setdefault(key, r.key)
        unique.append(dataclasses.replace(r, cache_key=key))
    hits: dict[bytes, str] = {}
    if cache.lookup:
        try:
            hits = lookup(cache, [r.cache_key for r in unique if r.cache_key])
        except Exception as exc:  # the cache saves work; it never fails a job
            log.warning("cache lookup failed, chunk %s runs uncached: %s", work.chunk.chunk_id, exc)
            work.timings["cache_errors"] = 1
    work.requests = [r for r in unique if r.cache_key not in hits]
    work.cached = [
        result_from_json(hits[r.cache_key], r.key) for r in unique if r.cache_key in hits
    ]


def _me() -> tuple[int, float]:
    import psutil

    return os.getpid(), psutil.Process().create_time()


def _node_id() -> str:
    """The Ray node this process runs on ('' outside Ray)."""
    import ray

    if not ray.is_initialized():
        return ""
    return str(ray.get_runtime_context().get_node_id())


def reap(engines: dict[str, dict[str, Any]], grace: float = 15.0) -> int:
    """After Ray shut down, end engine processes on this machine that outlived their actor.

    Ray kills the actors, and vLLM's engine processes notice their parent is gone and exit;
    this makes sure of it, so no engine keeps memory or a GPU after the job. Returns how
    many had to be ended.
    """
    import psutil

    host = socket.gethostname()
    procs = []
    for info in engines.values():
        if info.get("host") != host:
            continue
        for pid, started in info.get("processes", []):
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if abs(p.create_time() - started) < 1e-3:  # the same process, not a reused pid
                    procs.append(p)
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if alive:
        log.warning("ended %d engine processes that outlived their actors", len(alive))
    return len(alive)


class _Quarantine:
    """Shared/exclusive gate on an engine: a chunk being retried runs alone.

    When an engine dies, every chunk in flight on it loses an attempt. Running a retried
    chunk alone means a chunk that kills the engine again is the only one blamed, so
    innocent neighbours are never given up on.
    """

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self._shared = 0
        self._exclusive = False

    @asynccontextmanager
    async def enter(self, alone: bool) -> AsyncIterator[None]:
        async with self._cond:
            if alone:
                await self._cond.wait_for(lambda: not self._exclusive and self._shared == 0)
                self._exclusive = True
            else:
                await self._cond.wait_for(lambda: not self._exclusive)
                self._shared += 1
        try:
            yield
        finally:
            async with self._cond:
                if alone:
                    self._exclusive = False
                else:
                    self._shared -= 1
                self._cond.notify_all()


class EngineStage:
    """Engine actor: holds one engine for the whole job and runs several chunks at once.

    Each chunk's attempt is recorded in the output before the engine sees it, so the count
    survives crashes. An engine error retries the chunk (alone); a broken engine ends the
    actor process, Ray restarts the actor and Ray Data resubmits its chunks; a chunk that
    has used ``resources.max_attempts`` is given up and its rows go to ``_failed/``.
    """

    def __init__(
        self,
        spec_json: str,
        model_path: str,
        session: cpus.Session | None = None,
        run_id: str = "",
    ) -> None:
        from batch.engine import build_engine
        from batch.ledger import accelerators

        self.created = time.time()
        self.actor = uuid.uuid4().hex[:12]
        self.run_id = run_id
        self.spec = JobSpec.model_validate_json(spec_json)
        self.fs, self.root = storage.open_fs(
            self.spec.output.path, self.spec.output.storage_options
        )
        # The accelerator is held from now on (model load included): record it durably, so a
        # run killed at any moment has still billed the time its engines held.
        self.node_id = _node_id()
        self.clock = store.EngineClock(
            self.fs, self.root, run_id, self.actor, accelerators=accelerators(self.spec)
        )
        if self.node_id:  # which Ray node held the time (hosts can run several nodes)
            self.clock.doc["node_id"] = self.node_id
        self.clock.start()
        if self.spec.model.engine == "vllm":
            from batch.models import resolve_model

            # On a cluster each node prepares a bundled model itself (cached, idempotent).
            model_path = resolve_model(model_path)
        with cpus.EngineCores(session) as cores:
            self.engine = build_engine(self.spec, model_path)
        self.cpus = cores.result  # {} unless the run's other processes were moved
        self.ready = time.time()
        self.gate = _Quarantine()
        # Dedup across the chunks this engine holds: prompts in flight, and recent answers.
        self.dedup = self.spec.dedup
        self.inflight: dict[bytes, asyncio.Future[EngineResult | None]] = {}
        self.recent: OrderedDict[bytes, EngineResult] = OrderedDict()
        log.info("engine %s ready in %.1fs", self.actor, self.ready - self.created)

    async def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        work: ChunkWork = pickle.loads(row["work"])
        work.results = await self._run(work) if work.requests else []
        work.engine = {
            "actor": self.actor,
            "created": self.created,
            "ready": self.ready,
            "host": socket.gethostname(),
            **({"node_id": self.node_id} if self.node_id else {}),
            "processes": [_me(), *self.engine.processes()],
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            **({"cpus": self.cpus} if self.cpus else {}),
        }
        return {"chunk_id": row["chunk_id"], "work": pickle.dumps(work, protocol=5)}

    async def _run(self, work: ChunkWork) -> list[EngineResult]:
        chunk_id = work.chunk.chunk_id
        limit = self.spec.resources.max_attempts
        while True:
            # Object-store reads and writes: off the event loop, which other chunks share.
            state = await asyncio.to_thread(
                store.attempt_state, self.fs, self.root, chunk_id, self.run_id
            )
            failures, last_error = state.failures, state.last_error
            work.attempts_started = state.next_number - 1  # those before: paid for too
            if failures >= limit:
                log.error("giving up on chunk %s after %d failed attempts", chunk_id, failures)
                message = f"gave up after {failures} failed attempts; last error: {last_error}"
                work.attempts = failures
                return [
                    EngineResult(key=r.key, error_kind="ChunkFailed", error=message[:500])
                    for r in work.requests
                ]
            attempt = await asyncio.to_thread(
                store.begin_attempt,
                self.fs,
                self.root,
                chunk_id,
                {"run": self.run_id, "actor": self.actor, "at": time.time()},
                first=state.next_number,
            )
            work.attempts_started = attempt  # its number: every attempt so far reached the engine
            work.attempts = failures + 1
            self.clock.started_chunk(work.chunk.rows)
            try:
                async with self.gate.enter(alone=failures > 0):
                    # The engine window of this chunk: from its requests reaching the engine
                    # to its last result (the ledger's busy/idle accounting reads these).
                    work.timings["engine_start"] = time.time()
                    results = await self._generate(work.requests)
                    work.timings["engine_end"] = time.time()
                    return results
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"[:300]
                log.warning("chunk %s attempt %d failed: %s", chunk_id, attempt, error)
                await asyncio.to_thread(
                    store.fail_attempt, self.fs, self.root, chunk_id, attempt, error
                )
                if not self.engine.healthy():
                    # A dead engine cannot be revived in place; end the actor so Ray
                    # restarts it with a fresh engine and resubmits its chunks.
                    log.error("engine %s is dead; restarting the actor", self.actor)
                    self.engine.close()
                    os._exit(1)

    async def _generate(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        """``engine.run`` with dedup across this engine's chunks: a prompt already answered in
        this run (recently) or in flight for another chunk is not sent again; the row gets
        that answer (``source="dup"``). If the other chunk fails, the row is run here."""
        if not self.dedup:
            return await self.engine.run(requests)
        loop = asyncio.get_running_loop()
        own: list[EngineRequest] = []
        copies: list[EngineResult] = []
        waits: list[tuple[EngineRequest, asyncio.Future[EngineResult | None]]] = []
        mine: dict[bytes, asyncio.Future[EngineResult | None]] = {}
        for r in requests:
            k = r.cache_key
            if k is None:
                own.append(r)
            elif (done := self.recent.get(k)) is not None:
                self.recent.move_to_end(k)
                copies.append(dataclasses.replace(done, key=r.key, source="dup"))
            elif (pending := self.inflight.get(k)) is not None:
                waits.append((r, pending))
            else:
                self.inflight[k] = mine[k] = loop.create_future()
                own.append(r)
        results: list[EngineResult] = []
        try:
            results = await self.engine.run(own) if own else []
        finally:
            by_key = {res.key: res for res in results}
            for r in own:
                if r.cache_key is None or r.cache_key not in mine:
                    continue
                answer = by_key.get(r.key)
                ok = answer is not None and not answer.error_kind
                mine[r.cache_key].set_result(answer if ok else None)
                self.inflight.pop(r.cache_key, None)
                if ok:
                    assert answer is not None
                    self.recent[r.cache_key] = answer
                    while len(self.recent) > RECENT_ANSWERS:
                        self.recent.popitem(last=False)
        leftovers: list[EngineRequest] = []
        for r, pending in waits:
            answer = await asyncio.shield(pending)
            if answer is None:
                leftovers.append(r)  # its owner failed: this row is run here
            else:
                copies.append(dataclasses.replace(answer, key=r.key, source="dup"))
        if leftovers:
            results += await self.engine.run(leftovers)
        return results + copies


#: Answers an engine actor remembers for dedup across its chunks (the cache covers the rest).
RECENT_ANSWERS = 20_000


def commit_work(
    row: dict[str, Any],
    spec_json: str,
    fingerprint: str,
    run_id: str = "",
    cache: CacheContext | None = None,
) -> dict[str, Any]:
    """Commit task: results -> output columns -> parts and marker; then the chunk's new
    answers go to the result cache (as Lance fragments the driver has committed). Returns
    only stats."""
    from pipelines import load_pipeline

    spec = JobSpec.model_validate_json(spec_json)
    work: ChunkWork = pickle.loads(row["work"])
    t0 = time.perf_counter()
    results = all_results(work)
    data, failed = build_tables(spec, work, load_pipeline(spec), results)
    extra: dict[str, Any] = {"engine": work.engine, "timings": work.timings}
    if spec.response is not None:
        extra.update(typed_usage([r for r in results if r.source == "engine"]))
    if cache is not None:
        extra.update(cache_usage(results))
    rollup: list[dict[str, Any]] = []
    marker = store.commit_chunk(
        spec, work.chunk, data, failed, extra, fingerprint=fingerprint, attempts=work.attempts,
        run_id=run_id, attempts_started=work.attempts_started, rollup=rollup,
    )  # fmt: skip
    # The marker as committed, for the driver's rollup (before the stats below change it).
    marker["rollup"] = rollup[0] if rollup else None
    marker["timings"] = dict(marker.get("timings", {}), commit_s=time.perf_counter() - t0)
    if cache is not None and cache.write and cache.root and not marker.get("adopted"):
        marker["cache_fragments"] = _cache_new_answers(work, cache)
    return {"stats": pickle.dumps(marker)}


def _cache_new_answers(work: ChunkWork, cache: CacheContext) -> list[str]:
    """The chunk's answers computed by the engine (never failed rows), as cache fragments."""
    from batch.cache import write_fragments

    keys = {r.key: r.cache_key for r in work.requests if r.cache_key is not None}
    new: dict[bytes, EngineResult] = {}
    for r in work.results:
        key = keys.get(r.key)
        if key is not None and r.source == "engine" and not r.error_kind:
            new.setdefault(key, r)
    try:
        return write_fragments(cache, new.items())
    except Exception as exc:  # the rows are committed; only the cache misses them
        log.warning("chunk %s: answers not cached: %s", work.chunk.chunk_id, exc)
        return []


def all_results(work: ChunkWork) -> list[EngineResult]:
    """Every request's answer: the engine's, the cache's, and copies for rows that shared a
    prompt with an earlier row of the chunk."""
    results = [*work.results, *work.cached]
    by_key = {r.key: r for r in results}
    for row, first in sorted(work.shared.items()):
        answer = by_key.get(first)
        if answer is not None:  # a cached answer stays one (its row is _cached too)
            source = "cache" if answer.source == "cache" else "dup"
            results.append(dataclasses.replace(answer, key=row, source=source))
    return results


def cache_usage(results: Sequence[EngineResult]) -> dict[str, int]:
    """The marker's account of answers not computed for their row (and their tokens)."""
    ok = [r for r in results if not r.error_kind]
    saved = [r for r in ok if r.source != "engine"]
    return {
        "cache_hits": sum(1 for r in ok if r.source == "cache"),
        "dedup_rows": sum(1 for r in ok if r.source == "dup"),
        "saved_input_tokens": sum(r.input_tokens for r in saved),
        "saved_output_tokens": sum(r.output_tokens for r in saved),
    }


CACHED_COLUMN = "_cached"


def typed_usage(results: list[EngineResult]) -> dict[str, int]:
    """The marker's account of a typed job's re-sampling, over every row (failed ones too)."""
    return {
        "resamples": sum(r.resamples for r in results),
        "discarded_input_tokens": sum(r.discarded_input_tokens for r in results),
        "discarded_output_tokens": sum(r.discarded_output_tokens for r in results),
        "schema_violations": sum(1 for r in results if r.error_kind == "SchemaViolation"),
    }


def build_tables(
    spec: JobSpec,
    work: ChunkWork,
    pipeline: Any,
    results: Sequence[EngineResult] | None = None,
) -> tuple[pa.Table, pa.Table]:
    """One output row per input row: in ``data`` (with the pipeline's columns) or ``_failed``.
    With a cache path, ``data`` ends in ``_cached``: the answer came from the result cache."""
    if results is None:
        results = all_results(work)
    failures = dict(work.failures)
    ok = sorted((r for r in results if not r.error_kind), key=lambda r: r.key)
    texts: dict[int, str | None] = {}
    for r in results:
        if r.error_kind:
            failures[r.key] = (r.error_kind, r.error or "")
            texts[r.key] = r.text if r.error_kind == "SchemaViolation" else None
    table = work.table
    ok_keys = [r.key for r in ok]
    base = table.take(pa.array(ok_keys, pa.int64()))
    out = pipeline.finish_batch(base.to_pylist(), ok) if ok else None
    if out is not None:
        for name in out.column_names:
            if name in base.column_names:
                base = base.drop_columns([name])
            base = base.append_column(name, out[name])
    if spec.cache.path:
        base = base.append_column(
            CACHED_COLUMN, pa.array([r.source == "cache" for r in ok], pa.bool_())
        )
    fail_keys = sorted(failures)
    failed = table.take(pa.array(fail_keys, pa.int64()))
    failed = failed.append_column(
        store.ERROR_CLASS, pa.array([failures[k][0] for k in fail_keys], pa.string())
    )
    failed = failed.append_column(
        store.ERROR_MESSAGE, pa.array([failures[k][1] for k in fail_keys], pa.string())
    )
    prior = work.prior_attempts or [0] * table.num_rows
    failed = failed.append_column(
        store.ATTEMPT,
        pa.array([prior[k] + max(1, work.attempts) for k in fail_keys], pa.int16()),
    )
    if spec.response is not None:
        # Always there in a typed job (null but for SchemaViolation): one failed-part schema.
        failed = failed.append_column(
            store.OUTPUT_TEXT, pa.array([texts.get(k) for k in fail_keys], pa.string())
        )
    return base, failed


# --------------------------------------------------------------------------- driver


@contextmanager
def ray_session(
    address: str | None, *, verbose: bool = False, hub_offline: bool = True
) -> Iterator[cpus.Session | None]:
    """Connect to a cluster, or start a local Ray for this job and shut it down after.

    Yields the local session's processes when this call started Ray on this machine (then
    every Ray process is the run's, see :mod:`batch.cpus`), else None. ``hub_offline`` keeps
    workers from reaching for a model hub; it is off for a model named by a hub id, which the
    engine actors must be able to download on each node.
    """
    import ray

    if ray.is_initialized():
        yield None
        return
    env_vars = {
        "TOKENIZERS_PARALLELISM": "false",
        **({"HF_HUB_OFFLINE": "1"} if hub_offline else {}),
        "VLLM_CONFIGURE_LOGGING": "1" if verbose else "0",
        "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p),
    }
    kwargs: dict[str, Any] = {
        "runtime_env": {"env_vars": env_vars},
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
        "configure_logging": True,
    }
    if not verbose:
        # Ray's C++ core logs warnings (e.g. about actor restarts) straight to stderr, through
        # the progress bar; the driver only needs its errors, which reach it as exceptions.
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    processes: Any = contextlib.nullcontext(lambda: None)
    if address:
        kwargs["address"] = address
    else:
        kwargs["include_dashboard"] = False
        processes = cpus.local_session()
    with processes as session:
        with contextlib.nullcontext() if verbose else _quiet_stderr():
            ray.init(**kwargs)
        try:
            yield session()
        finally:
            ray.shutdown()


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 while Ray starts: its C++ core writes start-up lines (e.g.
    "Set ray log level from environment variable ...") straight to the descriptor, past
    Python's logging. Errors still reach the driver as exceptions."""
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def configure_ray_data(verbose: bool) -> None:
    import ray.data

    if not verbose:
        # Ray Data logs its own execution to the console; our reporter shows progress, and the
        # full log stays in the Ray session's ray-data.log.
        for handler in logging.getLogger("ray.data").handlers:
            if not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.CRITICAL)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose
    ctx.print_on_execution_start = verbose
    ctx.verbose_stats_logs = False
    ctx.log_internal_stack_trace_to_stdout = False
    bound_block_stats()


#: Output-block stats each Ray Data map operator keeps (see bound_block_stats).
KEPT_BLOCK_STATS = 1000


def bound_block_stats() -> bool:
    """Keep only the last ``KEPT_BLOCK_STATS`` output-block stats per Ray Data map operator.

    Ray Data's map operators keep one ``BlockStats`` (with its exec stats) per output block
    for the dataset's lifetime, only to print ``Dataset.stats()`` at the end (ray-project/ray
    #66016, still so in Ray 2.60). With one block per chunk that is about 4 KiB of driver
    memory per chunk for the job's lifetime: 0.4 GB at 100,000 chunks. batchinfer never reads
    those stats (the markers and the ledger carry its own), so the list is trimmed as blocks
    are handed on. Returns False, changing nothing, on a Ray whose operator no longer has that
    shape."""
    try:
        from ray.data._internal.execution.operators.map_operator import MapOperator
    except ImportError:
        return False
    if getattr(MapOperator, "_batchinfer_bounded", False):
        return True
    original = getattr(MapOperator, "_get_next_inner", None)
    if original is None:
        return False

    def _get_next_inner(self: Any) -> Any:
        bundle = original(self)
        kept = getattr(self, "_output_blocks_stats", None)
        if isinstance(kept, list) and len(kept) > 2 * KEPT_BLOCK_STATS:
            del kept[:-KEPT_BLOCK_STATS]
        return bundle

    MapOperator._get_next_inner = _get_next_inner  # type: ignore[method-assign]
    MapOperator._batchinfer_bounded = True  # type: ignore[attr-defined]
    return True


# chunks_in_flight with a result cache: the smallest share of a chunk's rows assumed to reach
# the engine, and a bound on the chunks one engine holds at once.
CACHE_MISS_FLOOR = 0.2
MAX_CHUNKS_IN_FLIGHT = 64


def chunks_in_flight(spec: JobSpec) -> int:
    """Chunks each engine holds at once: ``resources.chunks_in_flight``, raised when needed
    so that the engine's batch is full and one more chunk waits in its queue. Then a slot that
    frees is refilled at once from requests already in the engine, not after a round trip
    through Ray Data for the next chunk.
    """
    res = spec.resources
    full = -(-res.batch_size // res.rows_per_chunk) + 1
    if spec.cache.path is not None and spec.cache.mode != "write":
        # With a result cache most of a chunk's rows may never reach the engine: a nightly
        # rerun sends it only the changed and new ones. Sized for full chunks, the engine's
        # batch ran a fifth full on a second night with 20% misses; so count on as few as
        # CACHE_MISS_FLOOR of each chunk's rows reaching it. A fully cached chunk passes
        # through at once, so holding more of them costs little.
        rows = max(1, int(res.rows_per_chunk * CACHE_MISS_FLOOR))
        full = max(full, min(-(-res.batch_size // rows) + 1, MAX_CHUNKS_IN_FLIGHT))
    return max(res.chunks_in_flight, full)


def local_model(spec: JobSpec) -> bool:
    """A bundled model or a local/mounted directory (not a hub id such as Qwen/Qwen3-8B)."""
    path = spec.model.path
    return spec.model.engine != "vllm" or path.startswith("builtin:") or os.path.isdir(path)


def build_dataset(
    spec: JobSpec,
    plan: planning.Plan,
    model_path: str,
    session: cpus.Session | None = None,
    run_id: str = "",
    cache: CacheContext | None = None,
    gate: Any = None,
) -> Any:
    """The chunk pipeline, fed by :func:`chunk_source` (held back by ``gate``, a
    :class:`FeedGate` the driver tells how many chunks have committed). With ``session`` (a
    local Ray this run started) and the CPU device, engine actors keep the run's other
    processes off the engine's cores (batch.cpus)."""
    import ray.data

    spec_json = spec.model_dump_json()
    res = spec.resources
    # One chunk per block from the feed on: a block is cut as soon as it holds a row, so Ray
    # Data never merges chunks (it would otherwise pack the feed's small rows together).
    ray.data.DataContext.get_current().target_max_block_size = 1
    ds: Any = ray.data.read_datasource(
        chunk_source(plan, gate), override_num_blocks=max(1, -(-len(plan.pending) // FEED_TASK)),
        concurrency=1, num_cpus=0,
    )  # fmt: skip
    # Light stages ask for a fraction of a CPU so reads and commits always find room next to
    # the engines (logical CPUs are a scheduling budget; see docs/architecture.md).
    ds = ds.map(
        prepare_chunk,
        fn_kwargs={"spec_json": spec_json, "protocol": plan.protocol, "cache": cache},
        num_cpus=0.25,
    )
    engine_resources: dict[str, Any] = {
        "num_cpus": res.cpus_per_replica,
        # Ray starts worker processes at nice 15 so that its own daemons stay responsive; the
        # engine (and the processes vLLM starts from it) would then yield to every daemon and
        # to the driver whenever they share a core. The engine is the job: it runs at the
        # niceness of the driver, while reads and commits stay niced.
        "runtime_env": {"env_vars": {"RAY_worker_niceness": "0"}},
    }
    if res.device == "gpu":
        engine_resources["num_gpus"] = res.gpus_per_replica
    ds = ds.map(
        EngineStage,
        fn_constructor_kwargs={
            "spec_json": spec_json,
            "model_path": model_path,
            "session": session if res.device == "cpu" and res.isolate_engine_cpus else None,
            "run_id": run_id,
        },
        compute=ray.data.ActorPoolStrategy(
            size=res.replicas,
            max_tasks_in_flight_per_actor=chunks_in_flight(spec),
            max_concurrent_calls_per_actor=chunks_in_flight(spec),
        ),
        **engine_resources,
    )
    ds = ds.map(
        commit_work,
        fn_kwargs={
            "spec_json": spec_json,
            "fingerprint": plan.fingerprint,
            "run_id": run_id,
            "cache": cache,
        },
        num_cpus=0.25,
    )
    return ds


# --------------------------------------------------------------------------- chunk feed

#: Chunks per read task of the feed: the driver holds one small task object per this many.
FEED_TASK = 1000


def feed_window(spec: JobSpec) -> int:
    """Chunks the feed may have handed out and not yet seen committed: enough to keep every
    engine's slots full with one chunk more queued for each, and reads and commits moving."""
    return max(64, 4 * spec.resources.replicas * chunks_in_flight(spec))


class FeedGate:
    """A Ray actor (no CPU, async) that holds how many chunks the driver has seen committed.
    The feed's read task asks it for room before handing out chunk ``n``; the answer comes
    once ``n < committed + window``. Then the chunks in flight, and what the driver holds for
    them, stay bounded however long the job (Ray Data's own backpressure counts bytes and
    lets small rows run ahead)."""

    def __init__(self, window: int) -> None:
        self.window = window
        self.committed = 0
        self._moved: Any = None  # an asyncio.Event, made in the actor's loop

    def _event(self) -> Any:
        if self._moved is None:
            self._moved = asyncio.Event()
        return self._moved

    async def set_committed(self, n: int) -> None:
        if n > self.committed:
            self.committed = n
            moved, self._moved = self._event(), asyncio.Event()
            moved.set()

    async def room(self, position: int) -> int:
        """Returns (the new allowance) once chunk ``position`` may be handed out."""
        while position >= self.committed + self.window:
            await self._event().wait()
        return self.committed + self.window


def start_gate(spec: JobSpec) -> Any:
    """The run's FeedGate, on the driver's node (it is the driver's counter)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    actor: Any = ray.remote(FeedGate)
    return actor.options(num_cpus=0, max_restarts=-1, scheduling_strategy=here).remote(
        feed_window(spec)
    )


def _wait_for_room(gate: Any, position: int, allowed: int) -> int:
    """Block until chunk ``position`` may be handed out; returns the new allowance. A gate
    that cannot be reached opens (the feed then runs unbounded rather than stall the job)."""
    import ray

    while position >= allowed:
        try:
            allowed = int(ray.get(gate.room.remote(position), timeout=GATE_WAIT_S))
        except ray.exceptions.GetTimeoutError:
            continue  # no commit for a while (a slow engine start): ask again
        except Exception as exc:
            log.warning("the chunk feed's gate is unreachable (%s); feeding without it", exc)
            return 1 << 62
    return allowed


GATE_WAIT_S = 300.0


def _feed_rows(chunks: Sequence[planning.Chunk], identities: dict[str, str], gate: Any,
               first: int) -> Iterator[pa.Table]:  # fmt: skip
    """A read task of the feed: one single-row block per chunk, ``first`` its position."""
    allowed = 0 if gate is not None else 1 << 62
    for n, c in enumerate(chunks):
        if gate is not None:
            allowed = _wait_for_room(gate, first + n, allowed)
        yield pa.table({"chunk": [pickle.dumps(c)], "identity": [identities.get(c.path, "")]},
                       schema=FEED_SCHEMA)  # fmt: skip


FEED_SCHEMA = pa.schema([("chunk", pa.binary()), ("identity", pa.string())])


def chunk_feed(plan: planning.Plan) -> Iterator[dict[str, Any]]:
    """The rows the feed hands Ray Data, in order, streamed (what the read tasks yield)."""
    identities = plan.identities
    for c in plan.pending:
        yield {"chunk": pickle.dumps(c), "identity": identities.get(c.path, "")}


def _feed_task_parts(plan: planning.Plan) -> Iterator[tuple[int, Sequence[planning.Chunk]]]:
    """(first position, chunks) of each read task: a ChunkList part (files and runs only),
    or a slice of a plain list (retry-failed's few chunks)."""
    pending = plan.pending
    for a in range(0, len(pending), FEED_TASK):
        b = min(a + FEED_TASK, len(pending))
        yield a, (pending.part(a, b) if isinstance(pending, planning.ChunkList)
                  else list(pending[a:b]))  # fmt: skip


def _chunk_feed_source() -> Any:
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class _ChunkFeed(Datasource):
        """The plan's pending chunks as a Ray Data source: read tasks of FEED_TASK chunks
        each, made from the plan's files and runs (never from a list of every chunk)."""

        def __init__(self, plan: planning.Plan, gate: Any) -> None:
            self.plan, self.gate = plan, gate

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_name(self) -> str:
            return "ChunkFeed"

        def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                           data_context: Any = None) -> list[Any]:  # fmt: skip
            identities = self.plan.identities
            tasks = []
            for first, part in _feed_task_parts(self.plan):
                paths = {c.path for c in part} if not isinstance(part, planning.ChunkList) \
                    else {f.path for f in part.files}  # fmt: skip
                ids = {p: identities[p] for p in paths if p in identities}
                meta = BlockMetadata(num_rows=len(part), size_bytes=None, input_files=None,
                                     exec_stats=None)  # fmt: skip
                tasks.append(ReadTask(functools.partial(_feed_rows, part, ids, self.gate, first),
                                      meta, schema=FEED_SCHEMA))  # fmt: skip
            return tasks

    return _ChunkFeed


def chunk_source(plan: planning.Plan, gate: Any = None) -> Any:
    """The feed's Datasource (its class is made on first use: importing this module does not
    import Ray Data)."""
    return _chunk_feed_source()(plan, gate)
