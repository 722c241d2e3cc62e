"""Chunk planning: deterministic ids, exact coverage of rows, committed chunks subtracted."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch.errors import SpecError
from batch.plan import chunk_id, make_plan, read_chunk
from batch.spec import JobSpec, parse_spec


def spec_for(inp: Path, out: Path, rows_per_chunk: int = 10, **extra: str) -> JobSpec:
    text = f"""
name: t
input: {{path: "{inp}", id_column: {extra.get("id_column", "review_id")}}}
output: {{path: "{out}"}}
model: {{path: m, engine: fake}}
prompt: {{template: "{extra.get("template", "{{{{ body }}}}")}"}}
resources: {{rows_per_chunk: {rows_per_chunk}}}
"""
    return parse_spec(text)


def test_chunks_cover_every_row_once_and_ids_are_stable(reviews: Path, tmp_path: Path) -> None:
    spec = spec_for(reviews, tmp_path / "out", rows_per_chunk=10)
    plan = make_plan(spec, required_columns={"body"})
    assert plan.total_rows == 96
    assert [f.relpath for f in plan.files] == ["reviews-0000.parquet", "reviews-0001.parquet"]
    assert len(plan.chunks) == 10  # 48 rows per file -> 5 chunks each (last one 8 rows)
    covered = [(c.relpath, r) for c in plan.chunks for r in range(c.row_start, c.row_end)]
    assert len(covered) == len(set(covered)) == 96
    again = make_plan(spec, required_columns={"body"})
    assert [c.chunk_id for c in again.chunks] == [c.chunk_id for c in plan.chunks]


def test_chunk_id_depends_on_file_and_range() -> None:
    a = chunk_id("x/reviews.parquet", 0, 10)
    assert a == chunk_id("x/reviews.parquet", 0, 10)
    assert a != chunk_id("x/reviews.parquet", 10, 20)
    assert a != chunk_id("y/reviews.parquet", 0, 10)
    assert a.startswith("reviews.000000000-000000010.")


def test_committed_chunks_are_subtracted(reviews: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = spec_for(reviews, out)
    plan = make_plan(spec)
    (out / "_markers").mkdir(parents=True)
    for c in plan.chunks[:3]:
        (out / "_markers" / f"{c.chunk_id}.json").write_text("{}")
    resumed = make_plan(spec)
    assert [c.chunk_id for c in resumed.pending] == [c.chunk_id for c in plan.chunks[3:]]


def test_read_chunk_reads_exactly_its_rows_across_row_groups(tmp_path: Path) -> None:
    inp = tmp_path / "in"
    inp.mkdir()
    table = pa.table({"review_id": [f"r{i}" for i in range(100)], "body": ["b"] * 100})
    pq.write_table(table, inp / "a.parquet", row_group_size=7)
    spec = spec_for(inp, tmp_path / "out", rows_per_chunk=30)
    plan = make_plan(spec)
    got = [read_chunk(spec, c, plan.protocol)["review_id"].to_pylist() for c in plan.chunks]
    assert got[1] == [f"r{i}" for i in range(30, 60)]
    assert [i for ids in got for i in ids] == table["review_id"].to_pylist()


def test_without_id_column_rows_carry_provenance(reviews: Path, tmp_path: Path) -> None:
    text = f"""
name: t
input: {{path: "{reviews}"}}
output: {{path: "{tmp_path / "out"}"}}
model: {{path: m, engine: fake}}
prompt: {{template: "{{{{ body }}}}"}}
resources: {{rows_per_chunk: 10}}
"""
    spec = parse_spec(text)
    plan = make_plan(spec)
    t = read_chunk(spec, plan.chunks[1], plan.protocol)
    assert t["_source_row"].to_pylist() == list(range(10, 20))
    assert t["_source_file"][0].as_py().endswith("reviews-0000.parquet")


def test_template_column_missing_from_input_fails_before_any_work(
    reviews: Path, tmp_path: Path
) -> None:
    spec = spec_for(reviews, tmp_path / "out")
    with pytest.raises(SpecError, match="no column 'bdy'; did you mean 'body'"):
        make_plan(spec, required_columns={"bdy"})


def test_no_input_files_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    spec = spec_for(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(SpecError, match="no Parquet files"):
        make_plan(spec)
