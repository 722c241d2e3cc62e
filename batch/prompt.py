"""Prompt templates: Jinja over a row's columns, rendered in jinja2's sandbox.

The sandbox matters because templates come from job files, and job files come from many
hands (and Airflow templating); a template must not reach Python internals. Strict
undefined variables make a missing column an error for that row instead of an empty string
quietly sent to the model.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from batch.errors import RowError, SpecError

_ENV = SandboxedEnvironment(
    undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False
)


class Template:
    """A compiled template with the column names it reads."""

    def __init__(self, source: str, *, where: str = "prompt.template") -> None:
        try:
            parsed = _ENV.parse(source)
            self._template = _ENV.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise SpecError(
                f"{where}: Jinja syntax error on line {exc.lineno}: {exc.message}"
            ) from None
        self.source = source
        self.where = where
        self.variables: frozenset[str] = frozenset(meta.find_undeclared_variables(parsed))

    def check_columns(self, columns: Iterable[str]) -> None:
        """Fail before any work when no input column matches a template variable."""
        check_columns(self.variables, columns, self.where)

    def render(self, row: Mapping[str, Any]) -> str:
        """Render for one row. Raises RowError for a missing or null variable."""
        for var in self.variables:
            if var not in row:
                raise RowError("MissingColumn", f"the row has no column '{var}' ({self.where})")
            if row[var] is None:
                raise RowError("NullValue", f"column '{var}' is null ({self.where})")
        try:
            return self._template.render(row)
        except jinja2.UndefinedError as exc:
            raise RowError("TemplateError", f"{self.where}: {exc.message}") from None
        except jinja2.exceptions.SecurityError as exc:
            raise RowError("TemplateError", f"{self.where}: not allowed: {exc}") from None
        except Exception as exc:  # a filter failing on this row's data
            raise RowError("TemplateError", f"{self.where}: {type(exc).__name__}: {exc}") from None


def check_columns(variables: Iterable[str], columns: Iterable[str], where: str) -> None:
    """Raise SpecError, with the nearest column name, for a variable no input column provides."""
    available = list(columns)
    for var in sorted(variables):
        if var not in available:
            close = difflib.get_close_matches(var, available, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SpecError(
                f"{where} uses '{{{{ {var} }}}}' but the input has no column '{var}'; "
                f"{hint}columns: {', '.join(available)}"
            )


def chat_token_ids(
    tokenizer: Any,
    messages: Sequence[Mapping[str, str]],
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Render the model's chat template and tokenize once, as the engine does; plan uses it too.

    The rendered template already holds the special tokens, so none are added again. With no
    ``chat_template_kwargs`` the call is exactly the plain one (no extra keyword arguments).
    """
    text = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        tokenize=False,
        add_generation_prompt=True,
        **dict(chat_template_kwargs or {}),
    )
    return list(tokenizer.encode(str(text), add_special_tokens=False))
