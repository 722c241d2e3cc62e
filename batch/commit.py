"""Committing a chunk: its part files create-only, then its marker, create-only, last.

Runs on the workers, never through the driver. A chunk is done exactly when its marker
exists. An attempt that finds its part already written (a retry, or a second run of the
same job) adopts that part, and recounts the marker's figures from it, so the marker always
describes the bytes that are in the output.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batch import checkpoint, storage
from batch.plan import MARKERS, Chunk
from batch.spec import JobSpec

log = logging.getLogger(__name__)

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
    checkpoint.clear_attempts(fs, root, chunk.chunk_id, attempts + 1)
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
