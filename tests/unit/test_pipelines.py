"""Pipelines: rows become model inputs; results become columns; bad rows become row errors."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from batch.engine import EngineResult, Sample
from batch.errors import RowError, SpecError
from batch.spec import parse_spec
from pipelines import load_pipeline
from pipelines.generate import LOGPROBS_TYPE
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


def _sample(text: str, **kw: Any) -> Sample:
    return Sample(text=text, finish_reason="stop", output_tokens=len(text) // 4, **kw)


def test_n_samples_make_every_answer_column_a_list_and_keep_counts_per_row() -> None:
    p = load_pipeline(parse_spec(TYPED + "sampling: {n: 2, temperature: 0.7}\n"))
    strings, floats = pa.list_(pa.string()), pa.list_(pa.float64())
    assert p.output_schema() == pa.schema(
        [("generated_text", strings), ("finish_reason", strings),
         ("input_tokens", pa.int32()), ("output_tokens", pa.int32()),
         ("sentiment", strings), ("summary", strings),
         ("sentiment_confidence", floats), ("resamples", pa.int16())]
    )  # fmt: skip
    samples = [
        _sample('{"sentiment":"mixed","summary":"a"}', values={"sentiment": "mixed",
                "summary": "a"}, confidence={"sentiment_confidence": 0.5}),
        _sample('{"sentiment":"positive","summary":"b"}', values={"sentiment": "positive",
                "summary": "b"}, confidence={"sentiment_confidence": 0.9}),
    ]  # fmt: skip
    result = EngineResult(key=0, text=samples[0].text, finish_reason="stop", input_tokens=9,
                          output_tokens=18, samples=samples, resamples=1)  # fmt: skip
    row = p.finish_batch([{}], [result]).to_pylist()[0]
    assert row["sentiment"] == ["mixed", "positive"] and row["summary"] == ["a", "b"]
    assert row["sentiment_confidence"] == [0.5, 0.9]
    assert row["finish_reason"] == ["stop", "stop"]
    assert row["generated_text"] == [s.text for s in samples]
    assert (row["input_tokens"], row["output_tokens"], row["resamples"]) == (9, 18, 1)


def test_plain_text_with_n_2_is_two_texts_per_row_without_typed_columns() -> None:
    p = load_pipeline(parse_spec(BASE % ("generate", "") + "sampling: {n: 2, temperature: 1}\n"))
    assert p.output_schema().names == [
        "generated_text", "finish_reason", "input_tokens", "output_tokens"
    ]  # fmt: skip
    result = EngineResult(key=0, text=" one ", samples=[_sample(" one "), _sample("two")])
    assert p.finish_batch([{}], [result])["generated_text"].to_pylist() == [["one", "two"]]


def test_logprobs_column_has_each_token_with_its_top_alternatives() -> None:
    p = load_pipeline(parse_spec(BASE % ("generate", "") + "sampling: {logprobs: 2}\n"))
    assert p.output_schema().field("logprobs").type == LOGPROBS_TYPE
    tokens = [(5, "Hi", -0.1), (7, "!", -0.5)]
    top = [[(5, "Hi", -0.1), (6, "Hey", -2.5)], [(7, "!", -0.5), (8, ".", -1.0), (9, "?", -3.0)]]
    result = EngineResult(key=0, text="Hi!", samples=[_sample("Hi!", tokens=tokens, top=top)])
    (cell,) = p.finish_batch([{}], [result])["logprobs"].to_pylist()
    assert [(t["token_id"], t["token"]) for t in cell] == [(5, "Hi"), (7, "!")]
    assert cell[0]["logprob"] == pytest.approx(-0.1)
    assert [a["token"] for a in cell[1]["top"]] == ["!", ".", "?"]
    no_trace = EngineResult(key=1, text="x", samples=[_sample("x")])
    assert p.finish_batch([{}], [no_trace])["logprobs"].to_pylist() == [None]


@pytest.mark.parametrize(
    "extra",
    ["model: {path: m, task: generate, engine_args: {reasoning_parser: qwen3}}\n",
     "model: {path: m, task: generate, engine: fake, fake_options: {reasoning: true}}\n"],
)  # fmt: skip
def test_a_reasoning_parser_adds_a_reasoning_column_next_to_the_answer(extra: str) -> None:
    text = TYPED.replace("model: {path: m, task: generate}\n", extra)
    p = load_pipeline(parse_spec(text))
    names = p.output_schema().names
    assert names.index("reasoning") == names.index("resamples") - 1
    s = _sample('{"sentiment":"mixed","summary":""}', reasoning="let me think",
                values={"sentiment": "mixed", "summary": ""})  # fmt: skip
    table = p.finish_batch([{}], [EngineResult(key=0, text=s.text, samples=[s])])
    assert table["reasoning"].to_pylist() == ["let me think"]
    assert table["generated_text"].to_pylist() == [s.text]
    assert "reasoning" not in load_pipeline(parse_spec(TYPED)).output_schema().names
