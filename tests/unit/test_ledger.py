"""The cost ledger: arithmetic checked by hand, on synthetic markers and on a fake-engine run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from batch.ledger import build_ledger, check, engine_busy
from batch.prices import load_price_table
from batch.spec import JobSpec, parse_spec
from tests.conftest import write_job


def spec(**over: str) -> JobSpec:
    text = """
name: t
input: {path: in/}
output: {path: out/}
model: {path: m, engine: fake}
prompt: {template: "{{ body }}"}
ledger: {comparators: [openai/gpt-4o-mini, anthropic/claude-haiku-4.5]}
"""
    return parse_spec(text, overrides=[f"{k}={v}" for k, v in over.items()])


def marker(rows: int, inp: int, out: int, start: float, end: float) -> dict[str, object]:
    return {"rows": rows, "failed_rows": 1, "input_tokens": inp, "output_tokens": out,
            "failed_part": f"_failed/{start}", "timings": {"engine_start": start,
            "engine_end": end}}  # fmt: skip


def run(wall: float, gpu: float, *, finished: bool = True, acc: float = 1.0) -> dict[str, Any]:
    """A run record as the store reads it: one engine held ``gpu`` seconds."""
    engine = {"created": 0.0, "paid_until": gpu, "accelerators": acc}
    doc = {"run_id": f"r{wall}-{gpu}", "started_at": 0.0, "alive_at": wall, "engines": [engine]}
    if finished:
        doc.update(finished_at=wall, released_at=gpu, state="finished")
    return doc


def test_ledger_arithmetic_by_hand() -> None:
    s = spec(**{"ledger.cpu_hour_usd": "2.0"})
    markers = [marker(500, 400_000, 100_000, 0, 50), marker(500, 600_000, 100_000, 10, 100)]
    led = build_ledger(s, markers, [run(wall=120, gpu=1800)])
    assert (led["rows"], led["failed_rows"]) == (1000, 2)
    assert (led["input_tokens"], led["output_tokens"]) == (1_000_000, 200_000)
    assert led["run_cost_usd"] == pytest.approx(1.0)  # 0.5 h x $2/h
    assert led["usd_per_million_tokens"] == pytest.approx(1.0 / 1.2)
    mini, haiku = led["comparisons"]
    # gpt-4o-mini: 1M in x $0.15 + 0.2M out x $0.60 = $0.27; batch 50% off
    assert mini["list_usd"] == pytest.approx(0.27)
    assert mini["batch_usd"] == pytest.approx(0.135)
    assert mini["savings_vs_batch"] == pytest.approx(1 - 1.0 / 0.135, abs=1e-4)
    # claude-haiku-4.5: 1M x $1 + 0.2M x $5 = $2.00; batch $1.00 -> break-even at our cost
    assert haiku["list_usd"] == pytest.approx(2.0) and haiku["batch_usd"] == pytest.approx(1.0)
    assert haiku["savings_vs_batch"] == pytest.approx(0.0)
    # break-even: a dedicated instance costs $2 x 24 = $48/day; batch is $0.001 per row
    assert haiku["break_even_rows_per_day"] == 48_000
    # measured throughput: 1000 rows over the engine window 0..100 s = 10 rows/s
    assert led["rows_per_second_per_replica"] == pytest.approx(10.0)
    assert haiku["beats_batch_within_capacity"]  # 10 x 86400 x 0.7 = 604,800 >= 48,000
    assert led["price_table_version"] == load_price_table().version
    assert {r["model"] for r in led["price_rows"]["comparators"]} == {
        "gpt-4o-mini",
        "claude-haiku-4.5",
    }
    assert any("tokenize differently" in n for n in led["notes"])


def test_gpu_rate_comes_from_the_table_and_counts_gpus_per_replica() -> None:
    s = spec(**{"resources.device": "gpu", "resources.gpus_per_replica": "2",
                "ledger.gpu": "A100-80GB", "ledger.gpu_provider": "coreweave"})  # fmt: skip
    # the engine actor records the accelerators it holds (resources.gpus_per_replica)
    led = build_ledger(s, [marker(10, 100, 10, 0, 1)], [run(wall=10, gpu=3600, acc=2.0)])
    assert led["gpu_hour_usd"] == 2.70
    assert led["gpu_seconds"] == 7200  # two GPUs held for an hour
    assert led["run_cost_usd"] == pytest.approx(5.40)
    assert led["price_rows"]["rate"]["provider"] == "coreweave"


def test_job_price_overrides_take_effect() -> None:
    row = (
        "{chat: [{provider: openai, model: gpt-4o-mini, input: 1.0, output: 2.0, "
        "source: 'job: our contract', date: 2026-11}]}"
    )
    led = build_ledger(spec(**{"ledger.prices": row}), [marker(1, 1_000_000, 1_000_000, 0, 1)],
                       [run(wall=1, gpu=0)])  # fmt: skip
    assert led["comparisons"][0]["list_usd"] == pytest.approx(3.0)


def test_unknown_comparator_fails_before_the_run() -> None:
    with pytest.raises(Exception, match="gpt-4o-mni"):
        check(spec(**{"ledger.comparators": "[openai/gpt-4o-mni]"}))


def test_ledger_command_writes_table_markdown_and_chart(reviews: Path, tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "job.yaml",
        f"""\
        name: ledger-fake
        input: {{path: "{reviews}", id_column: review_id}}
        output: {{path: "{tmp_path}/out"}}
        model: {{path: m, engine: fake, fake_options: {{max_model_len: 400}}}}
        prompt: {{template: "{{{{ body }}}}"}}
        resources: {{rows_per_chunk: 48}}
        """,
    )
    cli = [sys.executable, "-m", "batch.cli"]
    assert subprocess.run([*cli, "submit", str(job), "-q"], capture_output=True).returncode == 0
    res = subprocess.run([*cli, "ledger", str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "savings vs batch" in res.stdout and "gpt-4o-mini" in res.stdout
    png = (tmp_path / "out" / "ledger.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    md = (tmp_path / "out" / "ledger.md").read_text()
    assert "| comparator |" in md and "ledger.png" in md
    res = subprocess.run([*cli, "ledger", str(tmp_path / "out"), "--json"], capture_output=True,
                         text=True)  # fmt: skip
    doc = json.loads(res.stdout)
    assert len(doc["comparisons"]) >= 5
    assert doc["input_tokens"] > 0 and doc["run_cost_usd"] > 0
    # the same arithmetic by hand on this run's own usage
    hours = doc["gpu_seconds"] / 3600
    assert doc["run_cost_usd"] == pytest.approx(hours * doc["gpu_hour_usd"], rel=1e-3)
    mini = next(c for c in doc["comparisons"] if c["model"] == "gpt-4o-mini")
    by_hand = doc["input_tokens"] * 0.15e-6 + doc["output_tokens"] * 0.60e-6
    assert mini["list_usd"] == pytest.approx(by_hand, rel=1e-3)
    assert mini["batch_usd"] == pytest.approx(by_hand / 2, rel=1e-3)


def test_ledger_sums_every_run_and_reports_work_paid_for_but_not_committed() -> None:
    """A run killed mid-job still costs what its engines held (to their last heartbeat); the
    ledger adds every run, lists them, and counts the rows its engines took in for nothing."""
    s = spec(**{"ledger.cpu_hour_usd": "3.6"})
    killed = run(wall=50, gpu=40, finished=False)  # SIGKILLed with the chunk in its engine
    killed["run_id"] = "killed"
    done = run(wall=100, gpu=90)
    done["run_id"] = "done"
    m = dict(marker(20, 100, 10, 0, 1), run_id="done", failed_rows=10, attempts_run=2)
    led = build_ledger(s, [m], [killed, done])
    assert led["gpu_seconds"] == pytest.approx(130)  # 40 + 90: the killed run's time counts
    assert led["wall_seconds"] == pytest.approx(150)
    assert led["run_cost_usd"] == pytest.approx(0.13)  # 130 s at $3.60/h
    assert [r["run_id"] for r in led["runs"]] == ["killed", "done"]
    assert led["runs"][0]["state"] == "killed or running"
    assert led["paid_not_committed"]["rows"] == 30  # the chunk's 30 rows ran twice
    assert led["paid_not_committed"]["chunk_attempts"] == 1
    assert led["paid_not_committed"]["gpu_seconds_of_unfinished_runs"] == pytest.approx(40)


def test_engine_idle_fraction_counts_gaps_between_chunks_per_engine() -> None:
    def m(actor: str, start: float, end: float) -> dict[str, object]:
        return {"engine": {"actor": actor}, "timings": {"engine_start": start, "engine_end": end}}

    # engine a: chunks overlap 0-10 and 5-20, then a 10 s gap, then 30-40 -> busy 30 of 40
    # engine b: back to back, never idle -> busy 20 of 20
    markers = [m("a", 0, 10), m("a", 5, 20), m("a", 30, 40), m("b", 100, 110), m("b", 110, 120)]
    busy = engine_busy(markers)
    assert busy["engine_busy_seconds"] == pytest.approx(50)
    assert busy["engine_idle_fraction"] == pytest.approx(10 / 60, abs=1e-4)
    assert engine_busy([])["engine_idle_fraction"] == 0.0


def test_typed_job_ledger_lists_resampling_apart_from_the_committed_tokens() -> None:
    from batch.report import summary_lines

    s = spec(**{"ledger.cpu_hour_usd": "2.0", "response.choice": "[good, bad]"})
    typed = {"resamples": 5, "discarded_input_tokens": 300, "discarded_output_tokens": 50_000,
             "schema_violations": 2}  # fmt: skip
    old = marker(500, 600_000, 100_000, 10, 100)  # written before typed answers: counts 0
    led = build_ledger(s, [{**marker(500, 400_000, 100_000, 0, 50), **typed}, old],
                       [run(wall=100, gpu=1800)])  # fmt: skip
    assert {k: led[k] for k in typed} == typed
    # the committed rows' tokens keep their meaning, and the APIs are priced on them ...
    assert (led["input_tokens"], led["output_tokens"]) == (1_000_000, 200_000)
    assert led["comparisons"][0]["list_usd"] == pytest.approx(0.27)
    # ... while throughput counts what the engine really generated
    assert led["generated_output_tokens"] == 250_000
    assert led["output_tokens_per_second"] == pytest.approx(2500.0)
    assert any("re-sampled and discarded tokens" in n for n in led["notes"])
    line = summary_lines(led)[-1]
    assert line == (
        "typed answers: re-sampled 5 times; 50,000 output tokens discarded (20.0% of "
        "generated); 2 rows SchemaViolation"
    )
    # a job without response: keeps exactly today's ledger keys
    plain = build_ledger(spec(**{"ledger.cpu_hour_usd": "2.0"}), [old], [run(100, 1800)])
    assert not {"resamples", "generated_output_tokens"} & set(plain)
    assert plain["output_tokens_per_second"] == pytest.approx(1000.0)
    assert not summary_lines(plain)[-1].startswith("typed answers")
