"""openai: the requests of an OpenAI Batch API file, answered as the provider would answer them.

A row is one line of the request file (``input.format: openai-batch``: custom_id, method, url,
body). ``prepare`` reads the body: for ``/v1/chat/completions`` the messages (system, developer,
user, assistant; content as a string or a list of text parts) and the request's own sampling
(``max_tokens`` / ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``,
``n``, ``presence_penalty``, ``frequency_penalty``, ``response_format`` json_schema or
json_object), which the engine applies on top of the spec's ``sampling`` (a field the body
leaves out takes the spec's value); for ``/v1/embeddings`` the ``input`` string. A request
fails as a row, with its reason, when its endpoint does not fit ``model.task``, its model is
not one ``input.openai_models`` lists, or it sets a field that would change the answer and
that batchinfer does not implement (tools, logit_bias, logprobs, ...); fields that change
nothing (user, metadata, store, ...) are ignored.

``finish`` writes ``response_body``: the complete ``chat.completion`` or embeddings ``list``
object as JSON text, ``model`` being the body's model name, plus ``request_model`` and the
token counts. Ids are derived from the job's fingerprint and the custom_id, and ``created``
is the job's creation time (from the job record), so a resumed or repeated run writes the
same bytes. :mod:`batch.openai_files` turns the committed rows into the provider's output and
error files.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa

from batch.engine import EngineRequest, EngineResult, sampling_overrides
from batch.errors import RowError, SpecError
from batch.spec import JobSpec
from pipelines.base import Pipeline

CHAT_URL = "/v1/chat/completions"
EMBEDDINGS_URL = "/v1/embeddings"

#: Body fields that do not change the answer: accepted and ignored.
IGNORED = frozenset(
    {"user", "metadata", "store", "service_tier", "stream", "stream_options", "prompt_cache_key",
     "safety_identifier", "parallel_tool_calls"}
)  # fmt: skip
CHAT_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed",
     "stop", "n", "presence_penalty", "frequency_penalty", "response_format", "logprobs",
     "top_logprobs", "modalities"}
)  # fmt: skip
EMBEDDING_FIELDS = frozenset({"model", "input", "encoding_format", "dimensions"})
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
FINISH_REASONS = {"stop", "length"}

OUTPUT_SCHEMA = pa.schema(
    [("response_body", pa.string()), ("request_model", pa.string()),
     ("input_tokens", pa.int32()), ("output_tokens", pa.int32())]
)  # fmt: skip


def _invalid(message: str) -> RowError:
    return RowError("InvalidRequest", message)


def _unsupported(name: str, why: str = "it changes the answer") -> RowError:
    return RowError(
        "UnsupportedField",
        f"body.{name} is not supported by batchinfer ({why}); remove it from the request",
    )


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _invalid(f"body.{name} must be a number (got {json.dumps(value)})")
    if not low <= value <= high:
        raise _invalid(f"body.{name} must be between {low:g} and {high:g} (got {value})")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"body.{name} must be an integer (got {json.dumps(value)})")
    if value < low or (high is not None and value > high):
        bound = f"at least {low}" if high is None else f"between {low} and {high}"
        raise _invalid(f"body.{name} must be {bound} (got {value})")
    return int(value)


def _content(message: Mapping[str, Any], i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise RowError(
                    "UnsupportedField",
                    f"body.messages[{i}].content: a part of type {json.dumps(kind)} is not "
                    "supported (text parts only)",
                )
            texts.append(part["text"])
        return "".join(texts)
    raise _invalid(f"body.messages[{i}].content must be a string or a list of text parts")


def _messages(body: Mapping[str, Any]) -> tuple[dict[str, str], ...]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("body.messages must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _invalid(f"body.messages[{i}] is not an object")
        role = m.get("role")
        if role not in ROLES:
            raise RowError(
                "UnsupportedField",
                f"body.messages[{i}].role {json.dumps(role)} is not supported (system, "
                "developer, user and assistant are)",
            )
        if m.get("tool_calls") or m.get("function_call") or m.get("audio"):
            raise _unsupported(f"messages[{i}].tool_calls")
        out.append({"role": ROLES[role], "content": _content(m, i)})
    return tuple(out)


def _stop(body: Mapping[str, Any]) -> tuple[str, ...] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return (stop,)
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 4:
        return tuple(stop)
    raise _invalid("body.stop must be a string or a list of at most 4 strings")


def _response_format(body: Mapping[str, Any]) -> dict[str, Any]:
    fmt = body.get("response_format")
    if fmt is None:
        return {}
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise _invalid("body.response_format.json_schema.schema must be a JSON schema object")
        return {"json_schema": json.dumps(schema, sort_keys=True, separators=(",", ":"))}
    raise _invalid(
        f"body.response_format.type {json.dumps(kind)} is not one of text, json_object, json_schema"
    )


def _digest(*parts: str) -> str:
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=12).hexdigest()


class OpenAIRequests(Pipeline):
    """The shared part: reading a line's body and the job-level facts of the response."""

    endpoint: ClassVar[str]

    def __init__(self, spec: JobSpec, **options: Any) -> None:
        super().__init__(spec, **options)
        if spec.input.format != "openai-batch":
            raise SpecError("pipeline openai reads OpenAI batch request files; set input.format: "
                            "openai-batch")  # fmt: skip
        models = spec.input.openai_models
        self.models = frozenset(models) if models is not None else None
        self._job: tuple[str, int] | None = None

    def required_columns(self) -> frozenset[str]:
        return frozenset({"custom_id", "url", "body"})

    def output_schema(self) -> pa.Schema:
        return OUTPUT_SCHEMA

    def _body(self, row: Mapping[str, Any]) -> dict[str, Any]:
        """The row's body as an object, after the checks every endpoint shares."""
        url = row.get("url")
        if url != self.endpoint:
            raise RowError(
                "WrongEndpoint",
                f"url {url} does not fit this job's model.task {self.spec.model.task} (it "
                f"serves {self.endpoint}); run {url} requests in a job of their own",
            )
        try:
            body = json.loads(row["body"])
        except (TypeError, ValueError):
            raise _invalid("body is not a JSON object") from None
        if not isinstance(body, dict):
            raise _invalid("body is not a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _invalid("body.model must be a non-empty string")
        if self.models is not None and model not in self.models:
            raise RowError(
                "ModelNotServed",
                f"model {model} is not served by this job; map it in the job file "
                f"(input.openai_models: [{', '.join(sorted(self.models | {model}))}])",
            )
        allowed = CHAT_FIELDS if self.endpoint == CHAT_URL else EMBEDDING_FIELDS
        for name in body:
            if name not in allowed and name not in IGNORED:
                raise _unsupported(name)
        if body.get("stream"):
            raise _invalid("body.stream must be false in a batch")
        return body

    def job_facts(self) -> tuple[str, int]:
        """(fingerprint, created) of the job, from its record: what ids and ``created`` are
        made of, the same on every run. Read once per pipeline (one commit task's chunk)."""
        if self._job is None:
            from batch import storage, store

            record: Mapping[str, Any] | None = None
            try:
                fs, root = storage.open_fs(self.spec.output.path, self.spec.output.storage_options)
                record = store.read_job_record(fs, root)
            except Exception:  # no output yet (a pipeline used on its own): the spec's
                record = None
            record = record or {}
            self._job = (
                str(record.get("fingerprint") or self.spec.fingerprint()),
                int(float(record.get("created_at") or 0)),
            )
        return self._job

    def finish(self, row: Mapping[str, Any], result: EngineResult) -> dict[str, Any]:
        fingerprint, created = self.job_facts()
        body = json.loads(row["body"])
        model = str(body["model"])
        response = self.response(body, result, str(row["custom_id"]), fingerprint, created)
        return {
            "response_body": json.dumps(response, ensure_ascii=False, separators=(",", ":")),
            "request_model": model,
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
        }

    def finish_batch(
        self, rows: Sequence[Mapping[str, Any]], results: Sequence[EngineResult]
    ) -> pa.Table:
        out = [self.finish(row, res) for row, res in zip(rows, results, strict=True)]
        return pa.Table.from_pylist(out, schema=OUTPUT_SCHEMA)

    def response(
        self,
        body: Mapping[str, Any],
        result: EngineResult,
        custom_id: str,
        fingerprint: str,
        created: int,
    ) -> dict[str, Any]:
        raise NotImplementedError


class OpenAIChat(OpenAIRequests):
    """``/v1/chat/completions`` requests, for a ``generate`` model."""

    task = "generate"
    endpoint = CHAT_URL

    def prepare(self, row: Mapping[str, Any]) -> EngineRequest:
        body = self._body(row)
        for name in ("logprobs", "top_logprobs"):
            if body.get(name):
                raise _unsupported(name, "token logprobs are not returned")
        modalities = body.get("modalities")
        if modalities is not None and modalities != ["text"]:
            raise _unsupported("modalities", "text only")
        max_tokens = _integer(body, "max_completion_tokens", 1)
        if max_tokens is None:
            max_tokens = _integer(body, "max_tokens", 1)
        temperature = _number(body, "temperature", 0, 2)
        n = _integer(body, "n", 1, 128)
        if n is not None and n > 1:
            used = self.spec.sampling.temperature if temperature is None else temperature
            if used == 0:
                whose = (
                    "body.temperature"
                    if temperature is not None
                    else ("the job's sampling.temperature (the body sets none)")
                )
                raise _invalid(
                    f"body.n is {n} but the temperature is 0 ({whose}), which gives {n} "
                    "identical answers; set body.temperature > 0 or sampling.temperature"
                )
        sampling = sampling_overrides(
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=_number(body, "top_p", 0, 1),
            seed=_integer(body, "seed", -(2**63)),
            stop=_stop(body),
            n=n,
            presence_penalty=_number(body, "presence_penalty", -2, 2),
            frequency_penalty=_number(body, "frequency_penalty", -2, 2),
            **_response_format(body),
        )
        return EngineRequest(key=0, messages=_messages(body), sampling=sampling)

    def response(
        self,
        body: Mapping[str, Any],
        result: EngineResult,
        custom_id: str,
        fingerprint: str,
        created: int,
    ) -> dict[str, Any]:
        answers = [(s.text, s.finish_reason) for s in result.samples] or [
            (result.text or "", result.finish_reason)
        ]
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": reason if reason in FINISH_REASONS else "stop",
            }
            for i, (text, reason) in enumerate(answers)
        ]
        return {
            "id": f"chatcmpl-{_digest(fingerprint, custom_id)}",
            "object": "chat.completion",
            "created": created,
            "model": str(body["model"]),
            "choices": choices,
            "usage": {
                "prompt_tokens": result.input_tokens,
                "completion_tokens": result.output_tokens,
                "total_tokens": result.input_tokens + result.output_tokens,
            },
            "system_fingerprint": f"batchinfer-{fingerprint}",
        }


class OpenAIEmbeddings(OpenAIRequests):
    """``/v1/embeddings`` requests, for an ``embed`` model (one string per request)."""

    task = "embed"
    endpoint = EMBEDDINGS_URL

    def prepare(self, row: Mapping[str, Any]) -> EngineRequest:
        body = self._body(row)
        text = body.get("input")
        if isinstance(text, list):
            raise RowError(
                "UnsupportedField",
                "body.input: a list of inputs is not supported (one string per request); "
                "write one request line per string",
            )
        if not isinstance(text, str) or not text.strip():
            raise _invalid("body.input must be a non-empty string")
        if body.get("encoding_format") not in (None, "float", "base64"):
            raise _invalid("body.encoding_format must be float or base64")
        if body.get("dimensions") is not None:
            raise _unsupported("dimensions", "the model's own size is returned")
        return EngineRequest(key=0, text=text)

    def response(
        self,
        body: Mapping[str, Any],
        result: EngineResult,
        custom_id: str,
        fingerprint: str,
        created: int,
    ) -> dict[str, Any]:
        vector = [float(x) for x in np.asarray(result.embedding or [], dtype=np.float32)]
        embedding: Any = vector
        if body.get("encoding_format") == "base64":
            raw = np.asarray(vector, dtype="<f4").tobytes()
            embedding = base64.b64encode(raw).decode("ascii")
        return {
            "object": "list",
            "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
            "model": str(body["model"]),
            "usage": {"prompt_tokens": result.input_tokens, "total_tokens": result.input_tokens},
        }
