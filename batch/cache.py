"""The result cache: pay once per distinct (model, prompt as the engine sees it, sampling,
response schema, pipeline), across runs, nights and jobs.

Keys. A job's *namespace* is a digest of everything but the prompt that decides an answer:
the model's identity (a content digest of its files, or a pinned hub revision, never only
its name), the engine arguments that change outputs (speed settings left out), the engine
and its options, the pipeline and its options, the sampling parameters, the chat template
arguments and the response schema. A row's key is a digest of the namespace and the model
input exactly as the pipeline hands it to the engine (chat messages or text), which with the
model's files (the chat template is one of them) and the template arguments determines the
token ids the engine sees. A changed template, model or sampling parameter therefore gives
different keys: no hits, never a stale one.

Storage. One Lance table (``<cache>/results.lance``: key, namespace, the engine's result as
JSON, token counts, when and by which run) with a B-tree index on the key. Lance was chosen
over a home-made layout because it gives what a shared cache of 100M entries needs, kept by
others: point lookups through an index without scanning (a chunk's keys are one indexed
query), commits that concurrent writers on object storage cannot corrupt (a new version is
a create-only manifest; appends from two jobs both land), compaction and incremental index
updates, and deletes for housekeeping. ``docs/cache.md`` states the design and its costs.

Writes never go through the driver's memory: commit tasks write the new entries of their
chunk as Lance fragments (data files only) and hand back the fragments' small metadata; the
driver passes batches of it to a Ray task that commits them as one append (so a night of
100k chunks makes hundreds of versions, not 100k) and, at the end of the run, folds the new
rows into the index. Entries become visible to lookups when committed. Only the vLLM-free
parts (keys, namespaces, model identity) are used by the driver; ``lance`` is imported in
Ray tasks, ``batchinfer cache`` and ``plan``.

Failed rows are never written. The first committed entry of a key is its answer: if two
writers raced and both added one, lookups take the oldest (ties broken by run id), so every
later row of that key gets the same bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch.errors import SpecError, UnsupportedStorage

if TYPE_CHECKING:
    import pyarrow as pa

    from batch.engine import EngineRequest, EngineResult
    from batch.spec import JobSpec

log = logging.getLogger(__name__)

#: Bump when keys or the stored result change meaning: old entries then never match.
CACHE_FORMAT = 1
TABLE = "results.lance"
NAMESPACES = "namespaces"  # <cache>/namespaces/<ns>.json: what a namespace is, when last used
KEY = "key"
INDEX = "key_idx"
#: Fragments the driver holds before it has them committed (and seconds between commits).
FLUSH_FRAGMENTS = 128
FLUSH_SECONDS = 15.0
_DIGEST_CHUNK = 1 << 20


def schema() -> pa.Schema:
    import pyarrow as pa

    return pa.schema(
        [
            pa.field(KEY, pa.binary(16), nullable=False),
            pa.field("namespace", pa.string()),
            pa.field("result", pa.string()),  # the engine's result (EngineResult) as JSON
            pa.field("input_tokens", pa.int32()),
            pa.field("output_tokens", pa.int32()),
            pa.field("created_at", pa.timestamp("ms", tz="UTC")),
            pa.field("run_id", pa.string()),
        ]
    )


# --------------------------------------------------------------------------- identity and keys


def model_identity(spec: JobSpec) -> dict[str, Any]:
    """What the model *is* for the cache: a digest of its files, or a pinned hub revision.

    Raises SpecError for a hub model without ``model.engine_args.revision`` (its weights can
    change under the same name, and a cache must not serve answers of other weights).
    """
    path = spec.model.path
    if spec.model.engine in ("fake", "sim"):
        return {"engine": spec.model.engine, "path": path}
    from batch.models import BUILTIN_PREFIX, resolve_model

    local = resolve_model(path) if path.startswith(BUILTIN_PREFIX) else path
    if "://" not in local and os.path.isdir(local):
        return {"digest": directory_digest(Path(local))}
    revision = spec.model.engine_args.get("revision")
    if not revision:
        raise SpecError(
            f"cache.path: model.path {path} is not a local directory, so the cache cannot "
            "digest its weights; pin them with model.engine_args.revision (a commit hash), or "
            "remove cache.path"
        )
    return {"hub": path, "revision": str(revision)}


def directory_digest(directory: Path) -> str:
    """A content digest (BLAKE2b) of every file below ``directory``, names included.

    Reading a model's weights takes a second per GB, so digests are remembered per file by
    (path, size, mtime, inode) in ``$BATCHINFER_HOME/digests.json``: a run reads only
    files it has not seen.
    """
    from batch.models import cache_dir

    memo_path = cache_dir().parent / "digests.json"
    try:
        memo: dict[str, str] = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    h = hashlib.blake2b(digest_size=16)
    changed = False
    for p in sorted(q for q in directory.rglob("*") if q.is_file()):
        st = p.stat()
        stamp = f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
        digest = memo.get(stamp)
        if digest is None:
            fh = hashlib.blake2b(digest_size=16)
            with p.open("rb") as f:
                while block := f.read(_DIGEST_CHUNK):
                    fh.update(block)
            digest = memo[stamp] = fh.hexdigest()
            changed = True
        h.update(f"{p.relative_to(directory).as_posix()}\0{digest}\n".encode())
    if changed:
        with contextlib.suppress(OSError):
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo_path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(memo, sort_keys=True))
            tmp.replace(memo_path)
    return h.hexdigest()


def namespace_fields(spec: JobSpec, model: Mapping[str, Any]) -> dict[str, Any]:
    """Everything but the prompt that decides an answer (see the module docstring)."""
    from batch.spec import SPEED_ONLY_ENGINE_ARGS

    dumped = spec.model_dump(mode="json")
    fields: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "task": spec.model.task,
        "engine": spec.model.engine,
        "model": dict(model),
        "engine_args": {
            k: v
            for k, v in dumped["model"]["engine_args"].items()
            if k.replace("-", "_") not in SPEED_ONLY_ENGINE_ARGS
        },
        "pipeline": spec.pipeline_name,
        "pipeline_options": dumped["pipeline_options"],
    }
    if spec.model.engine == "fake":
        fields["fake_options"] = dumped["model"]["fake_options"]
    if spec.model.engine == "sim":
        fields["sim_options"] = dumped["model"]["sim_options"]
    if spec.model.task == "generate":  # an embedding does not sample
        fields["sampling"] = dumped["sampling"]
        fields["chat_template_kwargs"] = dumped["prompt"]["chat_template_kwargs"]
        fields["response"] = dumped["response"]
    return fields


def namespace_of(fields: Mapping[str, Any]) -> str:
    blob = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def row_key(namespace: str, request: EngineRequest) -> bytes:
    """The cache key of one request: its namespace and its model input, exactly, with the
    request's own sampling when it has some (an OpenAI batch line's max_tokens, n, ...)."""
    body: Any = {"text": request.text}
    if request.messages is not None:
        body = {"messages": list(request.messages)}
    if request.sampling:  # absent otherwise: the keys of requests without it are unchanged
        body["sampling"] = [list(pair) for pair in request.sampling]
    blob = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    h = hashlib.blake2b(digest_size=16)
    h.update(bytes.fromhex(namespace))
    h.update(blob.encode())
    return h.digest()


# --------------------------------------------------------------------------- results


def result_json(result: EngineResult) -> str:
    """An engine result as stored: everything but its row position, timings and errors."""
    d = dataclasses.asdict(result)
    for name in ("key", "timings", "error_kind", "error", "source", "cache_key"):
        d.pop(name, None)
    return json.dumps(d, separators=(",", ":"), ensure_ascii=False)


def result_from_json(text: str, key: int) -> EngineResult:
    from batch.engine import EngineResult, Sample

    d = json.loads(text)
    samples = [Sample(**s) for s in d.pop("samples", [])]
    return EngineResult(key=key, samples=samples, source="cache", **d)


# --------------------------------------------------------------------------- where it lives


@dataclass(frozen=True)
class CacheContext:
    """A job's view of the cache, handed to the Ray stages (small and picklable)."""

    root: str  # the cache folder as the spec names it
    storage_options: dict[str, Any] = field(default_factory=dict)
    namespace: str = ""
    lookup: bool = True
    write: bool = True
    dedup: bool = True
    run_id: str = ""

    @property
    def table_uri(self) -> str:
        return _join(lance_uri(self.root), TABLE)

    def lance_options(self) -> dict[str, str]:
        return lance_storage_options(self.root, self.storage_options)


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def lance_uri(url: str) -> str:
    """The cache folder as Lance names it: a local path made absolute, or an object-store URL."""
    if "://" not in url:
        return str(Path(url).expanduser().resolve())
    scheme = url.split("://", 1)[0]
    if scheme == "file":
        return str(Path(url[len("file://") :]).resolve())
    if scheme in ("s3", "s3a"):
        return "s3://" + url.split("://", 1)[1]
    if scheme in ("gs", "gcs", "az", "abfs"):
        return url
    raise UnsupportedStorage(
        f"cache.path {url}: the cache lives on a local folder, s3://, gs:// or az://; "
        f"{scheme}:// is not one of them"
    )


def lance_storage_options(url: str, options: Mapping[str, Any]) -> dict[str, str]:
    """fsspec options (as in the spec) -> Lance's object-store options."""
    if "://" not in url or url.startswith("file://"):
        return {}
    out: dict[str, str] = {}
    if url.startswith(("s3://", "s3a://")):
        client = dict(options.get("client_kwargs") or {})
        endpoint = options.get("endpoint_url") or client.get("endpoint_url")
        mapping = {
            "key": "aws_access_key_id",
            "secret": "aws_secret_access_key",
            "token": "aws_session_token",
        }
        for theirs, ours in mapping.items():
            if options.get(theirs):
                out[ours] = str(options[theirs])
        region = client.get("region_name") or options.get("region_name")
        if endpoint:
            out["aws_endpoint"] = str(endpoint)
            if str(endpoint).startswith("http://"):
                out["allow_http"] = "true"
            region = region or "us-east-1"
        if region:
            out["aws_region"] = str(region)
        if options.get("anon"):
            out["aws_skip_signature"] = "true"
        return out
    return {k: str(v) for k, v in options.items() if isinstance(v, str | int | float | bool)}


def context(spec: JobSpec, run_id: str = "") -> CacheContext | None:
    """The job's cache context (None with neither a cache path nor dedup). Digests the model
    (cheap after the first time) and records the namespace in the cache folder, so an
    unreachable or read-only cache fails here, on the driver, with one line."""
    if not spec.cache.path:
        if not spec.dedup:
            return None
        # Dedup alone: keys without a model digest (they never leave this run).
        fields = namespace_fields(spec, {"path": spec.model.path})
        return CacheContext(root="", namespace=namespace_of(fields), lookup=False, write=False,
                            run_id=run_id)  # fmt: skip
    lance_uri(spec.cache.path)  # refuses a filesystem Lance cannot use
    fields = namespace_fields(spec, model_identity(spec))
    ns = namespace_of(fields)
    ctx = CacheContext(
        root=spec.cache.path,
        storage_options=dict(spec.cache.storage_options),
        namespace=ns,
        lookup=spec.cache.mode in ("read-write", "read"),
        write=spec.cache.mode in ("read-write", "write"),
        dedup=spec.dedup,
        run_id=run_id,
    )
    record_namespace(spec, ns, fields)
    return ctx


def record_namespace(spec: JobSpec, ns: str, fields: Mapping[str, Any]) -> None:
    """``<cache>/namespaces/<ns>.json``: what the namespace is (model, task, job) and when a job
    last used it; ``batchinfer cache stats|gc`` read these."""
    from batch import storage

    assert spec.cache.path
    fs, root = storage.open_fs(spec.cache.path, spec.cache.storage_options)
    path = storage.join(root, NAMESPACES, f"{ns}.json")
    now = time.time()
    previous = storage.read_json_or_none(fs, path) if storage.exists(fs, path) else None
    doc = {
        "namespace": ns,
        "model": spec.model.path,
        "task": spec.model.task,
        "fields": dict(fields),
        "first_used": (previous or {}).get("first_used", now),
        "last_used": now,
        "last_job": spec.name,
    }
    with contextlib.suppress(FileExistsError):
        fs.makedirs(storage.join(root, NAMESPACES), exist_ok=True)
    storage.overwrite(fs, path, json.dumps(doc, sort_keys=True, indent=1).encode())


# --------------------------------------------------------------------------- the table


def _retrying(fn: Any) -> Any:
    from tenacity import retry, stop_after_attempt, wait_exponential

    return retry(stop=stop_after_attempt(4), wait=wait_exponential(0.2, max=3), reraise=True)(fn)


def open_table(ctx: CacheContext) -> Any | None:
    """The Lance table at its newest version, or None if nothing was ever written."""
    import lance

    try:
        return lance.dataset(ctx.table_uri, storage_options=ctx.lance_options())
    except (ValueError, FileNotFoundError, OSError) as exc:
        if "not found" in str(exc).lower() or "does not exist" in str(exc).lower():
            return None
        raise


def lookup(ctx: CacheContext, keys: Sequence[bytes]) -> dict[bytes, str]:
    """key -> stored result JSON, for the keys the cache holds (one indexed query)."""
    if not keys or not ctx.lookup:
        return {}
    import pyarrow as pa
    import pyarrow.compute as pc

    def query() -> dict[bytes, str]:
        table = open_table(ctx)
        if table is None:
            return {}
        found = table.to_table(
            columns=[KEY, "result", "created_at", "run_id"],
            filter=pc.field(KEY).isin(pa.array(list(set(keys)), pa.binary(16))),
        )
        if found.num_rows == 0:
            return {}
        # The first committed entry of a key wins (two writers may have raced).
        found = found.sort_by([("created_at", "ascending"), ("run_id", "ascending")])
        out: dict[bytes, str] = {}
        for k, r in zip(found[KEY].to_pylist(), found["result"].to_pylist(), strict=True):
            out.setdefault(k, r)
        return out

    result: dict[bytes, str] = _retrying(query)()
    return result


def entries_table(ctx: CacheContext, results: Iterable[tuple[bytes, EngineResult]]) -> pa.Table:
    import pyarrow as pa

    rows = list(results)
    now = pa.scalar(int(time.time() * 1000), pa.timestamp("ms", tz="UTC"))
    n = len(rows)
    return pa.table(
        {
            KEY: pa.array([k for k, _ in rows], pa.binary(16)),
            "namespace": pa.array([ctx.namespace] * n, pa.string()),
            "result": pa.array([result_json(r) for _, r in rows], pa.string()),
            "input_tokens": pa.array([r.input_tokens for _, r in rows], pa.int32()),
            "output_tokens": pa.array([r.output_tokens for _, r in rows], pa.int32()),
            "created_at": pa.array([now.value] * n, pa.timestamp("ms", tz="UTC")),
            "run_id": pa.array([ctx.run_id] * n, pa.string()),
        },
        schema=schema(),
    )


def write_fragments(ctx: CacheContext, results: Iterable[tuple[bytes, EngineResult]]) -> list[str]:
    """Write new entries as Lance data files (not yet visible); returns their metadata, to be
    committed by :func:`commit_fragments`."""
    from lance.fragment import write_fragments as lance_write

    table = entries_table(ctx, results)
    if table.num_rows == 0:
        return []

    def write() -> list[str]:
        frags = lance_write(
            table, ctx.table_uri, schema=schema(), storage_options=ctx.lance_options()
        )
        return [json.dumps(f.to_json()) for f in frags]

    out: list[str] = _retrying(write)()
    return out


def ensure_table(ctx: CacheContext) -> Any:
    """Open the table, creating it (empty, with its key index) if it does not exist yet. Two
    jobs creating it at once: one creates, the other finds it."""
    import lance

    table = open_table(ctx)
    if table is not None:
        return table
    with contextlib.suppress(OSError, ValueError):
        lance.write_dataset(
            schema().empty_table(), ctx.table_uri, mode="create",
            storage_options=ctx.lance_options(),
        )  # fmt: skip
    table = lance.dataset(ctx.table_uri, storage_options=ctx.lance_options())
    if not any(i["name"] == INDEX for i in table.list_indices()):
        with contextlib.suppress(Exception):  # a concurrent creator's index won
            table.create_scalar_index(KEY, "BTREE", name=INDEX)
        table = lance.dataset(ctx.table_uri, storage_options=ctx.lance_options())
    return table


def commit_fragments(ctx: CacheContext, fragments: Sequence[str]) -> int:
    """Make written fragments visible: one append, retried on a concurrent commit. Returns
    the rows added."""
    import lance
    from lance.fragment import FragmentMetadata

    if not fragments:
        return 0
    metas = [FragmentMetadata.from_json(f) for f in fragments]

    def commit() -> int:
        table = ensure_table(ctx)
        lance.LanceDataset.commit(
            ctx.table_uri, lance.LanceOperation.Append(metas),
            read_version=table.version, storage_options=ctx.lance_options(),
        )  # fmt: skip
        return sum(int(m.num_rows or 0) for m in metas)

    added: int = _retrying(commit)()
    return added


def maintain(ctx: CacheContext, *, compact_over: int = 64) -> dict[str, Any]:
    """After a run: fold new rows into the key index (so lookups never scan them), and merge
    small fragments once there are many."""
    table = open_table(ctx)
    if table is None:
        return {}
    t0 = time.perf_counter()
    fragments = len(table.get_fragments())
    if fragments > compact_over:
        with contextlib.suppress(Exception):  # a concurrent compaction won; ours can wait
            table.optimize.compact_files()
            table = open_table(ctx) or table
    with contextlib.suppress(Exception):
        table.optimize.optimize_indices()
    return {"fragments_before": fragments, "maintain_s": round(time.perf_counter() - t0, 3)}


def flush_task(ctx: CacheContext, fragments: list[str], final: bool) -> dict[str, Any]:
    """A Ray task (see batch.job): commit the fragments; at the end of a run, maintain."""
    logging.getLogger("lance").setLevel(logging.WARNING)
    out: dict[str, Any] = {"added": commit_fragments(ctx, fragments)}
    if final:
        out.update(maintain(ctx))
    return out


class Flusher:
    """Driver side: holds the fragment metadata commit tasks hand back (small strings) and has
    it committed in batches by a Ray task; never more than FLUSH_FRAGMENTS at once."""

    def __init__(self, ctx: CacheContext | None) -> None:
        self.ctx = ctx if ctx is not None and ctx.write and ctx.root else None
        self.pending: list[str] = []
        self.last = time.monotonic()
        self.added = 0
        self.inflight: list[Any] = []

    def add(self, fragments: Sequence[str]) -> None:
        if self.ctx is None:
            return
        self.pending.extend(fragments)
        due = time.monotonic() - self.last > FLUSH_SECONDS
        if len(self.pending) >= FLUSH_FRAGMENTS or (due and self.pending):
            self._submit(final=False)

    def _submit(self, *, final: bool) -> None:
        import ray

        assert self.ctx is not None
        remote = ray.remote(num_cpus=0.25, max_retries=2)(flush_task)
        self.inflight.append(remote.remote(self.ctx, self.pending, final))
        self.pending = []
        self.last = time.monotonic()
        # Keep at most one earlier commit in flight; collect the finished ones.
        while len(self.inflight) > 1:
            self.added += int(ray.get(self.inflight.pop(0))["added"])

    def close(self) -> dict[str, Any]:
        """The last commit and the index update; waits for them. Needs Ray still running."""
        import ray

        if self.ctx is None:
            return {}
        self._submit(final=True)
        out: dict[str, Any] = {}
        for ref in self.inflight:
            out = ray.get(ref)
            self.added += int(out["added"])
        self.inflight = []
        return {**out, "added": self.added}
