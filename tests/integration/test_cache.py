"""The result cache (issue 14) on real parts: vLLM (CPU, SmolLM2), Ray, and a SeaweedFS S3
server holding the input, the output and the cache.

What a user would check:
- Two jobs filling one cache at once (overlapping inputs: the first night, run as two jobs)
  both finish exactly-once and leave a cache that answers every key one way.
- Night 2 over the table with a tenth of its rows changed and a tenth new sends only those
  rows to the engine and pays only their tokens; every other row is the first night's answer,
  byte for byte, marked ``_cached``.
- A changed sampling parameter, template or model never gets a hit. A job asking every prompt
  of the first night with another max_tokens runs on the engine and gets none of them; the
  other two are checked by the keys a run would look up, against the same cache.

Four jobs in two rounds, two at once, each a Ray session and an engine start (most of a job's
time on a CPU): the two first-night jobs (max_tokens 12); then night 2 (max_tokens 12) beside
the changed-sampling job (max_tokens 8).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import cache
from batch.engine import EngineRequest
from batch.spec import JobSpec, load_spec
from pipelines import load_pipeline
from tests.integration.helpers import cli, read_json, read_parts, run_together
from tests.s3server import S3Server

ROWS = 40
DUPLICATES = {30: 0, 31: 1, 32: 2, 33: 3}  # row -> the earlier row whose question it repeats
CHANGED = (5, 15, 25, 35)  # night 2 asks these rows something else (10%)
NEW = 4  # and adds this many rows (10%)
SPLIT = (range(0, 30), range(10, 40))  # the rows of the two concurrent jobs (they share 20)

JOB = """\
name: {name}
input: {{path: '{inp}', id_column: id, storage_options: {opts}}}
output: {{path: '{out}', storage_options: {opts}}}
model:
  path: builtin:smollm2-135m-instruct
  task: generate
  # Two engines run at once here, each with the CPU's default fixed KV cache (1 GiB).
  engine_args: {{max_model_len: 512, enforce_eager: true, dtype: bfloat16}}
prompt:
  template: '{{{{ question }}}}'
sampling: {{max_tokens: {max_tokens}, temperature: 0}}
resources: {{device: cpu, rows_per_chunk: 10}}
cache: {{path: '{cache}', storage_options: {opts}}}
"""


def night_table(night: int) -> pa.Table:
    ids, questions = [], []
    for i in range(ROWS + (NEW if night == 2 else 0)):
        ids.append(f"q{i:03d}")
        if night == 2 and i in CHANGED:
            questions.append(f"In one sentence, what changed about the number {i}?")
        else:
            questions.append(f"Say one short sentence about the number {DUPLICATES.get(i, i)}.")
    return pa.table({"id": ids, "question": questions})


def fresh_ids() -> set[str]:
    """Night 2's changed and new rows."""
    return {f"q{i:03d}" for i in (*CHANGED, *range(ROWS, ROWS + NEW))}


class Jobs:
    """Job files and inputs in one S3 bucket, run as a user would (``batchinfer submit``)."""

    def __init__(self, s3: S3Server, bucket: str, folder: Path) -> None:
        self.bucket, self.folder = bucket, folder
        self.fs = s3.new_fs()
        self.opts = json.dumps(s3.storage_options)

    def put(self, name: str, table: pa.Table) -> str:
        """``table`` as the one Parquet file of input folder ``name``; returns the folder."""
        with self.fs.open(f"{self.bucket}/{name}/part-0.parquet", "wb") as fh:
            pq.write_table(table, fh)
        return f"{self.bucket}/{name}/"

    def job(self, name: str, inp: str, *, max_tokens: int) -> Path:
        """A job over ``inp`` writing to ``out/<name>/``; every job shares one cache."""
        path = self.folder / f"{name}.yaml"
        out, cache_path = f"{self.bucket}/out/{name}/", f"{self.bucket}/cache/"
        path.write_text(
            JOB.format(name=name, inp=inp, out=out, opts=self.opts, max_tokens=max_tokens,
                       cache=cache_path)
        )  # fmt: skip
        return path

    def run_together(self, *jobs: Path) -> list[dict[str, Any]]:
        """Start the submits at once and wait for all; then read each output back."""
        done = run_together(*(cli("submit", job) for job in jobs), timeout=600)
        for job, res in zip(jobs, done, strict=True):
            out = res.stdout
            assert res.returncode == 0, f"{job.name}: {res.stderr[-3000:]}"
            # Not piped to a terminal, submit reports JSON lines; a cache it could not update
            # would be a message among them.
            events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
            assert events and events[-1]["event"] == "finished", out[-2000:]
            assert not [e for e in events if e["event"] == "message" and "cache" in e["text"]]
        return [self.read(job) for job in jobs]

    def read(self, job: Path) -> dict[str, Any]:
        spec = load_spec(job)
        out = spec.output.path.removeprefix("s3://").rstrip("/")
        self.fs.invalidate_cache()
        markers = [read_json(self.fs, p) for p in self.fs.find(f"{out}/_markers")]
        # A lookup that fails is logged and its chunk runs uncached: none may have failed here.
        assert not [m["chunk_id"] for m in markers if m.get("timings", {}).get("cache_errors")]
        return {
            "spec": spec,
            "data": read_parts(self.fs, f"{out}/data").sort_by("id"),
            "failed": read_parts(self.fs, f"{out}/_failed"),
            "ledger": read_json(self.fs, f"{out}/ledger.json"),
        }


def exactly_once(run: dict[str, Any], ids: Sequence[str]) -> None:
    assert run["failed"].num_rows == 0, run["failed"].to_pylist()[:3]
    counts = collections.Counter(run["data"]["id"].to_pylist())
    assert sorted(counts) == sorted(ids) and max(counts.values()) == 1, "every id exactly once"


def keys(spec: JobSpec, table: pa.Table) -> list[bytes]:
    """The cache key of each row of ``table`` under ``spec``, computed as the runner does."""
    ns = cache.namespace_of(cache.namespace_fields(spec, cache.model_identity(spec)))
    pipeline = load_pipeline(spec)
    out = []
    for i, row in enumerate(table.to_pylist()):
        model_input = pipeline.prepare(row)  # the request as prepare_chunk makes it
        if isinstance(model_input, EngineRequest):
            request = dataclasses.replace(model_input, key=i)
        elif isinstance(model_input, str):
            request = EngineRequest(key=i, text=model_input)
        else:
            request = EngineRequest(key=i, messages=tuple(model_input))
        out.append(cache.row_key(ns, request))
    return out


def cache_of(spec: JobSpec) -> cache.CacheContext:
    assert spec.cache.path
    return cache.CacheContext(root=spec.cache.path, storage_options=spec.cache.storage_options)


ANSWER = ("generated_text", "finish_reason", "input_tokens", "output_tokens")


def stored(result_json: str) -> dict[str, Any]:
    """A cache entry's answer as the output columns (ANSWER) it fills."""
    result = cache.result_from_json(result_json, 0)
    sample = result.samples[0] if result.samples else None
    return {
        "generated_text": ((sample.text if sample else result.text) or "").strip(),
        "finish_reason": sample.finish_reason if sample else result.finish_reason,
        "input_tokens": result.input_tokens,
        "output_tokens": result.output_tokens,
    }


def answers(t: pa.Table) -> pa.Table:
    """Every output column but ``_cached``, sorted by id."""
    return t.drop_columns(["_cached"]).sort_by("id")


@pytest.fixture(scope="module")
def runs(
    demo_models: dict[str, Path], s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """Every job of this file, in two rounds (see the module docstring)."""
    jobs = Jobs(s3, s3.make_bucket("cache-test"), tmp_path_factory.mktemp("cache-jobs"))
    night1 = night_table(1)
    a, b = (
        jobs.job(name, jobs.put(f"in-{name}", night1.take(list(rows))), max_tokens=12)
        for name, rows in zip("ab", SPLIT, strict=True)
    )
    out: dict[str, Any] = dict(zip("ab", jobs.run_together(a, b), strict=True))
    two = jobs.job("night2", jobs.put("in2", night_table(2)), max_tokens=12)
    other = jobs.job("sampling", jobs.put("in1", night1), max_tokens=8)
    out["two"], out["sampling"] = jobs.run_together(two, other)
    return out


def test_night_two_runs_only_changed_and_new_rows(runs: dict[str, Any]) -> None:
    two = runs["two"]
    exactly_once(two, night_table(2)["id"].to_pylist())
    fresh = fresh_ids()
    unchanged = {i for i in night_table(2)["id"].to_pylist() if i not in fresh}
    assert len(unchanged) == ROWS - len(CHANGED)
    data = two["data"]
    cached = dict(zip(data["id"].to_pylist(), data["_cached"].to_pylist(), strict=True))
    assert {i for i, c in cached.items() if c} == unchanged, "_cached: exactly the unchanged"

    ledger = two["ledger"]
    assert ledger["cache"]["hit_rows"] == len(unchanged)
    assert ledger["cache"]["dedup_rows"] == 0
    assert ledger["cache"]["engine_rows"] == len(fresh)
    # The engine's tokens are the fresh rows' only; the unchanged rows' are what was saved.
    rows = data.to_pylist()
    new = [r for r in rows if r["id"] in fresh]
    old = [r for r in rows if r["id"] in unchanged]
    assert ledger["input_tokens"] == sum(r["input_tokens"] for r in new)
    assert ledger["output_tokens"] == sum(r["output_tokens"] for r in new)
    assert ledger["cache"]["saved_input_tokens"] == sum(r["input_tokens"] for r in old)
    assert ledger["cache"]["saved_output_tokens"] == sum(r["output_tokens"] for r in old)

    # Unchanged rows are the first night's, byte for byte, in every column but _cached.
    first = pa.concat_tables([runs["a"]["data"], runs["b"]["data"]])
    assert data.drop_columns(["_cached"]).schema.remove_metadata() == (
        first.drop_columns(["_cached"]).schema.remove_metadata()
    )
    # A question the two jobs both asked may have either job's answer (the cache keeps one).
    t2 = night_table(2)
    question = dict(zip(t2["id"].to_pylist(), t2["question"].to_pylist(), strict=True))
    computed: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for row in first.to_pylist():
        computed[question[row["id"]]].append({k: row[k] for k in ANSWER})
    for row in old:
        assert {k: row[k] for k in ANSWER} in computed[question[row["id"]]], row["id"]


def test_changed_sampling_parameter_gets_no_hits_on_the_engine(runs: dict[str, Any]) -> None:
    """This job asks every question of the first night, which the cache holds in full, but
    with max_tokens 8 instead of 12: it gets nothing from the cache. Its repeated questions are
    answered once, by the engine."""
    other, table = runs["sampling"], night_table(1)
    ctx = cache_of(runs["two"]["spec"])
    first_spec: JobSpec = runs["a"]["spec"]
    assert set(cache.lookup(ctx, keys(first_spec, table))) == set(keys(first_spec, table))
    exactly_once(other, table["id"].to_pylist())
    assert other["ledger"]["cache"]["hit_rows"] == 0
    assert not any(other["data"]["_cached"].to_pylist())
    assert other["ledger"]["cache"]["dedup_rows"] == len(DUPLICATES)
    assert other["ledger"]["cache"]["engine_rows"] == ROWS - len(DUPLICATES)
    assert max(other["data"]["output_tokens"].to_pylist()) <= 8
    first = pa.concat_tables([runs["a"]["data"], runs["b"]["data"]])
    assert max(first["output_tokens"].to_pylist()) > 8, "the first night's answers differ"


def test_changed_template_or_model_gets_no_hits(
    runs: dict[str, Any], demo_models: dict[str, Path], tmp_path: Path
) -> None:
    """The keys a run would look up (computed as the runner does), against the S3 cache."""
    table = night_table(2)
    spec: JobSpec = runs["two"]["spec"]
    ctx = cache_of(spec)
    # The job as run: every question of night 2 is in the cache now (it added its fresh ones).
    assert set(cache.lookup(ctx, keys(spec, table))) == set(keys(spec, table))

    prompt = spec.prompt.model_copy(update={"template": "Q: {{ question }}"})
    assert cache.lookup(ctx, keys(spec.model_copy(update={"prompt": prompt}), table)) == {}

    # The same model with one file changed: another digest, so another namespace.
    smol = demo_models["smollm2-135m-instruct"]
    copy = tmp_path / "smollm2-copy"
    copy.mkdir()
    for f in smol.iterdir():
        if f.name == "model.safetensors":
            (copy / f.name).symlink_to(f)  # the same weights, not read again
        else:
            shutil.copy2(f, copy / f.name)
    config = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**config, "note": "a copy"}))
    model = spec.model.model_copy(update={"path": str(copy)})
    assert cache.lookup(ctx, keys(spec.model_copy(update={"model": model}), table)) == {}


def test_two_jobs_filling_one_cache_at_once(runs: dict[str, Any]) -> None:
    a, b = runs["a"], runs["b"]
    table = night_table(1)
    for run, rows in zip((a, b), SPLIT, strict=True):
        exactly_once(run, [f"q{i:03d}" for i in rows])
    (ra,), (rb,) = a["ledger"]["runs"], b["ledger"]["runs"]
    assert ra["started_at"] < rb["started_at"] + rb["wall_seconds"]
    assert rb["started_at"] < ra["started_at"] + ra["wall_seconds"], "the jobs overlapped"

    # The cache reads back: one answer per key, the one a job computed for a row of that key.
    spec: JobSpec = a["spec"]
    ctx = cache_of(spec)
    row_keys = keys(spec, table)
    found = cache.lookup(ctx, row_keys)
    assert set(found) == set(row_keys)
    assert cache.lookup(ctx, row_keys) == found, "the same answer every time"
    computed: dict[bytes, list[dict[str, Any]]] = collections.defaultdict(list)
    by_id = dict(zip(table["id"].to_pylist(), row_keys, strict=True))
    for run in (a, b):
        for row in run["data"].to_pylist():
            computed[by_id[row["id"]]].append({k: row[k] for k in ANSWER})
    for key, result in found.items():
        assert stored(result) in computed[key]
    lance_table = cache.open_table(ctx)
    assert lance_table is not None
    indices = [i["name"] for i in lance_table.list_indices()]
    assert indices.count(cache.INDEX) == 1, indices

    # Night 2's unchanged rows are served from that cache, with those answers.
    two = runs["two"]
    fresh = fresh_ids()
    for row in two["data"].to_pylist():
        if row["id"] not in fresh:
            assert {k: row[k] for k in ANSWER} == stored(found[by_id[row["id"]]]), row["id"]
