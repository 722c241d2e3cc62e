"""Pipelines: rows become model inputs; results become columns; bad rows become row errors."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batch.engine import EngineResult
from batch.errors import RowError, SpecError
from batch.spec import parse_spec
from pipelines import load_pipeline
from pipelines.reviews import needs_review

BASE = """
name: t
input: {path: in/}
output: {path: out/}
model: {path: m, task: %s}
prompt: {%s template: "{{ title }}: {{ body }}"}
"""


def test_generate_builds_chat_messages_with_system() -> None:
    p = load_pipeline(parse_spec(BASE % ("generate", "system: 'Be brief about {{ title }}.',")))
    msgs = p.prepare({"title": "Kettle", "body": "boils fast"})
    assert msgs == [
        {"role": "system", "content": "Be brief about Kettle."},
        {"role": "user", "content": "Kettle: boils fast"},
    ]
    assert p.required_columns() == {"title", "body"}


def test_empty_prompt_is_a_row_error() -> None:
    spec = parse_spec(BASE.replace('"{{ title }}: {{ body }}"', '"{{ body }}"') % ("embed", ""))
    with pytest.raises(RowError) as info:
        load_pipeline(spec).prepare({"body": "   "})
    assert info.value.kind == "EmptyText"


def test_embed_finish_makes_fixed_size_float32_vectors() -> None:
    p = load_pipeline(parse_spec(BASE % ("embed", "")))
    results = [EngineResult(key=i, embedding=[0.6, 0.8], input_tokens=3) for i in range(3)]
    table = p.finish_batch([{}] * 3, results)
    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 2)
    assert table["input_tokens"].to_pylist() == [3, 3, 3]


def test_unknown_user_pipeline_is_a_spec_error() -> None:
    spec = parse_spec(BASE % ("generate", "") + "pipeline: nosuch.module:Thing\n")
    with pytest.raises(SpecError, match=r"cannot import module .nosuch\.module."):
        load_pipeline(spec)


def test_user_pipeline_of_the_wrong_task_is_refused() -> None:
    spec = parse_spec(BASE % ("embed", "") + "pipeline: pipelines.reviews:ReviewTriage\n")
    with pytest.raises(SpecError, match="is a 'generate' pipeline"):
        load_pipeline(spec)


TYPED = BASE % ("generate", "") + """
response:
  fields: {sentiment: [positive, negative, mixed], summary: {type: string, maxLength: 120}}
"""


def test_without_response_the_output_schema_is_exactly_the_four_columns() -> None:
    p = load_pipeline(parse_spec(BASE % ("generate", "")))
    assert p.output_schema() == pa.schema(
        [("generated_text", pa.string()), ("finish_reason", pa.string()),
         ("input_tokens", pa.int32()), ("output_tokens", pa.int32())]
    )  # fmt: skip
    msgs = p.prepare({"title": "Kettle", "body": "boils fast"})
    assert msgs == [{"role": "user", "content": "Kettle: boils fast"}]


def test_typed_columns_follow_the_text_columns_then_resamples() -> None:
    p = load_pipeline(parse_spec(TYPED))
    assert p.output_schema() == pa.schema(
        [("generated_text", pa.string()), ("finish_reason", pa.string()),
         ("input_tokens", pa.int32()), ("output_tokens", pa.int32()),
         ("sentiment", pa.string()), ("summary", pa.string()),
         ("sentiment_confidence", pa.float64()), ("resamples", pa.int16())]
    )  # fmt: skip


def test_the_instruction_line_ends_the_user_message_unless_turned_off() -> None:
    row = {"title": "Kettle", "body": "boils fast"}
    msgs = load_pipeline(parse_spec(TYPED)).prepare(row)
    user = msgs[-1]["content"]
    assert isinstance(user, str) and user.startswith("Kettle: boils fast\n\n")
    assert "sentiment" in user.split("\n\n")[-1] and "positive" in user
    plain = load_pipeline(parse_spec(TYPED + "  instruct: false\n")).prepare(row)
    assert plain == [{"role": "user", "content": "Kettle: boils fast"}]


def test_finish_puts_checked_values_into_typed_columns() -> None:
    p = load_pipeline(parse_spec(TYPED))
    results = [
        EngineResult(key=0, text='{"sentiment":"mixed","summary":"ok"}', finish_reason="stop",
                     input_tokens=9, output_tokens=7,
                     values={"sentiment": "mixed", "summary": "ok"},
                     confidence={"sentiment_confidence": 0.75}, resamples=1),
        EngineResult(key=1, text='{"sentiment":"negative","summary":""}', finish_reason="stop",
                     values={"sentiment": "negative", "summary": ""},
                     confidence={"sentiment_confidence": None}),
    ]  # fmt: skip
    table = p.finish_batch([{}, {}], results)
    assert table.schema == p.output_schema()
    assert table["sentiment"].to_pylist() == ["mixed", "negative"]
    assert table["summary"].to_pylist() == ["ok", ""]
    assert table["sentiment_confidence"].to_pylist() == [0.75, None]
    assert table["resamples"].to_pylist() == [1, 0]


def test_a_typed_column_may_not_overwrite_an_input_column() -> None:
    p = load_pipeline(parse_spec(TYPED))
    p.check_input_schema(pa.schema([("title", pa.string()), ("body", pa.string())]))
    with pytest.raises(SpecError, match="sentiment would overwrite input columns"):
        p.check_input_schema(pa.schema([("body", pa.string()), ("sentiment", pa.string())]))


def test_review_triage_needs_a_typed_sentiment() -> None:
    plain = BASE % ("generate", "") + "pipeline: pipelines.reviews:ReviewTriage\n"
    with pytest.raises(SpecError, match=r"add response\.fields\.sentiment"):
        load_pipeline(parse_spec(plain))
    p = load_pipeline(parse_spec(TYPED + "pipeline: pipelines.reviews:ReviewTriage\n"))
    assert "rating" in p.required_columns()
    assert p.output_schema().field("needs_review").type == pa.bool_()


@pytest.mark.parametrize(
    ("sentiment", "confidence", "rating", "flagged"),
    [
        ("positive", 0.9, 5, False),
        ("positive", 0.9, 1, True),  # label contradicts the stars
        ("negative", 0.9, 4, True),
        ("negative", 0.9, 2, False),
        ("mixed", 0.9, 5, False),
        ("mixed", 0.5, 3, True),  # unsure
        ("positive", None, 5, False),  # no confidence measured: only the stars decide
        ("positive", 0.95, None, False),
    ],
)
def test_review_triage_flags_unsure_or_contradicting_rows(
    sentiment: str, confidence: float | None, rating: int | None, flagged: bool
) -> None:
    assert needs_review(sentiment, confidence, rating, 0.6) is flagged
