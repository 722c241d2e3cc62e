"""``batchinfer serve``: the OpenAI Files and Batches API, answered by batchinfer jobs.

The subset batch clients use, in OpenAI's shapes (the official ``openai`` SDK parses every
answer): ``POST /v1/files`` (multipart, purpose ``batch``), ``GET /v1/files/{id}`` and
``/content``, ``POST /v1/batches``, ``GET /v1/batches/{id}``, ``GET /v1/batches`` (``limit``,
``after``), ``POST /v1/batches/{id}/cancel``. Every request needs ``Authorization: Bearer
<key>`` with a key the operator set (401 otherwise, in OpenAI's error shape); each key has an
owner, and a file or batch of another owner is not found (404).

State lives in the store (:mod:`batch.serve_state`); the batches run as jobs
(:mod:`batch.serve_jobs`). FastAPI and uvicorn are imported only when a server is built.
"""

import hmac
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch.errors import SpecError
from batch.serve_jobs import Supervisor, request_counts
from batch.serve_state import TERMINAL, WINDOWS, Store, new_id

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger(__name__)

KEYS_ENV = "BATCHINFER_SERVE_KEYS"
_FILE_FIELDS = ("id", "object", "bytes", "created_at", "filename", "purpose", "status")
_BATCH_FIELDS = (
    "id", "object", "endpoint", "errors", "input_file_id", "completion_window", "status",
    "output_file_id", "error_file_id", "created_at", "in_progress_at", "expires_at",
    "finalizing_at", "completed_at", "failed_at", "expired_at", "cancelling_at", "cancelled_at",
    "request_counts", "metadata",
)  # fmt: skip


@dataclass(frozen=True)
class ServeConfig:
    store: Store
    keys: Mapping[str, str]  # API key -> owner
    bases: Mapping[str, Mapping[str, Any]]  # endpoint -> base job
    address: str | None = None
    max_running: int = 1
    poll_s: float = 1.0


# --------------------------------------------------------------------------- configuration


def read_keys(path: Path | None) -> dict[str, str]:
    """API keys: ``owner: key`` lines of ``--api-key-file`` and ``owner:key,...`` in
    $BATCHINFER_SERVE_KEYS. SpecError in one line when there are none or one is bad."""
    pairs: list[tuple[str, str, str]] = []
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise SpecError(f"--api-key-file {path}: {exc.strerror or exc}") from None
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip() and not line.lstrip().startswith("#"):
                pairs.append((*_pair(line), f"{path}:{number}"))
    for item in os.environ.get(KEYS_ENV, "").split(","):
        if item.strip():
            pairs.append((*_pair(item), f"${KEYS_ENV}"))
    keys: dict[str, str] = {}
    for owner, key, where in pairs:
        if not owner or len(key) < 8:
            raise SpecError(f"{where}: write 'owner: key' with a key of 8 characters or more")
        if key in keys and keys[key] != owner:
            raise SpecError(f"{where}: this key is already {keys[key]}'s; give each owner its own")
        keys[key] = owner
    if not keys:
        raise SpecError(
            f"no API keys: give --api-key-file with 'owner: key' lines, or set {KEYS_ENV}="
            "owner:key (the server refuses to run open)"
        )
    return keys


def _pair(text: str) -> tuple[str, str]:
    owner, _, key = text.partition(":")
    return owner.strip(), key.strip()


def read_bases(jobs: list[Path]) -> dict[str, dict[str, Any]]:
    """The operator's base jobs by the endpoint each answers (its model.task)."""
    import yaml

    from batch.request_files import check_base

    if not jobs:
        raise SpecError("give --job with a base job (model, resources, sampling) per endpoint")
    bases: dict[str, dict[str, Any]] = {}
    for job in jobs:
        try:
            raw = yaml.safe_load(job.read_text())
        except OSError as exc:
            raise SpecError(f"--job {job}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise SpecError(f"--job {job}: not YAML ({getattr(exc, 'problem', exc)})") from None
        endpoint, doc = check_base(raw, str(job))
        if endpoint in bases:
            raise SpecError(f"--job {job}: a second job for {endpoint}; give one per endpoint")
        bases[endpoint] = doc
    return bases


def default_store() -> str:
    home = os.environ.get("BATCHINFER_HOME", "").strip()
    return str(Path(home) / "serve") if home else "./batchinfer-serve"


# --------------------------------------------------------------------------- the app


class ApiError(Exception):
    """An answer in OpenAI's error shape."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}  # fmt: skip


def file_view(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: record.get(k) for k in _FILE_FIELDS}


def create_app(config: ServeConfig, supervisor: Supervisor | None = None) -> "FastAPI":
    """The ASGI app over ``config.store``; ``supervisor`` (default: one over the config)
    runs the batches while the app is up."""
    from fastapi import Depends, FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

    sup = supervisor or Supervisor(
        config.store, config.bases, address=config.address, max_running=config.max_running,
        poll_s=config.poll_s,
    )  # fmt: skip
    st = config.store

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sup.start()
        try:
            yield
        finally:
            sup.stop()

    app = FastAPI(title="batchinfer Batch API", lifespan=lifespan)
    app.state.supervisor = sup

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        err = ApiError(400, f"{param or 'request'}: {first.get('msg', 'invalid')}", param=param)
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        err = ApiError(exc.status_code, str(exc.detail))
        return JSONResponse(err.body(), status_code=exc.status_code)

    def owner(request: Request) -> str:
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise ApiError(401, "You didn't provide an API key. Send 'Authorization: Bearer "
                           "<key>' with a key the server's operator gave you.",
                           code="invalid_api_key")  # fmt: skip
        key = key.strip()
        for known, who in config.keys.items():
            if hmac.compare_digest(known.encode(), key.encode()):
                return who
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")

    def own_file(file_id: str, who: str) -> dict[str, Any]:
        record = st.file(file_id)
        if record is None or record.get("owner") != who:
            raise ApiError(404, f"No such File object: {file_id}", param="id",
                           code="not_found")  # fmt: skip
        return record

    def own_batch(batch_id: str, who: str) -> dict[str, Any]:
        record = st.batch(batch_id)
        if record is None or record.get("owner") != who:
            raise ApiError(404, f"No such Batch object: {batch_id}", param="id",
                           code="not_found")  # fmt: skip
        return record

    def batch_view(record: Mapping[str, Any]) -> dict[str, Any]:
        doc = {k: record.get(k) for k in _BATCH_FIELDS}
        if record["status"] not in TERMINAL and record["status"] != "validating":
            try:
                doc["request_counts"] = request_counts(sup.spec(record), int(record.get("total")
                                                                              or 0))  # fmt: skip
            except (SpecError, OSError) as exc:
                log.warning("request counts of %s: %s", record["id"], exc)
        return doc

    @app.post("/v1/files")
    async def create_file(request: Request, who: str = Depends(owner)) -> dict[str, Any]:
        form = await request.form()
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            raise ApiError(400, f"purpose must be 'batch' (got {purpose!r}): this server keeps "
                           "batch input files only", param="purpose")  # fmt: skip
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "file: attach the request file (multipart field 'file')",
                           param="file")  # fmt: skip
        data = await upload.read()
        if not data.strip():
            raise ApiError(400, "file: the file is empty", param="file")
        return file_view(st.put_file(who, upload.filename or "upload.jsonl", "batch", data))

    @app.get("/v1/files/{file_id}")
    def get_file(file_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        return file_view(own_file(file_id, who))

    @app.get("/v1/files/{file_id}/content")
    def file_content(file_id: str, who: str = Depends(owner)) -> Response:
        record = own_file(file_id, who)
        return Response(st.file_bytes(record), media_type="application/jsonl")

    @app.post("/v1/batches")
    async def create_batch(request: Request, who: str = Depends(owner)) -> dict[str, Any]:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        window = body.get("completion_window")
        if window not in WINDOWS:
            raise ApiError(400, f"completion_window must be one of {sorted(WINDOWS)} (got "
                           f"{window!r})", param="completion_window")  # fmt: skip
        endpoint = body.get("endpoint")
        if endpoint not in config.bases:
            raise ApiError(400, f"endpoint {endpoint!r} is not served here; this server answers "
                           f"{', '.join(sorted(config.bases))}", param="endpoint")  # fmt: skip
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict) or len(metadata) > 16
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):  # fmt: skip
            raise ApiError(400, "metadata: at most 16 string keys with string values",
                           param="metadata")  # fmt: skip
        file_id = body.get("input_file_id")
        if not isinstance(file_id, str):
            raise ApiError(400, "input_file_id: give the id of an uploaded file",
                           param="input_file_id")  # fmt: skip
        meta = st.file(file_id)
        if meta is None or meta.get("owner") != who:
            raise ApiError(404, f"No such File object: {file_id}", param="input_file_id",
                           code="not_found")  # fmt: skip
        if meta.get("purpose") != "batch":
            raise ApiError(400, f"{file_id} is not a batch input file (purpose "
                           f"{meta.get('purpose')!r})", param="input_file_id")  # fmt: skip
        now = int(sup.clock())
        batch_id = new_id("batch")
        record: dict[str, Any] = {field: None for field in _BATCH_FIELDS}
        record.update(
            id=batch_id, object="batch", endpoint=endpoint, input_file_id=file_id,
            completion_window=window, status="validating", created_at=now,
            expires_at=now + int(WINDOWS[window]), metadata=metadata,
            request_counts={"total": 0, "completed": 0, "failed": 0},
            owner=who, output=f"batches/{batch_id}/out",
        )  # fmt: skip
        st.save_batch(record)
        sup.watch(batch_id)
        return batch_view(record)

    @app.get("/v1/batches/{batch_id}")
    def get_batch(batch_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        return batch_view(own_batch(batch_id, who))

    @app.get("/v1/batches")
    def list_batches(
        who: str = Depends(owner), limit: int = 20, after: str | None = None
    ) -> dict[str, Any]:
        if not 1 <= limit <= 100:
            raise ApiError(400, f"limit must be between 1 and 100 (got {limit})", param="limit")
        mine = [b for b in st.batches() if b.get("owner") == who]
        if after is not None:
            ids = [b["id"] for b in mine]
            if after not in ids:
                raise ApiError(400, f"after: no batch {after}", param="after")
            mine = mine[ids.index(after) + 1 :]
        page = mine[:limit]
        data = [batch_view(b) for b in page]
        return {"object": "list", "data": data,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
                "has_more": len(mine) > limit}  # fmt: skip

    @app.post("/v1/batches/{batch_id}/cancel")
    def cancel_batch(batch_id: str, who: str = Depends(owner)) -> dict[str, Any]:
        with sup.lock:
            record = own_batch(batch_id, who)
            if record["status"] in ("cancelling", "cancelled"):
                return batch_view(record)
            if record["status"] in TERMINAL:
                raise ApiError(409, f"Cannot cancel a batch with status {record['status']}.",
                               code="batch_not_cancellable")  # fmt: skip
            record.update(status="cancelling", cancelling_at=int(sup.clock()))
            st.save_batch(record)
        return batch_view(record)

    return app


def serve(config: ServeConfig, host: str, port: int) -> None:
    """Run the server until Ctrl-C (running jobs are stopped; they resume on the next start)."""
    import uvicorn

    uvicorn.run(create_app(config), host=host, port=port, log_level="warning")
