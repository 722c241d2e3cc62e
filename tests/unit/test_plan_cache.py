"""`batchinfer plan` with a result cache: the sampled rows are looked up (read only), and the
estimates count only the rows the engine would compute."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.demo import reviews_table, write_reviews
from batch.errors import SpecError
from batch.job import run_job
from batch.progress import NullReporter
from batch.runner import ray_session
from batch.spec import JobSpec, parse_spec
from tests.unit.test_plan import WordTokenizer


@pytest.fixture(scope="module")
def ray_once() -> Iterator[None]:
    with ray_session(None):
        yield


def job(inp: Path, out: Path, cache: Path, *sets: str) -> JobSpec:
    # max_model_len 5000: the demo's over-long reviews succeed too, so every usable row is cached
    text = f"""
name: plan-cache
input: {{path: "{inp}", id_column: review_id}}
output: {{path: "{out}"}}
model: {{path: fake-model, engine: fake, fake_options: {{max_model_len: 5000}}}}
prompt: {{template: "Review of {{{{ product }}}}: {{{{ body }}}}"}}
sampling: {{max_tokens: 8}}
resources: {{rows_per_chunk: 10, chunks_in_flight: 3}}
cache: {{path: "{cache}"}}
"""
    return parse_spec(text, overrides=sets)


@pytest.fixture
def offline_tokenizer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The fake model has no tokenizer: count words, as the plan tests do."""
    import batch.estimate
    import batch.models

    monkeypatch.setattr(batch.estimate, "_tokenizer", lambda _dir: WordTokenizer())
    monkeypatch.setattr(batch.models, "resolve_model", lambda path: str(tmp_path))


def plan_doc(spec: JobSpec, sample: int = 256, measure: int = 0) -> dict[str, Any]:
    from batch.estimate import estimate

    return estimate(spec, sample=sample, measure=measure)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file below ``folder`` with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def add_new_file(folder: Path, rows: int = 48) -> None:
    """A third input file of reviews nobody has seen (distinct texts)."""
    t = reviews_table(rows, start=96)
    bodies = pa.array([f"a brand new review number {i}" for i in range(rows)], pa.string())
    t = t.set_column(t.schema.get_field_index("body"), "body", bodies)
    pq.write_table(t, folder / "reviews-0002.parquet")


def test_plan_after_a_run_finds_every_row_cached_and_changes_nothing(
    ray_once: None, reviews: Path, tmp_path: Path, offline_tokenizer: None
) -> None:
    cache = tmp_path / "cache"
    spec = job(reviews, tmp_path / "out", cache)
    run_job(spec, NullReporter())
    before = snapshot(cache)
    assert before, "the run filled the cache"

    doc = plan_doc(spec)
    c = doc["cache"]
    usable = 94  # 96 sampled rows (all of them), 2 with no text
    assert doc["sampled_rows"] == 96 and c["sample_rows"] == usable
    assert c["hits"] == usable and c["hit_rate"] == 1.0
    assert c["est_engine_rows"] == 0 and doc["est_input_tokens"] == 0
    assert doc["est_output_tokens_max"] == 0
    assert c["uncached"]["est_output_tokens_max"] == usable * 8
    assert "note" not in c and "error" not in c

    # with --sample N the measuring run computes its rows, beside the cache
    measured = plan_doc(spec, sample=16, measure=6)
    assert measured["measured"]["rows"] == 6
    assert measured["measured"]["output_tokens"] > 0, "the sample was computed, not served"
    assert measured["cache"]["hit_rate"] == 1.0
    assert snapshot(cache) == before, "plan never writes to the cache"

    # a changed template makes every key new
    template = "prompt.template=Rate {{ product }}: {{ body }}"
    changed = job(reviews, tmp_path / "out2", cache, template)
    doc = plan_doc(changed)
    c = doc["cache"]
    assert c["hits"] == 0 and c["hit_rate"] == 0.0 and c["sample_rows"] == usable
    # every distinct prompt is computed (once: the demo reviews repeat a few texts)
    assert c["est_engine_rows"] == usable - c["duplicate_rows"] < usable
    # the repeated texts' tokens (the two over-long reviews are the same text) count once
    assert 0 < doc["est_input_tokens"] < c["uncached"]["est_input_tokens"]
    assert snapshot(cache) == before


def test_plan_cli_shows_the_hit_rate(
    reviews: Path, tmp_path: Path, offline_tokenizer: None
) -> None:
    """Human and JSON output of `batchinfer plan` with a cache (an empty one: hit rate 0)."""
    from typer.testing import CliRunner

    from batch.cli import app

    cache = tmp_path / "cache"
    spec = job(reviews, tmp_path / "out", cache)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec.model_dump(mode="json")))
    runner = CliRunner()
    res = runner.invoke(app, ["plan", str(path), "--json"])
    assert res.exit_code == 0, res.output
    c = json.loads(res.output)["cache"]
    assert c["hits"] == 0 and c["hit_rate"] == 0.0
    assert c["note"] == f"the cache at {cache} holds no answers yet"
    res = runner.invoke(app, ["plan", str(path)])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # as printed, wrapped to the terminal
    assert f"result cache {cache}: 0 of 94 sampled rows cached (hit rate 0.0%)" in text
    assert "holds no answers yet" in text
    assert not cache.exists(), "plan creates no cache"


def test_sample_is_spread_over_the_input(
    ray_once: None, reviews: Path, tmp_path: Path, offline_tokenizer: None
) -> None:
    """Rows added since the last run (a new file) are in a small sample too: one chunk per
    file here, so a sample from the first chunk alone would call the input all cached."""
    cache = tmp_path / "cache"
    run_job(job(reviews, tmp_path / "out", cache, "resources.rows_per_chunk=100"), NullReporter())
    add_new_file(reviews)
    spec = job(reviews, tmp_path / "out2", cache, "resources.rows_per_chunk=100")
    doc = plan_doc(spec, sample=30)
    c = doc["cache"]
    # the first 10 rows of each file: r000005 and r000053 have no text; the new file's miss
    assert doc["sampled_rows"] == 30 and c["sample_rows"] == 28
    assert c["hits"] == 18 and c["hit_rate"] == round(18 / 28, 4)
    assert 40 <= c["est_engine_rows"] <= 56  # 48 new rows, estimated from the sample

    whole = plan_doc(spec)  # 256 rows: the whole input
    c = whole["cache"]
    assert c["sample_rows"] == 142 and c["hits"] == 94 and c["est_engine_rows"] == 48


def test_plan_counts_duplicate_prompts_of_the_sample(
    reviews: Path, tmp_path: Path, offline_tokenizer: None
) -> None:
    from pipelines import load_pipeline

    spec = job(reviews, tmp_path / "out", tmp_path / "cache")
    c = plan_doc(spec)["cache"]
    pipeline = load_pipeline(spec)
    rows = pa.concat_tables(pq.read_table(p) for p in sorted(reviews.glob("*.parquet")))
    prompts = [json.dumps(pipeline.prepare(r)) for r in rows.to_pylist() if r["body"]]
    repeats = len(prompts) - len(set(prompts))
    assert repeats > 0, "the demo reviews repeat some texts"
    assert c["dedup"] is True and c["duplicate_rows"] == repeats
    assert c["duplicate_share"] == round(repeats / len(prompts), 4)
    assert c["est_engine_rows"] == len(set(prompts))
    line_doc = plan_doc(spec)
    from batch.estimate import cache_line

    line = cache_line(line_doc)
    assert line is not None and f"{repeats} more repeat a sampled prompt" in line


def test_plan_refuses_a_hub_model_without_a_revision(tmp_path: Path) -> None:
    write_reviews(tmp_path / "in", rows=8, files=1)
    spec = parse_spec(
        f"name: t\ninput: {{path: '{tmp_path / 'in'}'}}\noutput: {{path: '{tmp_path / 'out'}'}}\n"
        "model: {path: Qwen/Qwen3-0.6B}\nprompt: {template: '{{ body }}'}\n"
        f"cache: {{path: '{tmp_path / 'cache'}'}}\n"
    )
    with pytest.raises(SpecError) as err:
        plan_doc(spec)
    message = str(err.value)
    assert "\n" not in message
    assert "cache.path" in message and "model.engine_args.revision" in message
