"""The vLLM engine wrapper renders and tokenizes each prompt exactly once, and vLLM gets ids.

Uses a stand-in for AsyncLLM and the tokenizer (no vllm import); the real engine runs in the
integration tests.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest

from batch.engine import EngineHung, EngineRequest, EngineResult, Watchdog
from batch.engine.vllm import VLLMEngine


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


def engine(tokenizer: CountingTokenizer, llm: StubAsyncLLM) -> VLLMEngine:
    e = VLLMEngine.__new__(VLLMEngine)
    e.task = "generate"
    e._tokens_prompt = dict  # type: ignore[assignment]
    e._tokenizer = tokenizer
    e._engine = llm
    e.max_model_len = 64
    e._ids = itertools.count()
    e._params = object()
    e._watchdog = Watchdog(None)
    e._fatal = ()
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
