"""Typed answers: what the user writes under response: becomes a JSON Schema, Arrow columns, an
instruction line and a checker whose values always fit the columns."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import pyarrow as pa
import pytest
from jsonschema import Draft202012Validator

from batch.response import (
    CUT_OFF,
    Response,
    SchemaProblem,
    arrow_type,
    check_json_schema,
    compact_to_json_schema,
)
from batch.spec import ResponseSpec

DEMO = {
    "sentiment": ["positive", "negative", "mixed"],
    "summary": {"type": "string", "maxLength": 160},
}


def response(**kw: Any) -> Response:
    return Response.from_spec(ResponseSpec(**kw))


def obj(props: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


@pytest.mark.parametrize(
    ("compact", "expected"),
    [
        ("str", {"type": "string"}),
        ("int", {"type": "integer"}),
        ("float", {"type": "number"}),
        ("bool", {"type": "boolean"}),
        (["a", "b"], {"type": "string", "enum": ["a", "b"]}),
        (["str"], {"type": "array", "items": {"type": "string"}}),
        (
            [{"name": "str", "n": "int"}],
            {"type": "array", "items": obj({"name": {"type": "string"}, "n": {"type": "integer"}})},
        ),
        ({"name": "str"}, obj({"name": {"type": "string"}})),
        (
            {"type": "string", "maxLength": 160},
            {"type": "string", "maxLength": 160},
        ),
    ],
)
def test_compact_fields_become_json_schema(compact: Any, expected: dict[str, Any]) -> None:
    assert compact_to_json_schema({"x": compact}) == obj({"x": expected})


@pytest.mark.parametrize(
    ("compact", "path", "words"),
    [
        ({"stars": "integr"}, ("stars",), "did you mean 'int'?"),
        ({"who": {"age": "flot"}}, ("who", "age"), "did you mean 'float'?"),
        ({"kind": ["only"]}, ("kind",), "one-label enum"),
        ({"kind": ["a", "a"]}, ("kind",), "listed twice"),
        (
            {"s": {"type": "string", "maxLenght": 3}},
            ("s", "maxLenght"),
            "did you mean 'maxLength'?",
        ),
        ({"s": {"type": "string", "maxLength": "x"}}, ("s", "maxLength"), "not valid JSON Schema"),
        ({"generated_text": "str"}, ("generated_text",), "reserved column name"),
        ({"_id": "str"}, ("_id",), "reserved column name"),
        ({"x": {}}, ("x",), "empty mapping"),
    ],
)
def test_bad_compact_fields_name_the_field(
    compact: dict[str, Any], path: tuple[str, ...], words: str
) -> None:
    with pytest.raises(SchemaProblem) as info:
        compact_to_json_schema(compact)
    assert info.value.path == path
    assert words in info.value.message


@pytest.mark.parametrize(
    ("schema", "path", "words"),
    [
        ({"type": "string"}, (), "the answer is an object"),
        ({"type": "object", "properties": {}}, (), "needs properties"),
        (
            {"type": "object", "properties": {"a": {"$ref": "#/x"}}},
            ("properties", "a", "$ref"),
            "not supported",
        ),
        (
            {"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}},
            ("properties", "a", "anyOf"),
            "not supported",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "string", "enum": ["x"]}}},
            ("properties", "a", "enum"),
            "one-label enum",
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string", "pattern": "a+", "maxLength": 3}},
            },
            ("properties", "a", "pattern"),
            "xgrammar cannot combine",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "strin"}}},
            ("properties", "a", "type"),
            "not valid JSON Schema",
        ),
        (
            {"type": "object", "properties": {"a": {"type": "array"}}},
            ("properties", "a"),
            "needs one items schema",
        ),
    ],
)
def test_unsupported_json_schema_names_the_path(
    schema: dict[str, Any], path: tuple[str, ...], words: str
) -> None:
    with pytest.raises(SchemaProblem) as info:
        check_json_schema(schema)
    assert info.value.path == path
    assert words in info.value.message


def test_json_schema_is_normalised_to_closed_objects() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}},
    }
    out = check_json_schema(schema)
    assert out["additionalProperties"] is False
    assert out["properties"]["a"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the user's mapping is not changed


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string", "enum": ["a", "b"]}, pa.string()),
        ({"type": "integer"}, pa.int64()),
        ({"type": "number"}, pa.float64()),
        ({"type": "boolean"}, pa.bool_()),
        ({"type": ["integer", "null"]}, pa.int64()),
        ({"type": "array", "items": {"type": "string"}}, pa.list_(pa.string())),
        (
            {"type": "array", "items": obj({"n": {"type": "integer"}})},
            pa.list_(pa.struct([pa.field("n", pa.int64(), nullable=False)])),
        ),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "string"}, "b": {"type": ["number", "null"]}},
                "required": ["a"],
            },
            pa.struct([pa.field("a", pa.string(), nullable=False), pa.field("b", pa.float64())]),
        ),
    ],
)
def test_arrow_types(schema: dict[str, Any], expected: pa.DataType) -> None:
    assert arrow_type(schema) == expected


def test_demo_columns_constraint_and_instruction() -> None:
    r = response(fields=DEMO)
    assert [(f.name, f.type) for f in r.fields()] == [
        ("sentiment", pa.string()),
        ("summary", pa.string()),
        ("sentiment_confidence", pa.float64()),
    ]
    assert r.structured_outputs()["json"]["required"] == ["sentiment", "summary"]
    assert r.wants_logprobs()
    assert r.instruction() == (
        'Answer with a JSON object: "sentiment": one of positive, negative, mixed; '
        '"summary": text of at most 160 characters.'
    )
    assert r.skeleton() == '{"sentiment":"mixed","summary":""}'
    assert not response(fields=DEMO, confidence=False).wants_logprobs()
    assert [f.name for f in response(fields=DEMO, confidence=False).fields()] == [
        "sentiment",
        "summary",
    ]


def test_choice_and_regex_columns() -> None:
    c = response(choice=["yes", "no"], column="answer")
    assert c.structured_outputs() == {"choice": ["yes", "no"]}
    assert [f.name for f in c.fields()] == ["answer", "answer_confidence"]
    assert c.instruction() == "Answer with exactly one of: yes, no."
    assert c.skeleton() == "no"
    r = response(regex=r"\d{3}")
    assert r.structured_outputs() == {"regex": r"\d{3}"}
    assert [f.name for f in r.fields()] == ["match"]
    assert not r.wants_logprobs()


STARS = {"stars": "int", "score": "float", "tags": ["str"], "who": {"name": "str"}}


@pytest.mark.parametrize(
    ("kw", "text", "finish", "reason"),
    [
        ({"fields": DEMO}, '{"sentiment":"mixed","summary":"ok"}', "stop", None),
        ({"fields": DEMO}, '{"sentiment":"mixed","summ', "length", CUT_OFF),
        ({"fields": DEMO}, '{"sentiment":"mixed","summ', "stop", "not valid JSON"),
        (
            {"fields": DEMO},
            '{"sentiment":"angry","summary":"x"}',
            "stop",
            "sentiment: 'angry' is not one of",
        ),
        (
            {"fields": STARS},
            '{"stars":"five","score":1,"tags":[],"who":{"name":"a"}}',
            "stop",
            "stars: 'five' is not of type 'integer'",
        ),
        ({"fields": DEMO}, '["mixed"]', "stop", "answer: ['mixed'] is not of type 'object'"),
        ({"choice": ["yes", "no"]}, "yes", "stop", None),
        ({"choice": ["yes", "no"]}, "maybe", "stop", "'maybe' is not one of the labels: yes, no"),
        ({"choice": ["yes", "no"]}, "ye", "length", CUT_OFF),
        ({"regex": r"\d{3}"}, "123", "stop", None),
        ({"regex": r"\d{3}"}, "1234", "stop", "'1234' does not match"),
    ],
)
def test_check_says_why_an_answer_is_invalid(
    kw: dict[str, Any], text: str, finish: str, reason: str | None
) -> None:
    c = response(**kw).check(text, finish)
    if reason is None:
        assert c.reason is None and c.values is not None
    else:
        assert c.values is None and c.reason is not None and c.reason.startswith(reason)


def test_check_coerces_to_the_arrow_types() -> None:
    r = response(fields=STARS)
    c = r.check('{"stars":4.0,"score":3,"tags":["a"],"who":{"name":"b"}}', "stop")
    assert c.values == {"stars": 4, "score": 3.0, "tags": ["a"], "who": {"name": "b"}}
    assert type(c.values["stars"]) is int and type(c.values["score"]) is float
    table = pa.Table.from_pylist([c.values], schema=pa.schema(r.fields()))
    assert table.column("stars").to_pylist() == [4]


def test_missing_optional_property_is_null() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": ["integer", "null"]}},
        "required": ["a"],
    }
    r = response(json_schema=schema)
    c = r.check('{"a":"x"}', "stop")
    assert c.values == {"a": "x", "b": None}
    pa.Table.from_pylist([c.values], schema=pa.schema(r.fields()))


def test_choice_confidence_is_the_probability_of_the_label() -> None:
    r = response(choice=["positive", "negative"])
    c = r.check("negative", "stop", cumulative_logprob=math.log(0.25))
    assert c.confidence == {"label_confidence": pytest.approx(0.25)}
    assert r.check("negative", "stop").confidence == {"label_confidence": None}
    assert response(choice=["a", "b"], confidence=False).check("a", "stop").confidence == {}


def test_choice_confidence_after_reasoning_counts_only_the_answer_tokens() -> None:
    r = response(choice=["positive", "negative"])
    tokens = [
        ("<think>", math.log(0.1)),
        ("hm</think>", math.log(0.1)),
        ("neg", math.log(0.5)),
        ("ative", 0.0),
    ]
    c = r.check(
        "negative", "stop", tokens=tokens, cumulative_logprob=-99.0, offset=len("<think>hm</think>")
    )
    assert c.confidence["label_confidence"] == pytest.approx(0.5)


def test_enum_confidence_sums_the_tokens_that_spell_the_label() -> None:
    r = response(fields=DEMO)
    text = '{"sentiment":"mixed","summary":"fine"}'
    tokens = [
        ('{"', 0.0),
        ("sentiment", 0.0),
        ('":"', 0.0),
        ("mix", math.log(0.5)),
        ("ed", math.log(0.8)),
        ('","', 0.0),
        ("summary", 0.0),
        ('":"', 0.0),
        ("fine", math.log(0.1)),
        ('"}', 0.0),
    ]
    c = r.check(text, "stop", tokens=tokens)
    assert c.confidence == {"sentiment_confidence": pytest.approx(0.4)}


def test_enum_confidence_is_none_when_tokens_do_not_line_up() -> None:
    r = response(fields=DEMO)
    text = '{"sentiment":"mixed","summary":"fine"}'
    tokens = [
        ("\ufffd", -0.1),
        ('sentiment":"', 0.0),
        ("mixed", -0.2),
        ('","summary":"fine"}', 0.0),
    ]
    assert r.check(text, "stop", tokens=tokens).confidence == {"sentiment_confidence": None}


SCHEMAS: list[dict[str, Any]] = [
    {"fields": DEMO},
    {"fields": STARS},
    {"fields": {"items": [{"name": "str", "kind": ["a", "b"]}], "ok": "bool"}},
    {
        "json_schema": {
            "type": "object",
            "properties": {
                "n": {"type": "integer", "minimum": 10, "maximum": 12},
                "x": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                "s": {"type": "string", "minLength": 5, "maxLength": 8},
                "l": {"type": "array", "items": {"type": "string"}, "minItems": 3, "maxItems": 4},
                "o": {"type": ["string", "null"]},
            },
            "required": ["n", "x", "s", "l"],
        }
    },
]


@pytest.mark.parametrize("kw", SCHEMAS)
def test_skeleton_and_examples_are_valid_and_fit_the_columns(kw: dict[str, Any]) -> None:
    r = response(**kw)
    validator = Draft202012Validator(r.schema)
    assert validator.is_valid(json.loads(r.skeleton()))
    rng = random.Random(7)
    vocab = ["great", "bad", 'say "hi"', "ünï", "a\\b", "", "x" * 40]
    rows = []
    for pick in range(100):
        words = rng.sample(vocab, rng.randint(0, len(vocab)))
        text = r.example(words, pick)
        checked = r.check(text, "stop")
        assert checked.reason is None, (text, checked.reason)
        assert checked.values is not None
        rows.append(checked.values)
    table = pa.Table.from_pylist(rows, schema=pa.schema(r.fields()[: len(rows[0])]))
    assert table.num_rows == 100


def test_choice_examples_cover_the_labels() -> None:
    r = response(choice=["a", "b", "c"])
    assert {r.example(["w"], pick) for pick in range(6)} == {"a", "b", "c"}
