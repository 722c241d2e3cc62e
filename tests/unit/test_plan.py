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


# --------------------------------------------------------------------------- plan estimate


class WordTokenizer:
    """One token per whitespace-separated word; records the chat template's keyword arguments."""

    model_max_length = 4096

    def __init__(self) -> None:
        self.chat_kwargs: list[dict[str, object]] = []

    def apply_chat_template(self, messages: list[dict[str, str]], **kw: object) -> str:
        self.chat_kwargs.append(kw)
        extra = " thinking-off" if kw.get("enable_thinking") is False else ""
        return "<s> " + " ".join(m["content"] for m in messages) + extra + " </s>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()] + ([0] if add_special_tokens else [])


def test_chat_token_ids_passes_the_template_kwargs_and_adds_no_special_tokens() -> None:
    from batch.prompt import chat_token_ids

    tok = WordTokenizer()
    msgs = [{"role": "user", "content": "hello there"}]
    assert chat_token_ids(tok, msgs, {}) == [3, 5, 5, 4]
    assert tok.chat_kwargs[-1] == {"tokenize": False, "add_generation_prompt": True}
    assert len(chat_token_ids(tok, msgs, {"enable_thinking": False})) == 5
    assert tok.chat_kwargs[-1]["enable_thinking"] is False


def _estimate(
    monkeypatch: pytest.MonkeyPatch, reviews: Path, tmp_path: Path, *sets: str
) -> tuple[dict[str, object], WordTokenizer]:
    import batch.estimate as estimate_mod
    import batch.models

    tok = WordTokenizer()
    monkeypatch.setattr(estimate_mod, "_tokenizer", lambda _dir: tok)
    monkeypatch.setattr(batch.models, "resolve_model", lambda path: str(tmp_path))
    text = f"""
name: t
input: {{path: "{reviews}", id_column: review_id}}
output: {{path: "{tmp_path / "out"}"}}
model: {{path: m, engine: fake}}
prompt: {{template: "{{{{ body }}}}"}}
sampling: {{max_tokens: 40}}
resources: {{rows_per_chunk: 10}}
"""
    spec = parse_spec(text, overrides=sets)
    return estimate_mod.estimate(spec, sample=8), tok


def test_plan_without_response_is_as_before(
    monkeypatch: pytest.MonkeyPatch, reviews: Path, tmp_path: Path
) -> None:
    doc, _ = _estimate(monkeypatch, reviews, tmp_path)
    rows_ok = doc["rows"] - doc["est_failed_rows"]  # type: ignore[operator]
    assert doc["est_output_tokens_max"] == rows_ok * 40
    assert "response" not in doc and "est_output_tokens_worst" not in doc
    assert doc["warnings"] == []


def test_plan_multiplies_the_output_bound_by_n(
    monkeypatch: pytest.MonkeyPatch, reviews: Path, tmp_path: Path
) -> None:
    doc, _ = _estimate(monkeypatch, reviews, tmp_path, "sampling.n=3", "sampling.temperature=0.7")
    plain, _ = _estimate(monkeypatch, reviews, tmp_path)
    assert doc["est_output_tokens_max"] == plain["est_output_tokens_max"] * 3  # type: ignore[operator]


def test_plan_tokenizes_with_the_chat_template_kwargs(
    monkeypatch: pytest.MonkeyPatch, reviews: Path, tmp_path: Path
) -> None:
    plain, _ = _estimate(monkeypatch, reviews, tmp_path)
    doc, tok = _estimate(
        monkeypatch, reviews, tmp_path, "prompt.chat_template_kwargs.enable_thinking=false"
    )
    assert all(kw.get("enable_thinking") is False for kw in tok.chat_kwargs)
    assert doc["mean_input_tokens_per_row"] == plain["mean_input_tokens_per_row"] + 1  # type: ignore[operator]


TYPED = (
    "response.fields={sentiment: [positive, negative, mixed], "
    "summary: {type: string, maxLength: 160}, stars: int}"
)


def test_plan_accounts_for_a_typed_answer(
    monkeypatch: pytest.MonkeyPatch, reviews: Path, tmp_path: Path
) -> None:
    plain, _ = _estimate(monkeypatch, reviews, tmp_path)
    doc, _ = _estimate(monkeypatch, reviews, tmp_path, TYPED)
    resp = doc["response"]
    assert isinstance(resp, dict)
    assert resp["kind"] == "fields" and resp["max_resamples"] == 2
    assert resp["instruction_tokens_per_row"] > 5
    # the instruction is on the user message, so it is in the input estimate
    assert doc["mean_input_tokens_per_row"] > plain["mean_input_tokens_per_row"]  # type: ignore[operator]
    assert resp["min_output_tokens_per_row"] >= 2  # the skeleton plus EOS
    assert doc["est_output_tokens_worst"] == plain["est_output_tokens_max"] * 3  # type: ignore[operator]
    assert doc["warnings"] == []


def test_plan_warns_when_no_answer_fits_max_tokens(
    monkeypatch: pytest.MonkeyPatch, reviews: Path, tmp_path: Path
) -> None:
    from batch.estimate import response_plan

    spec = parse_spec(
        "name: t\ninput: {path: x}\noutput: {path: y}\nmodel: {path: m, engine: fake}\n"
        "prompt: {template: '{{ body }}'}\nsampling: {max_tokens: 1}\n",
        overrides=(
            "response.json_schema={type: object, properties: "
            "{a: {type: string, maxLength: 5}, b: {type: integer}, c: {type: integer}}}",
        ),
    )
    tok = WordTokenizer()
    skeleton_tokens = len(tok.encode('{"a":"","b":0,"c":0}', add_special_tokens=False))
    resp, warnings = response_plan(spec, tok)
    assert resp is not None and resp["min_output_tokens_per_row"] == skeleton_tokens + 1
    assert len(warnings) == 1
    assert "every row would fail as SchemaViolation" in warnings[0]
    assert f"raise sampling.max_tokens to at least {skeleton_tokens + 1}" in warnings[0]


def test_plan_warns_about_unbounded_strings_with_few_tokens(
    monkeypatch: pytest.MonkeyPatch, reviews: Path, tmp_path: Path
) -> None:
    from batch.estimate import response_plan

    base = (
        "name: t\ninput: {path: x}\noutput: {path: y}\nmodel: {path: m, engine: fake}\n"
        "prompt: {template: '{{ body }}'}\nsampling: {max_tokens: 32}\n"
    )
    fields = "response.fields={summary: str, tags: [str], who: {name: str}, label: [a, b]}"
    _, warnings = response_plan(parse_spec(base, overrides=(fields,)), WordTokenizer())
    assert len(warnings) == 1
    assert "string fields without maxLength (summary, tags[], who.name)" in warnings[0]
    many = parse_spec(base, overrides=(fields, "sampling.max_tokens=256"))
    assert response_plan(many, WordTokenizer())[1] == []
