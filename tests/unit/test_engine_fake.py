"""The fake engine's fault options behave as the tests built on them assume (no Ray, no vLLM).

The retry, resume and kill tests read their verdicts off these faults: rows that fail at
random and differently on every attempt, a per-row exception that must stay a row error,
an engine that hangs until it is declared hung, and sampling that differs per attempt.
Typed answers (``response:``) are valid and deterministic, and its violation options drive
the check-and-resample loop the way a real engine's cut-off answers would.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from batch.engine import EngineHung, EngineRequest, EngineResult
from batch.engine.fake import FakeEngine, FakeEngineCrash
from batch.spec import JobSpec, parse_spec


def spec(options: dict[str, object], response: str = "", **over: str) -> JobSpec:
    text = f"""
name: fake-engine
input: {{path: /nowhere}}
output: {{path: /nowhere-out}}
model: {{path: m, engine: fake, fake_options: {json.dumps(options)}}}
prompt: {{template: "{{{{ text }}}}"}}
sampling: {{max_tokens: 6}}
{response}
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


# ---------------------------------------------------------------- typed answers (response:)

FIELDS = "response: {fields: {sentiment: [positive, negative, mixed], summary: str, stars: int}}"
REVIEWS = [f"review {i}: the phone number {i} is {'good ' * (i % 4)}fine" for i in range(30)]


def typed(options: dict[str, object], response: str = FIELDS, **over: str) -> FakeEngine:
    return FakeEngine(spec(options, response, **{"sampling.max_tokens": "64", **over}))


def test_typed_answers_are_valid_deterministic_and_varied() -> None:
    engine = typed({})
    results = run(engine, rows(*REVIEWS))
    assert all(r.error_kind is None and r.resamples == 0 for r in results)
    for r in results:
        assert r.values is not None and set(r.values) == {"sentiment", "summary", "stars"}
        assert r.values["sentiment"] in ("positive", "negative", "mixed")
        assert isinstance(r.values["stars"], int) and isinstance(r.values["summary"], str)
        assert json.loads(r.text or "") == r.values  # the text is the answer
        p = r.confidence["sentiment_confidence"]
        assert p is not None and 0 < p <= 1
    assert len({r.values["sentiment"] for r in results if r.values}) == 3
    assert len({r.confidence["sentiment_confidence"] for r in results}) > 3
    again = run(typed({}), rows(*REVIEWS))
    assert [r.values for r in again] == [r.values for r in results]


def test_a_row_cut_off_once_is_valid_after_one_resample_and_the_waste_is_counted() -> None:
    engine = typed({"violate_on_text": "number 3 ", "violate_draws": 1})
    results = run(engine, rows(*REVIEWS[:6]))
    assert [r.resamples for r in results] == [0, 0, 0, 1, 0, 0]
    cut = results[3]
    assert cut.error_kind is None and cut.values is not None
    assert cut.discarded_output_tokens == 64  # the cut-off answer ran to max_tokens
    assert cut.discarded_input_tokens == cut.input_tokens > 0
    assert all(r.discarded_output_tokens == 0 for i, r in enumerate(results) if i != 3)


def test_a_row_invalid_on_every_draw_is_a_schema_violation_with_its_last_answer() -> None:
    engine = typed({"violation_rate": 1})
    (result,) = run(engine, rows(REVIEWS[0]))
    assert result.error_kind == "SchemaViolation" and result.values is None
    assert "cut off at sampling.max_tokens" in (result.error or "")
    assert "after 2 re-samples" in (result.error or "")
    assert result.text and json.loads(json.dumps(result.text))  # the truncated answer, kept
    assert result.resamples == 2 and result.discarded_output_tokens == 3 * 64
    zero = typed({"violation_rate": 1}, FIELDS.replace("}}", "}, max_resamples: 0}"))
    (result,) = run(zero, rows(REVIEWS[0]))
    assert "after 0 re-samples" in (result.error or "") and result.resamples == 0


def test_an_answer_longer_than_max_tokens_is_cut_off_as_on_vllm() -> None:
    engine = typed({}, **{"sampling.max_tokens": "3"})  # 12 characters: no JSON answer fits
    results = run(engine, rows(*REVIEWS[:3]))
    assert [r.error_kind for r in results] == ["SchemaViolation"] * 3
    assert all("raise sampling.max_tokens" in (r.error or "") for r in results)


def test_choice_gives_a_listed_label_with_a_varying_confidence() -> None:
    engine = typed({}, "response: {choice: [keep, drop], column: answer}")
    results = run(engine, rows(*REVIEWS))
    assert {r.values["answer"] for r in results if r.values} == {"keep", "drop"}
    confidences = [r.confidence["answer_confidence"] for r in results]
    assert all(p is not None and 0 < p <= 1 for p in confidences)
    assert len(set(confidences)) > 1


def test_regex_jobs_answer_with_regex_answer() -> None:
    engine = typed({"regex_answer": "A-123"}, "response: {regex: '[A-Z]-[0-9]+'}")
    (good,) = run(engine, rows(REVIEWS[0]))
    assert good.values == {"match": "A-123"} and good.error_kind is None
    wrong = typed({"regex_answer": "nope"}, "response: {regex: '[A-Z]-[0-9]+'}")
    (bad,) = run(wrong, rows(REVIEWS[0]))
    assert bad.error_kind == "SchemaViolation" and bad.text == "nope"


def test_sampled_typed_answers_differ_per_attempt_and_stay_valid() -> None:
    engine = typed({}, **{"sampling.temperature": "0.8"})
    a, b = (run(engine, rows(*REVIEWS[:10])) for _ in range(2))
    assert all(r.error_kind is None for r in a + b)
    assert [r.text for r in a] != [r.text for r in b]


def test_without_response_no_typed_values_and_nothing_resampled() -> None:
    (r,) = run(FakeEngine(spec({"violation_rate": 1})), rows("the quick brown fox"))
    assert r.error_kind is None and r.text == "the quick"
    assert (r.values, r.resamples, r.discarded_output_tokens) == (None, 0, 0)


# ---------------------------------------------------------------- n > 1, logprobs, reasoning


def test_n_samples_per_row_differ_when_sampled_and_plain_rows_keep_their_text() -> None:
    requests = rows("the quick brown fox jumps over the lazy dog")
    (r,) = run(FakeEngine(spec({}, **{"sampling.n": "3", "sampling.temperature": "0.8"})), requests)
    assert len(r.samples) == 3 and len({s.text for s in r.samples}) == 3
    assert r.text == r.samples[0].text and r.output_tokens == 3 * 4
    (one,) = run(FakeEngine(spec({})), requests)
    assert one.text == "the quick brown fox" and len(one.samples) == 1
    assert one.samples[0].tokens is None and one.samples[0].top is None


def test_typed_n_samples_are_each_valid_and_a_cut_one_is_redrawn_alone() -> None:
    hot = {"sampling.n": "3", "sampling.temperature": "0.8"}
    engine = typed({"violate_on_text": "number 2 ", "violate_draws": 1}, **hot)
    results = run(engine, rows(*REVIEWS[:4]))
    assert all(r.error_kind is None and len(r.samples) == 3 for r in results)
    assert all(s.values is not None for r in results for s in r.samples)
    assert [r.resamples for r in results] == [0, 0, 1, 0]
    assert results[2].discarded_output_tokens == 64  # only the one cut answer was thrown away
    bad = typed({"violation_rate": 1}, **hot)
    (r,) = run(bad, rows(REVIEWS[0]))
    assert r.error_kind == "SchemaViolation" and r.samples == []


def test_sampling_logprobs_gives_k_ranked_candidates_per_token() -> None:
    (r,) = run(FakeEngine(spec({}, **{"sampling.logprobs": "3"})), rows("one two three four"))
    (s,) = r.samples
    assert s.tokens is not None and s.top is not None
    assert "".join(t for _, t, _ in s.tokens) == r.text and len(s.top) == len(s.tokens) == 2
    for token, candidates in zip(s.tokens, s.top, strict=True):
        assert len(candidates) == 3 and candidates[0] == token
        assert [c[2] for c in candidates] == sorted((c[2] for c in candidates), reverse=True)
    (t,) = run(typed({}, **{"sampling.logprobs": "2"}), rows(REVIEWS[0]))
    assert t.samples[0].top is not None and t.samples[0].tokens is not None


def test_the_reasoning_option_splits_the_thinking_off_the_checked_answer() -> None:
    (plain,) = run(FakeEngine(spec({"reasoning": True})), rows("one two three four"))
    assert plain.text == "one two" and plain.samples[0].reasoning == "fake"
    assert plain.output_tokens == 2 + 3  # the thinking is generated, so it is paid for
    engine = typed({"reasoning": True}, "response: {choice: [keep, drop], column: answer}")
    results = run(engine, rows(*REVIEWS[:8]))
    assert all(r.error_kind is None and r.values for r in results)
    assert all(r.text in ("keep", "drop") and r.samples[0].reasoning == "fake" for r in results)
    confidences = [r.confidence["answer_confidence"] for r in results]
    assert all(p is not None and 0 < p <= 1 for p in confidences)
