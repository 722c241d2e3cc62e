"""Pipelines: rows become model inputs; results become columns; bad rows become row errors."""

from __future__ import annotations

import pyarrow as pa
import pytest

from batch.engine import EngineResult
from batch.errors import RowError, SpecError
from batch.spec import parse_spec
from pipelines import load_pipeline
from pipelines.reviews import parse_answer

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
    spec = parse_spec(BASE % ("embed", "") + "pipeline: pipelines.reviews:ReviewEnrichment\n")
    with pytest.raises(SpecError, match="is a 'generate' pipeline"):
        load_pipeline(spec)


@pytest.mark.parametrize(
    ("text", "sentiment", "summary"),
    [
        ("Sentiment: negative\nSummary: It broke.", "negative", "It broke."),
        ("The customer is satisfied. Great value.", "unknown", "The customer is satisfied."),
        ("Mixed review: good design but faded.", "mixed", "Mixed review: good design but faded."),
        ("", "unknown", ""),
    ],
)
def test_review_answer_parsing(text: str, sentiment: str, summary: str) -> None:
    assert parse_answer(text) == (sentiment, summary)
