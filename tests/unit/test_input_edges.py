"""Input edge cases: where the input lives, files that change under a job, unreadable files.

Each test is what a user would see: a listing that finds their files, a resume that notices a
rewritten file, a chunk that refuses to commit short, a one-line error instead of a traceback.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import storage, store
from batch.errors import InputChanged, SpecError
from batch.plan import check_unchanged, make_plan, read_chunk
from batch.spec import JobSpec, parse_spec


def spec_for(inp: Path | str, out: Path, rows_per_chunk: int = 10) -> JobSpec:
    text = f"""
name: t
input: {{path: "{inp}", id_column: review_id}}
output: {{path: "{out}"}}
model: {{path: m, engine: fake}}
prompt: {{template: "{{{{ body }}}}"}}
resources: {{rows_per_chunk: {rows_per_chunk}}}
"""
    return parse_spec(text)


def write(path: Path, ids: range, body: str = "b", **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"review_id": [f"r{i}" for i in ids], "body": [body] * len(ids)})
    pq.write_table(table, path, **kwargs)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- hidden folders


def test_input_under_an_underscore_folder_is_found(tmp_path: Path) -> None:
    root = tmp_path / "_staging" / ".cache" / "reviews"
    write(root / "a.parquet", range(20))
    write(root / "sub" / "b.parquet", range(20, 30))
    plan = make_plan(spec_for(root, tmp_path / "out"))
    assert [f.relpath for f in plan.files] == ["a.parquet", "sub/b.parquet"]
    assert plan.total_rows == 30


def test_hidden_names_below_the_input_root_are_still_skipped(tmp_path: Path) -> None:
    root = tmp_path / "_staging" / "reviews"
    write(root / "a.parquet", range(20))
    write(root / "_tmp" / "x.parquet", range(5))
    write(root / ".hidden.parquet", range(5))
    write(root / "sub" / "_SUCCESS.parquet", range(5))
    plan = make_plan(spec_for(root, tmp_path / "out"))
    assert [f.relpath for f in plan.files] == ["a.parquet"]


# --------------------------------------------------------------------------- rewritten files


def test_a_file_rewritten_with_the_same_row_count_changes_the_fingerprint(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(20), body="first")
    spec = spec_for(root, tmp_path / "out")
    before = make_plan(spec)
    write(root / "a.parquet", range(20), body="second version")
    after = make_plan(spec)
    assert after.total_rows == before.total_rows
    assert after.listing != before.listing
    assert after.fingerprint != before.fingerprint


def test_a_copy_with_only_a_new_mtime_keeps_the_fingerprint(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(20))
    spec = spec_for(root, tmp_path / "out")
    before = make_plan(spec)
    shutil.copyfile(root / "a.parquet", tmp_path / "copy.parquet")
    (root / "a.parquet").unlink()
    shutil.move(tmp_path / "copy.parquet", root / "a.parquet")
    os.utime(root / "a.parquet", (1_000_000_000, 1_000_000_000))
    assert make_plan(spec).fingerprint == before.fingerprint


def test_make_plan_records_each_files_identity(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(20))
    plan = make_plan(spec_for(root, tmp_path / "out"))
    (f,) = plan.files
    assert f.identity.startswith(f"20:{(root / 'a.parquet').stat().st_size}:")
    assert plan.identities == {f.path: f.identity}


# --------------------------------------------------------------------------- files changing mid-run


def test_a_file_that_shrank_after_planning_refuses_a_short_chunk(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(25))
    spec = spec_for(root, tmp_path / "out")
    plan = make_plan(spec)
    write(root / "a.parquet", range(15))  # shrank: the last chunk [20, 25) and half of [10, 20)
    with pytest.raises(InputChanged) as info:
        read_chunk(spec, plan.chunks[1], plan.protocol)
    msg = str(info.value)
    assert "a.parquet" in msg and "10 rows" in msg and "found 5" in msg
    assert "--set output.path=" in msg and "\n" not in msg
    with pytest.raises(InputChanged, match="found 0"):
        read_chunk(spec, plan.chunks[2], plan.protocol)


def test_a_file_rewritten_after_planning_is_caught_by_its_identity(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(20), body="first")
    spec = spec_for(root, tmp_path / "out")
    plan = make_plan(spec)
    chunk = plan.chunks[0]
    expected = plan.identities[chunk.path]
    assert read_chunk(spec, chunk, plan.protocol, expected=expected).num_rows == 10
    fs, _ = storage.open_fs(spec.input.path)
    check_unchanged(fs, chunk.path, expected)  # unchanged: no error

    write(root / "a.parquet", range(20), body="rewritten, same rows")
    with pytest.raises(InputChanged, match=r"a\.parquet .*found 20, but its size or Parquet foot"):
        read_chunk(spec, chunk, plan.protocol, expected=expected)
    with pytest.raises(InputChanged, match="restore the file"):
        check_unchanged(fs, chunk.path, expected)


def test_a_file_that_grew_after_planning_is_caught_by_its_identity(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(20))
    spec = spec_for(root, tmp_path / "out")
    plan = make_plan(spec)
    write(root / "a.parquet", range(30))
    chunk = plan.chunks[1]  # rows 10-20 are still there, so only the identity tells
    with pytest.raises(InputChanged, match="planned 20 rows, found 30"):
        read_chunk(spec, chunk, plan.protocol, expected=plan.identities[chunk.path])


def test_input_changed_survives_pickling() -> None:
    import pickle

    err = InputChanged("input file x changed", chunk="c1")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is InputChanged and again.chunk == "c1"


# --------------------------------------------------------------------------- unreadable input


@pytest.mark.parametrize(
    "damage",
    [
        lambda data: b"",
        lambda data: b"not parquet at all" * 10,
        lambda data: data[: len(data) // 2],
        lambda data: data[:-40] + b"x" * 32 + data[-8:],  # footer bytes garbled
    ],
    ids=["empty", "not-parquet", "truncated", "garbled-footer"],
)
def test_a_corrupt_parquet_file_is_a_one_line_error(
    tmp_path: Path, damage: Callable[[bytes], bytes]
) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(20))
    write(root / "b.parquet", range(20))
    bad = root / "b.parquet"
    bad.write_bytes(damage(bad.read_bytes()))
    with pytest.raises(SpecError) as info:
        make_plan(spec_for(root, tmp_path / "out"))
    msg = str(info.value)
    assert "b.parquet is not a readable Parquet file" in msg
    assert "fix or remove it" in msg and "\n" not in msg


def test_a_missing_input_path_says_it_does_not_exist(tmp_path: Path) -> None:
    spec = spec_for(tmp_path / "nowhere", tmp_path / "out")
    with pytest.raises(SpecError, match=r"input.path: .*nowhere does not exist"):
        make_plan(spec)


def test_a_glob_that_matches_nothing_says_so(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    spec = spec_for(f"{tmp_path}/in/*.parquet", tmp_path / "out")
    with pytest.raises(SpecError, match="no Parquet files"):
        make_plan(spec)


# --------------------------------------------------------------------------- what a resume says


def _record(spec: JobSpec) -> dict[str, object]:
    plan = make_plan(spec)
    return store.job_record(
        spec, fingerprint=plan.fingerprint, listing=plan.listing, files=len(plan.files),
        rows=plan.total_rows, chunks=len(plan.chunks),
    )  # fmt: skip


def test_a_resume_after_a_same_size_rewrite_is_refused_as_an_input_change(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(20), body="first")
    spec = spec_for(root, tmp_path / "out")
    store.ensure_job_record(spec, _record(spec))
    write(root / "a.parquet", range(20), body="other")
    with pytest.raises(SpecError) as info:
        store.ensure_job_record(spec, _record(spec))
    msg = str(info.value)
    assert "changed: input listing" in msg and "--set output.path=" in msg


def test_a_resume_with_less_gpu_memory_is_accepted(tmp_path: Path) -> None:
    root = tmp_path / "in"
    write(root / "a.parquet", range(20))
    spec = spec_for(root, tmp_path / "out")
    store.ensure_job_record(spec, _record(spec))
    lower = parse_spec(
        spec.model_dump_json(),
        overrides=["model.engine_args.gpu_memory_utilization=0.5"],
    )
    store.ensure_job_record(lower, _record(lower))  # no SpecError: same job
    other = parse_spec(spec.model_dump_json(), overrides=["model.engine_args.dtype=float16"])
    with pytest.raises(SpecError, match=r"model\.engine_args\.dtype"):
        store.ensure_job_record(other, _record(other))
