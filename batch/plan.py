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

Text inputs (``input.format`` jsonl, csv, openai-batch) have no footer: the plan reads each
file once, streaming, to count its rows and note the byte offset where every chunk's first row
starts (:class:`TextLayout`), so a read task reads only its chunk's bytes (and, for CSV, the
header line, which it puts in front of them). Blank lines are not rows. A CSV record ends at a
newline outside double quotes, so quoted fields may hold commas and newlines. A text file's
identity is ``<rows>:<size>:<ETag or mtime>:<digest of its first and last 64 KiB>``: touching or
rewriting it after planning is refused as for Parquet.

The schema of a JSONL or CSV input is inferred from the first chunk of each file (types merged
over files: the first file's type wins, integers and floats meet at float64, all-null columns
become strings). A read task parses its chunk with that schema given explicitly, so chunks agree;
if the chunk does not parse as a whole, its rows are parsed one by one and a row that does not
fit becomes a row of nulls with the reason in ``_parse_error``: a failed row ("MalformedRow"),
never a failed job. Text inputs always carry the ``_parse_error`` column (null when the row
parsed). An ``openai-batch`` file is read line by line into custom_id, method, url, body (the
JSON text of the body as written) and _line; a malformed line is a failed row
("MalformedRequest") and duplicate custom_ids are refused at plan time (the ids of one job's
files are held in memory: OpenAI caps a batch file at 50,000 requests).

Hive-style folders below the input root (``dt=2026-12-01/region=eu/part.parquet``) add one
string column per key, for every format (URL-escaped values are decoded, and
``__HIVE_DEFAULT_PARTITION__`` is null); a folder name without ``=`` is just a folder.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import io
import json
import logging
import re
import urllib.parse
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, overload

import fsspec
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson
import pyarrow.parquet as pq

from batch import prompt, storage, store
from batch.errors import InputChanged, SpecError
from batch.spec import JobSpec
from batch.store import Chunk

log = logging.getLogger(__name__)

_GLOB = re.compile(r"[*?\[]")

#: The file names a folder input lists, per format.
SUFFIXES = {
    "parquet": (".parquet",),
    "jsonl": (".jsonl", ".json"),
    "csv": (".csv",),
    "openai-batch": (".jsonl", ".json"),
}
_FORMAT_NAMES = {"parquet": "Parquet", "jsonl": "JSONL", "csv": "CSV",
                 "openai-batch": "JSONL (OpenAI batch)"}  # fmt: skip
TEXT_FORMATS = ("jsonl", "csv", "openai-batch")

#: Null unless the row could not be parsed; then its reason (the row is a failed row).
PARSE_ERROR = "_parse_error"
#: The columns of an openai-batch row.
OPENAI_SCHEMA = pa.schema(
    [("custom_id", pa.string()), ("method", pa.string()), ("url", pa.string()),
     ("body", pa.string()), ("_line", pa.int64())]
)  # fmt: skip
OPENAI_URLS = ("/v1/chat/completions", "/v1/embeddings")
_EDGE = 64 * 1024  # bytes digested at each end of a text file for its identity
_SCHEMA_SAMPLE = 8 * 1024 * 1024  # at most this much of a file's first chunk infers its schema
_HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"


@dataclass(frozen=True, slots=True)
class TextLayout:
    """Where a text file's chunks start, for one ``rows_per_chunk``: ``starts[i]`` is the
    (byte offset, 1-based line number) of chunk i's first row, and ``starts[-1]`` the end of
    the file. ``header`` is the byte range of a CSV file's header record."""

    rows_per_chunk: int
    starts: tuple[tuple[int, int], ...]
    header: tuple[int, int] = (0, 0)


@dataclass(frozen=True, slots=True)
class InputFile:
    path: str  # as the filesystem names it (no protocol)
    relpath: str  # relative to the input root; what chunk ids are made of
    num_rows: int
    # "<rows>:<size>:<footer digest>": changes when the file is rewritten, not when copied.
    # Text files: "<rows>:<size>:<ETag or mtime>:<digest of the first and last 64 KiB>".
    # Empty for files whose identity is not tracked (retry-failed's parts).
    identity: str = ""
    layout: TextLayout | None = None  # text formats only


@dataclass(frozen=True, slots=True)
class InputChunk(Chunk):
    """A chunk that needs more than its row range to be read: a text chunk's byte range and
    planned schema, and the Hive partition keys of the job (values come from the path)."""

    fmt: str = "parquet"
    partition_keys: tuple[str, ...] = ()
    byte_start: int = 0
    byte_end: int = 0
    line_start: int = 0  # 1-based line number of the first row
    text_rows: int = 0  # rows in [byte_start, byte_end): the planned chunk's rows
    header: tuple[int, int] = (0, 0)  # CSV: the header record's bytes
    schema: bytes = field(default=b"", repr=False)  # text: the planned schema of the columns (IPC)


@dataclass(frozen=True, slots=True)
class Footer:
    num_rows: int
    schema: pa.Schema
    identity: str


@dataclass
class Plan:
    """``chunks`` and ``pending`` are lists or :class:`ChunkList` (cut on demand: a job's plan
    does not hold its chunks)."""

    files: list[InputFile]
    chunks: Sequence[Chunk]
    done: set[str]
    schema: pa.Schema
    protocol: str
    pending: Sequence[Chunk] = field(default_factory=list)
    listing: str = ""  # digest of the input listing (relative paths and row counts)
    fingerprint: str = ""  # of the listing and everything in the spec that shapes the output

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def pending_rows(self) -> int:
        if isinstance(self.pending, ChunkList):
            return self.pending.rows
        return sum(c.rows for c in self.pending)

    @property
    def identities(self) -> dict[str, str]:
        """Each input file's identity by path: what ``read_chunk(..., expected=)`` checks."""
        return {f.path: f.identity for f in self.files if f.identity}


def _stem(relpath: str) -> str:
    name = relpath.rsplit("/", 1)[-1]
    for suffix in (".parquet", ".jsonl", ".json", ".csv"):
        if name.endswith(suffix):
            name = name.removesuffix(suffix)
            break
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def chunk_id(relpath: str, row_start: int, row_end: int, stem: str | None = None) -> str:
    """Readable and unique: ``<file stem>.<start>-<end>.<hash of path and range>``."""
    stem = _stem(relpath) if stem is None else stem
    digest = hashlib.sha256(f"{relpath}\0{row_start}\0{row_end}".encode()).hexdigest()[:10]
    return f"{stem[:40]}.{row_start:09d}-{row_end:09d}.{digest}"


def cut_chunks(
    files: Iterable[InputFile],
    rows_per_chunk: int,
    *,
    fmt: str = "parquet",
    partition_keys: tuple[str, ...] = (),
    schema: pa.Schema | None = None,
) -> Iterator[Chunk]:
    """Every ``rows_per_chunk`` rows of each file. Plain Parquet chunks are :class:`Chunk`;
    text chunks and chunks of a partitioned input are :class:`InputChunk` (same ids)."""
    schema_bytes = schema.serialize().to_pybytes() if schema is not None else b""
    for f in files:
        stem = _stem(f.relpath)  # once per file, not per chunk
        for i in range(-(-f.num_rows // rows_per_chunk)):
            yield _make_chunk(f, i, rows_per_chunk, stem, fmt, partition_keys, schema_bytes)


def _make_chunk(
    f: InputFile,
    i: int,
    rows_per_chunk: int,
    stem: str,
    fmt: str,
    partition_keys: tuple[str, ...],
    schema_bytes: bytes,
) -> Chunk:
    """Chunk ``i`` of file ``f``: a pure function of its arguments."""
    start = i * rows_per_chunk
    end = min(start + rows_per_chunk, f.num_rows)
    cid = chunk_id(f.relpath, start, end, stem)
    if f.layout is not None:
        if f.layout.rows_per_chunk != rows_per_chunk:
            raise ValueError("the text layout was made for another rows_per_chunk")
        (b0, line), (b1, _) = f.layout.starts[i], f.layout.starts[i + 1]
        return InputChunk(cid, f.path, f.relpath, start, end, fmt=fmt,
                          partition_keys=partition_keys, byte_start=b0, byte_end=b1,
                          line_start=line, text_rows=end - start, header=f.layout.header,
                          schema=schema_bytes)  # fmt: skip
    if partition_keys:
        return InputChunk(cid, f.path, f.relpath, start, end, partition_keys=partition_keys)
    return Chunk(cid, f.path, f.relpath, start, end)


class ChunkList(Sequence[Chunk]):
    """The chunks of a list of files (all of them, or those not in ``done``), cut on demand.

    It holds the files and runs of consecutive kept chunk numbers per file, never the chunks:
    a plan of a million chunks costs its files and the runs its committed chunks break, and
    iterating it streams. Indexing and slicing work as on a list.
    """

    def __init__(
        self,
        files: Sequence[InputFile],
        rows_per_chunk: int,
        *,
        fmt: str = "parquet",
        partition_keys: tuple[str, ...] = (),
        schema: pa.Schema | None = None,
        done: set[str] | None = None,
        _runs: list[tuple[int, int, int]] | None = None,
        _schema_bytes: bytes | None = None,
    ) -> None:
        self.files = list(files)
        self.rows_per_chunk = rows_per_chunk
        self.fmt, self.partition_keys = fmt, partition_keys
        self._schema_bytes = (
            _schema_bytes if _schema_bytes is not None
            else schema.serialize().to_pybytes() if schema is not None else b""
        )  # fmt: skip
        self._stems = [_stem(f.relpath) for f in self.files]
        if _runs is None:
            _runs = []
            for n, f in enumerate(self.files):
                count = -(-f.num_rows // rows_per_chunk)
                if not done:
                    if count:
                        _runs.append((n, 0, count))
                    continue
                first = None
                for i in range(count):
                    start = i * rows_per_chunk
                    end = min(start + rows_per_chunk, f.num_rows)
                    if chunk_id(f.relpath, start, end, self._stems[n]) in done:
                        if first is not None:
                            _runs.append((n, first, i))
                            first = None
                    elif first is None:
                        first = i
                if first is not None:
                    _runs.append((n, first, count))
        self._runs = _runs  # (file number, first chunk number, end chunk number)
        self._offsets = [0]
        self.rows = 0
        for n, a, b in self._runs:
            self._offsets.append(self._offsets[-1] + b - a)
            f = self.files[n]
            self.rows += min(b * rows_per_chunk, f.num_rows) - a * rows_per_chunk

    def _chunk(self, n: int, i: int) -> Chunk:
        return _make_chunk(self.files[n], i, self.rows_per_chunk, self._stems[n], self.fmt,
                           self.partition_keys, self._schema_bytes)  # fmt: skip

    def __len__(self) -> int:
        return self._offsets[-1]

    def __iter__(self) -> Iterator[Chunk]:
        for n, a, b in self._runs:
            for i in range(a, b):
                yield self._chunk(n, i)

    @overload
    def __getitem__(self, index: int) -> Chunk: ...
    @overload
    def __getitem__(self, index: slice) -> list[Chunk]: ...
    def __getitem__(self, index: int | slice) -> Chunk | list[Chunk]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        r = bisect.bisect_right(self._offsets, index) - 1
        n, a, _ = self._runs[r]
        return self._chunk(n, a + index - self._offsets[r])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Sequence):
            return len(self) == len(other) and list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ChunkList({len(self)} chunks of {len(self.files)} files)"

    def part(self, start: int, stop: int) -> ChunkList:
        """Chunks ``start`` to ``stop`` as a ChunkList holding only the files they are of (what
        one read task of the chunk feed carries)."""
        runs: list[tuple[int, int, int]] = []
        files: list[InputFile] = []
        renumber: dict[int, int] = {}
        for r, (n, a, b) in enumerate(self._runs):
            lo, hi = self._offsets[r], self._offsets[r + 1]
            if hi <= start or lo >= stop:
                continue
            a2, b2 = a + max(0, start - lo), b - max(0, hi - stop)
            if n not in renumber:
                renumber[n] = len(files)
                files.append(self.files[n])
            runs.append((renumber[n], a2, b2))
        return ChunkList(files, self.rows_per_chunk, fmt=self.fmt,
                         partition_keys=self.partition_keys, _runs=runs,
                         _schema_bytes=self._schema_bytes)  # fmt: skip


def list_input(
    fs: fsspec.AbstractFileSystem, root: str, suffixes: tuple[str, ...] = (".parquet",)
) -> list[tuple[str, str]]:
    """(path, relpath) of every input file, sorted: a file, a folder (the files with one of
    ``suffixes`` below it) or a glob."""
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
            if p.endswith(suffixes)
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
    is its :attr:`InputFile.identity` (``Plan.identities[path]``). Reads the footer only (of a
    text file: its size, stamp and first and last 64 KiB)."""
    if expected.count(":") == 3:  # a text file's "<rows>:<size>:<stamp>:<digest>"
        with fs.open(path, "rb") as fh:
            if _text_identity(fs, path, fh) != expected.split(":", 1)[1]:
                raise InputChanged(_text_changed(_source(fs, path)))
        return
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


def _text_changed(source: str) -> str:
    return (
        f"input file {source} changed since the job was planned (its size, modification time "
        "or content differs): restore the file, or write to a fresh output with "
        "--set output.path=<new folder>"
    )


def make_plan(spec: JobSpec, *, required_columns: Iterable[str] = ()) -> Plan:
    """List, read footers (or scan text files), cut chunks, subtract committed ones, check the
    needed columns."""
    fmt = spec.input.format
    fs, root = storage.open_fs(spec.input.path, spec.input.storage_options)
    listed = list_input(fs, root, SUFFIXES[fmt])
    if not listed:
        if not _GLOB.search(root) and not storage.exists(fs, root):
            raise SpecError(
                f"input.path: {spec.input.path} does not exist; check the path (and "
                "input.storage_options for object storage)"
            )
        names = ", ".join(f"*{s}" for s in SUFFIXES[fmt])
        raise SpecError(
            f"input.path: no {_FORMAT_NAMES[fmt]} files ({names}) at {spec.input.path}"
            + ("" if fmt == "parquet" else f" (input.format: {fmt})")
        )
    rows_per_chunk = spec.resources.rows_per_chunk
    with ThreadPoolExecutor(max_workers=16) as pool:
        if fmt == "parquet":
            footers = list(pool.map(lambda p: inspect_file(fs, p[0]), listed))
            files = [
                InputFile(p, rel, f.num_rows, f.identity)
                for (p, rel), f in zip(listed, footers, strict=True)
            ]
            schema = footers[0].schema
        else:
            scans = list(pool.map(lambda p: scan_text(fs, p[0], fmt, rows_per_chunk), listed))
            files = [
                InputFile(p, rel, t.rows, t.identity, t.layout)
                for (p, rel), t in zip(listed, scans, strict=True)
            ]
            if fmt == "openai-batch":
                _check_unique_ids(
                    fs, [(p, t.custom_ids) for (p, _), t in zip(listed, scans, strict=True)]
                )
                schema = OPENAI_SCHEMA
            else:
                schema = pa.schema([])
                for t in scans:
                    schema = merge_schemas(schema, t.schema)
                schema = pa.schema(
                    [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f
                     for f in schema]
                )  # fmt: skip
    keys = partition_keys(f.relpath for f in files)
    clash = [k for k in keys if k in schema.names]
    if clash:
        raise SpecError(
            f"input.path: the column '{clash[0]}' is both in the files and a partition folder "
            f"({clash[0]}=...); rename the column or the folder"
        )
    full = full_schema(schema, keys, fmt)
    check_columns(spec, full, required_columns)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    plan = plan_chunks(spec, files, committed_chunk_ids(spec), schema=full, protocol=protocol)
    log.info(
        "plan: %d files, %d rows, %d chunks, %d already committed",
        len(files),
        plan.total_rows,
        len(plan.chunks),
        len(plan.chunks) - len(plan.pending),
    )
    return plan


def full_schema(file_schema: pa.Schema, keys: Iterable[str], fmt: str) -> pa.Schema:
    """What a read task returns (before provenance): the files' columns, then one string column
    per partition key, then, for text formats, ``_parse_error``."""
    fields = list(file_schema) + [pa.field(k, pa.string()) for k in keys]
    if fmt in TEXT_FORMATS:
        fields.append(pa.field(PARSE_ERROR, pa.string()))
    return pa.schema(fields)


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
    fmt = spec.input.format
    keys = partition_keys(f.relpath for f in files)
    text_schema = None
    if fmt in ("jsonl", "csv") and schema is not None:  # the files' own columns
        text_schema = pa.schema([f for f in schema if f.name not in (*keys, PARSE_ERROR)])
    rows_per_chunk = spec.resources.rows_per_chunk
    chunks = ChunkList(files, rows_per_chunk, fmt=fmt, partition_keys=keys, schema=text_schema)
    plan = Plan(files=files, chunks=chunks, done=done, schema=schema or pa.schema([]),
                protocol=protocol)  # fmt: skip
    # A file's identity joins its path, so a same-size rewrite changes the listing too.
    plan.listing = store.listing_digest(
        [(f"{f.relpath}\t{f.identity}" if f.identity else f.relpath, f.num_rows) for f in files]
    )
    plan.fingerprint = store.job_fingerprint(spec, plan.listing)
    plan.pending = ChunkList(files, rows_per_chunk, fmt=fmt, partition_keys=keys,
                             schema=text_schema, done=done)  # fmt: skip
    return plan


# --------------------------------------------------------------------------- Hive partitions


def partitions(relpath: str) -> list[tuple[str, str | None]]:
    """The ``key=value`` folders of a relative path (not its file name), in order."""
    out: list[tuple[str, str | None]] = []
    for segment in relpath.split("/")[:-1]:
        key, eq, value = segment.partition("=")
        if eq and key:
            value = urllib.parse.unquote(value)
            out.append((urllib.parse.unquote(key), None if value == _HIVE_NULL else value))
    return out


def partition_keys(relpaths: Iterable[str]) -> tuple[str, ...]:
    """Every partition key of the input, in order of first appearance."""
    keys: dict[str, None] = {}
    for rel in relpaths:
        for key, _ in partitions(rel):
            keys.setdefault(key)
    return tuple(keys)


def _with_partitions(table: pa.Table, relpath: str, keys: tuple[str, ...]) -> pa.Table:
    values = dict(partitions(relpath))
    for key in keys:
        if key not in table.column_names:  # a file's own column wins (refused at plan time)
            table = table.append_column(
                key, pa.array([values.get(key)] * table.num_rows, pa.string())
            )
    return table


# --------------------------------------------------------------------------- text files


@dataclass
class TextScan:
    rows: int
    identity: str
    layout: TextLayout
    schema: pa.Schema  # jsonl/csv: inferred from the first chunk; openai-batch: empty
    custom_ids: dict[str, int]  # openai-batch: custom_id -> line


def _stamp(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The file's ETag, else its modification time: what changes when it is written."""
    with contextlib.suppress(Exception):  # a filesystem without a listing cache
        fs.invalidate_cache(path)
    info = fs.info(path)
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key]).strip('"').replace(":", "_")
    return ""


def _edges_digest(fh: Any, size: int) -> str:
    h = hashlib.sha256()
    fh.seek(0)
    h.update(fh.read(min(size, _EDGE)))
    if size > _EDGE:
        fh.seek(max(_EDGE, size - _EDGE))
        h.update(fh.read())
    return h.hexdigest()[:16]


def _text_identity(fs: fsspec.AbstractFileSystem, path: str, fh: Any) -> str:
    """``<size>:<stamp>:<edges digest>`` (the identity without its row count)."""
    size = fh.seek(0, 2)
    return f"{size}:{_stamp(fs, path)}:{_edges_digest(fh, size)}"


def _blank(line: bytes) -> bool:
    return not line.strip(b" \t\r\n")


def _records(fh: Any, csv: bool) -> Iterator[tuple[int, int, int, bytes]]:
    """(byte offset, line number, next offset, bytes) of every non-blank record, streaming.
    A JSON record is a line; a CSV record ends at a newline outside double quotes."""
    offset, line_no = 0, 1
    start, start_line, quotes = 0, 1, 0
    parts: list[bytes] = []
    for line in fh:
        offset += len(line)
        line_no += 1
        if csv:
            parts.append(line)
            quotes += line.count(b'"')
            if quotes % 2:
                if line.endswith(b"\n"):
                    continue  # a newline inside a quoted field
                raise ValueError(
                    f"line {start_line}: a quoted field is not closed before the file ends"
                )
            record = b"".join(parts) if len(parts) > 1 else line
            parts, quotes = [], 0
        else:
            record = line
        if not _blank(record):
            yield start, start_line, offset, record
        start, start_line = offset, line_no
    if parts:  # the file ends inside a quoted field
        raise ValueError(f"line {start_line}: a quoted field is not closed before the file ends")


def scan_text(fs: fsspec.AbstractFileSystem, path: str, fmt: str, rows_per_chunk: int) -> TextScan:
    """One streaming pass over a text file: its rows, where each chunk starts, its identity, the
    schema of its first chunk (jsonl, csv) and its custom_ids (openai-batch)."""
    source = _source(fs, path)
    csv = fmt == "csv"
    starts: list[tuple[int, int]] = []
    header = (0, 0)
    sample: list[bytes] = []
    sample_size = 0
    ids: dict[str, int] = {}
    rows = 0
    have_header = False
    with fs.open(path, "rb") as fh:
        try:
            for start, line_no, end, record in _records(fh, csv):
                if csv and not have_header:
                    header, have_header = (start, end), True
                    continue
                if rows % rows_per_chunk == 0:
                    starts.append((start, line_no))
                if rows < rows_per_chunk and sample_size < _SCHEMA_SAMPLE and fmt != "openai-batch":
                    sample.append(record)
                    sample_size += len(record)
                if fmt == "openai-batch":
                    _note_id(ids, record, line_no, source)
                rows += 1
        except ValueError as exc:
            raise SpecError(f"input file {source}: {exc}; fix or remove it") from None
        size = fh.seek(0, 2)
        starts.append((size, 0))
        identity = f"{rows}:{_text_identity(fs, path, fh)}"
    if csv and not have_header and size:
        raise SpecError(f"input file {source}: a CSV file needs a header line; add one")
    schema = pa.schema([])
    if fmt in ("jsonl", "csv") and sample:
        head = fs_read(fs, path, header) if csv else b""
        schema = _infer(sample, head, csv, source)
    layout = TextLayout(rows_per_chunk, tuple(starts), header)
    return TextScan(rows, identity, layout, schema, ids)


def fs_read(fs: fsspec.AbstractFileSystem, path: str, span: tuple[int, int]) -> bytes:
    with fs.open(path, "rb") as fh:
        fh.seek(span[0])
        return bytes(fh.read(span[1] - span[0]))


def _note_id(ids: dict[str, int], record: bytes, line_no: int, source: str) -> None:
    try:
        doc = json.loads(record)
    except ValueError:
        return  # a malformed line: a failed row when read
    cid = doc.get("custom_id") if isinstance(doc, dict) else None
    if not isinstance(cid, str):
        return
    if cid in ids:
        raise SpecError(
            f"input file {source}: custom_id {json.dumps(cid)} is on lines {ids[cid]} and "
            f"{line_no}; custom_ids must be unique in a batch: rename or remove one"
        )
    ids[cid] = line_no


def _check_unique_ids(
    fs: fsspec.AbstractFileSystem, per_file: list[tuple[str, dict[str, int]]]
) -> None:
    """Duplicate custom_ids across the job's files (each file checked itself while scanned)."""
    seen: dict[str, tuple[str, int]] = {}
    for path, ids in per_file:
        for cid, line in ids.items():
            if cid in seen:
                first, first_line = seen[cid]
                raise SpecError(
                    f"input: custom_id {json.dumps(cid)} is on line {first_line} of "
                    f"{_source(fs, first)} and line {line} of {_source(fs, path)}; custom_ids "
                    "must be unique in a batch: rename or remove one"
                )
            seen[cid] = (path, line)


def _infer(sample: list[bytes], header: bytes, csv: bool, source: str) -> pa.Schema:
    """The schema pyarrow infers from a file's first rows; if they do not parse together, the
    merge of the rows that parse one by one (the others fail when read)."""
    try:
        return _parse_block(b"".join(sample), header, csv, None).schema
    except pa.ArrowInvalid:
        schema = pa.schema([])
        for record in sample:
            try:
                schema = merge_schemas(schema, _parse_block(record, header, csv, None).schema)
            except pa.ArrowInvalid:
                continue
        if not schema.names:
            log.warning("input file %s: none of its first rows parse", source)
        return schema


def merge_schemas(a: pa.Schema, b: pa.Schema) -> pa.Schema:
    """``a`` with ``b``'s new columns: the first type wins, except that a null type takes the
    other and integers meet floats at float64."""
    fields = {f.name: f for f in a}
    for f in b:
        old = fields.get(f.name)
        if old is None or pa.types.is_null(old.type):
            fields[f.name] = f
        elif old.type != f.type and _numeric(old.type) and _numeric(f.type):
            fields[f.name] = pa.field(f.name, pa.float64())
    return pa.schema(list(fields.values()))


def _numeric(t: pa.DataType) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _parse_block(body: bytes, header: bytes, csv: bool, schema: pa.Schema | None) -> pa.Table:
    """pyarrow's parse of JSON lines, or of CSV records under ``header``, with ``schema``
    given explicitly (or inferred when None)."""
    block = max(len(header) + len(body) + 1, 1 << 20)  # one block: a row never straddles two
    if csv:
        convert = pcsv.ConvertOptions()
        if schema is not None:
            convert = pcsv.ConvertOptions(column_types=schema, include_columns=schema.names,
                                          include_missing_columns=True)  # fmt: skip
        return pcsv.read_csv(
            io.BytesIO(header + body),
            read_options=pcsv.ReadOptions(block_size=block, use_threads=False),
            parse_options=pcsv.ParseOptions(newlines_in_values=True),
            convert_options=convert,
        )
    parse = pjson.ParseOptions()
    if schema is not None:
        parse = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    return pjson.read_json(
        io.BytesIO(body),
        read_options=pjson.ReadOptions(block_size=block, use_threads=False),
        parse_options=parse,
    )


def _split(body: bytes, csv: bool) -> list[tuple[int, bytes]]:
    """A chunk's bytes as (line number, record) of its non-blank records."""
    return [(line, record) for _, line, _, record in _records(io.BytesIO(body), csv)] if body \
        else []  # fmt: skip


def _read_text_rows(chunk: InputChunk, body: bytes, header: bytes) -> pa.Table:
    """The chunk's rows with ``_parse_error``: parsed as a whole, or row by row when that
    fails (a row that does not parse with the planned schema becomes nulls and a reason)."""
    if chunk.fmt == "openai-batch":
        records = _split(body, False)
        return _openai_rows(records, chunk.line_start)
    csv = chunk.fmt == "csv"
    schema = pa.ipc.read_schema(pa.py_buffer(chunk.schema))
    try:
        table = _parse_block(body, header, csv, schema)
        errors = pa.nulls(table.num_rows, pa.string())
        return table.append_column(PARSE_ERROR, errors)
    except pa.ArrowInvalid:
        pass
    tables = []
    reasons: list[str | None] = []
    for line, record in _split(body, csv):
        try:
            one = _parse_block(record if record.endswith(b"\n") else record + b"\n", header,
                               csv, schema)  # fmt: skip
            if one.num_rows != 1:
                raise pa.ArrowInvalid(f"{one.num_rows} rows in one record")
            reasons.append(None)
        except pa.ArrowInvalid as exc:
            one = pa.Table.from_pylist([{}], schema=schema)
            reason = " ".join(str(exc).split())
            reasons.append(f"line {chunk.line_start + line - 1}: {reason}"[:500])
        tables.append(one)
    if not tables:
        return pa.Table.from_pylist([], schema=schema).append_column(
            PARSE_ERROR, pa.array([], pa.string())
        )
    table = pa.concat_tables(tables)
    return table.append_column(PARSE_ERROR, pa.array(reasons, pa.string()))


def _openai_rows(records: list[tuple[int, bytes]], line_start: int) -> pa.Table:
    rows: list[dict[str, Any]] = []
    for line, record in records:
        number = line_start + line - 1
        row: dict[str, Any] = {"_line": number}
        try:
            row.update(parse_request(record))
        except ValueError as exc:
            row[PARSE_ERROR] = f"line {number}: {exc}"
            cid = getattr(exc, "custom_id", None)
            row["custom_id"] = cid
        rows.append(row)
    schema = pa.schema([*OPENAI_SCHEMA, pa.field(PARSE_ERROR, pa.string())])
    return pa.Table.from_pylist(rows, schema=schema)


class MalformedRequest(ValueError):
    def __init__(self, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.custom_id = custom_id


def parse_request(record: bytes) -> dict[str, Any]:
    """One line of an OpenAI batch file -> custom_id, method, url and body (the body's JSON
    text exactly as written). Raises :class:`MalformedRequest` with the reason."""
    try:
        text = record.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise MalformedRequest("the line is not UTF-8 text") from None
    fields, raw = _object_members(text)
    cid = fields.get("custom_id")
    cid = cid if isinstance(cid, str) else None
    if "custom_id" not in fields:
        raise MalformedRequest("custom_id is missing")
    if cid is None or not cid:
        raise MalformedRequest("custom_id must be a non-empty string")
    if fields.get("method") != "POST":
        raise MalformedRequest(f"method must be POST (got {json.dumps(fields.get('method'))})",
                               cid)  # fmt: skip
    if fields.get("url") not in OPENAI_URLS:
        raise MalformedRequest(
            f"url must be {' or '.join(OPENAI_URLS)} (got {json.dumps(fields.get('url'))})", cid
        )
    if not isinstance(fields.get("body"), dict):
        what = "missing" if "body" not in fields else "not a JSON object"
        raise MalformedRequest(f"body is {what}", cid)
    return {"custom_id": cid, "method": "POST", "url": fields["url"], "body": raw["body"]}


def _object_members(text: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A JSON object's members, decoded and as their raw text."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    try:
        doc, end = decoder.raw_decode(text)
    except ValueError as exc:
        raise MalformedRequest(f"the line is not JSON ({exc})") from None
    if text[end:].strip():
        raise MalformedRequest("the line holds more than one JSON value")
    if not isinstance(doc, dict):
        raise MalformedRequest("the line is not a JSON object")
    raw: dict[str, str] = {}
    idx = ws.match(text, 1).end()  # type: ignore[union-attr]
    while text[idx] != "}":
        key, idx = json.decoder.scanstring(text, idx + 1)  # type: ignore[attr-defined]
        idx = ws.match(text, idx).end() + 1  # type: ignore[union-attr]  # past ':'
        idx = ws.match(text, idx).end()  # type: ignore[union-attr]
        _, value_end = decoder.raw_decode(text, idx)
        raw[key] = text[idx:value_end]
        idx = ws.match(text, value_end).end()  # type: ignore[union-attr]
        if text[idx] == ",":
            idx = ws.match(text, idx + 1).end()  # type: ignore[union-attr]
    return doc, raw


def malformed_rows(spec: JobSpec, table: pa.Table) -> dict[int, tuple[str, str]]:
    """Rows whose ``_parse_error`` is set -> (kind, reason): the runner's failures."""
    if PARSE_ERROR not in table.column_names:
        return {}
    kind = "MalformedRequest" if spec.input.format == "openai-batch" else "MalformedRow"
    return {
        i: (kind, str(reason))
        for i, reason in enumerate(table[PARSE_ERROR].to_pylist())
        if reason is not None
    }


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
    source = chunk.path if protocol in ("file", "local") else f"{protocol}://{chunk.path}"
    keys = chunk.partition_keys if isinstance(chunk, InputChunk) else ()
    if isinstance(chunk, InputChunk) and chunk.fmt in TEXT_FORMATS:
        table = _read_text_chunk(fs, chunk, source, expected)
    else:
        table = _read_parquet_chunk(fs, chunk, source, expected, keys, spec.input.columns)
    table = _with_partitions(table, chunk.relpath, keys)
    if PARSE_ERROR in table.column_names:  # last, as in the plan's schema
        names = [c for c in table.column_names if c != PARSE_ERROR]
        table = table.select([*names, PARSE_ERROR])
    if spec.input.columns:
        keep = [*spec.input.columns] + [PARSE_ERROR] * (PARSE_ERROR in table.column_names)
        table = table.select(keep)
    if not spec.input.id_column:
        table = table.append_column("_source_file", pa.array([source] * chunk.rows, pa.string()))
        rows = pa.array(range(chunk.row_start, chunk.row_end), pa.int64())
        table = table.append_column("_source_row", rows)
    return table


def _read_text_chunk(
    fs: fsspec.AbstractFileSystem, chunk: InputChunk, source: str, expected: str | None
) -> pa.Table:
    """A text chunk's bytes (and a CSV header's), parsed; the file checked against its planned
    identity (size, stamp, first and last 64 KiB) and the rows against the plan."""
    with fs.open(chunk.path, "rb") as fh:
        if expected is not None:
            found = _text_identity(fs, chunk.path, fh)
            if found != expected.split(":", 1)[1]:
                raise InputChanged(_text_changed(source), chunk=chunk.chunk_id)
        header = b""
        if chunk.header[1] > chunk.header[0]:
            fh.seek(chunk.header[0])
            header = bytes(fh.read(chunk.header[1] - chunk.header[0]))
        fh.seek(chunk.byte_start)
        body = bytes(fh.read(chunk.byte_end - chunk.byte_start))
    table = _read_text_rows(chunk, body, header)
    if table.num_rows != chunk.text_rows:
        raise InputChanged(
            f"input file {source} changed since the job was planned (rows {chunk.row_start}-"
            f"{chunk.row_start + chunk.text_rows}: planned {chunk.text_rows} rows, found "
            f"{table.num_rows}): restore the file, or write to a fresh output with "
            "--set output.path=<new folder>",
            chunk=chunk.chunk_id,
        )
    return table.slice(0, chunk.rows)  # a sample may ask for the first rows only


def _read_parquet_chunk(
    fs: fsspec.AbstractFileSystem,
    chunk: Chunk,
    source: str,
    expected: str | None,
    keys: tuple[str, ...],
    columns: list[str] | None,
) -> pa.Table:
    if columns is not None:
        columns = [c for c in columns if c not in keys]
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
