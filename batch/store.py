"""The output store: the one module that owns an output's layout and its commit protocol.

Layout (a contract; see the README's "Output layout")::

    _job.json                 job record: the fingerprint and the spec (no credentials)
    _lease/<n>.json           who runs the job now (create-only numbers, renewed by the holder)
    _runs/<run>.json          one per run: start, heartbeat, end (wall time across runs)
    _runs/<run>/<actor>.json  one per engine actor: held from start, billed ahead per heartbeat
    _attempts/<chunk>/<n>.<run>.json  an attempt at a chunk reached the engine
    _attempts/<chunk>/<n>.failed.json ... and the engine failed it (with the error)
    data/part-<chunk>.<token>.parquet      rows; <token> is unique to the commit attempt
    _failed/part-<chunk>.<token>.parquet   rows that failed, with their reason
    _markers/<chunk>.json     the commit: names exactly the chunk's parts and their counts
    _rollup/<name>.jsonl.gz   a cache of many markers (their bytes and listing stamps)
    _MANIFEST.json            the committed parts, rewritten by every finishing operation
    ledger.json               the cost ledger, summed over every run

The exactly-once argument, in full:

1. A commit attempt writes its parts under names no other attempt can use (a fresh token),
   so attempts never overwrite or adopt each other's bytes.
2. It then creates the chunk's marker, create-only, naming those parts. Exactly one marker
   per chunk can ever be created (local: ``os.link``; S3: ``If-None-Match: *``), so exactly
   one attempt's parts are the chunk's rows. The marker is the single commit point.
3. An attempt whose marker lost (another attempt committed first) removes its own parts.
   Parts that no marker names (an attempt killed between its parts and its marker, or a
   loser killed before cleaning up) are garbage: :func:`collect_garbage` removes them when a
   run finishes, on ``status --repair`` and at the next run. A part of a chunk that has a
   marker is removed at once (no attempt can commit it any more); a part of an uncommitted
   chunk only once it is older than a grace period, because a worker of a killed run may
   still be about to commit it.
4. A retry of failed rows (``retry-failed``) is a chunk of its own whose marker names the
   failed part it supersedes; from the moment that marker exists, the superseded part is
   garbage, so a row is counted in the retry's parts or in the old failed part, never both.
5. Readers go through the markers, never the folder listing: totals, the manifest and the
   ledger are sums over markers. They find which markers exist by listing ``_markers/``; a
   marker's content may come from a rollup (``_rollup/``), a create-only cache of many
   markers written by the driver as chunks commit and by finalize, read with one request per
   file instead of one per marker. A rollup entry is used only for a marker the listing
   shows with the same stamp (S3: its ETag; local disk: size, inode and modification time),
   so a marker missing from every rollup is read itself, a rollup entry whose marker is
   absent is ignored, and a marker created anew after one was removed is never read from a
   stale rollup. The marker stays the commit point; a lost or damaged rollup costs reads.
   After a finishing operation (which collects the garbage), ``data/`` and ``_failed/``
   read as folders hold exactly what the manifest lists.
6. Each marker checks that its chunk's rows are all accounted for: rows + failed rows =
   the chunk's size, or the commit is refused (an input that changed under the job).

Attempts count engine failures only: an attempt is failed when the engine raised for it
(a ``.failed`` record), or when a later attempt of the same run exists (the actor died with
it and Ray resubmitted the chunk). The last attempt of a run that was killed around it is
not counted, so a chunk is never given up without its engine having failed it.

The ledger is true across runs: every run writes its own record and every engine actor its
own, renewed while it lives and billed ahead to the next heartbeat, so a run killed with
SIGKILL has still recorded at least the accelerator time it held.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem

from batch import storage
from batch.errors import InputChanged, LeaseHeld, SpecError
from batch.spec import JobSpec

log = logging.getLogger(__name__)

JOB_RECORD = "_job.json"
LEASE_DIR = "_lease"
RUNS_DIR = "_runs"
ATTEMPTS_DIR = "_attempts"
MARKERS = "_markers"
ROLLUP = "_rollup"
DATA = "data"
FAILED = "_failed"
MANIFEST = "_MANIFEST.json"
LEDGER = "ledger.json"
ERROR_CLASS = "_error_class"
ERROR_MESSAGE = "_error_message"
ATTEMPT = "_attempt"
# The model's last answer of a failed row (SchemaViolation), only in jobs with `response:`.
OUTPUT_TEXT = "_output_text"

# How often an engine actor renews its record, and how far ahead it is billed: a killed
# engine has recorded at least the time it held (at most one period more).
ENGINE_BEAT_SECONDS = 10.0
# A part of a chunk with no marker is left alone this long: a worker of a killed run may
# still be about to commit it. ``status --repair --force`` ignores it.
GARBAGE_GRACE_SECONDS = 900.0


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Chunk:
    """A row range of one input file (or, for retry-failed, one failed part of the output)."""

    chunk_id: str
    path: str
    relpath: str
    row_start: int
    row_end: int
    retry_of: str | None = None  # for retry-failed: the _failed/ part (relative to the output)

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start


# --------------------------------------------------------------------------- job record


def listing_digest(files: list[tuple[str, int]]) -> str:
    """Digest of the input listing: every file's relative path and row count."""
    h = hashlib.sha256()
    for relpath, rows in files:
        h.update(f"{relpath}\t{rows}\n".encode())
    return h.hexdigest()[:16]


def job_fingerprint(spec: JobSpec, listing: str) -> str:
    return hashlib.sha256(f"{spec.fingerprint()}:{listing}".encode()).hexdigest()[:16]


def job_record(spec: JobSpec, *, fingerprint: str, listing: str, files: int, rows: int,
               chunks: int) -> dict[str, Any]:  # fmt: skip
    return {
        "fingerprint": fingerprint,
        "spec_fingerprint": spec.fingerprint(),
        "determines_output": spec.fingerprint_fields(),
        "spec": public_spec(spec),
        "input": {"path": spec.input.path, "files": files, "rows": rows, "listing": listing},
        "chunks": chunks,
        "created_at": time.time(),
    }


def public_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as stored in the output: without storage options (credentials live there)."""
    doc = spec.model_dump(mode="json")
    doc["input"].pop("storage_options", None)
    doc["output"].pop("storage_options", None)
    return doc


def ensure_job_record(spec: JobSpec, record: dict[str, Any]) -> dict[str, Any]:
    """Write the job record on the first run; on later runs refuse a different fingerprint."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    path = storage.join(root, JOB_RECORD)
    body = json.dumps(record, indent=2, sort_keys=True).encode()
    if storage.create_only(fs, path, body):
        return record
    existing: dict[str, Any] = storage.read_json(fs, path)
    if existing.get("fingerprint") != record["fingerprint"]:
        raise SpecError(describe_change(spec.output.path, existing, record))
    return existing


def describe_change(output: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    changes = []
    a, b = _flatten(old.get("determines_output", {})), _flatten(new["determines_output"])
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            changes.append(f"{key}: {_short(a.get(key))} -> {_short(b.get(key))}")
    if old.get("input", {}).get("listing") != new["input"]["listing"]:
        o, n = old.get("input", {}), new["input"]
        if (o.get("files"), o.get("rows")) == (n["files"], n["rows"]):
            changes.append(
                f"input listing: a file was rewritten (same {n['files']} files/{n['rows']} rows)"
            )
        else:
            changes.append(
                f"input listing: {o.get('files')} files/{o.get('rows')} rows -> "
                f"{n['files']} files/{n['rows']} rows"
            )
    what = "; ".join(changes) or "the fingerprint"
    return (
        f"{output} holds output of a different job (changed: {what}). Resuming would mix two "
        "configurations in one output. Write to a fresh output, e.g. --set output.path=<new "
        f"folder>, or delete {output} to start over."
    )


# What retry-failed may change: the limits that made rows fail (context length, output
# length) and the fake engine's test options. Anything else (model, prompt, pipeline,
# sampling, input) would mix two jobs in one output.
RETRY_MAY_CHANGE = (
    "model.engine_args.max_model_len",
    "sampling.max_tokens",
    "model.fake_options",
    "response.max_resamples",
    "response.resample_temperature",
)


def check_retry_spec(spec: JobSpec, record: Mapping[str, Any]) -> None:
    """Refuse a retry-failed whose spec would write another job's rows into this output."""
    if record.get("spec_fingerprint") == spec.fingerprint():
        return
    old = _flatten(record.get("determines_output", {}))
    new = _flatten(spec.fingerprint_fields())
    changed = [
        k for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
        and not any(k == p or k.startswith(p + ".") for p in RETRY_MAY_CHANGE)
    ]  # fmt: skip
    if changed:
        what = "; ".join(f"{k}: {_short(old.get(k))} -> {_short(new.get(k))}" for k in changed)
        raise SpecError(
            f"retry-failed would change what {spec.output.path} holds (changed: {what}); a "
            f"retry may change only {', '.join(RETRY_MAY_CHANGE)}. Drop those --set "
            "overrides, or write the new configuration to a fresh output."
        )


def _flatten(doc: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(doc, dict):
        out: dict[str, Any] = {}
        for k, v in doc.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): doc}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def read_job_record(fs: Any, root: str) -> dict[str, Any] | None:
    """The output's job record, or None before a first run has written one."""
    doc: dict[str, Any] | None = storage.read_json_or_none(fs, storage.join(root, JOB_RECORD))
    return doc


# --------------------------------------------------------------------------- lease


@dataclass
class Lease:
    fs: Any
    root: str
    number: int
    holder: dict[str, Any]
    lost: bool = False  # another run took the lease over: this run must stop

    @property
    def path(self) -> str:
        return storage.join(self.root, LEASE_DIR, f"{self.number:08d}.json")


def _lease_paths(fs: Any, root: str) -> list[str]:
    return storage.list_files(fs, storage.join(root, LEASE_DIR), ".json")


def current_lease(fs: Any, root: str) -> tuple[int, dict[str, Any]] | None:
    """The newest lease entry (number, document), or None if the output never had one."""
    paths = _lease_paths(fs, root)
    if not paths:
        return None
    newest = paths[-1]
    number = int(newest.rsplit("/", 1)[-1].removesuffix(".json"))
    return number, storage.read_json(fs, newest)


def lease_is_live(doc: Mapping[str, Any], now: float | None = None) -> bool:
    """Held and not expired, and, when the holder ran on this machine, its process is alive
    (so a run killed with SIGKILL does not block the next one until its lease expires)."""
    if doc.get("released") or float(doc.get("expires_at", 0)) <= (now or time.time()):
        return False
    return not (doc.get("host") == socket.gethostname() and not _pid_alive(int(doc.get("pid", 0))))


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has exited; it only waits to be reaped
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][:1] != "Z"
    except OSError:
        return True


def describe_holder(doc: Mapping[str, Any]) -> str:
    left = max(0.0, float(doc.get("expires_at", 0)) - time.time())
    return (
        f"run {doc.get('run_id')} on {doc.get('host')} (pid {doc.get('pid')}), started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(doc.get('started_at', 0)))}, "
        f"lease expires in {left:.0f}s unless renewed"
    )


def acquire_lease(
    spec: JobSpec, *, ttl: float = 60.0, wait: bool = False, poll: float = 5.0
) -> Lease:
    """Take the output's lease, waiting for the holder if ``wait``; else raise LeaseHeld."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    me = {
        "run_id": uuid.uuid4().hex[:12],
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "job": spec.name,
        "started_at": time.time(),
    }
    while True:
        current = current_lease(fs, root)
        number = 1
        if current is not None:
            number = current[0] + 1
            if lease_is_live(current[1]):
                if not wait:
                    raise LeaseHeld(
                        f"another run holds {spec.output.path}: {describe_holder(current[1])}. "
                        "Wait for it (submit --wait), or if it died, retry after the lease "
                        "expires."
                    )
                log.info("waiting for %s", describe_holder(current[1]))
                time.sleep(poll)
                continue
        doc = dict(me, expires_at=time.time() + ttl, ttl=ttl)
        lease = Lease(fs, root, number, doc)
        if storage.create_only(fs, lease.path, json.dumps(doc).encode()):
            return lease
        # Someone else took this number first: look again.


def renew_lease(lease: Lease, ttl: float) -> bool:
    """Extend our lease; False if another run has taken over (we let it expire)."""
    current = current_lease(lease.fs, lease.root)
    if current is None or current[0] != lease.number:
        return False
    lease.holder["expires_at"] = time.time() + ttl
    storage.overwrite(lease.fs, lease.path, json.dumps(lease.holder).encode())
    return True


def release_lease(lease: Lease) -> None:
    current = current_lease(lease.fs, lease.root)
    if current is None or current[0] != lease.number:
        return
    lease.holder.update(released=True, expires_at=0)
    storage.overwrite(lease.fs, lease.path, json.dumps(lease.holder).encode())


@contextmanager
def hold_lease(
    spec: JobSpec,
    *,
    ttl: float = 60.0,
    wait: bool = False,
    on_beat: Callable[[], None] | None = None,
    on_lost: Callable[[], None] | None = None,
) -> Iterator[Lease]:
    """Hold the lease for the block, renewing it every ttl/3 seconds.

    ``on_beat`` runs with every renewal (the run record's heartbeat). ``on_lost`` runs once if
    another run takes the lease over; the caller must then stop (``Lease.lost`` is set).
    """
    lease = acquire_lease(spec, ttl=ttl, wait=wait)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                if not renew_lease(lease, ttl):
                    log.error("lost the lease on %s to another run", spec.output.path)
                    lease.lost = True
                    if on_lost is not None:
                        on_lost()
                    return
            except Exception as exc:  # a storage hiccup: try again next period
                log.warning("could not renew the lease: %s", exc)
            if on_beat is not None:
                try:
                    on_beat()
                except Exception as exc:
                    log.warning("could not record the run's heartbeat: %s", exc)

    thread = threading.Thread(target=renew, name="batchinfer-lease", daemon=True)
    thread.start()
    try:
        yield lease
    finally:
        stop.set()
        thread.join(timeout=5)
        try:
            release_lease(lease)
        except Exception as exc:
            log.warning("could not release the lease (it expires by itself): %s", exc)


# --------------------------------------------------------------------------- runs


@dataclass
class Run:
    """One run of the job (a submit or a retry-failed), recorded in ``_runs/<run_id>.json``."""

    fs: Any
    root: str
    run_id: str
    doc: dict[str, Any]

    @property
    def path(self) -> str:
        return storage.join(self.root, RUNS_DIR, f"{self.run_id}.json")

    def beat(self) -> None:
        self.doc["alive_at"] = time.time()
        storage.overwrite(self.fs, self.path, json.dumps(self.doc).encode())

    def finish(self, *, state: str, released_at: float | None = None) -> None:
        """``released_at``: when the run's engines were released (their billing ends)."""
        now = time.time()
        self.doc.update(alive_at=now, finished_at=now, state=state)
        if released_at is not None:
            self.doc["released_at"] = released_at
        storage.overwrite(self.fs, self.path, json.dumps(self.doc).encode())


def start_run(spec: JobSpec, kind: str) -> Run:
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    now = time.time()
    run_id = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6]
    doc = {
        "run_id": run_id,
        "kind": kind,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_at": now,
        "alive_at": now,
        "state": "running",
        "finished_at": None,
    }
    run = Run(fs, root, run_id, doc)
    storage.overwrite(fs, run.path, json.dumps(doc).encode())
    return run


class EngineClock:
    """An engine actor's record of the accelerator time it holds, renewed on a thread.

    Written at actor start (before the model loads) and every ``ENGINE_BEAT_SECONDS`` after,
    each time billed ahead to the next renewal: if the actor is killed, the record already
    covers the time it held. Also counts the rows the actor took into its engine, so the
    ledger can report work that was paid for but never committed.
    """

    def __init__(
        self, fs: Any, root: str, run_id: str, actor: str, *, accelerators: float,
        beat: float = ENGINE_BEAT_SECONDS,
    ) -> None:  # fmt: skip
        self.fs, self.beat_s = fs, beat
        self.path = storage.join(root, RUNS_DIR, run_id, f"{actor}.json")
        now = time.time()
        self.doc: dict[str, Any] = {
            "actor": actor,
            "run_id": run_id,
            "host": socket.gethostname(),
            "accelerators": accelerators,
            "created": now,
            "paid_until": now + 1.5 * beat,
            "chunks_started": 0,
            "rows_started": 0,
        }
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> EngineClock:
        self._write()
        self._thread = threading.Thread(target=self._loop, name="batchinfer-clock", daemon=True)
        self._thread.start()
        return self

    def started_chunk(self, rows: int) -> None:
        with self._lock:
            self.doc["chunks_started"] += 1
            self.doc["rows_started"] += rows

    def _write(self) -> None:
        with self._lock:
            self.doc["paid_until"] = time.time() + 1.5 * self.beat_s
            body = json.dumps(self.doc).encode()
        storage.overwrite(self.fs, self.path, body)

    def _loop(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self._write()
            except Exception as exc:  # a storage hiccup: the next beat tries again
                log.warning("could not record the engine's time: %s", exc)


def read_runs(spec: JobSpec) -> list[dict[str, Any]]:
    """Every run of the job, oldest first, each with its engine actors' records."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    folder = storage.join(root, RUNS_DIR)
    docs = [storage.read_json_or_none(fs, p) for p in storage.list_files(fs, folder, ".json")]
    runs = [d for d in docs if d]
    engines = storage.list_files(fs, folder, ".json", recursive=True)
    by_run: dict[str, list[dict[str, Any]]] = {}
    for path in engines:
        if path.rsplit("/", 2)[-2] == RUNS_DIR:
            continue  # a run record, not an engine's
        doc = storage.read_json_or_none(fs, path)
        if doc:
            by_run.setdefault(str(doc.get("run_id")), []).append(doc)
    for run in runs:
        run["engines"] = by_run.get(run["run_id"], [])
    return sorted(runs, key=lambda r: float(r.get("started_at", 0)))


def engine_seconds(run: Mapping[str, Any], engine: Mapping[str, Any]) -> float:
    """Seconds an engine actor was held: to its run's release if the run finished, else to
    what its last heartbeat paid for (it died with the run, or is still running)."""
    end = float(engine.get("paid_until", engine.get("created", 0)))
    if run.get("released_at"):
        end = min(end, float(run["released_at"]))
    return max(0.0, end - float(engine.get("created", end)))


def run_wall_seconds(run: Mapping[str, Any]) -> float:
    end = run.get("finished_at") or run.get("alive_at") or run.get("started_at", 0)
    return max(0.0, float(end) - float(run.get("started_at", 0)))


# --------------------------------------------------------------------------- attempts


def _attempt_dir(root: str, chunk_id: str) -> str:
    return storage.join(root, ATTEMPTS_DIR, chunk_id)


@dataclass(frozen=True)
class AttemptState:
    """What the attempt records of a chunk say, from one listing of its folder."""

    failures: int  # engine failures so far, by the rule in the module docstring
    last_error: str
    next_number: int  # the number the next attempt will try to take


def _run_tag(run_id: str) -> str:
    return (run_id or "norun").replace(".", "_").replace("/", "_")


def attempt_state(fs: Any, root: str, chunk_id: str, run_id: str) -> AttemptState:
    """One listing, and a read only of the failure records (rare): attempt records carry
    their run in their name (``<n>.<run>.json``), so counting needs no reads."""
    runs: dict[int, str] = {}
    failed: dict[int, str] = {}
    for path in storage.list_files(fs, _attempt_dir(root, chunk_id), ".json"):
        number, _, rest = path.rsplit("/", 1)[-1].removesuffix(".json").partition(".")
        if not number.isdigit():
            continue
        if rest == "failed":
            failed[int(number)] = path
        else:
            runs[int(number)] = rest
    count, last = 0, "the engine died while running this chunk"
    for n in sorted(runs):
        later_same_run = any(m > n and runs[m] == runs[n] for m in runs)
        if n in failed or runs[n] == _run_tag(run_id) or later_same_run:
            count += 1
            last = "the engine died while running this chunk"
            if n in failed:
                doc = storage.read_json_or_none(fs, failed[n]) or {}
                last = str(doc.get("error", "the engine failed"))
    return AttemptState(count, last, max(runs, default=0) + 1)


def prior_failures(fs: Any, root: str, chunk_id: str, run_id: str) -> tuple[int, str]:
    """(engine failures of this chunk so far, the last error)."""
    state = attempt_state(fs, root, chunk_id, run_id)
    return state.failures, state.last_error


def begin_attempt(
    fs: Any, root: str, chunk_id: str, note: Mapping[str, Any], *, first: int | None = None
) -> int:
    """Record that an attempt at a chunk reaches the engine; return its number. ``first``:
    the number to try first (from :func:`attempt_state`, saving a listing)."""
    n = first if first is not None else attempt_state(fs, root, chunk_id, "").next_number
    tag = _run_tag(str(note.get("run", "")))
    while True:
        path = storage.join(_attempt_dir(root, chunk_id), f"{n:04d}.{tag}.json")
        # Create-only on the number alone would need a lock; two attempts can only collide
        # on a number when Ray runs one chunk twice at once, and then both are counted.
        if storage.create_only(fs, path, json.dumps(dict(note, attempt=n)).encode()):
            return n
        n += 1


def attempts_run(fs: Any, root: str, chunk_id: str) -> int:
    """How many attempts at a chunk reached its engine (failed, killed or running)."""
    names = storage.list_files(fs, _attempt_dir(root, chunk_id), ".json")
    return sum(1 for p in names if not p.endswith(".failed.json"))


def fail_attempt(fs: Any, root: str, chunk_id: str, number: int, error: str) -> None:
    """Record that the engine failed this attempt (it counts towards giving up)."""
    path = storage.join(_attempt_dir(root, chunk_id), f"{number:04d}.failed.json")
    storage.create_only(fs, path, json.dumps({"error": error, "at": time.time()}).encode())


def clear_attempts(fs: Any, root: str, chunk_id: str) -> None:
    """After the chunk's commit its attempt records are not needed any more."""
    with contextlib.suppress(FileNotFoundError):
        fs.rm(_attempt_dir(root, chunk_id), recursive=True)


# --------------------------------------------------------------------------- commit


def part_name(kind: str, chunk_id: str, token: str) -> str:
    return f"{kind}/part-{chunk_id}.{token}.parquet"


def part_chunk_id(name: str) -> str | None:
    """The chunk a part belongs to, from its name; None for names this version did not make."""
    stem = name.rsplit("/", 1)[-1].removeprefix("part-").removesuffix(".parquet")
    chunk_id, _, token = stem.rpartition(".")
    return chunk_id if chunk_id and len(token) == 12 and token.isalnum() else None


def marker_name(chunk_id: str) -> str:
    return f"{MARKERS}/{chunk_id}.json"


def _token_totals(table: pa.Table) -> tuple[int, int]:
    def total(col: str) -> int:
        if col not in table.column_names or table.num_rows == 0:
            return 0
        return int(pc.sum(table[col]).as_py() or 0)

    return total("input_tokens"), total("output_tokens")


def commit_chunk(
    spec: JobSpec,
    chunk: Chunk,
    data: pa.Table | None,
    failed: pa.Table | None,
    extra: dict[str, Any],
    *,
    fingerprint: str,
    attempts: int = 0,
    run_id: str = "",
    attempts_started: int | None = None,
    rollup: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write the chunk's parts under attempt-unique names, then its marker; return the marker
    that committed the chunk (this attempt's, or the one that won before it). If this attempt
    created the marker, its rollup entry (stamp and content) is appended to ``rollup``."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    n_data = data.num_rows if data is not None else 0
    n_failed = failed.num_rows if failed is not None else 0
    if n_data + n_failed != chunk.rows:
        raise InputChanged(
            f"{chunk.relpath}: rows {chunk.row_start}-{chunk.row_end} came back as "
            f"{n_data + n_failed} rows, not {chunk.rows}: the input changed while the job ran. "
            "Restore it, or write to a fresh output (--set output.path=...)",
            chunk=chunk.chunk_id,
        )
    token = uuid.uuid4().hex[:12]
    marker: dict[str, Any] = {
        "chunk_id": chunk.chunk_id,
        "file": chunk.relpath,
        "row_start": chunk.row_start,
        "row_end": chunk.row_end,
        "fingerprint": fingerprint,
        "run_id": run_id,
        "attempts": attempts,
        "rows": n_data,
        "failed_rows": n_failed,
        "input_tokens": 0,
        "output_tokens": 0,
        "data_part": None,
        "failed_part": None,
        "adopted": False,
        "supersedes": chunk.retry_of,
    }
    written: list[str] = []
    for kind, table in ((DATA, data), (FAILED, failed)):
        if table is None or table.num_rows == 0:
            continue
        name = part_name(kind, chunk.chunk_id, token)
        path = storage.join(root, name)
        compression = spec.output.compression
        if not storage.write_parquet_create_only(fs, path, table, compression=compression):
            raise RuntimeError(f"{name} exists: attempt tokens collided")  # 2^-48: a bug
        written.append(path)
        fault_point(f"after-{kind.strip('_')}-part")
        marker["data_part" if kind == DATA else "failed_part"] = name
        if kind == DATA:
            marker["input_tokens"], marker["output_tokens"] = _token_totals(table)
    marker.update(extra)
    # Answers served from the result cache or shared with an equal prompt cost no engine
    # tokens: the marker's tokens are the engine's (saved_* are the rest).
    marker["input_tokens"] -= int(extra.get("saved_input_tokens", 0))
    marker["output_tokens"] -= int(extra.get("saved_output_tokens", 0))
    # Every attempt that reached the engine, this one included: the others were paid for and
    # their results thrown away (a run killed around the chunk, an engine that failed it).
    if attempts_started is None:  # not told by the engine stage: count the records
        attempts_started = attempts_run(fs, root, chunk.chunk_id)
    marker["attempts_run"] = max(1, attempts_started)
    marker["committed_at"] = time.time()
    body = json.dumps(marker, sort_keys=True).encode()
    marker_path = storage.join(root, marker_name(chunk.chunk_id))
    fault_point("before-marker")
    if not storage.create_only(fs, marker_path, body):
        # Another attempt committed this chunk first: its parts are the chunk's rows.
        for path in written:
            remove_quietly(fs, path)
        existing: dict[str, Any] = storage.read_json(fs, marker_path)
        existing["adopted"] = True
        return existing
    fault_point("after-marker")
    if rollup is not None:
        with contextlib.suppress(Exception):  # a cache entry: without it the marker is read
            stamp = _created_stamp(fs, marker_path, body)
            if stamp is not None:
                rollup.append({"stamp": stamp, "marker": json.loads(body)})
    if chunk.retry_of:
        # The retry's marker supersedes the failed part: its rows now live in this chunk.
        remove_quietly(fs, storage.join(root, chunk.retry_of))
    clear_attempts(fs, root, chunk.chunk_id)
    return marker


def fault_point(name: str) -> None:
    """Test hook: with BATCHINFER_FAULT=<name>, stop here (a flag file tells the test where)
    so a kill test can SIGKILL the job at exactly this point, e.g. between a part and its
    marker. Unset in normal runs; costs one environment lookup."""
    if os.environ.get("BATCHINFER_FAULT") != name:
        return
    flag_dir = os.environ.get("BATCHINFER_FAULT_DIR", ".")
    with open(os.path.join(flag_dir, f"fault-{name}"), "a") as fh:
        fh.write(f"{os.getpid()}\n")
    time.sleep(3600)


def remove_quietly(fs: fsspec.AbstractFileSystem, path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.rm(path)


# --------------------------------------------------------------------------- reading


def list_markers(spec: JobSpec) -> list[str]:
    """Chunk ids of every marker in the output (input chunks and retries)."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    names = storage.list_files(fs, storage.join(root, MARKERS), ".json")
    return [n.rsplit("/", 1)[-1].removesuffix(".json") for n in names]


def committed_chunk_ids(spec: JobSpec) -> set[str]:
    return set(list_markers(spec))


def read_markers(
    spec: JobSpec, chunk_ids: Iterable[str] | None = None, *, write_back: bool = False
) -> list[dict[str, Any]]:
    """Committed chunks' markers (all of them by default), in listing order.

    One listing of ``_markers/`` says which exist; their content comes from the rollups when an
    entry's stamp matches the listing, else from the marker itself (one request each). With
    ``write_back`` (finishing operations), markers read one by one are written to a new rollup,
    so the next reader does not read them again.
    """
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    listed = {
        str(e["name"]).rsplit("/", 1)[-1].removesuffix(".json"): marker_stamp(e)
        for e in storage.list_entries(fs, storage.join(root, MARKERS), ".json")
    }
    ids = list(listed) if chunk_ids is None else list(chunk_ids)
    found: dict[str, dict[str, Any]] = {}
    if len(ids) >= ROLLUP_MIN_READ:  # a few markers cost fewer requests than the rollups
        wanted = {c: listed[c] for c in ids if c in listed}
        found.update((cid, doc) for cid, (_, doc) in read_rollups(fs, root, wanted).items())
    missing = [c for c in ids if c not in found]
    paths = [storage.join(root, marker_name(c)) for c in missing]
    with ThreadPoolExecutor(max_workers=16) as pool:
        for cid, doc in zip(missing, pool.map(lambda p: storage.read_json(fs, p), paths),
                            strict=True):  # fmt: skip
            found[cid] = doc
    if write_back and len(missing) >= ROLLUP_MIN_WRITE:
        entries = [{"stamp": listed[c], "marker": found[c]} for c in missing if c in listed]
        for i in range(0, len(entries), ROLLUP_MARKERS):
            with contextlib.suppress(Exception):  # a cache: failing to write it costs reads
                write_rollup(fs, root, entries[i : i + ROLLUP_MARKERS])
    return [found[c] for c in ids]


# --------------------------------------------------------------------------- rollups

#: Markers per rollup file (the driver writes one each time this many chunks committed).
ROLLUP_MARKERS = 2000
#: Fewer markers than this are read one by one (cheaper than reading every rollup).
ROLLUP_MIN_READ = 64
#: A finishing operation that read at least this many markers one by one writes them back.
ROLLUP_MIN_WRITE = 16


def marker_stamp(entry: Mapping[str, Any]) -> str:
    """What a listing says of a marker that changes if it is ever created anew: its ETag
    (S3: the MD5 of its bytes), else its size, inode and modification time (local disk)."""
    etag = entry.get("ETag") or entry.get("etag")
    if etag:
        return str(etag).strip('"')
    return f"{entry.get('size')}:{entry.get('ino')}:{entry.get('mtime')}"


def _created_stamp(fs: Any, path: str, body: bytes) -> str | None:
    """The stamp a listing will show for the marker this attempt just created; None where it
    cannot be known without asking (the marker is then read, not taken from a rollup)."""
    if isinstance(fs, LocalFileSystem):
        return marker_stamp(storage.local_entry(path, os.stat(path)))
    if storage.is_s3(fs):  # a single PUT's ETag is the MD5 of its bytes (not with SSE-KMS)
        return hashlib.md5(body, usedforsecurity=False).hexdigest()
    return None


def write_rollup(fs: Any, root: str, entries: list[dict[str, Any]]) -> str | None:
    """Write ``entries`` ({"stamp", "marker"}) as a new rollup, create-only under a fresh
    name (two writers never collide); returns its name relative to the output."""
    if not entries:
        return None
    name = f"{ROLLUP}/{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:12]}"
    name += ".jsonl.gz"
    lines = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
    body = gzip.compress(lines.encode(), compresslevel=5)
    if not storage.create_only(fs, storage.join(root, name), body):
        return None  # a fresh name was taken: impossible but harmless (it is a cache)
    return name


def read_rollups(
    fs: Any, root: str, wanted: Mapping[str, str] | None = None
) -> dict[str, tuple[str, dict[str, Any]]]:
    """chunk id -> (stamp, marker) from every rollup; given ``wanted`` (chunk id -> the stamp
    its listing shows), only entries with that id and stamp (of several rollups naming a
    chunk, the one that matches). A rollup that cannot be read or parsed is skipped: its
    markers are then read one by one."""
    paths = storage.list_files(fs, storage.join(root, ROLLUP), ".jsonl.gz")

    def one(path: str) -> list[dict[str, Any]]:
        try:
            text = gzip.decompress(fs.cat_file(path)).decode()
            return [json.loads(line) for line in text.splitlines() if line]
        except Exception as exc:
            log.warning("rollup %s is unreadable (%s); its markers are read one by one", path,
                        exc)  # fmt: skip
            return []

    out: dict[str, tuple[str, dict[str, Any]]] = {}
    with ThreadPoolExecutor(max_workers=16) as pool:
        for entries in pool.map(one, paths):
            for e in entries:
                doc = e.get("marker") if isinstance(e, dict) else None
                if not isinstance(doc, dict) or not isinstance(e.get("stamp"), str):
                    continue
                cid = str(doc.get("chunk_id", ""))
                if wanted is None or wanted.get(cid) == e["stamp"]:
                    out[cid] = (e["stamp"], doc)
    return out


class RollupWriter:
    """Driver side: collects the markers of committed chunks (from their stats) and writes a
    rollup every ``ROLLUP_MARKERS``; bounded memory, one request per rollup."""

    def __init__(self, spec: JobSpec, every: int = ROLLUP_MARKERS) -> None:
        self.fs, self.root = storage.open_fs(spec.output.path, spec.output.storage_options)
        self.every = every
        self.pending: list[dict[str, Any]] = []
        self.written = 0

    def add(self, entry: dict[str, Any] | None) -> None:
        if entry:
            self.pending.append(entry)
        if len(self.pending) >= self.every:
            self.flush()

    def flush(self) -> None:
        entries, self.pending = self.pending, []
        try:
            if write_rollup(self.fs, self.root, entries):
                self.written += 1
        except Exception as exc:  # a cache: finalize reads these markers one by one instead
            log.warning("could not write a marker rollup: %s", exc)


def write_json(spec: JobSpec, name: str, doc: dict[str, Any], *, create_only: bool) -> bool:
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    body = json.dumps(doc, indent=2, sort_keys=True).encode()
    path = storage.join(root, name)
    if create_only:
        return storage.create_only(fs, path, body)
    storage.overwrite(fs, path, body)
    return True


def write_file(spec: JobSpec, name: str, body: bytes) -> None:
    """A file of the output that is not part of the protocol (``ledger.md``, ``ledger.png``)."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    storage.overwrite(fs, storage.join(root, name), body)


def read_output_json(spec: JobSpec, name: str) -> dict[str, Any] | None:
    """The output's ``name`` (manifest, ledger), or None if the job has not written it yet."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    doc: dict[str, Any] | None = storage.read_json_or_none(fs, storage.join(root, name))
    return doc


# --------------------------------------------------------------------------- totals


@dataclass
class Totals:
    """What the markers say the output holds: the only place rows and parts are summed."""

    chunks: int = 0  # input chunks committed
    retries: int = 0  # retry chunks committed
    rows: int = 0
    failed_rows: int = 0  # in failed parts no retry has taken over
    input_tokens: int = 0
    output_tokens: int = 0
    # Typed answers (response:): extra draws, the tokens they threw away, rows that never fit.
    # Over every marker, retries included: that work was done. Old markers count 0.
    resamples: int = 0
    discarded_input_tokens: int = 0
    discarded_output_tokens: int = 0
    schema_violations: int = 0
    # Result cache and dedup: rows whose answer was not computed for them, and its tokens.
    cache_hits: int = 0
    dedup_rows: int = 0
    saved_input_tokens: int = 0
    saved_output_tokens: int = 0
    data_parts: list[str] = field(default_factory=list)
    failed_parts: list[str] = field(default_factory=list)  # live ones
    superseded_parts: list[str] = field(default_factory=list)


def totals(markers: Iterable[Mapping[str, Any]]) -> Totals:
    markers = list(markers)
    superseded = {str(m["supersedes"]) for m in markers if m.get("supersedes")}
    t = Totals()
    for m in markers:
        if m.get("supersedes"):
            t.retries += 1
        else:
            t.chunks += 1
        t.rows += int(m["rows"])
        t.input_tokens += int(m["input_tokens"])
        t.output_tokens += int(m["output_tokens"])
        t.resamples += int(m.get("resamples", 0))
        t.discarded_input_tokens += int(m.get("discarded_input_tokens", 0))
        t.discarded_output_tokens += int(m.get("discarded_output_tokens", 0))
        t.schema_violations += int(m.get("schema_violations", 0))
        t.cache_hits += int(m.get("cache_hits", 0))
        t.dedup_rows += int(m.get("dedup_rows", 0))
        t.saved_input_tokens += int(m.get("saved_input_tokens", 0))
        t.saved_output_tokens += int(m.get("saved_output_tokens", 0))
        if m.get("data_part"):
            t.data_parts.append(str(m["data_part"]))
        part = m.get("failed_part")
        if part and part not in superseded:
            t.failed_rows += int(m["failed_rows"])
            t.failed_parts.append(str(part))
        elif part:
            t.superseded_parts.append(str(part))
    t.data_parts.sort()
    t.failed_parts.sort()
    return t


def is_complete(record: Mapping[str, Any], t: Totals) -> bool:
    """Every input chunk of the job is committed."""
    return t.chunks >= int(record.get("chunks", 0))


# --------------------------------------------------------------------------- garbage


@dataclass
class Garbage:
    """Parts in ``data/`` and ``_failed/`` that no live marker names."""

    removable: list[str] = field(default_factory=list)  # relative to the output
    young: list[str] = field(default_factory=list)  # of uncommitted chunks, within the grace
    removed: int = 0


def _entries(fs: Any, folder: str) -> list[tuple[str, float]]:
    """(path, modification time) of the files in ``folder``; [] if it is missing."""
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        if e.get("type") == "directory" or e["name"].rsplit("/", 1)[-1].startswith("."):
            continue
        mtime = e.get("mtime") or e.get("LastModified") or e.get("last_modified") or 0
        if hasattr(mtime, "timestamp"):
            mtime = mtime.timestamp()
        out.append((str(e["name"]), float(mtime)))
    return out


def find_garbage(
    spec: JobSpec, markers: Iterable[Mapping[str, Any]], *, grace: float = GARBAGE_GRACE_SECONDS
) -> Garbage:
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    markers = list(markers)
    t = totals(markers)
    named = set(t.data_parts) | set(t.failed_parts)
    committed = {str(m["chunk_id"]) for m in markers}
    garbage = Garbage()
    now = time.time()
    for kind in (DATA, FAILED):
        for path, mtime in _entries(fs, storage.join(root, kind)):
            rel = f"{kind}/{path.rsplit('/', 1)[-1]}"
            if rel in named:
                continue
            chunk_id = part_chunk_id(rel)
            if (chunk_id is not None and chunk_id in committed) or rel in t.superseded_parts:
                garbage.removable.append(rel)  # no attempt can commit it any more
            elif now - mtime >= grace:
                garbage.removable.append(rel)
            else:
                garbage.young.append(rel)
    return garbage


def collect_garbage(
    spec: JobSpec, markers: Iterable[Mapping[str, Any]], *, grace: float = GARBAGE_GRACE_SECONDS
) -> Garbage:
    """Remove parts no marker names (see the module docstring, point 3); returns what it saw."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    garbage = find_garbage(spec, markers, grace=grace)
    for rel in garbage.removable:
        remove_quietly(fs, storage.join(root, rel))
        garbage.removed += 1
    if garbage.removed:
        log.info("removed %d parts no marker names", garbage.removed)
    return garbage


# --------------------------------------------------------------------------- manifest


def manifest_doc(
    spec: JobSpec, record: Mapping[str, Any], t: Totals, *, started: float
) -> dict[str, Any]:
    from batch import __version__

    return {
        "job": spec.name,
        "fingerprint": record.get("fingerprint"),
        "input": spec.input.path,
        "output": spec.output.path,
        "files": int(record.get("input", {}).get("files", 0)),
        "chunks": t.chunks,
        "retries": t.retries,
        "rows": t.rows,
        "failed_rows": t.failed_rows,
        "data_parts": t.data_parts,
        "failed_parts": t.failed_parts,
        "started_at": started,
        "finished_at": time.time(),
        "batchinfer_version": __version__,
    }


_MANIFEST_CONTENT = ("fingerprint", "chunks", "retries", "rows", "failed_rows", "data_parts",
                     "failed_parts")  # fmt: skip


def publish_manifest(spec: JobSpec, doc: dict[str, Any]) -> bool:
    """Replace ``_MANIFEST.json`` (atomically) unless it already lists the same output.

    Returns True if it was written. A manifest left stale by an older operation (a retry cut
    short, an older version's create-only manifest) is replaced by the next finishing one.
    """
    current = read_output_json(spec, MANIFEST)
    if current is not None and all(current.get(k) == doc.get(k) for k in _MANIFEST_CONTENT):
        return False
    write_json(spec, MANIFEST, doc, create_only=False)
    return True


def withdraw_manifest(spec: JobSpec) -> None:
    """Remove a manifest that describes an output which is no longer complete."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    remove_quietly(fs, storage.join(root, MANIFEST))


# --------------------------------------------------------------------------- inspection


def pending_attempts(spec: JobSpec, committed: set[str]) -> list[str]:
    """Chunks with attempt records but no marker: in flight, or cut short by a kill."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    folder = storage.join(root, ATTEMPTS_DIR)
    fs.invalidate_cache(folder)
    try:
        names = [e.rstrip("/").rsplit("/", 1)[-1] for e in fs.ls(folder, detail=False)]
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n not in committed and not n.startswith("."))
