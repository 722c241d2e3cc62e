"""fsspec I/O primitives for the runner: open a URL, create-only writes, small reads, listings.

Exactly-once output rests on one primitive, :func:`create_only`: a write that lands only if
nothing is at the path yet, and that tells the caller whether it won. Two attempts at the same
chunk (a retried Ray task, a resumed job) then race safely: one creates the marker, the other
sees ``False`` and defers to it (see :mod:`batch.store`). No partial object is ever visible at
the final path.

- Local disk: temp file in the same directory, fsync, ``os.link`` (atomic, fails if taken).
- S3 (s3fs): a conditional PUT (``If-None-Match: *``); a 412 means someone else won.
- Anything else raises :class:`NotImplementedError` rather than silently overwriting.

Whether an object is there is asked through :func:`exists` and :func:`read_json_or_none`, never
``fs.exists``: on S3 a role that may list only some prefixes is answered 403, not 404, for a
missing key (see the note above :func:`exists`).
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
import time
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

from batch.errors import StorageUnreachable, UnreadableRecord, UnsupportedStorage

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
    try:
        return retrying(fn)
    except Exception as exc:
        endpoint = _unreachable(exc)
        if endpoint is None:
            raise
        reason = " ".join(str(exc).split())
        raise StorageUnreachable(
            f"cannot reach {endpoint}: {reason}; check that the storage server is up and that "
            "storage_options.client_kwargs.endpoint_url names it"
        ) from exc


def _unreachable(exc: BaseException) -> str | None:
    """The endpoint (scheme://host:port) of a connection that failed, or None for any other
    error: an answer from the server (5xx, throttling) is not "unreachable"."""
    from urllib.parse import urlsplit

    if is_precondition_failed(exc) or any(_response(e)[1] for e in _chain(exc)):
        return None
    for e in _chain(exc):
        names = {c.__name__ for c in type(e).__mro__}
        if not (names & _TRANSIENT_CLASS_NAMES or isinstance(e, TimeoutError | ConnectionError)):
            continue
        kwargs = getattr(e, "kwargs", None)  # botocore: the request's URL
        url = str(kwargs.get("endpoint_url", "")) if isinstance(kwargs, Mapping) else ""
        if url:
            parts = urlsplit(url)
            return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url
        host = getattr(e, "host", None)  # aiohttp
        if host:
            return f"{host}:{getattr(e, 'port', '')}".rstrip(":")
        return "the storage endpoint"
    return None


def explain(exc: BaseException) -> str | None:
    """One line for a storage error that reached the user: what happened and what to change;
    None if ``exc`` is not one (the caller then says what it can).

    A local path's OSError carries the path; the messages this module builds (a refused
    listing or read) already say what to grant and are kept as they are.
    """
    if not isinstance(exc, OSError):
        return None
    where = exc.filename if isinstance(exc.filename, str) else ""
    reason = exc.strerror or " ".join(str(exc).split())
    if isinstance(exc, PermissionError):
        if not where:  # ours, or s3fs's AccessDenied
            text = " ".join(str(exc).split())
            if "need" in text or "grant" in text:
                return text
            return f"access denied ({text}); grant these credentials access to the path"
        return (
            f"{where}: {reason}; give this user access to it, or point the job's "
            "output.path (or input.path) somewhere it may write (read)"
        )
    if isinstance(exc, NotADirectoryError) or exc.errno == errno.ENOTDIR:
        return (
            f"{where or 'a path'}: part of it is a file, not a folder; point output.path at a "
            "folder (a new one is created), or move that file away"
        )
    if exc.errno == errno.ENOSPC:
        return (
            f"{where or 'the output'}: no space left on the device; free some, or choose "
            "another output.path"
        )
    if exc.errno == errno.EROFS:
        return f"{where}: read-only filesystem; choose an output.path on a writable one"
    if isinstance(exc, FileNotFoundError) and where:
        return f"{where}: no such file or folder; check the path in the job"
    if where:
        return f"{where}: {reason}; check that path in the job and its storage"
    return None


# --------------------------------------------------------------------------- paths


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    proto = fs.protocol
    return {proto} if isinstance(proto, str) else set(proto)


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & S3_PROTOCOLS)


def is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    """An S3 filesystem (s3fs)."""
    return _is_s3(fs)


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

    False means the path was already taken (another attempt won): the caller defers to what
    is there. Readers never see a partial object at ``path``.

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
    protocol = sorted(_protocols(fs))[0]
    shared = "" if protocol != "memory" else ", and Ray's worker processes cannot see it"
    raise UnsupportedStorage(
        f"{protocol}://{path.lstrip('/')}: no atomic create-if-absent write on the {protocol} "
        f"filesystem{shared}; set output.path to a local folder or an s3:// URL"
    )


def _create_only_local(path: str, data: bytes) -> bool:
    """Temp file + fsync + hard link: the link is atomic and fails if ``path`` exists."""
    path = os.path.abspath(path)
    with _temp_beside(path, data) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            log.debug("create_only: %s already exists", path)
            return False
    _fsync_dir(os.path.dirname(path))
    log.debug("create_only: created %s (%d bytes)", path, len(data))
    return True


@contextlib.contextmanager
def _temp_beside(path: str, data: bytes) -> Iterator[str]:
    """``data`` in a hidden, fsynced temp file in ``path``'s folder (same filesystem, so it
    can be linked or renamed into place); removed afterwards."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        yield tmp
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


# --------------------------------------------------------------------------- writes


def overwrite(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` at ``path``, replacing what is there (the ledger, a rewritten manifest).

    Only local disk needs the folder made first. On S3, ``makedirs`` probes the bucket
    (HeadBucket, GetBucketLocation) and, when a role that may list only some prefixes is refused
    those, tries CreateBucket, which fails with AccessDenied.
    """
    if isinstance(fs, LocalFileSystem):
        _replace_local(path, data)
        return
    _retrying(lambda: fs.pipe_file(path, data))  # an S3 PUT replaces the object atomically


def _replace_local(path: str, data: bytes) -> None:
    """Temp file + fsync + rename: a reader sees the old bytes or the new, never half of them
    (a lease or a run record read while its holder renews it)."""
    path = os.path.abspath(path)
    with _temp_beside(path, data) as tmp:
        os.replace(tmp, path)


# --------------------------------------------------------------------------- reads


_JSON_READS = 3  # reads of a record that is not JSON before calling it damaged
_JSON_PAUSE_S = 0.3


def read_json(fs: fsspec.AbstractFileSystem, path: str) -> Any:
    """Parse a small JSON object (markers, manifests, the lease); transient errors are retried.

    Bytes that are not JSON are read again after a pause (a writer on a filesystem without an
    atomic replace may be mid-write); still not JSON after a few reads, the record is damaged:
    :class:`UnreadableRecord`, naming it and what to do.
    """
    problem: ValueError | None = None
    for n in range(_JSON_READS):
        if n:
            time.sleep(_JSON_PAUSE_S * n)
        raw = _retrying(lambda: fs.cat_file(path))
        try:
            return json.loads(raw)
        except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
            problem = exc
            log.info("%s is not JSON (%s); reading it again", path, exc)
    url = fs.unstrip_protocol(path)
    raise UnreadableRecord(
        f"{url} is not valid JSON ({problem}), read {_JSON_READS} times: a process killed while "
        "writing it or another program damaged it; delete it (if no run is using this output) "
        "and run again: batchinfer rewrites it, or re-runs the chunk of a deleted marker"
    )


# S3 answers a HEAD or GET of a missing key with 404 only when the caller also holds
# s3:ListBucket on the bucket; otherwise with 403, so that a caller who may not list cannot learn
# what is absent (Amazon S3 API Reference, HeadObject and GetObject, "Permissions":
# https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadObject.html and API_GetObject.html).
# The Ray pods' role (infra/terraform/access.tf) may list only under the input and output
# prefixes (an s3:prefix condition). A HEAD or GET carries no prefix, and AWS does not document
# that such a grant counts (kopia/kopia#3072 reports a 404 with one), so expect either answer.
# s3fs maps 403/AccessDenied to PermissionError (s3fs/errors.py), and S3FileSystem._info and
# _exists catch only FileNotFoundError, so ``fs.exists`` raises for every absent ``_job.json``
# or manifest: on every first run. The answer is in a listing of the parent folder, which that
# role may do; a refused listing is a real permission problem, reported with what to grant.


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    """True if something is at ``path``; a refused look is settled by listing its folder.

    Also unlike fsspec's default ``exists``, which calls any error "missing" (a dropped
    connection would make a finished job look new), other errors are retried, then raised.
    """

    def look() -> bool:
        try:
            fs.info(path)
        except FileNotFoundError:
            return False
        return True

    try:
        return _retrying(look)
    except PermissionError as refused:
        return _listed(fs, path, refused)


def read_json_or_none(fs: fsspec.AbstractFileSystem, path: str) -> Any | None:
    """:func:`read_json`, or None if nothing is at ``path`` (the job record before a first run,
    the manifest before the last chunk). A refused read of an object that is there raises."""
    try:
        return read_json(fs, path)
    except FileNotFoundError:
        return None
    except PermissionError as refused:
        if not _listed(fs, path, refused):
            return None
    # Listed, so it is there (perhaps written since the first read): read it once more.
    try:
        return read_json(fs, path)
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise PermissionError(_read_refused(fs, path, exc)) from exc


def _listed(fs: fsspec.AbstractFileSystem, path: str, refused: PermissionError) -> bool:
    """Whether ``path`` is in a listing of its folder: the answer when reading it was refused."""
    target = fs._strip_protocol(path).rstrip("/")
    folder = fs._parent(target)

    def ls() -> set[str]:
        fs.invalidate_cache(folder)
        try:
            return {str(name).rstrip("/") for name in fs.ls(folder, detail=False)}
        except FileNotFoundError:
            return set()

    try:
        names = _retrying(ls)
    except PermissionError as exc:
        raise PermissionError(_list_refused(fs, folder, exc, wanted=path)) from exc
    found = target in names
    log.debug("reading %s was refused (%s); listed: %s", path, refused, found)
    return found


def _list_refused(
    fs: fsspec.AbstractFileSystem, folder: str, exc: BaseException, *, wanted: str | None = None
) -> str:
    """What to tell a user whose credentials may not list ``folder``, and what to grant."""
    where = fs.unstrip_protocol(folder).rstrip("/") + "/"
    if wanted is None:
        text = f"listing {where} was refused ({exc})."
    else:
        text = (
            f"cannot tell whether {fs.unstrip_protocol(wanted)} exists: reading it was refused, "
            f"and so was listing {where} ({exc})."
        )
    if not _is_s3(fs):
        return f"{text} The credentials need permission to list {where}."
    bucket, _, key = fs._strip_protocol(folder).partition("/")
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    text += (
        f" The credentials need s3:ListBucket on arn:aws:s3:::{bucket} for the prefix {prefix!r}"
        f" (e.g. an s3:prefix condition {prefix.split('/')[0] + '/*'!r}, as"
        " infra/terraform/access.tf grants for the input and output prefixes)."
    )
    if wanted is not None:
        text += (
            " S3 answers 403, not 404, for a missing key to a caller that may not list it, so"
            " batchinfer lists the folder to decide."
        )
    return text


def _read_refused(fs: fsspec.AbstractFileSystem, path: str, exc: BaseException) -> str:
    url = fs.unstrip_protocol(path)
    if not _is_s3(fs):
        return f"{url} is there but reading it was refused ({exc}); grant read access to it."
    return (
        f"{url} is there but reading it was refused ({exc}). The credentials need s3:GetObject on"
        f" arn:aws:s3:::{fs._strip_protocol(path)} (and kms:Decrypt on the bucket's key if it"
        " is encrypted with SSE-KMS)."
    )


def list_files(
    fs: fsspec.AbstractFileSystem, root: str, suffix: str, *, recursive: bool = False
) -> list[str]:
    """Sorted paths of files under ``root`` ending in ``suffix``; [] if ``root`` is missing.

    Hidden names (".x") are skipped: they are create_only's temp files on local disk. The
    cache is invalidated first so files other workers just wrote are seen. A refused listing
    raises PermissionError naming what to grant: read as "nothing there", it would make a
    resume redo every committed chunk. (One level is ``fs.ls``, not ``fs.find``, for that
    reason: fsspec's walk drops folders it may not list.)
    """

    if not recursive:
        return [str(e["name"]) for e in list_entries(fs, root, suffix)]

    def find() -> list[str]:
        fs.invalidate_cache(root)
        try:
            return list(fs.find(root, withdirs=False))
        except FileNotFoundError:
            return []

    try:
        paths = _retrying(find)
    except PermissionError as exc:
        raise PermissionError(_list_refused(fs, root, exc)) from exc
    return sorted(
        p
        for p in paths
        if p.endswith(suffix) and not posixpath.basename(p.rstrip("/")).startswith(".")
    )


def local_entry(path: str, st: os.stat_result) -> dict[str, Any]:
    """What :func:`list_entries` says of a local file (the fields fsspec's ``info`` has)."""
    return {"name": path, "type": "file", "size": st.st_size, "ino": st.st_ino,
            "mtime": st.st_mtime}  # fmt: skip


def list_entries(
    fs: fsspec.AbstractFileSystem, root: str, suffix: str
) -> list[dict[str, Any]]:
    """:func:`list_files` (one level) with what the listing says of each file (size, ETag or
    inode and mtime), sorted by name: the same requests as the names alone."""

    def ls() -> list[dict[str, Any]]:
        fs.invalidate_cache(root)
        try:
            # fsspec's ls costs ~50 us a file in Python; the shortcut is for the plain local
            # filesystem only: a subclass may list differently (or refuse, as tests do).
            if type(fs) is LocalFileSystem:
                with os.scandir(root) as it:
                    return [local_entry(e.path, e.stat()) for e in it if e.is_file()]
            return [e for e in fs.ls(root, detail=True) if e["type"] != "directory"]
        except FileNotFoundError:
            return []

    try:
        entries = _retrying(ls)
    except PermissionError as exc:
        raise PermissionError(_list_refused(fs, root, exc)) from exc
    return sorted(
        (
            e
            for e in entries
            if str(e["name"]).endswith(suffix)
            and not posixpath.basename(str(e["name"]).rstrip("/")).startswith(".")
        ),
        key=lambda e: str(e["name"]),
    )
