"""The simulated engine's model of an accelerator (no Ray, no GPU): batch limit, decode that
slows per sequence as the batch grows, prefill, startup, token counts, and the calibration
table reproduced by the simulation itself (its simulated clock, not the wall clock)."""

from __future__ import annotations

import asyncio
import time

import pytest

from batch.engine import EngineRequest, build_engine
from batch.engine.sim import CALIBRATION, PROFILES, SimEngine, output_tokens, step_seconds
from batch.errors import SpecError
from batch.spec import JobSpec, parse_spec

FAST = 1e6  # simulated seconds per wall second: the wall clock plays no part


def spec(sim: str = "", max_tokens: int = 64, sampling: str = "") -> JobSpec:
    text = f"""
name: sim-engine
input: {{path: /nowhere}}
output: {{path: /nowhere-out}}
model: {{path: m, engine: sim, sim_options: {{time_scale: {FAST}, startup_s: 0{sim}}}}}
prompt: {{template: "{{{{ text }}}}"}}
sampling: {sampling or f"{{max_tokens: {max_tokens}}}"}
"""
    return parse_spec(text)


def rows(n: int, words: int = 20) -> list[EngineRequest]:
    return [
        EngineRequest(key=i, messages=({"role": "user", "content": f"row {i} " + "w " * words},))
        for i in range(n)
    ]


def test_selected_by_the_spec_never_the_default() -> None:
    s = spec()
    assert isinstance(build_engine(s, "m"), SimEngine)
    plain = parse_spec(
        "name: x\ninput: {path: /a}\noutput: {path: /b}\nmodel: {path: m}\n"
        'prompt: {template: "{{ text }}"}\n'
    )
    assert plain.model.engine == "vllm"
    with pytest.raises(SpecError, match="sim_options"):
        parse_spec(
            "name: x\ninput: {path: /a}\noutput: {path: /b}\n"
            "model: {path: m, sim_options: {profile: h100-llama3-8b}}\n"
            'prompt: {template: "{{ text }}"}\n'
        )
    with pytest.raises(SpecError, match="profil"):  # extra=forbid: a typo is refused
        spec(", profil: h100-llama3-8b")


def test_batch_limit_and_every_request_answered() -> None:
    eng = SimEngine(spec(", max_num_seqs: 4", sampling="{max_tokens: 32, ignore_eos: true}"))
    results = asyncio.run(eng.run(rows(10)))
    assert [r.key for r in results] == list(range(10))
    assert all(r.output_tokens == 32 and r.finish_reason == "length" for r in results)
    assert eng.stats.max_batch == 4, "never more than max_num_seqs at once"
    # 10 sequences of 32 steps, 4 at a time: 3 waves (4, 4, 2), 96 steps in all.
    assert eng.stats.decode_steps == 96
    assert eng.stats.output_tokens == 320


def test_decode_slows_per_sequence_as_the_batch_grows_but_the_batch_gains() -> None:
    def rates(n: int) -> tuple[float, float]:
        eng = SimEngine(spec(sampling="{max_tokens: 100, ignore_eos: true}"))
        asyncio.run(eng.run(rows(n)))
        decode = eng.stats.sim_seconds - eng.stats.prefill_seconds
        return 100 / decode, n * 100 / decode  # per sequence, whole batch (tokens/s)

    one, one_total = rates(1)
    per_seq, total = rates(64)
    assert per_seq < 0.8 * one, "each sequence is slower in a big batch (memory-bound)"
    assert total > 30 * one_total, "but the batch's throughput is much higher"


@pytest.mark.parametrize(("profile", "batch", "itl_ms", "tolerance"), CALIBRATION)
def test_the_simulation_reproduces_the_calibration_table(
    profile: str, batch: int, itl_ms: float, tolerance: float
) -> None:
    steps = 50
    eng = SimEngine(
        spec(f", profile: {profile}", sampling=f"{{max_tokens: {steps}, ignore_eos: true}}")
    )
    asyncio.run(eng.run(rows(batch)))
    decode = eng.stats.sim_seconds - eng.stats.prefill_seconds
    assert eng.stats.decode_steps == steps and eng.stats.max_batch == batch
    measured_ms = decode / steps * 1000
    assert measured_ms == pytest.approx(itl_ms, rel=tolerance)
    assert 1000 / measured_ms * batch == pytest.approx(batch * 1000 / itl_ms, rel=tolerance)


def test_h200_is_faster_than_h100() -> None:
    for b in (1, 64, 256):
        assert step_seconds(PROFILES["h200-llama3-8b"], b) < step_seconds(
            PROFILES["h100-llama3-8b"], b
        )


def test_prefill_costs_per_input_token() -> None:
    short = SimEngine(spec(", prefill_tokens_per_s: 1000"))
    long = SimEngine(spec(", prefill_tokens_per_s: 1000"))
    asyncio.run(short.run(rows(4, words=10)))
    asyncio.run(long.run(rows(4, words=1000)))
    assert long.stats.input_tokens > 20 * short.stats.input_tokens
    assert long.stats.prefill_seconds == pytest.approx(long.stats.input_tokens / 1000)


def test_output_lengths_are_realistic_and_seeded_by_the_prompt() -> None:
    lengths = [output_tokens(f"prompt {i}", 10_000, mean=200) for i in range(2000)]
    mean = sum(lengths) / len(lengths)
    assert 170 < mean < 230, mean
    assert len(set(lengths)) > 100, "a spread of lengths, not one"
    assert output_tokens("same", 10_000, 200) == output_tokens("same", 10_000, 200)
    assert max(output_tokens(f"p{i}", 16, 200) for i in range(100)) == 16, "cut at max_tokens"
    eng = SimEngine(spec(max_tokens=16))
    a = asyncio.run(eng.run(rows(8)))
    b = asyncio.run(eng.run(rows(8)))
    assert [r.output_tokens for r in a] == [r.output_tokens for r in b], "a rerun repeats rows"
    assert all(r.input_tokens > 20 for r in a) and all(r.text for r in a)


def test_startup_delay_scaled_by_time_scale() -> None:
    t0 = time.monotonic()
    SimEngine(spec().model_copy(deep=True))  # startup_s: 0
    fast = time.monotonic() - t0
    s = parse_spec(
        "name: x\ninput: {path: /a}\noutput: {path: /b}\n"
        "model: {path: m, engine: sim, sim_options: {startup_s: 30, time_scale: 100}}\n"
        'prompt: {template: "{{ text }}"}\n'
    )
    t0 = time.monotonic()
    SimEngine(s)
    took = time.monotonic() - t0
    assert 0.28 < took < 1.5 and fast < 0.1


def test_time_scale_is_not_part_of_the_fingerprint() -> None:
    a = spec()
    b = parse_spec(a.model_dump_json().replace(f'"time_scale":{FAST}', '"time_scale":2.0'))
    assert a.model.sim_options != b.model.sim_options
    assert a.fingerprint() == b.fingerprint()
