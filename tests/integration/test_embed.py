"""Embeddings end to end on real vLLM (CPU) with the bundled all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from batch.demo import reviews_table
from tests.integration.helpers import read_json, read_parts, submit

PARAPHRASES = {
    "p1": "The kettle boils water very quickly.",
    "p2": "This kettle heats up water fast.",
    "u1": "The central bank raised interest rates again this quarter.",
}


def test_embed_job(demo_models: dict[str, Path], tmp_path: Path) -> None:
    inp, out = tmp_path / "in", tmp_path / "out"
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
    res = submit(
        "jobs/embed.yaml",
        f"input.path={inp}",
        f"output.path={out}",
        "prompt.template={{ body }}",
    )
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


def test_plan_with_a_measured_sample(demo_models: dict[str, Path], tmp_path: Path) -> None:
    """plan --sample runs a few rows for real and turns the throughput into GPU-hours."""
    inp = tmp_path / "in"
    inp.mkdir()
    pq.write_table(reviews_table(64), inp / "a.parquet")
    res = subprocess.run(
        [sys.executable, "-m", "batch.cli", "plan", "jobs/embed.yaml", "--json", "--sample", "16",
         "--set", f"input.path={inp}", "--set", f"output.path={tmp_path / 'out'}"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(res.stdout)
    assert plan["rows"] == 64 and plan["measured"]["rows"] > 0
    assert plan["measured"]["rows_per_second_per_replica"] > 0
    assert plan["est_accelerator_hours"] > 0 and plan["est_run_cost_usd"] > 0
    assert not (tmp_path / "out").exists(), "the dry run wrote nothing to the job's output"
