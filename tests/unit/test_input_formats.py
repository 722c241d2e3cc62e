"""JSONL, CSV and OpenAI batch files as job input, and Hive-style partition folders.

What a user would check: a chunk reads only its rows (from its byte range), every row comes out
exactly once, a row that does not parse is a failed row with its reason (never a failed job),
duplicate custom_ids are refused before anything runs, and a file changed after planning is
refused. The end-to-end tests (marked with the ``ray_once`` fixture) run the fake engine on
real Ray.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import storage
from batch.errors import InputChanged, SpecError
from batch.plan import (
    InputChunk,
    Plan,
    check_unchanged,
    make_plan,
    malformed_rows,
    partitions,
    read_chunk,
)
from batch.spec import JobSpec, parse_spec


def spec_for(
    inp: Path | str, out: Path, *, rows: int = 10, extra: str = "", template: str = ""
) -> JobSpec:
    text = f"""
name: formats-test
input: {{path: "{inp}"{extra}}}
output: {{path: "{out}"}}
model: {{path: fake-model, engine: fake, fake_options: {{max_model_len: 400}}}}
prompt: {{template: "Say {{{{ text }}}}"}}
sampling: {{max_tokens: 8}}
resources: {{rows_per_chunk: {rows}, chunks_in_flight: 3}}
"""
    return parse_spec(text, overrides=[f"prompt.template={template}"] if template else [])


def write_jsonl(path: Path, rows: list[Any], *, blank_after: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as fh:
        for i, row in enumerate(rows):
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
            if i == blank_after:
                fh.write("\n  \n")
    return path


def texts(n: int, prefix: str = "t") -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i:03d}", "n": i, "text": f"row {prefix}{i}"} for i in range(n)]


def read_all(spec: JobSpec, plan: Plan) -> pa.Table:
    tables = [read_chunk(spec, c, plan.protocol, expected=plan.identities.get(c.path))
              for c in plan.chunks]  # fmt: skip
    return pa.concat_tables(tables)


# --------------------------------------------------------------------------- spec


def test_the_format_follows_the_extension_unless_set(tmp_path: Path) -> None:
    assert spec_for(tmp_path / "a.jsonl", tmp_path / "o").input.format == "jsonl"
    assert spec_for(tmp_path / "a.json", tmp_path / "o").input.format == "jsonl"
    assert spec_for(tmp_path / "in/*.csv", tmp_path / "o").input.format == "csv"
    assert spec_for(tmp_path / "in", tmp_path / "o").input.format == "parquet"
    given = spec_for(tmp_path / "a.jsonl", tmp_path / "o", extra=", format: openai-batch")
    assert given.input.format == "openai-batch"
    # a folder of JSONL needs the format named: the folder's files are not guessed
    assert spec_for(tmp_path / "in", tmp_path / "o", extra=", format: jsonl").input.format == (
        "jsonl"
    )


# --------------------------------------------------------------------------- JSONL


def test_jsonl_chunks_read_only_their_byte_range(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "in" / "a.jsonl", texts(25), blank_after=3)
    spec = spec_for(tmp_path / "in", tmp_path / "out", extra=", format: jsonl")
    plan = make_plan(spec)
    assert plan.total_rows == 25 and [c.rows for c in plan.chunks] == [10, 10, 5]
    assert plan.schema.names == ["id", "n", "text", "_parse_error"]
    chunk = plan.chunks[1]
    assert isinstance(chunk, InputChunk)
    lines = path.read_bytes().splitlines(keepends=True)
    # row 10 is on line 13 (two blank lines after row 3); its chunk starts at that line's byte
    assert chunk.line_start == 13
    assert chunk.byte_start == sum(len(x) for x in lines[:12])
    table = read_chunk(spec, chunk, plan.protocol, expected=plan.identities[chunk.path])
    assert table["id"].to_pylist() == [f"t{i:03d}" for i in range(10, 20)]
    assert table["_source_row"].to_pylist() == list(range(10, 20))
    assert table["_parse_error"].null_count == 10
    # the same plan again: the same chunk ids (resume)
    assert [c.chunk_id for c in make_plan(spec).chunks] == [c.chunk_id for c in plan.chunks]


def test_a_jsonl_chunk_is_read_from_its_bytes_not_the_whole_file(tmp_path: Path) -> None:
    """Bytes outside the chunk are not parsed: garbage there does not reach the chunk."""
    path = write_jsonl(tmp_path / "a.jsonl", texts(20))
    spec = spec_for(path, tmp_path / "out")
    plan = make_plan(spec)
    second = plan.chunks[1]
    assert isinstance(second, InputChunk)
    data = bytearray(path.read_bytes())
    data[: second.byte_start - 1] = b"x" * (second.byte_start - 1)  # same size, first half gone
    path.write_bytes(bytes(data))
    table = read_chunk(spec, second, plan.protocol)  # no identity check: bytes only
    assert table["id"].to_pylist() == [f"t{i:03d}" for i in range(10, 20)]


def test_a_row_of_another_type_is_a_failed_row_not_a_failed_job(tmp_path: Path) -> None:
    rows: list[Any] = texts(12)
    rows[11] = {"id": "t011", "n": "eleven", "text": "row t11"}  # n was an integer
    rows.append("{not json")
    rows.append("[1, 2]")
    write_jsonl(tmp_path / "a.jsonl", rows)
    spec = spec_for(tmp_path / "a.jsonl", tmp_path / "out")
    plan = make_plan(spec)
    assert plan.schema.field("n").type == pa.int64()  # from the first chunk
    table = read_all(spec, plan)
    assert table.num_rows == 14
    errors = table["_parse_error"].to_pylist()
    assert [i for i, e in enumerate(errors) if e] == [11, 12, 13]
    assert errors[11].startswith("line 12: ") and "string" in errors[11]
    assert errors[12].startswith("line 13: ")
    assert table["id"].to_pylist()[10] == "t010"  # the chunk's good rows are kept
    assert malformed_rows(spec, table)[11][0] == "MalformedRow"


def test_columns_of_later_files_join_the_schema(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [{"id": "a", "n": None}])
    write_jsonl(tmp_path / "in" / "b.jsonl", [{"id": "b", "n": 2.5, "extra": True}])
    spec = spec_for(tmp_path / "in", tmp_path / "out", extra=", format: jsonl")
    plan = make_plan(spec)
    assert plan.schema.names == ["id", "n", "extra", "_parse_error"]
    assert plan.schema.field("n").type == pa.float64()
    table = read_all(spec, plan)
    assert table.select(["id", "n", "extra"]).to_pylist() == [
        {"id": "a", "n": None, "extra": None},
        {"id": "b", "n": 2.5, "extra": True},
    ]


def test_a_changed_text_file_is_refused_when_read(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", texts(20))
    spec = spec_for(path, tmp_path / "out")
    plan = make_plan(spec)
    chunk = plan.chunks[1]
    expected = plan.identities[chunk.path]
    # same size, same first and last bytes: only the modification time says it was written
    data = path.read_bytes().replace(b"row t12", b"row X12")
    path.write_bytes(data)
    os.utime(path, ns=(1, 1))
    with pytest.raises(InputChanged, match=r"a\.jsonl changed since the job was planned"):
        read_chunk(spec, chunk, plan.protocol, expected=expected)
    fs, _ = storage.open_fs(str(path))
    with pytest.raises(InputChanged, match="modification time or content differs"):
        check_unchanged(fs, str(path), expected)
    # rows cut short: the byte range no longer holds the planned rows
    path.write_bytes(b"\n".join(path.read_bytes().splitlines()[:15]) + b"\n")
    with pytest.raises(InputChanged, match="planned 10 rows, found 5"):
        read_chunk(spec, chunk, plan.protocol)


def test_the_listing_and_fingerprint_change_when_a_text_file_is_touched(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "a.jsonl", texts(5))
    spec = spec_for(path, tmp_path / "out")
    before = make_plan(spec)
    os.utime(path, ns=(10**18, 10**18))
    after = make_plan(spec)
    assert before.listing != after.listing and before.fingerprint != after.fingerprint
    assert [c.chunk_id for c in before.chunks] == [c.chunk_id for c in after.chunks]


# --------------------------------------------------------------------------- CSV


CSV = (
    b'id,name,qty\n1,"comma, inside",3\n2,"two\nlines",4\n\n3,plain,5\r\n'
    b'4,"said ""hi""",6\n5,e,7\n6,f,8\n7,g,9\n'
)


def test_csv_with_quotes_commas_and_newlines_in_fields(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(CSV)
    spec = spec_for(tmp_path / "a.csv", tmp_path / "out", rows=3)
    plan = make_plan(spec)
    assert plan.total_rows == 7 and [c.rows for c in plan.chunks] == [3, 3, 1]
    assert plan.schema.names == ["id", "name", "qty", "_parse_error"]
    table = read_all(spec, plan)
    assert table["name"].to_pylist() == [
        "comma, inside", "two\nlines", "plain", 'said "hi"', "e", "f", "g"
    ]  # fmt: skip
    assert table["qty"].to_pylist() == [3, 4, 5, 6, 7, 8, 9]
    assert table["_parse_error"].null_count == 7
    second = plan.chunks[1]
    assert isinstance(second, InputChunk) and second.header == (0, len(b"id,name,qty\n"))
    assert second.line_start == 7  # the quoted newline and the blank line count as lines


def test_a_csv_row_that_does_not_fit_is_a_failed_row(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b"id,qty\n1,2\n2,3\n3,lots\n4\n5,6\n")
    spec = spec_for(tmp_path / "a.csv", tmp_path / "out", rows=2)
    plan = make_plan(spec)
    table = read_all(spec, plan)
    assert table["id"].to_pylist() == [1, 2, None, None, 5]
    errors = table["_parse_error"].to_pylist()
    assert errors[2].startswith("line 4: ") and "lots" in errors[2]
    assert errors[3].startswith("line 5: ") and "columns" in errors[3]


def test_a_csv_without_a_closing_quote_is_refused_at_plan(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_bytes(b'id,name\n1,"open\n2,b\n')
    with pytest.raises(SpecError, match=r"a\.csv: line 2: a quoted field is not closed"):
        make_plan(spec_for(tmp_path / "a.csv", tmp_path / "out"))


def test_no_files_of_the_format_says_which(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.parquet").write_bytes(b"")
    spec = spec_for(tmp_path / "in", tmp_path / "out", extra=", format: csv")
    with pytest.raises(SpecError, match=r"no CSV files \(\*\.csv\) at .*input\.format: csv"):
        make_plan(spec)


# --------------------------------------------------------------------------- Hive partitions


def test_partition_folders_are_columns_and_plain_folders_are_not() -> None:
    assert partitions("dt=2026-12-01/region=eu/part.parquet") == [
        ("dt", "2026-12-01"), ("region", "eu")
    ]  # fmt: skip
    assert partitions("2026/dt=x%2Fy/a.csv") == [("dt", "x/y")]
    assert partitions("k=__HIVE_DEFAULT_PARTITION__/a.csv") == [("k", None)]
    assert partitions("region=eu.parquet") == []  # a file name is not a folder


def test_parquet_partitions_become_columns_for_the_template(tmp_path: Path) -> None:
    for dt, region, n in (("2026-12-01", "eu", 3), ("2026-12-02", "us", 2)):
        folder = tmp_path / "in" / f"dt={dt}" / f"region={region}"
        folder.mkdir(parents=True)
        pq.write_table(pa.table({"text": [f"{region}{i}" for i in range(n)]}), folder / "p.parquet")
    (tmp_path / "in" / "plain").mkdir()
    pq.write_table(pa.table({"text": ["z"]}), tmp_path / "in" / "plain" / "p.parquet")
    spec = spec_for(tmp_path / "in", tmp_path / "out", template="{{ region }}")
    plan = make_plan(spec, required_columns=["region", "text"])
    assert plan.schema.names == ["text", "dt", "region"]
    table = read_all(spec, plan)
    assert table.select(["text", "dt", "region"]).to_pylist() == [
        {"text": "eu0", "dt": "2026-12-01", "region": "eu"},
        {"text": "eu1", "dt": "2026-12-01", "region": "eu"},
        {"text": "eu2", "dt": "2026-12-01", "region": "eu"},
        {"text": "us0", "dt": "2026-12-02", "region": "us"},
        {"text": "us1", "dt": "2026-12-02", "region": "us"},
        {"text": "z", "dt": None, "region": None},
    ]
    # a projection may name a partition column
    only = spec_for(tmp_path / "in", tmp_path / "out", extra=", columns: [region, text]")
    cols = read_chunk(only, make_plan(only).chunks[0], "file").column_names
    assert cols == ["region", "text", "_source_file", "_source_row"]


def test_unpartitioned_parquet_chunks_are_as_before(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", "b"]}), tmp_path / "a.parquet")
    plan = make_plan(spec_for(tmp_path / "a.parquet", tmp_path / "out"))
    assert type(plan.chunks[0]).__name__ == "Chunk"


def test_a_column_named_like_a_partition_is_refused(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "region=eu" / "a.jsonl", [{"region": "x", "text": "t"}])
    spec = spec_for(tmp_path / "in", tmp_path / "out", extra=", format: jsonl")
    with pytest.raises(SpecError, match="'region' is both in the files and a partition folder"):
        make_plan(spec)


# --------------------------------------------------------------------------- openai-batch


def request(cid: str, content: str = "hi", **over: Any) -> dict[str, Any]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    return {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body,
            **over}  # fmt: skip


def test_openai_batch_lines_become_rows_and_malformed_lines_failed_rows(tmp_path: Path) -> None:
    lines: list[Any] = [
        request("a"),
        '{"custom_id": "b", "method": "POST", "url": "/v1/embeddings", '
        '"body":  {"input": "x",  "model": "e"} }',
        "not json at all",
        request("c", method="GET"),
        request("d", url="/v1/completions"),
        {**request("e"), "body": "a string"},
        {"method": "POST", "url": "/v1/embeddings", "body": {}},
        [1, 2],
        {**request("f"), "custom_id": 7},
    ]
    path = write_jsonl(tmp_path / "req.jsonl", lines, blank_after=0)
    spec = spec_for(path, tmp_path / "out", extra=", format: openai-batch")
    plan = make_plan(spec)
    assert plan.schema.names == ["custom_id", "method", "url", "body", "_line", "_parse_error"]
    table = read_all(spec, plan)
    rows = table.to_pylist()
    assert rows[0]["custom_id"] == "a" and json.loads(rows[0]["body"]) == lines[0]["body"]
    # the body as written, spaces and key order kept; lines counted with the blank ones
    assert rows[1]["body"] == '{"input": "x",  "model": "e"}' and rows[1]["_line"] == 4
    assert [r["_line"] for r in rows] == [1, 4, 5, 6, 7, 8, 9, 10, 11]
    errors = {r["_line"]: (r["custom_id"], r["_parse_error"]) for r in rows if r["_parse_error"]}
    assert errors == {
        5: (None, "line 5: the line is not JSON (Expecting value: line 1 column 1 (char 0))"),
        6: ("c", 'line 6: method must be POST (got "GET")'),
        7: ("d", 'line 7: url must be /v1/chat/completions or /v1/embeddings (got '
                 '"/v1/completions")'),
        8: ("e", "line 8: body is not a JSON object"),
        9: (None, "line 9: custom_id is missing"),
        10: (None, "line 10: the line is not a JSON object"),
        11: (None, "line 11: custom_id must be a non-empty string"),
    }  # fmt: skip
    failures = malformed_rows(spec, table)
    assert sorted(failures) == [2, 3, 4, 5, 6, 7, 8]
    assert {kind for kind, _ in failures.values()} == {"MalformedRequest"}


def test_duplicate_custom_ids_are_refused_with_both_lines(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "req.jsonl", [request("a"), request("b"), request("a")])
    spec = spec_for(path, tmp_path / "out", extra=", format: openai-batch")
    with pytest.raises(SpecError, match=r'custom_id "a" is on lines 1 and 3'):
        make_plan(spec)


def test_duplicate_custom_ids_across_files_name_both_files(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in" / "a.jsonl", [request("x"), request("y")])
    write_jsonl(tmp_path / "in" / "b.jsonl", [request("z"), request("y")])
    spec = spec_for(tmp_path / "in", tmp_path / "out", extra=", format: openai-batch")
    with pytest.raises(SpecError, match=r'"y" is on line 2 of .*a\.jsonl and line 2 of .*b\.'):
        make_plan(spec)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ray_once() -> Iterator[None]:
    from batch.runner import ray_session

    with ray_session(None):
        yield


def read_dir(path: Path) -> pa.Table:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files], promote_options="default") \
        if files else pa.table({})  # fmt: skip


def outputs(out: Path) -> tuple[pa.Table, pa.Table]:
    return read_dir(out / "data"), read_dir(out / "_failed")


def provenance(out: Path) -> list[tuple[str, int]]:
    data, failed = outputs(out)
    pairs: list[tuple[str, int]] = []
    for t in (data, failed):
        if t.num_rows:
            pairs += zip(t["_source_file"].to_pylist(), t["_source_row"].to_pylist(), strict=True)
    return sorted(pairs)


def drop_commits(out: Path, n: int) -> list[str]:
    (out / "_MANIFEST.json").unlink(missing_ok=True)
    lost = []
    for marker in sorted((out / "_markers").glob("*.json"))[:n]:
        marker.unlink()
        lost.append(marker.stem)
        for kind in ("data", "_failed"):
            for part in (out / kind).glob(f"part-{marker.stem}*.parquet"):
                part.unlink()
    return lost


def test_jsonl_job_every_row_once_resume_and_a_changed_file(ray_once: None, tmp_path: Path) -> None:
    from batch.job import run_job
    from batch.progress import NullReporter

    rows: list[Any] = texts(23, "a")
    rows[7] = {"id": "a007", "n": "seven", "text": "row a7"}
    a = write_jsonl(tmp_path / "in" / "a.jsonl", rows, blank_after=2)
    b = write_jsonl(tmp_path / "in" / "b.jsonl", texts(14, "b"))
    out = tmp_path / "out"
    spec = spec_for(tmp_path / "in", out, extra=", format: jsonl")
    expected = sorted([(str(a), i) for i in range(23)] + [(str(b), i) for i in range(14)])
    summary = run_job(spec, NullReporter())
    assert provenance(out) == expected
    data, failed = outputs(out)
    assert sorted(data["id"].to_pylist()) == sorted(
        [f"a{i:03d}" for i in range(23) if i != 7] + [f"b{i:03d}" for i in range(14)]
    )
    assert failed["_error_class"].to_pylist() == ["MalformedRow"]
    assert failed["_error_message"].to_pylist()[0].startswith("line 10: ")
    assert summary.rows == 36 and summary.failed_rows == 1
    # a crash lost two chunks' commits: the rerun redoes those two only, every row still once
    drop_commits(out, 2)
    again = run_job(spec, NullReporter())
    assert again.chunks_run == 2
    assert provenance(out) == expected
    # a file written after the plan: the resume is refused, naming what changed
    drop_commits(out, 1)
    with a.open("a") as fh:
        fh.write(json.dumps({"id": "a999", "n": 1, "text": "late"}) + "\n")
    with pytest.raises(SpecError, match="input listing"):
        run_job(spec, NullReporter())


def test_csv_job_with_hive_partitions(ray_once: None, tmp_path: Path) -> None:
    from batch.job import run_job
    from batch.progress import NullReporter

    expected = []
    for dt, region, n in (
        ("2026-12-01", "eu", 12),
        ("2026-12-01", "us", 5),
        ("2026-12-02", "eu", 9),
    ):
        path = tmp_path / "in" / f"dt={dt}" / f"region={region}" / "part.csv"
        path.parent.mkdir(parents=True)
        body = "".join(f'{i},"{region} row {i}, quoted"\n' for i in range(n))
        path.write_text("n,text\n" + body)
        expected += [(str(path), i, dt, region) for i in range(n)]
    out = tmp_path / "out"
    spec = spec_for(tmp_path / "in", out, extra=", format: csv",
                    template="{{ region }} {{ dt }}: {{ text }}")  # fmt: skip
    run_job(spec, NullReporter())
    data, failed = outputs(out)
    assert failed.num_rows == 0
    got = sorted(zip(*(data[c].to_pylist() for c in ("_source_file", "_source_row", "dt",
                                                     "region")), strict=True))  # fmt: skip
    assert got == sorted(expected)
    assert all(t for t in data["generated_text"].to_pylist())
    lost = drop_commits(out, 2)
    again = run_job(spec, NullReporter())
    assert again.chunks_run == len(lost) == 2
    data, _ = outputs(out)
    assert sorted(zip(data["_source_file"].to_pylist(), data["_source_row"].to_pylist(),
                      strict=True)) == sorted((p, i) for p, i, _, _ in expected)  # fmt: skip


def test_openai_batch_job_fails_malformed_lines_only(ray_once: None, tmp_path: Path) -> None:
    from batch.job import run_job
    from batch.progress import NullReporter

    lines: list[Any] = [request(f"r{i}", f"question {i}") for i in range(6)]
    lines.insert(2, "{broken")
    lines.insert(5, request("x", method="GET"))
    path = write_jsonl(tmp_path / "req.jsonl", lines)
    out = tmp_path / "out"
    spec = spec_for(path, out, rows=3, extra=", format: openai-batch, id_column: custom_id",
                    template="{{ body }}")  # fmt: skip
    summary = run_job(spec, NullReporter())
    data, failed = outputs(out)
    assert sorted(data["custom_id"].to_pylist()) == [f"r{i}" for i in range(6)]
    lines_failed = zip(failed["_line"].to_pylist(), failed["_error_class"].to_pylist(), strict=True)
    assert sorted(lines_failed) == [(3, "MalformedRequest"), (6, "MalformedRequest")]
    assert summary.failed_rows == 2
