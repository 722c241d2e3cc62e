"""OpenAI batch output files, and the ledger's view of a request file's own models.

A job over an OpenAI Batch API request file (``pipeline: openai``) writes, once every chunk is
committed, what the provider would have returned:

- ``openai/output.jsonl``: one line per request that succeeded,
  ``{"id": "batch_req_...", "custom_id", "response": {"status_code": 200, "request_id",
  "body": <chat.completion or embeddings list>}, "error": null}``;
- ``openai/errors.jsonl``: one line per request that failed, with ``error: {code, message}``
  (the error class and reason of ``_failed/``) and, for a request that was invalid (malformed
  line, unsupported field, model not served, prompt too long, ...), ``response`` with status
  400 and the provider's error body; a request that failed in the engine has ``response``
  null.

Both are in input line order, every custom_id exactly once across the two. They are derived
from the committed parts (read through the markers, a chunk at a time, so the driver never
holds more than one chunk's rows): rewriting them is idempotent, each write replaces the file
atomically, and ids are digests of the job fingerprint and the custom_id, so a resumed or
repeated run writes the same bytes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow.parquet as pq

from batch import storage, store
from batch.spec import JobSpec

log = logging.getLogger(__name__)

FOLDER = "openai"
OUTPUT = f"{FOLDER}/output.jsonl"
ERRORS = f"{FOLDER}/errors.jsonl"

#: Error classes of requests the provider would have refused (HTTP 400): the request's fault.
REQUEST_ERRORS = frozenset(
    {"MalformedRequest", "InvalidRequest", "UnsupportedField", "ModelNotServed",
     "WrongEndpoint", "PromptTooLong", "TokenizerError", "EmptyPrompt"}
)  # fmt: skip

_RETRY = re.compile(r"^(?P<base>.+?)\.retry\d+$")
_DATA_COLUMNS = ("custom_id", "_line", "response_body")
_FAILED_COLUMNS = ("custom_id", "_line", store.ERROR_CLASS, store.ERROR_MESSAGE)


def applies(spec: JobSpec) -> bool:
    """The job answers an OpenAI request file (its outputs include the provider's files)."""
    return spec.pipeline_name == "openai"


def _digest(*parts: str) -> str:
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=12).hexdigest()


def _read(fs: Any, root: str, part: str, wanted: Sequence[str]) -> list[dict[str, Any]]:
    """One part's rows, only the columns wanted (those it has)."""
    with fs.open(storage.join(root, part), "rb") as fh:
        pf = pq.ParquetFile(fh)
        names = [c for c in wanted if c in pf.schema_arrow.names]
        rows: list[dict[str, Any]] = []
        for batch in pf.iter_batches(columns=names, batch_size=4096):
            rows += batch.to_pylist()
    return rows


def _chunks_in_order(markers: Sequence[Mapping[str, Any]]) -> list[list[tuple[str, bool]]]:
    """Per input chunk, in file order: its live parts and those of its retries, each as
    (part, is_data). A retry's rows come from its chunk's failed part, so they sort in with it."""
    t = store.totals(markers)
    live_failed = set(t.failed_parts)
    retries: dict[str, list[Mapping[str, Any]]] = {}
    bases = []
    for m in markers:
        if m.get("supersedes"):
            match = _RETRY.match(str(m["chunk_id"]))
            base = match["base"] if match else str(m["chunk_id"])
            retries.setdefault(base, []).append(m)
        else:
            bases.append(m)
    bases.sort(key=lambda m: (str(m.get("file", "")), int(m.get("row_start", 0))))
    out = []
    for m in bases:
        parts: list[tuple[str, bool]] = []
        for one in [m, *retries.get(str(m["chunk_id"]), [])]:
            if one.get("data_part"):
                parts.append((str(one["data_part"]), True))
            if one.get("failed_part") and one["failed_part"] in live_failed:
                parts.append((str(one["failed_part"]), False))
        out.append(parts)
    return out


def requests_in_order(
    spec: JobSpec, markers: Sequence[Mapping[str, Any]]
) -> Iterator[dict[str, Any]]:
    """Every committed request, in input line order, one chunk in memory at a time: its
    custom_id and line, and ``response_body`` (succeeded) or the error class and message."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    for parts in _chunks_in_order(markers):
        rows: list[dict[str, Any]] = []
        for part, is_data in parts:
            for row in _read(fs, root, part, _DATA_COLUMNS if is_data else _FAILED_COLUMNS):
                row["ok"] = is_data
                rows.append(row)
        rows.sort(key=lambda r: int(r.get("_line") or 0))
        yield from rows


def output_lines(
    spec: JobSpec, markers: Sequence[Mapping[str, Any]], fingerprint: str
) -> Iterator[tuple[bool, str]]:
    """(succeeded, JSON line) per request, in input order."""
    for row in requests_in_order(spec, markers):
        cid = row.get("custom_id")
        tag = cid if cid is not None else f"line {row.get('_line')}"
        line_id = f"batch_req_{_digest(fingerprint, 'line', tag)}"
        request_id = _digest(fingerprint, "request", tag)
        if row["ok"]:
            body = json.loads(row["response_body"])
            doc = {"id": line_id, "custom_id": cid,
                   "response": {"status_code": 200, "request_id": request_id, "body": body},
                   "error": None}  # fmt: skip
        else:
            code = str(row.get(store.ERROR_CLASS) or "Error")
            message = str(row.get(store.ERROR_MESSAGE) or code)
            response = None
            if code in REQUEST_ERRORS:
                error_body = {"message": message, "type": "invalid_request_error", "param": None,
                              "code": code}  # fmt: skip
                response = {"status_code": 400, "request_id": request_id,
                            "body": {"error": error_body}}  # fmt: skip
            doc = {"id": line_id, "custom_id": cid, "response": response,
                   "error": {"code": code, "message": message}}  # fmt: skip
        yield row["ok"], json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def write_files(
    spec: JobSpec, record: Mapping[str, Any], markers: Sequence[Mapping[str, Any]]
) -> dict[str, int]:
    """Write ``openai/output.jsonl`` and ``openai/errors.jsonl`` from the committed parts
    (each file replaced atomically); returns the lines written to each."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    fingerprint = str(record.get("fingerprint") or spec.fingerprint())
    counts = {"output": 0, "errors": 0}
    with contextlib.ExitStack() as stack:
        ok_fh = stack.enter_context(_atomic(fs, storage.join(root, OUTPUT)))
        err_fh = stack.enter_context(_atomic(fs, storage.join(root, ERRORS)))
        for succeeded, line in output_lines(spec, markers, fingerprint):
            (ok_fh if succeeded else err_fh).write(line.encode() + b"\n")
            counts["output" if succeeded else "errors"] += 1
    log.info("openai files: %(output)d output lines, %(errors)d error lines", counts)
    return counts


@contextlib.contextmanager
def _atomic(fs: Any, path: str) -> Iterator[Any]:
    """A file written in full or not at all: on local disk a temp file renamed over the
    target; on object stores one upload, which becomes visible when it completes."""
    if isinstance(fs, storage.LocalFileSystem):
        path = os.path.abspath(path)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
        return
    with fs.open(path, "wb") as fh:
        yield fh


# --------------------------------------------------------------------------- ledger


FILE_MODELS_NOTE = (
    "file_models: the request file's own models (the model named in each body), with what "
    "their requests cost at that model's list and batch price for the tokens our engine "
    "counted (our tokenizer; the provider's differs), failed requests not billed. "
    "run_cost_share splits run_cost_usd by each model's share of those tokens; "
    "file_batch_usd is what the file would have cost at its own models' batch prices "
    "(models without a price in the table are left out and named)."
)


def model_usage(spec: JobSpec, markers: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Per body model: requests answered and failed, and the answered requests' tokens."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    t = store.totals(markers)
    usage: dict[str, dict[str, int]] = {}

    def entry(model: str) -> dict[str, int]:
        return usage.setdefault(
            model, {"requests": 0, "failed_requests": 0, "input_tokens": 0, "output_tokens": 0}
        )

    for part in t.data_parts:
        for row in _read(fs, root, part, ("request_model", "input_tokens", "output_tokens")):
            e = entry(str(row.get("request_model")))
            e["requests"] += 1
            e["input_tokens"] += int(row.get("input_tokens") or 0)
            e["output_tokens"] += int(row.get("output_tokens") or 0)
    for part in t.failed_parts:
        for row in _read(fs, root, part, ("body",)):
            model = None
            with contextlib.suppress(TypeError, ValueError, AttributeError):
                model = json.loads(row.get("body") or "").get("model")
            entry(str(model) if isinstance(model, str) else "(unknown)")["failed_requests"] += 1
    return usage


def _price_key(model: str) -> list[str]:
    """Price table keys to try for a body model: ``openai/<model>``, then without a dated
    snapshot suffix (gpt-4o-mini-2024-07-18 -> gpt-4o-mini)."""
    keys = [model if "/" in model else f"openai/{model}"]
    bare = re.sub(r"-\d{4}-\d{2}-\d{2}$", "", keys[0])
    return keys + ([bare] if bare != keys[0] else [])


def file_models(
    spec: JobSpec,
    markers: Sequence[Mapping[str, Any]],
    table: Any,
    *,
    run_cost: float,
) -> dict[str, Any]:
    """The ledger's ``file_models`` block (see FILE_MODELS_NOTE)."""
    from batch.prices import UnknownPriceError, api_cost, embedding_cost

    usage = model_usage(spec, markers)
    tokens_all = sum(u["input_tokens"] + u["output_tokens"] for u in usage.values())
    models = []
    file_batch = 0.0
    unpriced = []
    for model in sorted(usage):
        u = usage[model]
        row: dict[str, Any] = {"model": model, **u, "price_row": None, "list_usd": None,
                               "batch_usd": None}  # fmt: skip
        for key in _price_key(model):
            try:
                if spec.model.task == "embed":
                    eprice = table.embedding_price(key)
                    list_usd = embedding_cost(eprice, u["input_tokens"])
                    price = eprice.model_dump(mode="json")
                else:
                    cprice = table.chat_price(key)
                    list_usd = api_cost(cprice, u["input_tokens"], u["output_tokens"])
                    price = cprice.model_dump(mode="json")
            except (UnknownPriceError, KeyError):
                continue
            batch_usd = list_usd * (1 - table.batch_discount(price["provider"]))
            row.update(price_row=price, list_usd=round(list_usd, 10),
                       batch_usd=round(batch_usd, 10))  # fmt: skip
            file_batch += batch_usd
            break
        else:
            if u["requests"]:
                unpriced.append(model)
            row["note"] = "no price for this model in the price table (add it under ledger.prices)"
        tokens = u["input_tokens"] + u["output_tokens"]
        share = run_cost * tokens / tokens_all if tokens_all else 0.0
        row["run_cost_share_usd"] = round(share, 10)
        models.append(row)
    return {
        "models": models,
        "file_batch_usd": round(file_batch, 10),
        "run_cost_usd": round(run_cost, 10),
        "savings_vs_file_batch": round(1 - run_cost / file_batch, 4) if file_batch else None,
        "unpriced_models": unpriced,
    }
