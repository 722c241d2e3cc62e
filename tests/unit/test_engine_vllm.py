"""The vLLM engine wrapper renders and tokenizes each prompt exactly once, and vLLM gets ids;
typed answers carry vLLM's constraint, are checked, and bad ones are drawn again.

Uses a stand-in for AsyncLLM and the tokenizer (no vllm import); the real engine runs in the
integration tests.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from batch.engine import Draw, EngineHung, EngineRequest, EngineResult, ResamplePolicy, Watchdog
from batch.engine.vllm import VLLMEngine, _sample, engine_arguments, sampling_kwargs
from batch.errors import ConfigurationError
from batch.response import Response
from batch.spec import JobSpec, parse_spec


class CountingTokenizer:
    def __init__(self) -> None:
        self.rendered = 0
        self.encoded = 0

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> str:
        assert kw == {"tokenize": False, "add_generation_prompt": True}
        self.rendered += 1
        return "<s>" + " ".join(m["content"] for m in messages) + "</s>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        self.encoded += 1
        return [len(w) for w in text.split()]


class StubAsyncLLM:
    """Records what reaches the engine; answers with 3 tokens."""

    def __init__(self) -> None:
        self.prompts: list[Any] = []

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        self.prompts.append(prompt)
        yield SimpleNamespace(
            outputs=[SimpleNamespace(text="ok", finish_reason="length", token_ids=[1, 2, 3])]
        )


class StubSamplingParams:
    """Stands for vllm.SamplingParams: keeps the keyword arguments it was built with."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.output_kind: Any = None
        self.verified: tuple[Any, ...] | None = None

    def verify(self, *args: Any) -> None:
        self.verified = args


def engine(tokenizer: Any, llm: Any, spec: JobSpec | None = None) -> VLLMEngine:
    """A VLLMEngine around stand-ins, set up as __init__ sets up a real one."""
    e = VLLMEngine.__new__(VLLMEngine)
    e.task = "generate"
    e._tokens_prompt = dict  # type: ignore[assignment]
    e._tokenizer = tokenizer
    e._engine = llm
    e.max_model_len = 64
    e._ids = itertools.count()
    e._watchdog = Watchdog(None)
    e._fatal = ()
    e._sampling_params = StubSamplingParams
    e._structured_params = SimpleNamespace
    e._final_only = "FINAL_ONLY"
    e._chat_template_kwargs = dict(spec.prompt.chat_template_kwargs) if spec else {}
    e._top_k = int(spec.sampling.logprobs or 0) if spec else 0
    e._reasoning = None
    e._gen_kwargs = {}
    if spec is None:
        e._response = None
        e._policy = ResamplePolicy(1, 0, 0.0, 0.8, None)
        e._kwargs = {}
        e._params = object()
    else:
        e._response = Response.from_spec(spec.response) if spec.response else None
        e._policy = ResamplePolicy.from_spec(spec)
        e._kwargs = sampling_kwargs(spec)
        e._params = e._draw_params(Draw(n=e._policy.n))
    return e


def test_each_prompt_is_rendered_and_tokenized_once_and_vllm_gets_the_ids() -> None:
    tok, llm = CountingTokenizer(), StubAsyncLLM()
    reqs = [
        EngineRequest(key=i, messages=({"role": "user", "content": f"row {i} text"},))
        for i in range(5)
    ]
    results = asyncio.run(engine(tok, llm).run(reqs))
    assert (tok.rendered, tok.encoded) == (5, 5)
    # vLLM received token ids, so it does not tokenize again; counts are the ones it saw
    assert all(set(p) == {"prompt_token_ids"} for p in llm.prompts)
    assert [r.input_tokens for r in results] == [len(p["prompt_token_ids"]) for p in llm.prompts]
    assert all(r.output_tokens == 3 and r.timings["finished_at"] > 0 for r in results)


def test_an_over_long_prompt_is_a_row_error_without_reaching_the_engine() -> None:
    tok, llm = CountingTokenizer(), StubAsyncLLM()
    long = EngineRequest(key=0, messages=({"role": "user", "content": "w " * 100},))
    (result,) = asyncio.run(engine(tok, llm).run([long]))
    assert result.error_kind == "PromptTooLong" and "max_model_len" in (result.error or "")
    assert llm.prompts == [] and tok.encoded == 1


# ---------------------------------------------------------------- per-row failures, aborts, hangs
# A stand-in AsyncLLM whose requests misbehave by the words in their prompt, as vLLM's would:
# "boom" raises a plain exception, "wrapped" raises the message-less wrapper vLLM's generate()
# puts around unexpected errors, "dead" the engine-dead error, "crash" kills the engine, "slow"
# takes 0.3s, "hang" never finishes, "serial" runs one at a time for 0.1s each.


class StubEngineDead(Exception):
    """Stands for vllm.v1.engine.exceptions.EngineDeadError."""


class StubGenerateError(Exception):
    """Stands for vLLM's EngineGenerateError: no message, the cause chained."""


class WordTokenizer:
    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> str:
        return " ".join(m["content"] for m in messages)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]

    def decode(self, ids: list[int]) -> str:
        words = {i: w for w, i in self.vocab.items()}
        return " ".join(words[i] for i in ids)


class MisbehavingAsyncLLM:
    def __init__(self, tokenizer: WordTokenizer) -> None:
        self.tokenizer = tokenizer
        self.errored = False
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.serial = asyncio.Lock()

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        words = self.tokenizer.decode(prompt["prompt_token_ids"]).split()
        self.running.add(request_id)
        try:
            if "boom" in words:
                raise RuntimeError("CUDA error: an illegal memory access")
            if "wrapped" in words:
                try:
                    raise KeyError("logits processor has no state for this request")
                except KeyError as exc:
                    raise StubGenerateError() from exc
            if "dead" in words:
                raise StubEngineDead("EngineCore encountered an issue")
            if "crash" in words:
                self.errored = True
                raise RuntimeError("output handler failed")
            if "slow" in words:
                await asyncio.sleep(0.3)
            if "hang" in words:
                await asyncio.Event().wait()
            if "serial" in words:
                async with self.serial:
                    await asyncio.sleep(0.1)
            yield SimpleNamespace(
                outputs=[SimpleNamespace(text="ok", finish_reason="stop", token_ids=[1])]
            )
        finally:
            self.running.discard(request_id)

    async def abort(self, request_ids: Any) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        self.aborted.extend(ids)
        self.running.difference_update(ids)


def misbehaving(timeout_s: float | None = 5.0) -> tuple[VLLMEngine, MisbehavingAsyncLLM]:
    tok = WordTokenizer()
    llm = MisbehavingAsyncLLM(tok)
    e = engine(tok, llm)  # type: ignore[arg-type]
    e._watchdog = Watchdog(timeout_s)
    e._fatal = (StubEngineDead,)  # what vllm.v1.engine.exceptions.EngineDeadError is to vLLM
    return e, llm


def rows(*texts: str) -> list[EngineRequest]:
    return [
        EngineRequest(key=i, messages=({"role": "user", "content": t},))
        for i, t in enumerate(texts)
    ]


def test_any_exception_raised_for_one_request_fails_only_that_row() -> None:
    e, _ = misbehaving()
    results = asyncio.run(e.run(rows("fine", "boom now", "wrapped", "fine too")))
    assert [r.key for r in results] == [0, 1, 2, 3]
    assert [r.error_kind for r in results] == [None, "RuntimeError", "KeyError", None]
    assert "illegal memory access" in (results[1].error or "")
    assert "no state" in (results[2].error or "")
    assert results[1].input_tokens == 2 and results[0].text == "ok"
    assert e.healthy()


def test_engine_dead_fails_the_chunk_and_aborts_its_other_requests() -> None:
    e, llm = misbehaving()

    async def go() -> None:
        with pytest.raises(StubEngineDead):
            await e.run(rows("slow one", "dead", "slow two"))
        # the chunk's siblings are out of the engine: its retry does not run beside them
        assert {"r0", "r2"} <= set(llm.aborted)
        assert llm.running == set()

    asyncio.run(go())


def test_any_error_once_the_engine_died_fails_the_chunk() -> None:
    e, _ = misbehaving()
    with pytest.raises(RuntimeError, match="output handler failed"):
        asyncio.run(e.run(rows("fine", "crash")))
    assert not e.healthy()


def test_a_cancelled_chunk_aborts_its_requests_in_the_engine() -> None:
    e, llm = misbehaving()

    async def go() -> None:
        task = asyncio.ensure_future(e.run(rows("slow a", "slow b", "fine")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert {"r0", "r1"} <= set(llm.aborted)
        assert llm.running == set()

    asyncio.run(go())


def test_a_hung_engine_fails_the_chunk_with_engine_hung_and_reports_unhealthy() -> None:
    e, llm = misbehaving(timeout_s=0.3)

    async def go() -> float:
        start = time.monotonic()
        with pytest.raises(EngineHung, match="chunk_timeout_s"):
            await asyncio.wait_for(e.run(rows("fine", "hang")), 5)  # not forever, if broken
        return time.monotonic() - start

    took = asyncio.run(go())
    assert 0.3 <= took < 2.0
    assert "r1" in llm.aborted and llm.running == set()
    assert not e.healthy()  # the actor replaces the engine


def test_chunks_queued_behind_others_are_not_hung_while_the_engine_progresses() -> None:
    # 10 requests of 0.1s each, one at a time: 1s in the engine, more than the 0.3s timeout,
    # but something finishes every 0.1s, so no chunk counts as hung.
    e, _ = misbehaving(timeout_s=0.3)

    async def go() -> list[list[EngineResult]]:
        a = rows(*["serial"] * 5)
        b = rows(*["serial"] * 5)
        return list(await asyncio.gather(e.run(a), e.run(b)))

    results = asyncio.run(go())
    assert all(r.error_kind is None for chunk in results for r in chunk)
    assert e.healthy()


def test_the_hang_clock_starts_when_an_idle_engine_gets_work() -> None:
    now = [0.0]
    dog = Watchdog(10.0, clock=lambda: now[0])
    now[0] = 100.0  # idle for a long time: not a hang
    assert dog.seconds_left() == 10.0
    with dog.request():
        now[0] = 105.0
        assert dog.seconds_left() == 5.0
        with dog.request():
            now[0] = 111.0
            assert dog.seconds_left() is not None and dog.seconds_left() <= 0  # type: ignore[operator]
        # the inner one finished: progress
        assert dog.seconds_left() == 10.0
    assert Watchdog(None).seconds_left() is None


# ---------------------------------------------------------------- typed answers (response:)


def job(response: str = "", **over: str) -> JobSpec:
    text = f"""
name: typed
input: {{path: /nowhere}}
output: {{path: /nowhere-out}}
model: {{path: m}}
prompt: {{template: "{{{{ text }}}}"}}
sampling: {{max_tokens: 32, seed: 7}}
{response}
"""
    return parse_spec(text, overrides=[f"{k}={v}" for k, v in over.items()])


CHOICE = "response: {choice: [positive, negative, mixed]}"


def test_without_response_the_sampling_and_engine_arguments_are_as_before() -> None:
    spec = job(**{"sampling.extra_args": "{presence_penalty: 0.5}"})
    assert sampling_kwargs(spec) == dict(
        max_tokens=32,
        temperature=0.0,
        top_p=1.0,
        top_k=-1,
        min_tokens=0,
        seed=7,
        stop=None,
        ignore_eos=False,
        repetition_penalty=1.0,
        presence_penalty=0.5,
    )
    assert "structured_outputs_config" not in engine_arguments(spec, "/m")
    params = engine(WordTokenizer(), StubAsyncLLM(), spec)._params
    assert params.kwargs == sampling_kwargs(spec)  # no n, no logprobs, no constraint
    assert params.output_kind == "FINAL_ONLY"


def test_a_typed_response_constrains_every_request_and_asks_logprobs_for_confidence() -> None:
    choice = job(CHOICE)
    assert sampling_kwargs(choice)["logprobs"] == 0  # the sampled token's, for the confidence
    assert "logprobs" not in sampling_kwargs(job(CHOICE.replace("}", ", confidence: false}")))
    assert "logprobs" not in sampling_kwargs(job("response: {regex: '[0-9]+'}"))
    enum = job("response: {fields: {sentiment: [a, b], summary: str}}")
    assert sampling_kwargs(enum)["logprobs"] == 0
    assert "logprobs" not in sampling_kwargs(job("response: {fields: {summary: str}}"))
    # whitespace-free xgrammar on the engine, unless the user configured it
    assert engine_arguments(choice, "/m")["structured_outputs_config"] == {
        "backend": "xgrammar",
        "disable_any_whitespace": True,
    }
    mine = job(CHOICE, **{"model.engine_args": "{structured_outputs_config: {backend: guidance}}"})
    assert engine_arguments(mine, "/m")["structured_outputs_config"] == {"backend": "guidance"}
    params = engine(WordTokenizer(), StubAsyncLLM(), enum)._params
    assert json.loads(json.dumps(params.kwargs["structured_outputs"].json))["required"] == [
        "sentiment",
        "summary",
    ]


class AnsweringAsyncLLM:
    """Answers each request id from a script: the text per draw, and its logprob."""

    def __init__(self, answers: dict[str, list[str]], slow_resamples: bool = False) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any]] = []
        self.errored = False
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.slow_resamples = slow_resamples

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        self.calls.append((request_id, params))
        base, _, draw = request_id.partition(".s")
        self.running.add(request_id)
        try:
            if draw and self.slow_resamples:
                await asyncio.Event().wait()
            text = self.answers[base][int(draw or 0)]
            yield SimpleNamespace(
                outputs=[
                    SimpleNamespace(
                        text=text,
                        finish_reason="stop",
                        token_ids=[1] * len(text),
                        cumulative_logprob=-0.25,
                        logprobs=None,
                    )
                ]
            )
        finally:
            self.running.discard(request_id)

    async def abort(self, request_ids: Any) -> None:
        self.aborted.extend(request_ids)
        self.running.difference_update(request_ids)


def test_a_bad_answer_is_drawn_again_as_its_own_request_and_sampled_not_greedy() -> None:
    llm = AnsweringAsyncLLM({"r0": ["maybe", "positive"], "r1": ["negative"]})
    e = engine(WordTokenizer(), llm, job(CHOICE))
    first, second = asyncio.run(e.run(rows("great phone", "awful phone")))
    assert sorted(c[0] for c in llm.calls) == ["r0", "r0.s1", "r1"]
    resample = next(p.kwargs for rid, p in llm.calls if rid == "r0.s1")
    assert resample["temperature"] == 0.8 and resample["seed"] == 8  # seed + round
    assert resample["structured_outputs"].choice == ["positive", "negative", "mixed"]
    assert llm.calls[0][1].kwargs["temperature"] == 0.0
    assert first.error_kind is None and first.values == {"label": "positive"}
    assert first.confidence["label_confidence"] == pytest.approx(math.exp(-0.25))
    assert (first.resamples, first.discarded_output_tokens) == (1, len("maybe"))
    assert first.discarded_input_tokens == first.input_tokens == 2
    assert first.output_tokens == len("positive") and first.text == "positive"
    assert (second.values, second.resamples, second.discarded_output_tokens) == (
        {"label": "negative"},
        0,
        0,
    )


def test_a_row_still_invalid_after_max_resamples_is_a_schema_violation_with_its_text() -> None:
    llm = AnsweringAsyncLLM({"r0": ["maybe", "perhaps", "dunno"]})
    (result,) = asyncio.run(engine(WordTokenizer(), llm, job(CHOICE)).run(rows("meh")))
    assert result.error_kind == "SchemaViolation"
    assert "after 2 re-samples" in (result.error or "") and "dunno" in (result.error or "")
    assert result.text == "dunno" and result.values is None
    assert result.resamples == 2 and result.discarded_output_tokens == 5 + 7 + 5
    assert [c[0] for c in llm.calls] == ["r0", "r0.s1", "r0.s2"]


def test_cancelling_a_chunk_during_a_resample_aborts_the_resample_request() -> None:
    llm = AnsweringAsyncLLM({"r0": ["maybe", "positive"]}, slow_resamples=True)
    e = engine(WordTokenizer(), llm, job(CHOICE))

    async def go() -> None:
        task = asyncio.ensure_future(e.run(rows("meh")))
        await asyncio.sleep(0.05)
        assert "r0.s1" in llm.running
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert "r0.s1" in llm.aborted and llm.running == set()

    asyncio.run(go())


class BudgetTokenizer(WordTokenizer):
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(range(len(text)))  # one token per character


def test_a_schema_vllm_refuses_or_an_answer_that_cannot_fit_fails_at_engine_start() -> None:
    class Refusing(StubSamplingParams):
        def verify(self, *args: Any) -> None:
            raise ValueError("The provided JSON schema contains features not supported")

    llm = SimpleNamespace(
        model_config="mc", vllm_config=SimpleNamespace(structured_outputs_config="soc")
    )
    spec = job("response: {fields: {sentiment: [positive, negative], summary: str}}")
    e = engine(BudgetTokenizer(), llm, spec)
    e._verify(KeyError, 40)  # the skeleton {"sentiment":"positive","summary":""} fits 40
    e._sampling_params = Refusing
    with pytest.raises(ConfigurationError, match=r"^response: vLLM cannot constrain"):
        e._verify(KeyError, 32)
    e._sampling_params = StubSamplingParams
    with pytest.raises(ConfigurationError, match=r"sampling.max_tokens to at least 38"):
        e._verify(KeyError, 20)


# ---------------------------------------------------------------- n > 1, logprobs, reasoning


def lp(logprob: float, rank: int, token: str) -> Any:
    return SimpleNamespace(logprob=logprob, rank=rank, decoded_token=token)


class ManyAsyncLLM:
    """Answers each draw of a request with one output per text in its script."""

    def __init__(self, answers: dict[str, list[list[str]]], slow: bool = False) -> None:
        self.answers = answers
        self.calls: list[tuple[str, Any, dict[str, Any]]] = []
        self.errored = False
        self.running: set[str] = set()
        self.aborted: list[str] = []
        self.slow = slow

    async def generate(
        self, prompt: Any, params: Any, request_id: str, **kw: Any
    ) -> AsyncIterator[Any]:
        self.calls.append((request_id, params, kw))
        base, _, draw = request_id.partition(".s")
        self.running.add(request_id)
        try:
            if self.slow:
                await asyncio.Event().wait()
            texts = self.answers[base][int(draw or 0)]
            yield SimpleNamespace(
                outputs=[
                    SimpleNamespace(
                        text=t,
                        finish_reason="stop",
                        token_ids=[1] * len(t),
                        cumulative_logprob=-0.1,
                        logprobs=None,
                    )
                    for t in texts
                ]
            )
        finally:
            self.running.discard(request_id)

    async def abort(self, request_ids: Any) -> None:
        self.aborted.extend(request_ids)
        self.running.difference_update(request_ids)


def test_n_samples_per_row_and_a_resample_asks_only_for_the_missing_ones() -> None:
    llm = ManyAsyncLLM({"r0": [["positive", "maybe", "negative"], ["mixed"]]})
    spec = job(CHOICE, **{"sampling.n": "3", "sampling.temperature": "0.7"})
    (result,) = asyncio.run(engine(WordTokenizer(), llm, spec).run(rows("meh")))
    assert [(rid, p.kwargs.get("n", 1)) for rid, p, _ in llm.calls] == [("r0", 3), ("r0.s1", 1)]
    assert result.error_kind is None and result.resamples == 1
    # every slot keeps its place: the re-sampled answer fills the one that failed
    assert [s.values for s in result.samples] == [
        {"label": "positive"},
        {"label": "mixed"},
        {"label": "negative"},
    ]
    assert result.output_tokens == len("positive") + len("mixed") + len("negative")
    assert result.discarded_output_tokens == len("maybe")


def test_one_sample_still_invalid_makes_the_whole_row_a_schema_violation() -> None:
    llm = ManyAsyncLLM({"r0": [["positive", "maybe"], ["nope"], ["nah"]]})
    spec = job(CHOICE, **{"sampling.n": "2", "sampling.temperature": "0.7"})
    (result,) = asyncio.run(engine(WordTokenizer(), llm, spec).run(rows("meh")))
    assert result.error_kind == "SchemaViolation" and result.text == "nah"
    assert result.samples == [] and result.values is None
    # the valid answer is paid for too
    assert result.discarded_output_tokens == len("maybe") + 4 + 3 + len("positive")


def test_without_response_n_samples_come_back_as_they_are() -> None:
    llm = ManyAsyncLLM({"r0": [["one answer", "another"]]})
    spec = job(**{"sampling.n": "2", "sampling.temperature": "0.7"})
    (result,) = asyncio.run(engine(WordTokenizer(), llm, spec).run(rows("meh")))
    assert [s.text for s in result.samples] == ["one answer", "another"]
    assert result.text == "one answer" and result.output_tokens == 10 + 7
    assert llm.calls[0][1].kwargs["n"] == 2 and "logprobs" not in llm.calls[0][1].kwargs


def test_cancelling_a_chunk_of_n_sample_rows_aborts_every_request() -> None:
    llm = ManyAsyncLLM({"r0": [["a", "b"]], "r1": [["c", "d"]]}, slow=True)
    spec = job(**{"sampling.n": "2", "sampling.temperature": "0.7"})
    e = engine(WordTokenizer(), llm, spec)

    async def go() -> None:
        task = asyncio.ensure_future(e.run(rows("x", "y")))
        await asyncio.sleep(0.05)
        assert llm.running == {"r0", "r1"}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert sorted(llm.aborted) == ["r0", "r1"] and llm.running == set()

    asyncio.run(go())


def test_sampling_logprobs_are_asked_for_and_kept_per_token_sorted_by_rank() -> None:
    spec = job(**{"sampling.logprobs": "2"})
    assert sampling_kwargs(spec)["logprobs"] == 2
    assert sampling_kwargs(job(CHOICE, **{"sampling.logprobs": "3"}))["logprobs"] == 3
    output = SimpleNamespace(
        text="Hi!",
        finish_reason="stop",
        token_ids=[5, 9],
        cumulative_logprob=-1.5,
        # the sampled token 9 is not in the top 2 at the second position (rank 3)
        logprobs=[
            {7: lp(-2.0, 2, "Yo"), 5: lp(-0.2, 1, "Hi")},
            {9: lp(-1.3, 3, "!"), 4: lp(-0.9, 2, "."), 3: lp(-0.6, 1, "?")},
        ],
    )
    s = _sample(output, top_k=2)
    assert s.tokens == [(5, "Hi", -0.2), (9, "!", -1.3)]
    assert s.top == [[(5, "Hi", -0.2), (7, "Yo", -2.0)], [(3, "?", -0.6), (4, ".", -0.9)]]
    assert _sample(output).top is None  # logprobs=0 (confidence only): no candidates


def test_kept_logprobs_survive_into_the_result_and_are_dropped_otherwise() -> None:
    class LogprobLLM(ManyAsyncLLM):
        async def generate(
            self, prompt: Any, params: Any, request_id: str, **kw: Any
        ) -> AsyncIterator[Any]:
            yield SimpleNamespace(
                outputs=[
                    SimpleNamespace(
                        text="positive",
                        finish_reason="stop",
                        token_ids=[1],
                        cumulative_logprob=-0.1,
                        logprobs=[{1: lp(-0.1, 1, "positive"), 2: lp(-2.4, 2, "negative")}],
                    )
                ]
            )

    kept = job(CHOICE, **{"sampling.logprobs": "2"})
    (r,) = asyncio.run(engine(WordTokenizer(), LogprobLLM({}), kept).run(rows("x")))
    assert r.samples[0].tokens == [(1, "positive", -0.1)]
    assert r.samples[0].top == [[(1, "positive", -0.1), (2, "negative", -2.4)]]
    (r,) = asyncio.run(engine(WordTokenizer(), LogprobLLM({}), job(CHOICE)).run(rows("x")))
    assert r.samples[0].tokens is None and r.samples[0].top is None


class TemplateTokenizer(WordTokenizer):
    def __init__(self) -> None:
        super().__init__()
        self.kwargs: list[dict[str, Any]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: Any) -> str:
        self.kwargs.append(kw)
        return " ".join(m["content"] for m in messages)


def test_the_prompt_is_rendered_with_prompt_chat_template_kwargs() -> None:
    tok = TemplateTokenizer()
    spec = job(**{"prompt.chat_template_kwargs": "{enable_thinking: false}"})
    llm = ManyAsyncLLM({"r0": [["ok"]]})
    asyncio.run(engine(tok, llm, spec).run(rows("hello")))
    assert tok.kwargs == [
        {"tokenize": False, "add_generation_prompt": True, "enable_thinking": False}
    ]
    assert llm.calls[0][2] == {}  # no reasoning parser: generate gets no extra arguments


class ThinkParser:
    def extract_reasoning(self, text: str, request: Any) -> tuple[str | None, str | None]:
        head, sep, tail = text.partition("</think>")
        return (head.removeprefix("<think>"), tail) if sep else (None, text)


class BrokenParser:
    def extract_reasoning(self, text: str, request: Any) -> tuple[str | None, str | None]:
        raise IndexError("no end token")


def test_a_reasoning_parser_splits_the_thinking_from_the_checked_answer() -> None:
    llm = ManyAsyncLLM({"r0": [["<think>it is good</think>positive"]]})
    e = engine(WordTokenizer(), llm, job(CHOICE))
    e._reasoning = ThinkParser()
    e._gen_kwargs = {"reasoning_parser_kwargs": {"chat_template_kwargs": {}}}
    (r,) = asyncio.run(e.run(rows("x")))
    assert r.error_kind is None and r.values == {"label": "positive"} and r.text == "positive"
    (s,) = r.samples
    assert s.reasoning == "it is good" and s.offset == len("<think>it is good</think>")
    assert s.output_tokens == len("<think>it is good</think>positive")
    assert llm.calls[0][2] == {"reasoning_parser_kwargs": {"chat_template_kwargs": {}}}


def test_a_failing_reasoning_parser_keeps_the_whole_text_and_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    llm = ManyAsyncLLM({"r0": [["<think>hmm positive"]]})
    e = engine(WordTokenizer(), llm, job())
    e._reasoning = BrokenParser()
    with caplog.at_level("WARNING", logger="batch.engine.vllm"):
        (r,) = asyncio.run(e.run(rows("x")))
    assert r.error_kind is None and r.text == "<think>hmm positive"
    assert r.samples[0].reasoning is None and r.samples[0].offset == 0
    assert "reasoning parser failed" in caplog.text


# ---------------------------------------------------------------- memory on the CPU


def test_a_cpu_job_gets_a_fixed_kv_cache_unless_it_sizes_memory_itself() -> None:
    """On the CPU, vLLM's share-of-host-memory sizing refused to start two engines at once (CI:
    "Engine core initialization failed"); a CPU job now asks for a fixed KV cache instead, and
    a job that sets either memory argument keeps exactly what it set."""
    default = engine_arguments(job(**{"resources.device": "cpu"}), "/m")
    assert default["kv_cache_memory_bytes"] == 1 << 30
    assert "gpu_memory_utilization" not in default
    share = engine_arguments(
        job(**{"model.engine_args": "{gpu_memory_utilization: 0.3}"}), "/m"
    )
    assert share["gpu_memory_utilization"] == 0.3 and "kv_cache_memory_bytes" not in share
    fixed = engine_arguments(job(**{"model.engine_args": "{kv_cache_memory_bytes: 123}"}), "/m")
    assert fixed["kv_cache_memory_bytes"] == 123
    gpu = engine_arguments(job(**{"resources.device": "gpu"}), "/m")
    assert "kv_cache_memory_bytes" not in gpu and "gpu_memory_utilization" not in gpu


def test_the_engine_reaps_only_the_processes_it_started() -> None:
    """An engine built inside a process that already has children (a test run with its S3
    server, a user's program) must not count them as its own: close() SIGTERMed them (the
    suite's SeaweedFS shut down during test_engine_rows)."""
    import subprocess

    from batch.engine.vllm import _descendants

    older = subprocess.Popen(["sleep", "30"])
    try:
        before = _descendants()
        newer = subprocess.Popen(["sleep", "30"])
        try:
            assert [p.pid for p in _descendants(exclude=before)] == [newer.pid]
        finally:
            newer.kill()
            newer.wait()
    finally:
        older.kill()
        older.wait()
