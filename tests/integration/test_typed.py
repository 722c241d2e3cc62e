"""Typed answers (response:) end to end on real vLLM (CPU, SmolLM2), real Ray, local disk.

Two engine starts in all, at the same time: one job with a JSON schema of string, enum, int
and list fields, one with a choice. What a user would check: every row is either
schema-valid in typed columns or in _failed/ as SchemaViolation with the model's text; choice
labels are listed ones with a real probability; a broken schema stops before any engine starts.
"""

from __future__ import annotations

import collections
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import fsspec
import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from batch.demo import write_reviews
from batch.response import compact_to_json_schema
from batch.spec import load_spec
from pipelines import load_pipeline
from tests.integration.helpers import cli, leftovers, read_json, read_parts, run_together

SCHEMA = (
    "{sentiment: [positive, negative, mixed], summary: {type: string, maxLength: 120}, "
    "stars: int, tags: [str]}"
)
LABELS = ["positive", "negative", "mixed"]
ROWS = 40  # two files of 20 demo reviews, each with a null and an over-long body
EXPECTED_FAILURES = {"NullValue", "PromptTooLong", "SchemaViolation"}


def _args(job: Path | str, out: Path, inp: Path, *sets: str) -> tuple[str, ...]:
    return (str(job), f"input.path={inp}/", f"output.path={out}/",
            "resources.rows_per_chunk=10", *sets)  # fmt: skip


def _read(res: subprocess.CompletedProcess[str], job: str, out: Path, overrides: Sequence[str]
          ) -> dict[str, Any]:  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    fs = fsspec.filesystem("file")
    data, failed = read_parts(fs, f"{out}/data"), read_parts(fs, f"{out}/_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    counts = collections.Counter(ids)
    assert max(counts.values()) == 1 and len(counts) == ROWS, "every input id exactly once"
    assert set(failed["_error_class"].to_pylist()) <= EXPECTED_FAILURES
    return {"data": data, "failed": failed, "spec": load_spec(job, list(overrides)),
            "ledger": read_json(fs, f"{out}/ledger.json"), "out": out}  # fmt: skip


@pytest.fixture(scope="module")
def reviews(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("typed") / "reviews"
    write_reviews(folder, rows=ROWS, files=2)
    return folder


@pytest.fixture(scope="module")
def runs(
    demo_models: dict[str, Path], reviews: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    """The schema job and the choice job, run at the same time (two engine starts overlap)."""
    folder = tmp_path_factory.mktemp("choice")
    doc = yaml.safe_load(Path("jobs/enrich.yaml").read_text())
    doc["response"] = {"choice": LABELS, "column": "sentiment"}
    doc["prompt"]["template"] = (
        "{{ title }}. {{ body }}\n\nThis is a {{ rating }}-star review of a {{ product }}. "
        "What is its sentiment?"
    )
    job = folder / "choice.yaml"
    job.write_text(yaml.safe_dump(doc))
    schema_out = tmp_path_factory.mktemp("schema") / "out"
    schema = _args("jobs/enrich.yaml", schema_out, reviews, f"response.fields={SCHEMA}",
                   "sampling.max_tokens=96")  # fmt: skip
    choice = _args(job, folder / "out", reviews, "sampling.max_tokens=8")
    res = run_together(cli("submit", *schema), cli("submit", *choice))
    return {
        "schema": _read(res[0], schema[0], schema_out, schema[1:]),
        "choice": _read(res[1], choice[0], folder / "out", choice[1:]),
    }


@pytest.fixture(scope="module")
def schema_run(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return runs["schema"]


@pytest.fixture(scope="module")
def choice_run(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return runs["choice"]


def test_schema_job_gives_only_schema_valid_typed_rows_or_schema_violations(
    schema_run: dict[str, Any], reviews: Path
) -> None:
    out: Path = schema_run["out"]
    inputs = pq.read_schema(next(reviews.glob("*.parquet")))
    expected = pa.schema([*inputs, *load_pipeline(schema_run["spec"]).output_schema()])
    parts = sorted((out / "data").glob("*.parquet"))
    assert parts and all(pq.read_schema(p).remove_metadata() == expected for p in parts)
    data: pa.Table = schema_run["data"]
    assert data.num_rows >= ROWS // 2, "most rows get a typed answer"
    schema = compact_to_json_schema(yaml.safe_load(SCHEMA))
    for row in data.to_pylist():
        typed = {k: row[k] for k in ("sentiment", "summary", "stars", "tags")}
        jsonschema.validate(typed, schema)  # never an untyped value in a typed column
        assert json.loads(row["generated_text"]) == typed
        assert row["sentiment_confidence"] is None or 0 <= row["sentiment_confidence"] <= 1
    failed = schema_run["failed"].to_pylist()
    for r in failed:
        if r["_error_class"] == "SchemaViolation":
            assert r["_output_text"] and "re-samples" in r["_error_message"]
        else:
            assert r["_output_text"] is None
    markers = [json.loads(p.read_text()) for p in (out / "_markers").glob("*.json")]
    ledger = schema_run["ledger"]
    for key in ("resamples", "discarded_input_tokens", "discarded_output_tokens"):
        assert ledger[key] == sum(m[key] for m in markers)
    violations = sum(r["_error_class"] == "SchemaViolation" for r in failed)
    assert ledger["schema_violations"] == violations


def test_choice_gives_listed_labels_with_a_probability(choice_run: dict[str, Any]) -> None:
    data: pa.Table = choice_run["data"]
    assert data.num_rows >= ROWS - 4 - 2
    assert set(data["sentiment"].to_pylist()) <= set(LABELS)
    conf = data["sentiment_confidence"].to_pylist()
    assert all(c is not None and 0 <= c <= 1 for c in conf)
    assert len(set(conf)) > 1 and min(conf) < 1.0, "real logprobs, not a constant"
    assert set(choice_run["failed"]["_error_class"].to_pylist()) <= {"NullValue", "PromptTooLong"}


def test_a_broken_schema_exits_2_before_any_engine_starts(tmp_path: Path) -> None:
    out = tmp_path / "out"
    before = set(leftovers())
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "batch.cli", "submit", "jobs/enrich.yaml", "--set",
         f"output.path={out}/", "--set", "response.fields.stars=integr"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2, res.stderr[-2000:]
    assert "response.fields.stars" in res.stderr and "did you mean 'int'" in res.stderr
    assert not out.exists(), "nothing written"
    assert "vllm" not in res.stderr.lower()
    engines = {p for p in set(leftovers()) - before if "VLLM" in p or "EngineCore" in p}
    assert not engines, f"an engine started: {engines}"
    assert time.monotonic() - t0 < 60
