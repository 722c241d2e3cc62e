"""The vLLM engine: the only module of batchinfer that imports vllm.

One ``VLLMEngine`` lives in each engine actor for the whole job. It wraps vLLM's
``AsyncLLM`` so that requests of every chunk in flight share one continuous batch: each
chunk's ``run`` submits all its rows at once and awaits them, while other chunks do the
same. The prompt is tokenized exactly once, here (chat template included), and the token
ids are handed to vLLM, so the token counts we report are the ones the engine saw.

Failures follow ``batch.engine``: any exception raised for one request is that row's error,
unless the engine is dead (``EngineDeadError``, or ``errored``), which fails the chunk; a
failed or cancelled chunk aborts its requests in vLLM; an engine that finishes nothing for
``resources.chunk_timeout_s`` while holding requests raises ``EngineHung`` and stays unhealthy.

Typed answers (``response:``): every request carries vLLM's structured-outputs constraint,
the engine runs xgrammar without free whitespace (an engine-level setting; vLLM ignores it
per request), ``draw_checked`` checks each answer and re-samples a bad one as request
``<id>.s<k>``, which the chunk's abort reaches too. The constraint is verified once at
engine start, so a schema vLLM cannot follow fails the job, not every row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from batch.engine import (
    Draw,
    EngineRequest,
    EngineResult,
    ResamplePolicy,
    Sample,
    Watchdog,
    draw_checked,
    row_error,
    run_watched,
)
from batch.errors import ConfigurationError
from batch.prompt import chat_token_ids
from batch.response import Response

if TYPE_CHECKING:
    from batch.spec import JobSpec

log = logging.getLogger(__name__)

# On the CPU, vLLM sizes the KV cache as gpu_memory_utilization x host memory minus the engine
# process's own size, and refuses to start when that is not free: its default of 0.92 does not
# fit next to Ray, two engines at 0.4 do not fit in 24 GiB, and a small share leaves nothing
# once the engine's own memory is taken off (how two CPU jobs failed at once in CI with
# "Engine core initialization failed"). A fixed KV cache is what a CPU job needs: 1 GiB holds
# 64 sequences of ~700 tokens of SmolLM2 and leaves the rest of the machine to Ray and other
# jobs. A job that sets gpu_memory_utilization or kv_cache_memory_bytes (or the environment's
# VLLM_CPU_KVCACHE_SPACE) keeps its own.
CPU_KV_CACHE_BYTES = 1 << 30
_CPU_MEMORY_ARGS = ("gpu_memory_utilization", "kv_cache_memory_bytes")

# Structured outputs: vLLM reads disable_any_whitespace from the engine's config only (the
# request-level flag is ignored by every backend), and it needs a named backend.
_STRUCTURED_DEFAULTS: dict[str, Any] = {"backend": "xgrammar", "disable_any_whitespace": True}


def engine_arguments(spec: JobSpec, model_path: str) -> dict[str, Any]:
    """The keyword arguments for vLLM's ``AsyncEngineArgs`` (the same on CPU and GPU)."""
    args: dict[str, Any] = {"model": model_path, "disable_log_stats": True}
    if spec.resources.device == "cpu" and not any(
        k in spec.model.engine_args for k in _CPU_MEMORY_ARGS
    ):
        args["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    elif spec.resources.gpus_per_replica > 1:
        args["tensor_parallel_size"] = int(spec.resources.gpus_per_replica)
    args["max_num_seqs"] = spec.resources.batch_size
    if spec.model.task == "embed":
        args["runner"] = "pooling"
    args.update(spec.model.engine_args)
    # Typed answers, and request files whose lines may ask for JSON (response_format).
    constrained = spec.response is not None or (
        spec.pipeline_name == "openai" and spec.model.task == "generate"
    )
    if constrained and "structured_outputs_config" not in args:
        args["structured_outputs_config"] = dict(_STRUCTURED_DEFAULTS)
    return args


def sampling_kwargs(spec: JobSpec) -> dict[str, Any]:
    """The keyword arguments for vLLM's ``SamplingParams`` of a row's first draw.

    Without ``response`` these are exactly the spec's sampling settings. A typed answer
    whose confidence is wanted also asks for the sampled token's logprob (``logprobs=0``).
    """
    s = spec.sampling
    kwargs: dict[str, Any] = dict(
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        min_tokens=s.min_tokens,
        seed=s.seed,
        stop=list(s.stop) or None,
        ignore_eos=s.ignore_eos,
        repetition_penalty=s.repetition_penalty,
        **s.extra_args,
    )
    if s.logprobs is not None:
        kwargs["logprobs"] = s.logprobs
    elif spec.response is not None and Response.from_spec(spec.response).wants_logprobs():
        kwargs.setdefault("logprobs", 0)
    return kwargs


class VLLMEngine:
    def __init__(self, spec: JobSpec, model_path: str) -> None:
        try:
            import vllm
            from vllm.config import StructuredOutputsConfig
            from vllm.exceptions import VLLMValidationError
            from vllm.inputs import TokensPrompt
            from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
            from vllm.v1.engine.exceptions import EngineDeadError
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigurationError(
                f"vLLM is not installed ({exc}); install the engine extra: "
                "pip install 'batchinfer[cpu]' (no GPU) or 'batchinfer[gpu]'"
            ) from exc
        self.task = spec.model.task
        self._tokens_prompt = TokensPrompt
        # The errors after which the engine cannot serve again (as in Ray Data LLM's vLLM
        # stage); every other exception raised for a request is that row's failure.
        self._fatal: tuple[type[BaseException], ...] = (EngineDeadError,)
        self._watchdog = Watchdog(spec.resources.chunk_timeout_s)
        args = engine_arguments(spec, model_path)
        self._response = Response.from_spec(spec.response) if spec.response else None
        engine_kwargs = dict(args)
        structured = engine_kwargs.get("structured_outputs_config")
        if isinstance(structured, dict):
            # AsyncEngineArgs converts other config dicts, not this one.
            try:
                engine_kwargs["structured_outputs_config"] = StructuredOutputsConfig(**structured)
            except (TypeError, ValueError) as exc:
                raise ConfigurationError(
                    "model.engine_args.structured_outputs_config: vLLM rejected it: "
                    f"{exc}".splitlines()[0]
                ) from exc
        try:
            engine_args = vllm.AsyncEngineArgs(**engine_kwargs)
        except TypeError as exc:
            raise ConfigurationError(
                f"model.engine_args: vLLM rejected the engine arguments: {exc}"
            ) from exc
        log.info("starting vLLM engine (pid %s): %s", os.getpid(), args)
        before = _descendants()
        self._engine = vllm.AsyncLLMEngine.from_engine_args(engine_args)  # = v1 AsyncLLM
        # The engine core and its workers are child processes; if the core dies, its workers
        # are re-parented away from us and would live on holding memory (or a GPU). Remember
        # them now so close() can end every one: only those the engine started. (Taking every
        # child made an engine built inside a test process SIGTERM the suite's SeaweedFS.)
        self._processes = _descendants(exclude=before)
        self._tokenizer = self._engine.get_tokenizer()
        self.max_model_len = int(self._engine.model_config.max_model_len)
        self._ids = itertools.count()
        self._policy = ResamplePolicy.from_spec(spec)
        self._chat_template_kwargs: dict[str, Any] = dict(spec.prompt.chat_template_kwargs)
        self._top_k = spec.sampling.logprobs or 0
        self._reasoning: Any = None
        self._gen_kwargs: dict[str, Any] = {}
        parser = spec.model.engine_args.get("reasoning_parser")
        if parser and self.task == "generate":
            self._reasoning = _reasoning_parser(
                str(parser), self._tokenizer, self._chat_template_kwargs
            )
            self._gen_kwargs = {
                "reasoning_parser_kwargs": {"chat_template_kwargs": self._chat_template_kwargs}
            }
        if self.task == "generate":
            self._sampling_params: Any = vllm.SamplingParams
            self._structured_params: Any = StructuredOutputsParams
            self._final_only: Any = RequestOutputKind.FINAL_ONLY
            self._kwargs = sampling_kwargs(spec)
            self._params: Any = self._draw_params(Draw(n=self._policy.n))
            if self._response is not None:
                self._verify(VLLMValidationError, spec.sampling.max_tokens)
        else:
            self._params = vllm.PoolingParams(task="embed")

    def _draw_params(self, d: Draw, overrides: dict[str, Any] | None = None) -> Any:
        """A new SamplingParams per draw (not a clone with fields set: SamplingParams fixes
        greedy-specific fields from the temperature when it is built). ``overrides`` are the
        request's own sampling (``EngineRequest.sampling``), on top of the spec's."""
        kwargs = dict(self._kwargs)
        o = overrides or {}
        for name in ("max_tokens", "temperature", "top_p", "seed", "presence_penalty",
                     "frequency_penalty"):  # fmt: skip
            if name in o:
                kwargs[name] = o[name]
        if "stop" in o:
            kwargs["stop"] = list(o["stop"]) or None
        if "json_schema" in o:
            schema = json.loads(o["json_schema"])
            kwargs["structured_outputs"] = self._structured_params(json=schema)
        elif o.get("json_object"):
            kwargs["structured_outputs"] = self._structured_params(json_object=True)
        if d.n != 1:
            kwargs["n"] = d.n
        if d.temperature is not None:
            kwargs["temperature"] = d.temperature
        if d.seed is not None:
            kwargs["seed"] = d.seed
        if self._response is not None:
            kwargs["structured_outputs"] = self._structured_params(
                **self._response.structured_outputs()
            )
        params = self._sampling_params(**kwargs)
        # Only the finished output is wanted, as in vLLM's own offline LLM class: no
        # per-step RequestOutput for every running request (which costs the frontend CPU
        # that the engine core shares on a small machine).
        params.output_kind = self._final_only
        return params

    def _verify(self, validation_error: type[Exception], max_tokens: int) -> None:
        """Fail before any row if vLLM cannot follow the constraint or no answer fits."""
        assert self._response is not None
        probe = self._draw_params(Draw(n=self._policy.n))
        try:
            probe.verify(
                self._engine.model_config,
                None,
                self._engine.vllm_config.structured_outputs_config,
                self._tokenizer,
            )
        except (validation_error, ValueError) as exc:
            raise ConfigurationError(
                f"response: vLLM cannot constrain to this schema: {str(exc).splitlines()[0]}; "
                "simplify the schema, or set model.engine_args.structured_outputs_config."
                "backend: guidance"
            ) from exc
        shortest = len(self._tokenizer.encode(self._response.skeleton(), add_special_tokens=False))
        if shortest + 1 > max_tokens:
            raise ConfigurationError(
                f"sampling.max_tokens: the shortest valid answer takes {shortest + 1} tokens, "
                f"more than {max_tokens}; raise sampling.max_tokens to at least {shortest + 1}"
            )

    async def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        request_ids = [f"r{next(self._ids)}" for _ in requests]
        live = list(request_ids)  # grows by the re-sample ids; the abort takes them all

        async def abort() -> None:
            if not self._engine.errored:  # a dead engine core takes no aborts
                await self._engine.abort(list(live))

        return await run_watched(
            (self._one(r, i, live) for r, i in zip(requests, request_ids, strict=True)),
            self._watchdog,
            abort,
        )

    async def _one(self, req: EngineRequest, request_id: str, live: list[str]) -> EngineResult:
        result = await self._run_one(req, request_id, live)
        result.timings["finished_at"] = time.time()
        return result

    async def _run_one(self, req: EngineRequest, request_id: str, live: list[str]) -> EngineResult:
        try:
            ids = self._tokenize(req)
        except Exception as exc:  # a row the tokenizer cannot take is that row's problem
            return EngineResult(key=req.key, error_kind="TokenizerError", error=str(exc)[:500])
        if len(ids) > self.max_model_len or (
            self.task == "generate" and len(ids) >= self.max_model_len
        ):
            return EngineResult(
                key=req.key,
                input_tokens=len(ids),
                error_kind="PromptTooLong",
                error=f"prompt is {len(ids)} tokens; the model's context is {self.max_model_len} "
                "(raise model.engine_args.max_model_len if the model allows, or shorten the "
                "template)",
            )
        try:
            with self._watchdog.request():
                return await self._infer(req.key, ids, request_id, live, req.sampling)
        except Exception as exc:
            if isinstance(exc, self._fatal) or not self.healthy():
                raise  # the engine is broken: the chunk fails and is retried elsewhere
            log.info("request %s (row %d) failed: %s: %s", request_id, req.key, type(exc), exc)
            return row_error(req.key, exc, input_tokens=len(ids))

    async def _infer(
        self,
        key: int,
        ids: list[int],
        request_id: str,
        live: list[str],
        sampling: tuple[tuple[str, Any], ...] = (),
    ) -> EngineResult:
        prompt = self._tokens_prompt(prompt_token_ids=ids)
        if self.task == "embed":
            pooled: Any = None
            async for pooled_out in self._engine.encode(prompt, self._params, request_id):
                pooled = pooled_out
                self._watchdog.progress()
            if pooled is None:
                raise RuntimeError("vLLM returned no embedding")
            vector = pooled.outputs.data.float().tolist()
            return EngineResult(key=key, input_tokens=len(ids), embedding=vector)

        policy, first = self._policy, self._params
        overrides = dict(sampling)
        if overrides:  # the request's own sampling: its own params (and n)
            policy = dataclasses.replace(
                policy,
                n=int(overrides.get("n", policy.n)),
                temperature=float(overrides.get("temperature", policy.temperature)),
                seed=overrides.get("seed", policy.seed),
            )
            first = self._draw_params(Draw(n=policy.n), overrides)

        async def draw(d: Draw) -> tuple[int, list[Sample]]:
            if d.round == 0:
                rid, params = request_id, first
            else:
                rid, params = f"{request_id}.s{d.round}", self._draw_params(d, overrides)
                live.append(rid)
            final: Any = None
            async for out in self._engine.generate(prompt, params, rid, **self._gen_kwargs):
                final = out
                self._watchdog.progress()
            if final is None:
                raise RuntimeError("vLLM returned no output")
            samples = [_sample(c, self._top_k) for c in final.outputs[: d.n]]
            if self._reasoning is not None:
                for sample in samples:
                    _split_reasoning(self._reasoning, sample)
            return len(ids), samples

        return await draw_checked(key, draw, self._response, policy)

    def _tokenize(self, req: EngineRequest) -> list[int]:
        if req.messages is not None:
            # The chat template rendered and tokenized once, as plan counts it.
            return chat_token_ids(self._tokenizer, req.messages, self._chat_template_kwargs)
        return list(self._tokenizer.encode(req.text or ""))

    def healthy(self) -> bool:
        return not self._engine.errored and not self._watchdog.hung

    def processes(self) -> list[tuple[int, float]]:
        """(pid, start time) of every process the engine started, for the driver to reap."""
        return [(p.pid, p.create_time()) for p in self._processes]

    def close(self) -> None:
        """Stop the engine and every process it started; none may outlive the actor."""
        if self._watchdog.hung:
            # A hung engine core may not answer a polite shutdown: end its processes first.
            _terminate(self._processes)
        try:
            self._engine.shutdown()
        finally:
            _terminate(self._processes)


def _sample(c: Any, top_k: int = 0) -> Sample:
    """One vLLM ``CompletionOutput`` as a Sample. Each position's logprob dict holds the
    sampled token (vLLM puts it in), so its logprob is the sampled one's; with
    ``logprobs=k`` it also holds the k best candidates, kept in ``top`` by rank."""
    tokens: list[tuple[int, str, float]] | None = None
    top: list[list[tuple[int, str, float]]] | None = None
    logprobs = getattr(c, "logprobs", None)  # None unless SamplingParams.logprobs is set
    if logprobs is not None:
        tokens = []
        top = [] if top_k > 0 else None
        for tid, position in zip(c.token_ids, logprobs, strict=False):
            lp = position.get(tid)
            if lp is None:  # no trace to align: the confidence becomes None
                tokens, top = None, None
                break
            tokens.append((int(tid), lp.decoded_token or "", float(lp.logprob)))
            if top is not None:
                ranked = sorted(position.items(), key=lambda kv: _rank(kv[1]))[:top_k]
                top.append([(int(t), x.decoded_token or "", float(x.logprob)) for t, x in ranked])
    return Sample(
        text=c.text,
        finish_reason=str(c.finish_reason),
        output_tokens=len(c.token_ids),
        cumulative_logprob=getattr(c, "cumulative_logprob", None),
        tokens=tokens,
        top=top,
    )


def _rank(lp: Any) -> int:
    rank = getattr(lp, "rank", None)
    return 1 << 30 if rank is None else int(rank)


def _reasoning_parser(name: str, tokenizer: Any, chat_template_kwargs: dict[str, Any]) -> Any:
    """vLLM's reasoning parser ``name`` (model.engine_args.reasoning_parser), built once."""
    try:
        from vllm.reasoning import ReasoningParserManager

        cls = ReasoningParserManager.get_reasoning_parser(name)
        try:
            return cls(tokenizer, chat_template_kwargs=chat_template_kwargs)
        except TypeError:  # parsers that take no template kwargs
            return cls(tokenizer)
    except Exception as exc:
        raise ConfigurationError(
            f"model.engine_args.reasoning_parser: vLLM has no usable parser {name!r} ({exc}); "
            "set it to one vLLM lists (vllm serve --help), or remove it"
        ) from exc


def _split_reasoning(parser: Any, sample: Sample) -> None:
    """Move the model's thinking out of ``sample.text`` into ``sample.reasoning``.

    A parser that fails leaves the whole text as the answer (logged): the check then
    judges the full text, which is the honest outcome.
    """
    text = sample.text
    try:
        reasoning, content = parser.extract_reasoning(text, None)
    except Exception as exc:
        log.warning("reasoning parser failed; keeping the whole text as the answer: %s", exc)
        return
    content = content or ""
    sample.reasoning = reasoning
    sample.text = content
    # exact when the answer is the text's tail (it is, after the end-of-thinking token)
    sample.offset = max(0, len(text) - len(content))


def _descendants(exclude: Sequence[Any] = ()) -> list[Any]:
    """This process's descendants, without those in ``exclude`` (same pid and start time)."""
    import psutil

    seen = set()
    for p in exclude:
        with contextlib.suppress(psutil.Error):
            seen.add((p.pid, p.create_time()))
    found = []
    for p in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if (p.pid, p.create_time()) not in seen:
                found.append(p)
    return found


def _terminate(processes: list[Any]) -> None:
    """SIGTERM, then SIGKILL, the processes still running (psutil checks pid reuse)."""
    import psutil

    alive = [p for p in processes if p.is_running()]
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, still = psutil.wait_procs(alive, timeout=5)
    for p in still:
        with contextlib.suppress(psutil.Error):
            p.kill()
