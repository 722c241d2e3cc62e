"""fsspec I/O primitives for the runner: open a URL, create-only writes, small reads, listings.

Exactly-once output rests on one primitive, :func:`create_only`: a write that lands only if
nothing is at the path yet, and that tells the caller whether it won. Two attempts at the same
chunk (a retried Ray task, a resumed job) then race safely: one creates the part, the other sees
``False`` and adopts what is there. No partial object is ever visible at the final path.

- Local disk: temp file in the same directory, fsync, ``os.link`` (atomic, fails if taken).
- S3 (s3fs): a conditional PUT (``If-None-Match: *``); a 412 means someone else won.
- Anything else raises :class:`NotImplementedError` rather than silently overwriting.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import json
import logging
import os
import posixpath
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import fsspec
import fsspec.core
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)

_T = TypeVar("_T")

S3_PROTOCOLS = frozenset({"s3", "s3a"})

# S3 error codes worth another try. ConditionalRequestConflict (409) is what AWS answers when
# a concurrent conditional write to the same key is in flight; AWS documents retrying it, and
# the retry then gets a definite answer (success or 412).
_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "RequestLimitExceeded",
        "TooManyRequests",
        "ConditionalRequestConflict",
    }
)
# Exception class names (anywhere in the MRO) that mean "the connection failed", for the botocore
# and aiohttp errors s3fs lets through after its own retries. Matched by name so this module
# does not import either library.
_TRANSIENT_CLASS_NAMES = frozenset(
    {
        "ConnectionError",  # builtin and botocore.exceptions.ConnectionError
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ClientConnectionError",  # aiohttp
        "ServerDisconnectedError",
        "ClientPayloadError",
        "ClientOSError",
    }
)
_PRECONDITION_MESSAGES = ("PreconditionFailed", "pre-conditions you specified did not hold")


# --------------------------------------------------------------------------- errors


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """The exception and its causes/contexts: s3fs wraps botocore's ClientError in an OSError."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        e = todo.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)


def _response(exc: BaseException) -> tuple[str, int]:
    """(error code, HTTP status) of a botocore ClientError; ("", 0) for anything else."""
    resp = getattr(exc, "response", None)
    if not isinstance(resp, Mapping):
        return "", 0
    err = resp.get("Error") or {}
    meta = resp.get("ResponseMetadata") or {}
    code = str(err.get("Code", "")) if isinstance(err, Mapping) else ""
    status = meta.get("HTTPStatusCode", 0) if isinstance(meta, Mapping) else 0
    try:
        return code, int(status or 0)
    except (TypeError, ValueError):
        return code, 0


def is_precondition_failed(exc: BaseException) -> bool:
    """True if ``exc`` says a conditional write lost (the object already exists).

    s3fs maps a 412 to FileExistsError only when the error carries ``Condition: If-None-Match``.
    AWS sends that field, SeaweedFS (4.48) does not, so there s3fs raises ``OSError(EINVAL)``
    with the ClientError as ``__cause__``. Look through the whole chain for either form.
    """
    for e in _chain(exc):
        if isinstance(e, FileExistsError):
            return True
        code, status = _response(e)
        if code == "PreconditionFailed" or status == 412:
            return True
    # Last resort for wrappers that dropped the cause: s3fs keeps the server's message.
    return (
        isinstance(exc, OSError)
        and exc.errno == errno.EINVAL
        and any(m in str(exc) for m in _PRECONDITION_MESSAGES)
    )


def is_transient(exc: BaseException) -> bool:
    """True for errors a retry can fix: dropped connections, timeouts, 5xx, throttling.

    Never for a precondition failure (a definite answer) or not-found/permission errors.
    """
    if is_precondition_failed(exc):
        return False
    for e in _chain(exc):
        if isinstance(e, FileNotFoundError | PermissionError | ValueError):
            return False
        code, status = _response(e)
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return True
        if isinstance(e, TimeoutError | ConnectionError):
            return True
        if any(c.__name__ in _TRANSIENT_CLASS_NAMES for c in type(e).__mro__):
            return True
    return False


def _retrying(fn: Callable[[], _T]) -> _T:
    """Call ``fn``, retrying transient errors a few times with short exponential backoff.

    This sits on top of botocore's and s3fs's own retries: enough to ride out a blip or a
    throttling burst, short enough that a real outage surfaces in seconds, not minutes.
    """
    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        stop=stop_after_attempt(4),
        wait=wait_exponential_jitter(initial=0.2, max=3.0, jitter=0.2),
        before_sleep=before_sleep_log(log, logging.WARNING),
        reraise=True,
    )
    return retrying(fn)


# --------------------------------------------------------------------------- paths


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & S3_PROTOCOLS)


def open_fs(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``url`` and the path on it (no protocol, no trailing "/").

    For S3 the listings cache is off by default (``use_listings_cache=False``): a cached
    listing would hide parts and markers other workers wrote since, and resume decisions are
    made from listings. The fsspec instance cache is kept (it is keyed by the options, so it
    cannot hand back a listing-caching instance), because the runner opens the output once per
    chunk and a fresh S3 client each time is slow. Both can be overridden via the options
    (e.g. ``skip_instance_cache=True``).
    """
    options = dict(storage_options or {})
    protocol, _ = fsspec.core.split_protocol(url)
    if protocol in S3_PROTOCOLS:
        options.setdefault("use_listings_cache", False)
    fs, path = fsspec.core.url_to_fs(url, **options)
    stripped = path.rstrip("/")
    if not stripped and path.startswith("/"):
        stripped = "/"  # the local root itself
    return fs, stripped


def join(root: str, *parts: str) -> str:
    """POSIX join; parts are taken as relative (leading "/" dropped) so they stay under root."""
    base = root.rstrip("/")
    if not base and root.startswith("/"):
        base = "/"
    rel = [p.strip("/") for p in parts if p.strip("/")]
    return posixpath.join(base, *rel)


# --------------------------------------------------------------------------- create-only


def create_only(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Write ``data`` at ``path`` only if nothing is there; True if this call created it.

    False means the path was already taken (another attempt won): the caller should adopt
    what is there. Readers never see a partial object at ``path``.

    Empty ``data`` is refused (ValueError): s3fs turns an empty "xb" write into a plain,
    non-exclusive touch, and an empty part or marker is a bug upstream anyway.

    S3 and retries: transient errors are retried. If an earlier try of the same PUT did land
    but its response was lost, the retry gets a 412 and this returns False, even though the
    bytes are ours. That is deliberate: False ("adopt what is there") is always safe, whereas
    reporting True from a byte comparison could let two writers with identical bytes both
    claim the object. botocore and s3fs also retry inside one call, invisibly, so the
    ambiguity cannot be removed here anyway.
    """
    if not data:
        raise ValueError(f"create_only: refusing to write an empty object at {path!r}")
    if isinstance(fs, LocalFileSystem):
        return _create_only_local(path, bytes(data))
    if _is_s3(fs):
        return _create_only_s3(fs, path, bytes(data))
    raise NotImplementedError(
        f"create_only: no atomic create-if-absent write for filesystem "
        f"{type(fs).__name__} (protocol {fs.protocol!r}); supported: local paths and s3://. "
        "Refusing to fall back to a check-then-write that could overwrite another writer."
    )


def _create_only_local(path: str, data: bytes) -> bool:
    """Temp file + fsync + hard link: the link is atomic and fails if ``path`` exists."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    # Hidden temp name in the same directory (same filesystem, so link works).
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            log.debug("create_only: %s already exists", path)
            return False
        _fsync_dir(parent)
        log.debug("create_only: created %s (%d bytes)", path, len(data))
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _fsync_dir(path: str) -> None:
    """Persist the new directory entry; best effort (not every platform allows it)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_only_s3(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> bool:
    """Conditional PUT via s3fs ``pipe_file(mode="create")`` (sends ``If-None-Match: *``)."""
    params = inspect.signature(fs._pipe_file).parameters
    if "mode" not in params:
        raise NotImplementedError(
            "create_only: this s3fs has no create mode for pipe_file; upgrade s3fs (>=2024.12)"
        )
    kwargs: dict[str, Any] = {"mode": "create"}
    if "chunksize" in params:
        # s3fs switches to a multipart upload at 2 * chunksize; keep it one PUT (up to S3's
        # 5 GiB single-PUT limit): a plain conditional PUT is the most widely supported form.
        kwargs["chunksize"] = max(50 * 2**20, len(data))

    def put() -> None:
        fs.pipe_file(path, data, **kwargs)

    try:
        _retrying(put)
    except Exception as exc:
        if is_precondition_failed(exc):
            log.debug("create_only: %s already exists (412)", path)
            return False
        raise
    log.debug("create_only: created %s (%d bytes)", path, len(data))
    return True


def write_parquet_create_only(
    fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, compression: str = "zstd"
) -> bool:
    """Serialise ``table`` in memory, then :func:`create_only` it (one atomic object)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    return create_only(fs, path, sink.getvalue().to_pybytes())


# --------------------------------------------------------------------------- reads


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parse a small JSON object (markers, manifests); transient errors are retried."""
    return json.loads(_retrying(lambda: fs.cat_file(path)))


def list_files(
    fs: fsspec.AbstractFileSystem, root: str, suffix: str, *, recursive: bool = False
) -> list[str]:
    """Sorted paths of files under ``root`` ending in ``suffix``; [] if ``root`` is missing.

    Hidden names (".x") are skipped: they are create_only's temp files on local disk. The
    cache is invalidated first so files other workers just wrote are seen.
    """

    def find() -> list[str]:
        fs.invalidate_cache(root)
        try:
            found = fs.find(root, maxdepth=None if recursive else 1, withdirs=False)
        except FileNotFoundError:
            return []
        return list(found)

    paths = _retrying(find)
    return sorted(
        p
        for p in paths
        if p.endswith(suffix) and not posixpath.basename(p.rstrip("/")).startswith(".")
    )
