"""The vLLM engine wrapper renders and tokenizes each prompt exactly once, and vLLM gets ids.

Uses a stand-in for AsyncLLM and the tokenizer (no vllm import); the real engine runs in the
integration tests.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

from batch.engine import EngineRequest
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
