"""Generation end to end on real vLLM (CPU), real Ray and a real S3 server."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from batch.demo import reviews_table
from tests.integration.helpers import looks_like_english, read_json, read_parts, submit
from tests.s3server import S3Server

# Short outputs keep the CPU run brief (a summary of at most 60 characters fits in 48 tokens
# with its JSON); the prompts, model and typed columns are the demo job's own.
FAST = (
    "sampling.max_tokens=48",
    "response.fields.summary={type: string, maxLength: 60}",
    "resources.rows_per_chunk=8",
)


def check_generation_output(fs: fsspec.AbstractFileSystem, out: str, input_ids: list[str]) -> None:
    data = read_parts(fs, f"{out}/data")
    failed = read_parts(fs, f"{out}/_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    counts = collections.Counter(ids)
    assert sorted(counts) == sorted(input_ids), "every input id in the output"
    assert max(counts.values()) == 1, "and exactly once"
    # The demo data's two bad rows per file, with reasons from the real engine and template.
    assert sorted(failed["_error_class"].to_pylist()) == [
        "NullValue",
        "NullValue",
        "PromptTooLong",
        "PromptTooLong",
    ]
    too_long = [m for m in failed["_error_message"].to_pylist() if "context" in m]
    assert len(too_long) == 2 and "2048" in too_long[0]
    rows = data.to_pylist()
    assert len(rows) >= 32
    for row in rows:
        assert row["input_tokens"] > 0 and row["output_tokens"] > 0
        assert row["finish_reason"] in ("stop", "length")
        assert row["sentiment"] in ("positive", "negative", "mixed")  # typed: never unknown
        assert 0 <= row["sentiment_confidence"] <= 1
    english = [r for r in rows if looks_like_english(r["generated_text"])]
    assert len(english) >= 0.9 * len(rows), [r["generated_text"] for r in rows[:5]]
    ledger = read_json(fs, f"{out}/ledger.json")
    assert ledger["rows"] == len(rows) and ledger["failed_rows"] == 4
    # The engine's tokens plus those of rows answered by an equal prompt (dedup) are the rows'.
    saved = ledger.get("cache", {})
    assert ledger["input_tokens"] + saved.get("saved_input_tokens", 0) == sum(
        r["input_tokens"] for r in rows
    )
    assert ledger["output_tokens"] + saved.get("saved_output_tokens", 0) == sum(
        r["output_tokens"] for r in rows
    )
    assert ledger["gpu_seconds"] > 0
    manifest = read_json(fs, f"{out}/_MANIFEST.json")
    assert manifest["rows"] == len(rows) and len(manifest["data_parts"]) == len(
        fs.find(f"{out}/data")
    )
    assert len(fs.find(f"{out}/_markers")) == manifest["chunks"]


def test_enrich_job_on_s3(demo_models: dict[str, Path], s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.make_bucket("reviews")
    fs = s3.new_fs()
    ids: list[str] = []
    for f in range(2):
        table = reviews_table(20, start=f * 20)
        ids += table["review_id"].to_pylist()
        with fs.open(f"{bucket}/in/reviews-{f}.parquet", "wb") as fh:
            pq.write_table(table, fh)
    opts = s3.storage_options
    endpoint = opts["client_kwargs"]["endpoint_url"]
    storage = (
        f"{{key: {opts['key']}, secret: {opts['secret']}, "
        f"client_kwargs: {{endpoint_url: '{endpoint}', region_name: us-east-1}}}}"
    )
    res = submit(
        "jobs/enrich.yaml",
        f"input.path={bucket}/in/",
        f"output.path={bucket}/out/",
        f"input.storage_options={storage}",
        f"output.storage_options={storage}",
        *FAST,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1].startswith("enrich-reviews: 36 rows, 4 failed")
    out = f"{bucket.removeprefix('s3://')}/out"
    check_generation_output(fs, out, ids)
    # The dry run's estimate against what the engine actually counted. (Real-vLLM jobs on
    # local disk run in test_engine_crash, test_interrupt and test_cluster.)
    sets = [
        f"input.path={bucket}/in/",
        f"output.path={bucket}/out/",
        f"input.storage_options={storage}",
        f"output.storage_options={storage}",
        *FAST,
    ]
    args = [a for item in sets for a in ("--set", item)]
    res = subprocess.run(
        [sys.executable, "-m", "batch.cli", "plan", "jobs/enrich.yaml", "--json", *args],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    plan = json.loads(res.stdout)
    assert (plan["rows"], plan["chunks"], plan["est_failed_rows"]) == (40, 6, 4)
    actual = read_json(fs, f"{out}/ledger.json")["input_tokens"]
    assert abs(plan["est_input_tokens"] - actual) <= 0.05 * actual, (plan, actual)
