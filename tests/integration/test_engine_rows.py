"""The vLLM engine's failure handling on real vLLM (CPU), in process, without Ray.

One engine, three situations a user meets: a request vLLM itself rejects fails only its row
(vLLM 0.32 raises ``VLLMValidationError``, not a ``ValueError``); a cancelled chunk leaves no
request behind in the engine; an engine that finishes nothing for ``chunk_timeout_s`` raises
``EngineHung``, drops the chunk's requests and reports itself unhealthy. And typed answers:
a JSON schema gives valid JSON, a choice a listed label with its probability.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from batch.engine import Draw, EngineHung, EngineRequest, ResamplePolicy, Watchdog
from batch.response import Response
from batch.spec import JobSpec, parse_spec


def rows(*texts: str) -> list[EngineRequest]:
    return [
        EngineRequest(key=i, messages=({"role": "user", "content": t},))
        for i, t in enumerate(texts)
    ]


ARGS = {"max_model_len": 1024, "enforce_eager": True, "dtype": "bfloat16"}
SPEC = f"""
name: engine-rows
input: {{path: /unused}}
output: {{path: /unused-out}}
model: {{path: m, engine_args: {json.dumps(ARGS)}}}
prompt: {{template: "{{{{ text }}}}"}}
sampling: {{max_tokens: 8}}
resources: {{chunk_timeout_s: null}}
"""


def test_real_vllm_row_errors_aborts_and_hangs(demo_models: dict[str, Path]) -> None:
    from batch.engine.vllm import VLLMEngine

    spec = parse_spec(SPEC)
    engine = VLLMEngine(spec, str(demo_models["smollm2-135m-instruct"]))
    llm = engine._engine
    try:
        asyncio.run(scenario(engine, llm))  # one event loop: vLLM's output handler lives in it
    finally:
        engine.close()
    assert all(not p.is_running() for p in engine._processes)


async def scenario(engine: Any, llm: Any) -> None:
    from batch.engine.vllm import sampling_kwargs

    # A row whose token ids vLLM rejects (out of vocabulary): that row's error only.
    tokenize = engine._tokenize

    def bad_ids_for_oov(req: EngineRequest) -> list[int]:
        ids = tokenize(req)
        return [-1, *ids] if "OOV" in str(req.messages) else ids

    engine._tokenize = bad_ids_for_oov
    results = await engine.run(rows("Say hello.", "OOV Say hi.", "Name a colour."))
    assert [r.error_kind for r in results] == [None, "VLLMValidationError", None]
    assert "vocabulary" in (results[1].error or "")
    assert results[0].output_tokens > 0 and results[2].output_tokens > 0
    assert engine.healthy()
    engine._tokenize = tokenize

    # sampling.n: 2 at temperature 0.7 gives two answers per row; cancelling such a chunk
    # leaves none of vLLM's per-sample child requests behind.
    first = engine._params, engine._policy, engine._kwargs
    two = parse_spec(
        SPEC.replace("max_tokens: 8", "max_tokens: 16, n: 2, temperature: 0.7, seed: 3")
    )
    engine._policy = ResamplePolicy.from_spec(two)
    engine._kwargs = sampling_kwargs(two)
    engine._params = engine._draw_params(Draw(n=2))
    results = await engine.run(rows("Name a fruit.", "Name a city."))
    assert all(r.error_kind is None and len(r.samples) == 2 for r in results)
    assert all(s.text and s.output_tokens > 0 for r in results for s in r.samples)
    assert any(r.samples[0].text != r.samples[1].text for r in results)
    assert all(r.output_tokens == sum(s.output_tokens for s in r.samples) for r in results)
    engine._params.max_tokens = 900
    engine._params.ignore_eos = True
    task = asyncio.ensure_future(engine.run(rows("Tell a long story.", "Write a long poem.")))
    await asyncio.sleep(1.0)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)
    assert llm.output_processor.get_num_unfinished_requests() == 0
    engine._params, engine._policy, engine._kwargs = first

    # Long generations from here on, so a chunk is still running when it is stopped.
    engine._params.max_tokens = 900
    engine._params.ignore_eos = True
    chunk = rows("Tell a long story.", "Write a long poem.")

    task = asyncio.ensure_future(engine.run(chunk))
    await asyncio.sleep(1.0)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)
    # nothing left running in the engine beside the chunk's retry
    assert llm.output_processor.get_num_unfinished_requests() == 0

    # Final-only outputs: nothing finishes during a long generation, so with a short timeout
    # the engine counts as hung.
    engine._watchdog = Watchdog(1.0)
    start = time.monotonic()
    with pytest.raises(EngineHung):
        await engine.run(chunk)
    assert 1.0 <= time.monotonic() - start < 10
    await asyncio.sleep(0.5)
    assert llm.output_processor.get_num_unfinished_requests() == 0
    assert not engine.healthy()  # the actor restarts with a fresh engine


REVIEWS = [
    "Battery lasts two days and the screen is bright. Love it.",
    "Stopped charging after a week. Support never answered.",
    "Good camera, but the case cracked in a month.",
]


def typed_spec(response: str) -> JobSpec:
    args = {"max_model_len": 1024, "enforce_eager": True, "dtype": "bfloat16"}
    return parse_spec(
        f"""
name: engine-typed
input: {{path: /unused}}
output: {{path: /unused-out}}
model: {{path: m, engine_args: {json.dumps(args)}}}
prompt: {{template: "{{{{ text }}}}"}}
sampling: {{max_tokens: 64}}
response: {response}
resources: {{chunk_timeout_s: null}}
"""
    )


def test_real_vllm_typed_answers(demo_models: dict[str, Path]) -> None:
    from batch.engine.vllm import VLLMEngine

    schema = typed_spec(
        "{fields: {sentiment: [positive, negative, mixed], "
        "summary: {type: string, maxLength: 60}}, max_resamples: 2}"
    )
    engine = VLLMEngine(schema, str(demo_models["smollm2-135m-instruct"]))  # verifies at start
    try:
        asyncio.run(typed_scenario(engine, schema))
    finally:
        engine.close()


def typed_requests(response: Response) -> list[EngineRequest]:
    return [
        EngineRequest(
            key=i,
            messages=({"role": "user", "content": f"Review: {t}\n\n{response.instruction()}"},),
        )
        for i, t in enumerate(REVIEWS)
    ]


async def typed_scenario(engine: Any, schema: JobSpec) -> None:
    response = engine._response
    results = await engine.run(typed_requests(response))
    valid = [r for r in results if r.error_kind is None]
    assert len(valid) >= 2, [(r.error_kind, r.error, r.text) for r in results]
    for r in valid:
        doc = json.loads(r.text)
        jsonschema.validate(doc, response.schema)
        assert r.values == doc and r.values["sentiment"] in ("positive", "negative", "mixed")
    assert all(r.error_kind in (None, "SchemaViolation") for r in results)

    # The same engine, asked for a choice (the constraint is per request).
    choice = typed_spec("{choice: [positive, negative, mixed]}")
    assert choice.response is not None
    from batch.engine.vllm import sampling_kwargs

    engine._response = Response.from_spec(choice.response)
    engine._policy = ResamplePolicy.from_spec(choice)
    engine._kwargs = sampling_kwargs(choice)
    engine._params = engine._draw_params(Draw(n=1))
    engine._verify(Exception, 64)
    results = await engine.run(typed_requests(engine._response))
    assert all(r.error_kind is None for r in results), [(r.error, r.text) for r in results]
    for r in results:
        assert r.values["label"] in ("positive", "negative", "mixed")
        p = r.confidence["label_confidence"]
        assert p is not None and 0 < p <= 1 and not math.isnan(p)
