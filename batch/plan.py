"""Planning: the input listing and Parquet footers cut into deterministic chunks.

A chunk is a row range ``[row_start, row_end)`` of one input file, cut every
``resources.rows_per_chunk`` rows from the start of the file. Its id is a pure function of
the file's path relative to the input root and the range, so the plan after a crash is the
plan before it, and no id column is needed to resume. Chunks whose marker exists in the
output are done; the plan reads only listings and footers, never row data.

Each file's identity (rows, size and a digest of its Parquet footer) is part of the input
listing digest, so a file rewritten with the same row count changes the job fingerprint; a copy
that only changes the modification time does not. :func:`read_chunk` checks that a chunk still
reads the rows the plan cut (and, given the identity, that the file is the planned one), so a
file changed mid-run stops the job with :class:`InputChanged` instead of committing short.
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
from batch.errors import InputChanged, SpecError
from batch.spec import JobSpec
from batch.store import Chunk

log = logging.getLogger(__name__)

_GLOB = re.compile(r"[*?\[]")


@dataclass(frozen=True, slots=True)
class InputFile:
    path: str  # as the filesystem names it (no protocol)
    relpath: str  # relative to the input root; what chunk ids are made of
    num_rows: int
    # "<rows>:<size>:<footer digest>": changes when the file is rewritten, not when copied.
    # Empty for files whose identity is not tracked (retry-failed's parts).
    identity: str = ""


@dataclass(frozen=True, slots=True)
class Footer:
    num_rows: int
    schema: pa.Schema
    identity: str


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

    @property
    def identities(self) -> dict[str, str]:
        """Each input file's identity by path: what ``read_chunk(..., expected=)`` checks."""
        return {f.path: f.identity for f in self.files if f.identity}


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
        # Hidden names (_SUCCESS, _tmp/, .staging/) are skipped below the root only: the
        # root itself may well sit under /data/_staging/.
        paths = sorted(
            p
            for p in fs.find(root)
            if p.endswith(".parquet")
            and not any(s.startswith(("_", ".")) for s in _relative(p, base).split("/"))
        )
    return [(p, _relative(p, base)) for p in paths]


def _relative(path: str, base: str) -> str:
    if base and path.startswith(base):
        return path[len(base) :].lstrip("/")
    return path


def read_footer(fs: fsspec.AbstractFileSystem, path: str) -> tuple[int, pa.Schema]:
    footer = inspect_file(fs, path)
    return footer.num_rows, footer.schema


def inspect_file(fs: fsspec.AbstractFileSystem, path: str) -> Footer:
    """Row count, schema and identity from the footer; a file that is not Parquet is a
    SpecError naming it (never a pyarrow traceback)."""
    with fs.open(path, "rb") as fh:
        try:
            meta = pq.ParquetFile(fh)
            rows = meta.metadata.num_rows
            return Footer(rows, meta.schema_arrow, _identity(fh, rows))
        except Exception as exc:
            if not _is_corrupt(exc):
                raise
            reason = " ".join(str(exc).split()).rstrip(".")  # pyarrow's may end in a newline
            raise SpecError(
                f"input file {_source(fs, path)} is not a readable Parquet file ({reason}): "
                "fix or remove it"
            ) from None


def _is_corrupt(exc: BaseException) -> bool:
    """pyarrow's verdict on the bytes (ArrowInvalid, or a bare OSError from the footer's
    thrift decoder), as opposed to a storage error (permission, missing, connection)."""
    if isinstance(exc, pa.ArrowInvalid):
        return True
    return type(exc) is OSError and exc.errno is None


def _identity(fh: Any, rows: int) -> str:
    """``<rows>:<size>:<digest of the footer bytes>``. The footer holds every row group's
    offsets, sizes and statistics, so a rewrite changes it; a byte-for-byte copy (a new
    modification time) does not. The footer was just read to parse it, so on object storage
    this read is served from the file's read-ahead cache."""
    size = fh.seek(0, 2)
    digest = ""
    if size >= 12:
        fh.seek(size - 8)
        length = min(int.from_bytes(fh.read(4), "little"), size - 8)
        fh.seek(size - 8 - length)
        digest = hashlib.sha256(fh.read(length)).hexdigest()[:16]
    return f"{rows}:{size}:{digest}"


def check_unchanged(fs: fsspec.AbstractFileSystem, path: str, expected: str) -> None:
    """Raise InputChanged unless the file at ``path`` is still the one planned; ``expected``
    is its :attr:`InputFile.identity` (``Plan.identities[path]``). Reads the footer only."""
    with fs.open(path, "rb") as fh:
        try:
            rows = pq.ParquetFile(fh).metadata.num_rows
        except Exception as exc:
            if not _is_corrupt(exc):
                raise
            rows = 0
        found = _identity(fh, rows)
    if found != expected:
        raise InputChanged(_changed(_source(fs, path), expected, rows))


def _source(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def _changed(source: str, expected: str, rows: int) -> str:
    planned = expected.split(":", 1)[0]
    differs = "" if planned != str(rows) else ", but its size or Parquet footer differs"
    return (
        f"input file {source} changed since the job was planned (planned {planned} rows, "
        f"found {rows}{differs}): restore the file, or write to a fresh output with "
        "--set output.path=<new folder>"
    )


def make_plan(spec: JobSpec, *, required_columns: Iterable[str] = ()) -> Plan:
    """List, read footers, cut chunks, subtract committed ones, check the needed columns."""
    fs, root = storage.open_fs(spec.input.path, spec.input.storage_options)
    listed = list_input(fs, root)
    if not listed:
        if not _GLOB.search(root) and not storage.exists(fs, root):
            raise SpecError(
                f"input.path: {spec.input.path} does not exist; check the path (and "
                "input.storage_options for object storage)"
            )
        raise SpecError(f"input.path: no Parquet files at {spec.input.path}")
    with ThreadPoolExecutor(max_workers=16) as pool:
        footers = list(pool.map(lambda p: inspect_file(fs, p[0]), listed))
    files = [
        InputFile(p, rel, f.num_rows, f.identity)
        for (p, rel), f in zip(listed, footers, strict=True)
    ]
    schema = footers[0].schema
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
    # A file's identity joins its path, so a same-size rewrite changes the listing too.
    plan.listing = store.listing_digest(
        [(f"{f.relpath}\t{f.identity}" if f.identity else f.relpath, f.num_rows) for f in files]
    )
    plan.fingerprint = store.job_fingerprint(spec, plan.listing)
    plan.pending = [c for c in chunks if c.chunk_id not in done]
    return plan


def committed_chunk_ids(spec: JobSpec) -> set[str]:
    """The chunks whose marker exists (a listing of marker names, no reads): the store's."""
    return store.committed_chunk_ids(spec)


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


def read_chunk(
    spec: JobSpec, chunk: Chunk, protocol: str, *, expected: str | None = None
) -> pa.Table:
    """The chunk's rows (projected), with _source_file/_source_row when there is no id column.

    A retry chunk reads its failed part from the output instead: those rows already carry
    the projected input columns and their id or provenance.

    Raises InputChanged if the file no longer holds the chunk's rows, or, given ``expected``
    (the file's planned identity, ``Plan.identities[chunk.path]``), if it is not the planned
    file: committing would lose rows silently, or mix two versions of the input.
    """
    if chunk.retry_of:
        out_fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
        with out_fs.open(storage.join(root, chunk.retry_of), "rb") as fh:
            return pq.read_table(fh)
    fs, _ = storage.open_fs(spec.input.path, spec.input.storage_options)
    columns = spec.input.columns
    source = chunk.path if protocol in ("file", "local") else f"{protocol}://{chunk.path}"
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
        file_rows = pf.metadata.num_rows
        if expected is not None:
            found = _identity(fh, file_rows)
            if found != expected:
                raise InputChanged(_changed(source, expected, file_rows), chunk=chunk.chunk_id)
        table = pf.read_row_groups(groups, columns=columns)
    table = table.slice(chunk.row_start - (first_start or 0), chunk.rows)
    if table.num_rows != chunk.rows:
        raise InputChanged(
            f"input file {source} changed since the job was planned (rows {chunk.row_start}-"
            f"{chunk.row_end}: planned {chunk.rows} rows, found {table.num_rows}; the file now "
            f"has {file_rows} rows): restore the file, or write to a fresh output with "
            "--set output.path=<new folder>",
            chunk=chunk.chunk_id,
        )
    if not spec.input.id_column:
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
