"""Embeddings end to end on real vLLM (CPU) with the bundled all-MiniLM-L6-v2: a job, and
``plan --sample`` beside it (the two engine starts overlap, in one module fixture)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.demo import reviews_table
from tests.integration.helpers import cli, read_json, read_parts, run_together

PARAPHRASES = {
    "p1": "The kettle boils water very quickly.",
    "p2": "This kettle heats up water fast.",
    "u1": "The central bank raised interest rates again this quarter.",
}


@pytest.fixture(scope="module")
def runs(demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    job_dir, plan_dir = tmp_path_factory.mktemp("embed"), tmp_path_factory.mktemp("plan")
    inp, out = job_dir / "in", job_dir / "out"
    inp.mkdir()
    table = reviews_table(36)
    extra = pa.table(
        {
            "review_id": list(PARAPHRASES),
            "product": ["kettle"] * 3,
            "rating": pa.array([5, 5, 3], pa.int8()),
            "title": ["Note"] * 3,
            "body": list(PARAPHRASES.values()),
        }
    )
    pq.write_table(pa.concat_tables([table, extra.cast(table.schema)]), inp / "a.parquet")
    (plan_dir / "in").mkdir()
    pq.write_table(reviews_table(64), plan_dir / "in" / "a.parquet")
    job, plan = run_together(
        cli("submit", "jobs/embed.yaml", f"input.path={inp}", f"output.path={out}",
            "prompt.template={{ body }}"),
        # plan --sample runs a few rows for real and turns the throughput into GPU-hours
        [*cli("plan", "jobs/embed.yaml", f"input.path={plan_dir / 'in'}",
              f"output.path={plan_dir / 'out'}"), "--json", "--sample", "16"],
    )  # fmt: skip
    return {"job": job, "table": table, "out": out, "plan": plan, "plan_dir": plan_dir}


def test_embed_job(runs: dict[str, Any]) -> None:
    res, table, out = runs["job"], runs["table"], runs["out"]
    assert res.returncode == 0, res.stderr[-3000:]
    data = read_parts(fsspec.filesystem("file"), str(out / "data"))
    failed = read_parts(fsspec.filesystem("file"), str(out / "_failed"))
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == sorted(table["review_id"].to_pylist() + list(PARAPHRASES))
    assert len(set(ids)) == len(ids)
    # the row with no body, and the one longer than the model's 512-token context
    assert sorted(failed["_error_class"].to_pylist()) == ["NullValue", "PromptTooLong"]
    assert data.schema.field("embedding").type == pa.list_(pa.float32(), 384)
    vectors = {r["review_id"]: np.asarray(r["embedding"]) for r in data.to_pylist()}
    norms = np.linalg.norm(np.stack(list(vectors.values())), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-3)
    close = float(vectors["p1"] @ vectors["p2"])
    far = float(vectors["p1"] @ vectors["u1"])
    assert close > far + 0.2, (close, far)
    assert all(t > 0 for t in data["input_tokens"].to_pylist())
    ledger = read_json(fsspec.filesystem("file"), str(out / "ledger.json"))
    saved = ledger.get("cache", {}).get("saved_input_tokens", 0)  # rows with an equal text
    assert ledger["input_tokens"] + saved == sum(data["input_tokens"].to_pylist())
    assert ledger["output_tokens"] == 0
    assert {c["model"] for c in ledger["comparisons"]} >= {"text-embedding-3-small"}


def test_plan_with_a_measured_sample(runs: dict[str, Any]) -> None:
    """plan --sample runs a few rows for real and turns the throughput into GPU-hours."""
    res, tmp_path = runs["plan"], runs["plan_dir"]
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(res.stdout)
    assert plan["rows"] == 64 and plan["measured"]["rows"] > 0
    assert plan["measured"]["rows_per_second_per_replica"] > 0
    assert plan["est_accelerator_hours"] > 0 and plan["est_run_cost_usd"] > 0
    assert not (tmp_path / "out").exists(), "the dry run wrote nothing to the job's output"
