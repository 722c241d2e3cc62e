"""The fake engine's fault options behave as the tests built on them assume (no Ray, no vLLM).

The retry, resume and kill tests read their verdicts off these faults: rows that fail at
random and differently on every attempt, a per-row exception that must stay a row error,
an engine that hangs until it is declared hung, and sampling that differs per attempt.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from batch.engine import EngineHung, EngineRequest, EngineResult
from batch.engine.fake import FakeEngine, FakeEngineCrash
from batch.spec import JobSpec, parse_spec


def spec(options: dict[str, object], **over: str) -> JobSpec:
    text = f"""
name: fake-engine
input: {{path: /nowhere}}
output: {{path: /nowhere-out}}
model: {{path: m, engine: fake, fake_options: {json.dumps(options)}}}
prompt: {{template: "{{{{ text }}}}"}}
sampling: {{max_tokens: 6}}
"""
    return parse_spec(text, overrides=[f"{k}={v}" for k, v in over.items()])


def rows(*texts: str) -> list[EngineRequest]:
    return [
        EngineRequest(key=i, messages=({"role": "user", "content": t},))
        for i, t in enumerate(texts)
    ]


def run(engine: FakeEngine, requests: list[EngineRequest]) -> list[EngineResult]:
    return asyncio.run(asyncio.wait_for(engine.run(requests), 10))


def test_row_error_rate_fails_rows_at_random_and_differently_on_every_attempt() -> None:
    engine = FakeEngine(spec({"row_error_rate": 0.5}))
    requests = rows(*[f"row number {i} says hello" for i in range(200)])
    failed = [
        {r.key for r in run(engine, requests) if r.error_kind == "EngineError"} for _ in range(2)
    ]
    assert all(40 < len(f) < 160 for f in failed)  # about half, not none nor all
    assert failed[0] != failed[1]  # a retry splits the rows differently
    assert FakeEngine(spec({"row_error_rate": 0})).healthy()


def test_a_row_that_raises_becomes_that_rows_error_and_the_chunk_goes_on() -> None:
    engine = FakeEngine(spec({"raise_row_exception_on_text": "poison"}))
    results = run(engine, rows("good row here", "a poison row", "another good one"))
    assert [r.error_kind for r in results] == [None, "FakeRowException", None]
    assert "poison" in (results[1].error or "")
    assert results[0].text and results[2].text
    assert engine.healthy()


def test_a_hanging_chunk_is_declared_hung_after_chunk_timeout_s_and_aborted() -> None:
    engine = FakeEngine(spec({"hang_on_text": "stuck"}, **{"resources.chunk_timeout_s": "0.3"}))
    assert run(engine, rows("fine row"))[0].error_kind is None

    async def go() -> float:
        start = time.monotonic()
        with pytest.raises(EngineHung, match="chunk_timeout_s"):
            await asyncio.wait_for(engine.run(rows("fine", "stuck here")), 10)
        return time.monotonic() - start

    assert 0.3 <= asyncio.run(go()) < 5
    assert engine.aborted == [0, 1]
    assert not engine.healthy()  # the actor must replace it


def test_a_hanging_chunk_hangs_until_cancelled_without_a_timeout() -> None:
    engine = FakeEngine(spec({"hang_on_text": "stuck"}, **{"resources.chunk_timeout_s": "null"}))
    with pytest.raises(TimeoutError):
        run_briefly = asyncio.wait_for(engine.run(rows("stuck")), 0.5)
        asyncio.run(run_briefly)
    assert engine.aborted == [0]  # cancelled: its requests were aborted
    assert engine.healthy()  # nobody declared it hung


def test_sampling_with_temperature_differs_per_attempt_and_greedy_does_not() -> None:
    requests = rows("the quick brown fox jumps over the lazy dog")
    hot = FakeEngine(spec({}, **{"sampling.temperature": "0.8"}))
    a, b = run(hot, requests)[0], run(hot, requests)[0]
    assert a.text != b.text
    assert a.output_tokens == b.output_tokens == 4 == len((a.text or "").split())
    greedy = FakeEngine(spec({}))
    assert run(greedy, requests)[0].text == run(greedy, requests)[0].text


def test_the_older_options_still_work() -> None:
    engine = FakeEngine(
        spec({"fail_rows_containing": "bad", "max_model_len": 10, "crash_on_text": "kaboom"})
    )
    results = run(engine, rows("ok row", "bad row", "w " * 20))
    assert [r.error_kind for r in results] == [None, "EngineError", "PromptTooLong"]
    with pytest.raises(FakeEngineCrash):
        run(engine, rows("ok", "kaboom"))
    assert engine.healthy()  # a crash fails the chunk; the fake engine itself lives on
