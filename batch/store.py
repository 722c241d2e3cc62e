"""The output store: the one module that owns an output's layout and its commit protocol.

(Being rewritten: see the module docstring below each section.)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch import storage
from batch.errors import LeaseHeld, SpecError
from batch.spec import JobSpec

log = logging.getLogger(__name__)

MARKERS = "_markers"


@dataclass(frozen=True, slots=True)
class Chunk:
    chunk_id: str
    path: str
    relpath: str
    row_start: int
    row_end: int
    retry_of: str | None = None  # for retry-failed: the _failed/ part (relative to the output)

    @property
    def rows(self) -> int:
        return self.row_end - self.row_start




JOB_RECORD = "_job.json"
LEASE_DIR = "_lease"
ATTEMPTS_DIR = "_attempts"


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
    with lease.fs.open(lease.path, "wb") as fh:
        fh.write(json.dumps(lease.holder).encode())
    return True


def release_lease(lease: Lease) -> None:
    current = current_lease(lease.fs, lease.root)
    if current is None or current[0] != lease.number:
        return
    lease.holder.update(released=True, expires_at=0)
    with lease.fs.open(lease.path, "wb") as fh:
        fh.write(json.dumps(lease.holder).encode())


@contextmanager
def hold_lease(spec: JobSpec, *, ttl: float = 60.0, wait: bool = False) -> Iterator[Lease]:
    """Hold the lease for the duration of the block, renewing it every ttl/3 seconds."""
    lease = acquire_lease(spec, ttl=ttl, wait=wait)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                if not renew_lease(lease, ttl):
                    log.warning("lost the lease on %s to another run", spec.output.path)
                    return
            except Exception as exc:  # a storage hiccup: try again next period
                log.warning("could not renew the lease: %s", exc)

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


# --------------------------------------------------------------------------- attempts


def begin_attempt(fs: Any, root: str, chunk_id: str, note: Mapping[str, Any]) -> int:
    """Record one more attempt at a chunk; return its number (1 for the first)."""
    n = 1
    while True:
        path = storage.join(root, ATTEMPTS_DIR, f"{chunk_id}.{n:03d}.json")
        if storage.create_only(fs, path, json.dumps(dict(note, attempt=n)).encode()):
            return n
        n += 1


def attempts_so_far(fs: Any, root: str, chunk_id: str) -> int:
    names = storage.list_files(fs, storage.join(root, ATTEMPTS_DIR), ".json")
    return sum(1 for p in names if p.rsplit("/", 1)[-1].startswith(chunk_id + "."))


def clear_attempts(fs: Any, root: str, chunk_id: str, count: int) -> None:
    for n in range(1, count + 1):
        path = storage.join(root, ATTEMPTS_DIR, f"{chunk_id}.{n:03d}.json")
        with suppress(FileNotFoundError):
            fs.rm(path)


DATA = "data"
FAILED = "_failed"
MANIFEST = "_MANIFEST.json"
LEDGER = "ledger.json"
ERROR_CLASS = "_error_class"
ERROR_MESSAGE = "_error_message"
ATTEMPT = "_attempt"


def part_name(kind: str, chunk: Chunk) -> str:
    return f"{kind}/part-{chunk.chunk_id}.parquet"


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
) -> dict[str, Any]:
    """Write the chunk's parts and marker; return the marker (the chunk's stats)."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    compression = spec.output.compression
    marker: dict[str, Any] = {
        "chunk_id": chunk.chunk_id,
        "file": chunk.relpath,
        "row_start": chunk.row_start,
        "row_end": chunk.row_end,
        "fingerprint": fingerprint,
        "attempts": attempts,
        "rows": 0,
        "failed_rows": 0,
        "input_tokens": 0,
        "output_tokens": 0,
        "data_part": None,
        "failed_part": None,
        "adopted": False,
        "supersedes": chunk.retry_of,
    }
    for kind, table in ((DATA, data), (FAILED, failed)):
        if table is None or table.num_rows == 0:
            continue
        name = part_name(kind, chunk)
        path = storage.join(root, name)
        created = storage.write_parquet_create_only(fs, path, table, compression=compression)
        if not created:
            # Another attempt wrote this part first: adopt it and describe what is there.
            log.info("adopting existing part %s", name)
            table = _read_counts(fs, path)
            marker["adopted"] = True
        fault_point(f"after-{kind.strip('_')}-part")
        key = "rows" if kind == DATA else "failed_rows"
        marker[key] = table.num_rows
        marker["data_part" if kind == DATA else "failed_part"] = name
        if kind == DATA:
            marker["input_tokens"], marker["output_tokens"] = _token_totals(table)
    marker.update(extra)
    marker["committed_at"] = time.time()
    body = json.dumps(marker, sort_keys=True).encode()
    marker_path = storage.join(root, marker_name(chunk.chunk_id))
    if not storage.create_only(fs, marker_path, body):
        existing: dict[str, Any] = storage.read_json(fs, marker_path)
        existing["adopted"] = True
        marker = existing
    clear_attempts(fs, root, chunk.chunk_id, attempts + 1)
    if chunk.retry_of:
        # The retry's parts and marker are committed: the rows it took over leave _failed/.
        remove_quietly(fs, storage.join(root, chunk.retry_of))
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


def live_failed_parts(markers: Iterable[dict[str, Any]]) -> set[str]:
    """Failed parts still holding rows: those no retry has taken over."""
    markers = list(markers)
    superseded = {m["supersedes"] for m in markers if m.get("supersedes")}
    return {m["failed_part"] for m in markers if m.get("failed_part")} - superseded


def clean_superseded(spec: JobSpec, markers: Iterable[dict[str, Any]]) -> int:
    """Finish retries cut short between their marker and removing the failed part."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    parts = [storage.join(root, m["supersedes"]) for m in markers if m.get("supersedes")]
    # One listing per folder rather than a look per part: most were removed long ago, and on
    # S3 every absent part would cost a refused HEAD and then a listing of its folder.
    present: set[str] = set()
    for folder in sorted({fs._parent(p) for p in parts}):
        present.update(storage.list_files(fs, folder, ""))
    n = 0
    for path in parts:
        if path in present:
            remove_quietly(fs, path)
            n += 1
    return n


def list_markers(spec: JobSpec) -> list[str]:
    """Chunk ids of every marker in the output (input chunks and retries)."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    names = storage.list_files(fs, storage.join(root, MARKERS), ".json")
    return [n.rsplit("/", 1)[-1].removesuffix(".json") for n in names]


def _read_counts(fs: fsspec.AbstractFileSystem, path: str) -> pa.Table:
    with fs.open(path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        cols = [c for c in ("input_tokens", "output_tokens") if c in pf.schema_arrow.names]
        if cols:
            return pf.read(columns=cols)
        return pa.table({"_": pa.nulls(pf.metadata.num_rows)})


def read_markers(spec: JobSpec, chunk_ids: Iterable[str]) -> list[dict[str, Any]]:
    """Every committed chunk's marker (for the manifest and the ledger at the end)."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    paths = [storage.join(root, marker_name(c)) for c in chunk_ids]
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda p: storage.read_json(fs, p), paths))


def write_json(spec: JobSpec, name: str, doc: dict[str, Any], *, create_only: bool) -> bool:
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    body = json.dumps(doc, indent=2, sort_keys=True).encode()
    path = storage.join(root, name)
    if create_only:
        return storage.create_only(fs, path, body)
    storage.overwrite(fs, path, body)
    return True


def read_output_json(spec: JobSpec, name: str) -> dict[str, Any] | None:
    """The output's ``name`` (manifest, ledger), or None if the job has not written it yet."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    doc: dict[str, Any] | None = storage.read_json_or_none(fs, storage.join(root, name))
    return doc
