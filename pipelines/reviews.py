"""The demo's review enrichment: generate, then parse the answer into sentiment and summary.

An example of a user pipeline (named in a job as ``pipelines.reviews:ReviewEnrichment``):
it reuses ``Generate`` for the prompt and adds two columns parsed from the model's text.
Small models do not always follow the format; an unparsable answer gives sentiment
``unknown`` rather than a failed row, and the raw text is kept in ``generated_text``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from batch.engine import EngineResult
from pipelines.generate import Generate

LABELS = ("positive", "negative", "mixed")
_SENTIMENT = re.compile(r"sentiment\W*\s*(positive|negative|mixed|neutral)", re.IGNORECASE)
_LABEL = re.compile(r"\b(positive|negative|mixed)\b", re.IGNORECASE)
_SUMMARY = re.compile(r"summary\W*\s*(.+)", re.IGNORECASE)


def parse_answer(text: str) -> tuple[str, str]:
    """(sentiment, summary) from the model's two-line answer; tolerant of small deviations."""
    m = _SENTIMENT.search(text)
    if m:
        sentiment = m.group(1).lower()
        sentiment = "mixed" if sentiment == "neutral" else sentiment
    else:
        any_label = _LABEL.search(text)
        sentiment = any_label.group(1).lower() if any_label else "unknown"
    s = _SUMMARY.search(text)
    if s:
        summary = s.group(1).strip()
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        rest = [ln for ln in lines if not _SENTIMENT.fullmatch(ln.strip(" .*"))]
        summary = _first_sentence(rest[0]) if rest else ""
    return sentiment, summary.strip().strip('"')


class ReviewEnrichment(Generate):
    def output_schema(self) -> pa.Schema:
        base = super().output_schema()
        return base.append(pa.field("sentiment", pa.string())).append(
            pa.field("summary", pa.string())
        )

    def finish(self, row: Mapping[str, Any], result: EngineResult) -> dict[str, Any]:
        out = super().finish(row, result)
        out["sentiment"], out["summary"] = parse_answer(out["generated_text"])
        return out


def _first_sentence(text: str) -> str:
    m = re.match(r"(.+?[.!?])(\s|$)", text)
    return m.group(1) if m else text
