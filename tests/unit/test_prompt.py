"""Prompt templates: rendered in the sandbox; missing or null columns fail the row, not the job."""

from __future__ import annotations

import pytest

from batch.errors import RowError, SpecError
from batch.prompt import Template


def test_renders_row_columns() -> None:
    t = Template("Review of {{ product }}: {{ body | trim }}")
    assert t.render({"product": "kettle", "body": " great "}) == "Review of kettle: great"
    assert t.variables == {"product", "body"}


def test_missing_column_is_a_row_error() -> None:
    with pytest.raises(RowError) as info:
        Template("{{ body }}").render({"title": "x"})
    assert info.value.kind == "MissingColumn"
    assert "no column 'body'" in info.value.message


def test_null_value_is_a_row_error() -> None:
    with pytest.raises(RowError) as info:
        Template("{{ body }}").render({"body": None})
    assert info.value.kind == "NullValue"


def test_sandbox_blocks_python_internals() -> None:
    t = Template("{{ body.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(RowError) as info:
        t.render({"body": "x"})
    assert info.value.kind == "TemplateError"


def test_syntax_error_is_a_spec_error_with_line() -> None:
    with pytest.raises(SpecError, match=r"prompt.template: Jinja syntax error on line 2"):
        Template("ok\n{{ body ")


def test_unknown_column_fails_early_with_suggestion() -> None:
    with pytest.raises(SpecError, match="did you mean 'body'"):
        Template("{{ bdy }}").check_columns(["review_id", "body"])
