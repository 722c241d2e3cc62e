"""Job specs for OpenAI Batch API request files, without a YAML of the user's.

Two callers: ``batchinfer submit requests.jsonl`` (the default CPU job: the bundled chat model
for a file of ``/v1/chat/completions`` requests, the bundled embedding model for
``/v1/embeddings``, picked by the file's first request), and ``batchinfer serve`` (the
operator's base spec per endpoint, with the uploaded file as input and an output under the
server's store). Either way the job is an ordinary one: ``input.format: openai-batch``,
pipeline ``openai``, resume and exactly-once as for any job.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from batch.errors import SpecError
from batch.spec import JobSpec, parse_spec

CHAT_URL = "/v1/chat/completions"
EMBEDDINGS_URL = "/v1/embeddings"
#: The endpoint a job's model.task answers.
TASK_ENDPOINT = {"generate": CHAT_URL, "embed": EMBEDDINGS_URL}

#: The default CPU jobs of ``batchinfer submit requests.jsonl``, by the file's endpoint.
DEFAULT_MODELS: dict[str, dict[str, Any]] = {
    CHAT_URL: {
        "path": "builtin:smollm2-135m-instruct",
        "task": "generate",
        "engine_args": {"max_model_len": 2048, "enforce_eager": True},
    },
    EMBEDDINGS_URL: {
        "path": "builtin:all-minilm-l6-v2",
        "task": "embed",
        "engine_args": {"enforce_eager": True, "dtype": "float32"},
    },
}
_PEEK_LINES = 50


def first_request_url(path: Path) -> str | None:
    """The ``url`` of the first well-formed request in a local file, or None when none of its
    first lines looks like an OpenAI batch request (``custom_id`` and ``url``)."""
    try:
        with path.open("rb") as fh:
            for _ in range(_PEEK_LINES):
                raw = fh.readline()
                if not raw:
                    return None
                try:
                    doc = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(doc, dict) and "custom_id" in doc and isinstance(doc.get("url"), str):
                    return str(doc["url"])
    except OSError:
        return None
    return None


def is_request_file(path: Path) -> bool:
    """A ``.jsonl`` file whose lines are OpenAI batch requests (what ``submit`` runs as is)."""
    return path.suffix == ".jsonl" and path.is_file() and first_request_url(path) is not None


def default_spec(path: Path, output: str | None, overrides: list[str]) -> JobSpec:
    """The default CPU job for a request file: its endpoint's bundled model, greedy,
    ``max_tokens`` 128 for requests that set none; output ``<stem>-out/`` next to the file."""
    url = first_request_url(path)
    if url not in DEFAULT_MODELS:
        raise SpecError(
            f"{path}: its first request's url is {url!r}; the default job answers "
            f"{CHAT_URL} or {EMBEDDINGS_URL} (write a job YAML with input.format: "
            "openai-batch for another model)"
        )
    doc = {
        "name": _name(path.stem),
        "input": {"path": str(path.resolve()), "format": "openai-batch"},
        "output": {"path": output or str(path.resolve().with_name(f"{path.stem}-out"))},
        "model": DEFAULT_MODELS[url],
        "resources": {"device": "cpu", "rows_per_chunk": 64},
    }
    return parse_spec(yaml.safe_dump(doc), source=f"{path} (default job)", overrides=overrides)


def _name(stem: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_" else "-" for c in stem).strip("-")
    return cleaned or "requests"


def check_base(raw: Mapping[str, Any], source: str) -> tuple[str, dict[str, Any]]:
    """A server's base job (model, resources, sampling, input.openai_models; no input path or
    output): the endpoint it answers, and the mapping. SpecError naming the file otherwise."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"{source}: a job is a YAML mapping (name, model, sampling, ...)")
    doc = dict(raw)
    spec = spec_for(doc, name="check", input_path="/dev/null/requests.jsonl",
                    output_path="/dev/null/out", storage_options={}, source=source)  # fmt: skip
    if spec.model.task not in TASK_ENDPOINT:
        raise SpecError(f"{source}: model.task {spec.model.task!r} answers no batch endpoint")
    return TASK_ENDPOINT[spec.model.task], doc


def spec_for(
    base: Mapping[str, Any],
    *,
    name: str,
    input_path: str,
    output_path: str,
    storage_options: Mapping[str, Any],
    source: str,
) -> JobSpec:
    """The base job answering one uploaded request file into ``output_path``."""
    doc: dict[str, Any] = json.loads(json.dumps(dict(base)))  # a deep copy
    given = doc.get("input") or {}
    if set(given) - {"openai_models", "format"}:
        extra = sorted(set(given) - {"openai_models", "format"})
        raise SpecError(
            f"{source}: input.{extra[0]}: the server sets the input (each uploaded file); "
            "keep only input.openai_models"
        )
    if doc.get("output") and set(doc["output"]) - {"compression"}:
        raise SpecError(
            f"{source}: output: the server puts each batch's output under its --store; "
            "keep only output.compression"
        )
    doc["name"] = name
    doc["input"] = {**given, "path": input_path, "format": "openai-batch",
                    "storage_options": dict(storage_options)}  # fmt: skip
    doc["output"] = {**(doc.get("output") or {}), "path": output_path,
                     "storage_options": dict(storage_options)}  # fmt: skip
    doc.pop("pipeline", None)
    doc.pop("prompt", None)
    return parse_spec(json.dumps(doc), source=source)
