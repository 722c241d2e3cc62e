"""The runner end to end on real Ray with the deterministic fake engine (no vLLM).

What a user would check: every input id exactly once (in data/ or in _failed/ with a
reason), the documented layout, ledger totals that match the rows, and a resume that
redoes only what was not committed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.errors import SpecError
from batch.job import retry_failed, run_job
from batch.progress import NullReporter
from batch.runner import ray_session
from batch.spec import JobSpec, parse_spec


@pytest.fixture(scope="module", autouse=True)
def ray_once() -> Iterator[None]:
    with ray_session(None):
        yield


def fake_job(inp: Path, out: Path, **over: str) -> JobSpec:
    text = f"""
name: fake-test
input: {{path: "{inp}", id_column: review_id}}
output: {{path: "{out}"}}
model: {{path: fake-model, engine: fake, fake_options: {{max_model_len: 400}}}}
prompt: {{template: "Review of {{{{ product }}}}: {{{{ body }}}}"}}
sampling: {{max_tokens: 8}}
resources: {{rows_per_chunk: 10, chunks_in_flight: 3}}
"""
    return parse_spec(text, overrides=[f"{k}={v}" for k, v in over.items()])


def read_dir(path: Path) -> pa.Table:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def input_ids(folder: Path) -> list[str]:
    return sorted(read_dir(folder)["review_id"].to_pylist())


def test_every_row_exactly_once_with_failures_explained(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_job(fake_job(reviews, out), NullReporter())
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews)
    assert len(set(ids)) == len(ids) == 96
    # the demo data's bad rows: a null body and an over-long one in each file
    reasons = sorted(
        zip(failed["review_id"].to_pylist(), failed["_error_class"].to_pylist(), strict=True)
    )
    assert reasons == [
        ("r000005", "NullValue"),
        ("r000011", "PromptTooLong"),
        ("r000053", "NullValue"),
        ("r000059", "PromptTooLong"),
    ]
    assert all(m for m in failed["_error_message"].to_pylist())
    assert summary.rows == 92 and summary.failed_rows == 4
    # layout and contracts
    assert len(list((out / "_markers").glob("*.json"))) == 10
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert manifest["rows"] == 92 and manifest["failed_rows"] == 4 and manifest["chunks"] == 10
    ledger = json.loads((out / "ledger.json").read_text())
    # The engine's tokens, plus those of rows that shared an equal prompt's answer (dedup is
    # on at temperature 0), are the rows' tokens.
    saved = ledger.get("cache", {})
    assert ledger["input_tokens"] + saved.get("saved_input_tokens", 0) == sum(
        data["input_tokens"].to_pylist()
    )
    assert ledger["output_tokens"] + saved.get("saved_output_tokens", 0) == sum(
        data["output_tokens"].to_pylist()
    )
    assert ledger["rows"] == 92 and ledger["failed_rows"] == 4
    assert ledger["gpu_seconds"] > 0 and ledger["wall_seconds"] > 0
    # The engine runs at the driver's niceness, not at the nice 15 Ray gives its workers (it
    # would yield to every Ray daemon on a shared core).
    marker = json.loads(next((out / "_markers").glob("*.json")).read_text())
    assert marker["engine"]["niceness"] == os.getpriority(os.PRIO_PROCESS, 0)
    assert set(data.column_names) >= {"generated_text", "finish_reason", "input_tokens"}
    assert all(t for t in data["generated_text"].to_pylist())


def test_resume_redoes_only_uncommitted_chunks(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = fake_job(reviews, out)
    run_job(spec, NullReporter())
    before = {p.name: p.stat().st_mtime_ns for p in (out / "data").glob("*.parquet")}
    # Simulate a crash that lost three chunks' commits and the manifest.
    (out / "_MANIFEST.json").unlink()
    lost = sorted((out / "_markers").glob("*.json"))[:3]
    for marker in lost:
        cid = marker.stem
        marker.unlink()
        for kind in ("data", "_failed"):
            for part in (out / kind).glob(f"part-{cid}.*.parquet"):
                part.unlink()
    summary = run_job(spec, NullReporter())
    assert summary.chunks_run == 3
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews)
    untouched = {n: t for n, t in before.items() if (out / "data" / n).exists()}
    for name, mtime in untouched.items():
        if not any(m.stem in name for m in lost):
            assert (out / "data" / name).stat().st_mtime_ns == mtime  # never recomputed


def test_complete_output_is_not_rerun(reviews: Path, tmp_path: Path) -> None:
    spec = fake_job(reviews, tmp_path / "out")
    run_job(spec, NullReporter())
    again = run_job(spec, NullReporter())
    assert again.already_complete and again.chunks_run == 0 and again.rows == 92


def test_user_pipeline_by_module_and_class(reviews: Path, tmp_path: Path) -> None:
    spec = fake_job(
        reviews, tmp_path / "out", pipeline="pipelines.reviews:ReviewTriage",
        **{"response.fields": "{sentiment: [positive, negative, mixed], summary: str}",
           "sampling.max_tokens": "200"},
    )  # fmt: skip
    run_job(spec, NullReporter())
    data = read_dir(tmp_path / "out" / "data")
    assert {"sentiment", "summary", "generated_text", "needs_review"} <= set(data.column_names)


def test_embeddings_are_fixed_size_float32(reviews: Path, tmp_path: Path) -> None:
    spec = fake_job(
        reviews,
        tmp_path / "out",
        **{"model.task": "embed", "model.fake_options": "{dims: 16, max_model_len: 400}"},
    )
    run_job(spec, NullReporter())
    data = read_dir(tmp_path / "out" / "data")
    assert data.schema.field("embedding").type == pa.list_(pa.float32(), 16)
    assert "output_tokens" not in data.column_names
    assert data.num_rows == 92


def test_poison_chunk_is_given_up_after_bounded_attempts_and_the_job_finishes(
    reviews: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    opts = "{crash_on_text: 'rain jacket', max_model_len: 400}"
    summary = run_job(fake_job(reviews, out, **{"model.fake_options": opts}), NullReporter())
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews) and len(set(ids)) == 96
    given_up = [r for r in failed.to_pylist() if r["_error_class"] == "ChunkFailed"]
    assert given_up, "the chunks holding a 'rain jacket' review are given up"
    assert all(r["_attempt"] == 3 for r in given_up)
    assert "gave up after 3 failed attempts" in given_up[0]["_error_message"]
    assert "FakeEngineCrash" in given_up[0]["_error_message"]
    assert summary.failed_rows == failed.num_rows
    assert (out / "_MANIFEST.json").exists()
    assert list((out / "_attempts").glob("*")) == [], "attempt records go once committed"


def test_engine_actor_death_is_survived_with_exactly_once_output(
    reviews: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    opts = f"{{die_on_text: 'rain jacket', die_flag_dir: '{tmp_path}', max_model_len: 400}}"
    summary = run_job(fake_job(reviews, out, **{"model.fake_options": opts}), NullReporter())
    assert (tmp_path / "fake-engine-died").exists(), "the engine actor did die once"
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews) and len(set(ids)) == 96
    assert summary.failed_rows == 4  # only the demo data's four bad rows
    assert "ChunkFailed" not in failed["_error_class"].to_pylist()


def test_resume_with_a_changed_spec_is_refused(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_job(fake_job(reviews, out), NullReporter())
    changed = fake_job(reviews, out, **{"sampling.max_tokens": "16"})
    with pytest.raises(SpecError, match=r"changed: sampling.max_tokens: 8 -> 16"):
        run_job(changed, NullReporter())


def test_retry_failed_moves_fixed_rows_to_data_exactly_once(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_job(fake_job(reviews, out), NullReporter())
    # the over-long rows fail at max_model_len 400; allow more and retry only those rows
    bigger = fake_job(reviews, out, **{"model.fake_options": "{max_model_len: 5000}"})
    summary = retry_failed(bigger, NullReporter())
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews) and len(set(ids)) == 96
    assert sorted(failed["review_id"].to_pylist()) == ["r000005", "r000053"]  # null bodies
    assert failed["_attempt"].to_pylist() == [2, 2]
    assert {"r000011", "r000059"} <= set(data["review_id"].to_pylist())
    assert summary.rows == 94 and summary.failed_rows == 2
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert manifest["failed_rows"] == 2 and manifest["retries"] == 4
    assert sorted(p.name for p in (out / "_failed").iterdir()) == sorted(
        Path(p).name for p in manifest["failed_parts"]
    )


def test_two_runs_at_once_produce_no_duplicates(reviews: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(
        f"""
name: twice
input: {{path: "{reviews}", id_column: review_id}}
output: {{path: "{out}"}}
model: {{path: m, engine: fake, fake_options: {{max_model_len: 400, delay_per_token: 0.02}}}}
prompt: {{template: "{{{{ body }}}}"}}
sampling: {{max_tokens: 8}}
resources: {{rows_per_chunk: 8}}
"""
    )
    cmd = [sys.executable, "-m", "batch.cli", "submit", str(job), "--quiet"]
    # Two at once: whichever takes the lease runs; the one without --wait may find it held.
    runs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in (cmd, [*cmd, "--wait"])
    ]
    time.sleep(3)
    late = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # a third, later
    results = [(p, *p.communicate(timeout=300)) for p in runs]
    (plain, _, plain_err), (waiting, _, waiting_err) = results
    assert waiting.returncode == 0, waiting_err[-2000:]  # it ran, or waited and resumed
    for code, err in ((plain.returncode, plain_err), (late.returncode, late.stderr)):
        assert code in (0, 3), err[-2000:]
        if code == 3:
            assert "another run holds" in err
    assert 3 in (plain.returncode, late.returncode), "one of them found the output held"
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews) and len(set(ids)) == 96


# --------------------------------------------------------------------------- the output store
# Regressions of issue 12: each of these failed on the code before the output store.


def _drop_commits(out: Path, n: int, *, keep_data_parts: bool = False) -> list[str]:
    """Undo the commits of ``n`` chunks as a crash would have left them: markers gone (and the
    manifest); with ``keep_data_parts`` the data parts stay, as when the attempt was killed
    between writing its data part and its failed part."""
    (out / "_MANIFEST.json").unlink(missing_ok=True)
    lost = []
    for marker in sorted((out / "_markers").glob("*.json"))[:n]:
        cid = marker.stem
        marker.unlink()
        lost.append(cid)
        kinds = ("_failed",) if keep_data_parts else ("data", "_failed")
        for kind in kinds:
            for part in (out / kind).glob(f"part-{cid}*.parquet"):
                part.unlink()
    return lost


def _ids_once(out: Path, reviews: Path) -> None:
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews), "every input id exactly once in data/ + _failed/"
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/part-*.parquet")}
    assert on_disk == set(manifest["data_parts"]) | set(manifest["failed_parts"])


def test_an_orphaned_data_part_is_not_read_twice_when_the_rerun_splits_rows_otherwise(
    reviews: Path, tmp_path: Path
) -> None:
    """Item 1: attempt 1 wrote its data part and died; attempt 2 (sampling at temperature > 0,
    rows failing at random) fails other rows. Reading data/ and _failed/ as folders must still
    give every id once."""
    out = tmp_path / "out"
    opts = "{row_error_rate: 0.5, max_model_len: 400}"
    spec = fake_job(reviews, out, **{"model.fake_options": opts, "sampling.temperature": "1.0"})
    run_job(spec, NullReporter())
    _drop_commits(out, 4, keep_data_parts=True)
    run_job(spec, NullReporter())
    _ids_once(out, reviews)


def test_chunks_in_flight_through_three_killed_runs_are_run_not_given_up(
    reviews: Path, tmp_path: Path
) -> None:
    """Item 2: attempts recorded by three runs killed around a chunk are not engine failures."""
    from batch import storage, store

    out = tmp_path / "out"
    spec = fake_job(reviews, out)
    run_job(spec, NullReporter())
    (cid,) = _drop_commits(out, 1)
    fs, root = storage.open_fs(str(out))
    for killed in ("run-1", "run-2", "run-3"):
        store.begin_attempt(fs, root, cid, {"run": killed})
    run_job(spec, NullReporter())
    failed = read_dir(out / "_failed")
    assert "ChunkFailed" not in failed["_error_class"].to_pylist()
    _ids_once(out, reviews)


def test_retry_failed_on_an_incomplete_output_leaves_no_stale_manifest(
    reviews: Path, tmp_path: Path
) -> None:
    """Item 3: a manifest written by retry-failed before the output was complete must not
    outlive the submit that completes it."""
    out = tmp_path / "out"
    spec = fake_job(reviews, out)
    run_job(spec, NullReporter())
    _drop_commits(out, 2)
    bigger = fake_job(reviews, out, **{"model.fake_options": "{max_model_len: 5000}"})
    retry_failed(bigger, NullReporter())
    assert not (out / "_MANIFEST.json").exists(), "no manifest for an incomplete output"
    run_job(spec, NullReporter())
    _ids_once(out, reviews)
    manifest = json.loads((out / "_MANIFEST.json").read_text())
    assert manifest["chunks"] == 10 and manifest["rows"] + manifest["failed_rows"] == 96


def test_retry_failed_refuses_a_spec_that_changes_the_job(reviews: Path, tmp_path: Path) -> None:
    """Item 4: --set may not change the model, prompt or pipeline of part of an output."""
    out = tmp_path / "out"
    run_job(fake_job(reviews, out), NullReporter())
    before = sorted(p.name for p in out.rglob("*") if p.is_file())
    other = fake_job(reviews, out, **{"prompt.template": "Summarise: {{ body }}"})
    with pytest.raises(SpecError, match=r"retry-failed would change .*prompt.template"):
        retry_failed(other, NullReporter())
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == before


def test_the_ledger_adds_up_every_run_of_a_resumed_job(reviews: Path, tmp_path: Path) -> None:
    """Item 5: tokens were summed over all runs but engine time only over the last."""
    out = tmp_path / "out"
    spec = fake_job(reviews, out)
    from batch import storage, store

    first = run_job(spec, NullReporter())
    fs, root = storage.open_fs(str(out))
    dropped = _drop_commits(out, 5)
    for cid in dropped:  # as a run killed with these chunks in its engine
        store.begin_attempt(fs, root, cid, {"run": "killed"})
    second = run_job(spec, NullReporter())
    ledger = json.loads((out / "ledger.json").read_text())
    assert [r["state"] for r in ledger["runs"]] == ["finished", "finished"]
    assert ledger["gpu_seconds"] == pytest.approx(first.gpu_seconds + second.gpu_seconds, abs=0.01)
    assert ledger["gpu_seconds"] > second.gpu_seconds > 0
    assert ledger["wall_seconds"] >= first.wall_seconds + second.wall_seconds - 1.0
    # The five chunks' rows were paid for twice: the ledger says so.
    markers = [json.loads((out / "_markers" / f"{c}.json").read_text()) for c in dropped]
    assert ledger["paid_not_committed"] == {
        "rows": sum(m["rows"] + m["failed_rows"] for m in markers),
        "chunk_attempts": 5, "gpu_seconds_of_unfinished_runs": 0.0, "runs_unfinished": 0,
    }  # fmt: skip


def test_a_run_that_loses_its_lease_stops(reviews: Path, tmp_path: Path) -> None:
    """Item 7: losing the lease was logged and the run carried on beside its successor."""
    import threading

    from batch import storage, store
    from batch.errors import LeaseLost

    out = tmp_path / "out"
    opts = "{max_model_len: 400, delay_per_token: 0.05}"
    spec = fake_job(reviews, out, **{"model.fake_options": opts, "resources.batch_size": "10"})
    fs, root = storage.open_fs(str(out))

    def take_over() -> None:  # another run takes the lease once this one's engines run
        deadline = time.time() + 120
        while time.time() < deadline and not list((out / "_runs").glob("*/*.json")):
            time.sleep(0.2)
        number, doc = store.current_lease(fs, root) or (0, {})
        path = storage.join(root, store.LEASE_DIR, f"{number + 1:08d}.json")
        storage.create_only(fs, path, json.dumps(dict(doc, run_id="thief")).encode())

    thief = threading.Thread(target=take_over, daemon=True)
    thief.start()
    with pytest.raises(LeaseLost, match="another run took over the lease"):
        run_job(spec, NullReporter(), lease_ttl=1.5)
    thief.join()
    assert len(list((out / "_markers").glob("*.json"))) < 10, "it stopped before the end"


# --------------------------------------------------------------------------- typed answers
# Issue 13: response: in the spec. The fake engine builds valid answers and cuts them off at
# sampling.max_tokens (as vLLM does), so a small max_tokens gives SchemaViolation rows.

TYPED_FIELDS = (
    "{sentiment: [positive, negative, mixed], summary: {type: string, maxLength: 40}, "
    "stars: int, tags: [str]}"
)
ERROR_COLUMNS = [
    pa.field("_error_class", pa.string()),
    pa.field("_error_message", pa.string()),
    pa.field("_attempt", pa.int16()),
]


def typed_job(inp: Path, out: Path, **over: str) -> JobSpec:
    return fake_job(inp, out, **{"response.fields": TYPED_FIELDS, "sampling.max_tokens": "24",
                                 **over})  # fmt: skip


def _same_schema(folder: Path, expected: pa.Schema) -> bool:
    """Every part in ``folder`` has exactly this schema (list item names aside: Parquet calls
    them ``element``; pyarrow's schema equality ignores them, a set of schemas would not)."""
    parts = [pq.read_schema(p).remove_metadata() for p in sorted(folder.glob("*.parquet"))]
    return bool(parts) and all(s == expected for s in parts)


def _markers(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (out / "_markers").glob("*.json")]


def _rebuilt_rows_validate(data: pa.Table) -> None:
    import jsonschema
    import yaml

    from batch.response import compact_to_json_schema

    schema = compact_to_json_schema(yaml.safe_load(TYPED_FIELDS))
    for row in data.select(["sentiment", "summary", "stars", "tags"]).to_pylist():
        jsonschema.validate(row, schema)


def test_typed_job_exactly_once_with_schema_violations_and_retry(
    reviews: Path, tmp_path: Path
) -> None:
    from pipelines import load_pipeline

    out = tmp_path / "out"
    spec = typed_job(reviews, out)
    run_job(spec, NullReporter())
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews) and len(set(ids)) == 96
    # every part has the schema known before the run: the input's columns, then the typed ones
    inputs = pq.read_schema(next(reviews.glob("*.parquet")))
    typed = load_pipeline(spec).output_schema()
    expected_data = pa.schema([*inputs, *typed])
    expected_failed = pa.schema([*inputs, *ERROR_COLUMNS, pa.field("_output_text", pa.string())])
    assert _same_schema(out / "data", expected_data)
    assert _same_schema(out / "_failed", expected_failed)
    assert set(data["sentiment"].to_pylist()) <= {"positive", "negative", "mixed"}
    assert all(0 <= c <= 1 for c in data["sentiment_confidence"].to_pylist() if c is not None)
    _rebuilt_rows_validate(data)
    # cut-off answers went to _failed/ as SchemaViolation with the text the model gave
    rows = failed.to_pylist()
    violations = [r for r in rows if r["_error_class"] == "SchemaViolation"]
    assert violations and data.num_rows > 0, "max_tokens 24 cuts some answers, not all"
    assert all(r["_output_text"] and "after 2 re-samples" in r["_error_message"]
               for r in violations)  # fmt: skip
    assert all(r["_output_text"] is None for r in rows if r["_error_class"] != "SchemaViolation")
    # the ledger counts the re-sampling, as the markers do
    markers = _markers(out)
    ledger = json.loads((out / "ledger.json").read_text())
    for key in ("resamples", "discarded_input_tokens", "discarded_output_tokens"):
        assert ledger[key] == sum(m[key] for m in markers)
    assert ledger["schema_violations"] == len(violations)
    assert ledger["resamples"] >= 2 * len(violations) and ledger["discarded_output_tokens"] > 0
    assert ledger["generated_output_tokens"] == (
        ledger["output_tokens"] + ledger["discarded_output_tokens"]
    )
    assert ledger["output_tokens"] + ledger.get("cache", {}).get("saved_output_tokens", 0) == sum(
        data["output_tokens"].to_pylist()
    )
    # retry-failed with a larger max_tokens moves them to data/ exactly once
    summary = retry_failed(typed_job(reviews, out, **{"sampling.max_tokens": "200"}),
                           NullReporter())  # fmt: skip
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    assert sorted(ids) == input_ids(reviews) and len(set(ids)) == 96
    assert "SchemaViolation" not in failed["_error_class"].to_pylist()
    assert {r["review_id"] for r in violations} <= set(data["review_id"].to_pylist())
    assert _same_schema(out / "data", expected_data)
    assert _same_schema(out / "_failed", expected_failed)
    _rebuilt_rows_validate(data)
    assert summary.rows == data.num_rows


def test_typed_job_resumes_exactly_once_after_lost_commits(reviews: Path, tmp_path: Path) -> None:
    from pipelines import load_pipeline

    out = tmp_path / "out"
    spec = typed_job(reviews, out, **{"model.fake_options": "{violation_rate: 0.3, "
                                                           "max_model_len: 400}"})  # fmt: skip
    run_job(spec, NullReporter())
    _drop_commits(out, 4, keep_data_parts=True)
    run_job(spec, NullReporter())
    _ids_once(out, reviews)
    inputs = pq.read_schema(next(reviews.glob("*.parquet")))
    assert _same_schema(out / "data", pa.schema([*inputs, *load_pipeline(spec).output_schema()]))
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["resamples"] == sum(m["resamples"] for m in _markers(out)) > 0


def test_without_response_parts_markers_and_ledger_are_as_before(
    reviews: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run_job(fake_job(reviews, out), NullReporter())
    inputs = pq.read_schema(next(reviews.glob("*.parquet")))
    assert _same_schema(out / "_failed", pa.schema([*inputs, *ERROR_COLUMNS]))
    assert all("resamples" not in m and "schema_violations" not in m for m in _markers(out))
    ledger = json.loads((out / "ledger.json").read_text())
    assert "resamples" not in ledger and "generated_output_tokens" not in ledger


def test_n_2_job_gives_lists_of_two_answers_with_logprobs_and_reasoning(
    reviews: Path, tmp_path: Path
) -> None:
    from pipelines import load_pipeline

    out = tmp_path / "out"
    spec = typed_job(reviews, out, **{
        "sampling": "{n: 2, temperature: 0.7, logprobs: 2, max_tokens: 200}",
        "model.fake_options": "{max_model_len: 400, reasoning: true}",
    })  # fmt: skip
    run_job(spec, NullReporter())
    _ids_once(out, reviews)
    inputs = pq.read_schema(next(reviews.glob("*.parquet")))
    assert _same_schema(out / "data", pa.schema([*inputs, *load_pipeline(spec).output_schema()]))
    data = read_dir(out / "data")
    assert data.num_rows == 92
    per_answer = ["generated_text", "finish_reason", "sentiment", "summary", "stars", "tags",
                  "sentiment_confidence", "reasoning", "logprobs"]  # fmt: skip
    for row in data.to_pylist():
        assert all(len(row[c]) == 2 for c in per_answer), row["review_id"]
        assert isinstance(row["output_tokens"], int) and isinstance(row["resamples"], int)
        assert set(row["sentiment"]) <= {"positive", "negative", "mixed"}
        assert row["reasoning"] == ["fake", "fake"]
        for trace in row["logprobs"]:
            assert trace and all(1 <= len(t["top"]) <= 3 for t in trace)
    _rebuilt_rows_validate(
        pa.Table.from_pylist([
            {k: row[k][i] for k in ("sentiment", "summary", "stars", "tags")}
            for row in data.to_pylist() for i in range(2)
        ])
    )  # fmt: skip
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["output_tokens"] + ledger.get("cache", {}).get("saved_output_tokens", 0) == sum(
        data["output_tokens"].to_pylist()
    )
