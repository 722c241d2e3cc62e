"""Planning: the input listing and Parquet footers cut into deterministic chunks.

A chunk is a row range ``[row_start, row_end)`` of one input file, cut every
``resources.rows_per_chunk`` rows from the start of the file. Its id is a pure function of
the file's path relative to the input root and the range, so the plan after a crash is the
plan before it, and no id column is needed to resume. Chunks whose marker exists in the
output are done; the plan reads only listings and footers, never row data.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from batch import prompt, storage, store
from batch.errors import SpecError
from batch.spec import JobSpec
from batch.store import MARKERS, Chunk

log = logging.getLogger(__name__)

_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class InputFile:
    path: str  # as the filesystem names it (no protocol)
    relpath: str  # relative to the input root; what chunk ids are made of
    num_rows: int


@dataclass
class Plan:
    files: list[InputFile]
    chunks: list[Chunk]
    done: set[str]
    schema: pa.Schema
    protocol: str
    pending: list[Chunk] = field(default_factory=list)
    listing: str = ""  # digest of the input listing (relative paths and row counts)
    fingerprint: str = ""  # of the listing and everything in the spec that shapes the output

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def pending_rows(self) -> int:
        return sum(c.rows for c in self.pending)


def _stem(relpath: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", relpath.rsplit("/", 1)[-1].removesuffix(".parquet"))


def chunk_id(relpath: str, row_start: int, row_end: int, stem: str | None = None) -> str:
    """Readable and unique: ``<file stem>.<start>-<end>.<hash of path and range>``."""
    stem = _stem(relpath) if stem is None else stem
    digest = hashlib.sha256(f"{relpath}\0{row_start}\0{row_end}".encode()).hexdigest()[:10]
    return f"{stem[:40]}.{row_start:09d}-{row_end:09d}.{digest}"


def cut_chunks(files: Iterable[InputFile], rows_per_chunk: int) -> Iterator[Chunk]:
    for f in files:
        stem = _stem(f.relpath)  # once per file, not per chunk
        for start in range(0, f.num_rows, rows_per_chunk):
            end = min(start + rows_per_chunk, f.num_rows)
            yield Chunk(chunk_id(f.relpath, start, end, stem), f.path, f.relpath, start, end)


def list_input(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, str]]:
    """(path, relpath) of every Parquet input file, sorted: a file, a folder or a glob."""
    if _GLOB.search(root):
        base = _GLOB.split(root, maxsplit=1)[0].rsplit("/", 1)[0]
        paths = sorted(p for p in fs.glob(root) if fs.isfile(p))
    elif fs.isfile(root):
        base, paths = root.rsplit("/", 1)[0], [root]
    else:
        base = root
        paths = sorted(
            p
            for p in fs.find(root)
            if p.endswith(".parquet") and not any(s.startswith(("_", ".")) for s in p.split("/"))
        )
    return [(p, p[len(base) :].lstrip("/") if base else p) for p in paths]


def read_footer(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, pa.Schema]:
    with fs.open(path, "rb") as fh:
        meta = pq.ParquetFile(fh)
        return meta.metadata.num_rows, meta.schema_arrow


def make_plan(spec: JobSpec, *, required_columns: Iterable[str] = ()) -> Plan:
    """List, read footers, cut chunks, subtract committed ones, check the needed columns."""
    fs, root = storage.open_fs(spec.input.path, spec.input.storage_options)
    listed = list_input(fs, root)
    if not listed:
        raise SpecError(f"input.path: no Parquet files at {spec.input.path}")
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = list(pool.map(lambda p: read_footer(fs, p[0]), listed))
    files = [InputFile(p, rel, n) for (p, rel), (n, _) in zip(listed, footers, strict=True)]
    schema = footers[0][1]
    check_columns(spec, schema, required_columns)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    plan = plan_chunks(spec, files, committed_chunk_ids(spec), schema=schema, protocol=protocol)
    log.info(
        "plan: %d files, %d rows, %d chunks, %d already committed",
        len(files),
        plan.total_rows,
        len(plan.chunks),
        len(plan.chunks) - len(plan.pending),
    )
    return plan


def plan_chunks(
    spec: JobSpec,
    files: list[InputFile],
    done: set[str],
    *,
    schema: pa.Schema | None = None,
    protocol: str = "file",
) -> Plan:
    """The pure part of planning: (listing, committed chunk ids, spec) -> plan.

    A resume computes the same chunks as the first run because this is a function of its
    arguments only; it touches no row data, so its cost grows with files and chunks, never
    with rows.
    """
    chunks = list(cut_chunks(files, spec.resources.rows_per_chunk))
    plan = Plan(files=files, chunks=chunks, done=done, schema=schema or pa.schema([]),
                protocol=protocol)  # fmt: skip
    plan.listing = store.listing_digest([(f.relpath, f.num_rows) for f in files])
    plan.fingerprint = store.job_fingerprint(spec, plan.listing)
    plan.pending = [c for c in chunks if c.chunk_id not in done]
    return plan


def committed_chunk_ids(spec: JobSpec) -> set[str]:
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    names = storage.list_files(fs, storage.join(root, MARKERS), ".json")
    return {n.rsplit("/", 1)[-1].removesuffix(".json") for n in names}


def check_columns(spec: JobSpec, schema: pa.Schema, required: Iterable[str]) -> None:
    names = list(schema.names)
    wanted: list[tuple[str, str]] = [(c, "input.columns") for c in spec.input.columns or []]
    if spec.input.id_column:
        wanted.append((spec.input.id_column, "input.id_column"))
    available = spec.input.columns or names
    for col, where in wanted:
        if col not in names:
            raise SpecError(
                f"{where}: the input has no column '{col}'; columns: {', '.join(names)}"
            )
    prompt.check_columns(required, available, "prompt")


def read_chunk(spec: JobSpec, chunk: Chunk, protocol: str) -> pa.Table:
    """The chunk's rows (projected), with _source_file/_source_row when there is no id column.

    A retry chunk reads its failed part from the output instead: those rows already carry
    the projected input columns and their id or provenance.
    """
    if chunk.retry_of:
        out_fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
        with out_fs.open(storage.join(root, chunk.retry_of), "rb") as fh:
            return pq.read_table(fh)
    fs, _ = storage.open_fs(spec.input.path, spec.input.storage_options)
    columns = spec.input.columns
    with fs.open(chunk.path, "rb") as fh:
        pf = pq.ParquetFile(fh)
        groups: list[int] = []
        first_start = None
        offset = 0
        for i in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(i).num_rows
            if offset < chunk.row_end and offset + n > chunk.row_start:
                groups.append(i)
                first_start = offset if first_start is None else first_start
            offset += n
        table = pf.read_row_groups(groups, columns=columns)
    table = table.slice(chunk.row_start - (first_start or 0), chunk.rows)
    if not spec.input.id_column:
        source = chunk.path if protocol in ("file", "local") else f"{protocol}://{chunk.path}"
        table = table.append_column("_source_file", pa.array([source] * chunk.rows, pa.string()))
        rows = pa.array(range(chunk.row_start, chunk.row_end), pa.int64())
        table = table.append_column("_source_row", rows)
    return table


def describe(plan: Plan) -> dict[str, Any]:
    return {
        "files": len(plan.files),
        "rows": plan.total_rows,
        "chunks": len(plan.chunks),
        "committed_chunks": len(plan.chunks) - len(plan.pending),
        "pending_chunks": len(plan.pending),
        "pending_rows": plan.pending_rows,
    }
