"""Review triage: a custom pipeline on top of typed answers, as an example.

The sentiment and summary columns need no code: ``response.fields`` in the spec makes them
(see ``jobs/enrich.yaml``). What a spec cannot do is join the model's answer with the input
row. ``ReviewTriage`` (named in a job as ``pipelines.reviews:ReviewTriage``) adds
``needs_review``: true when the model was unsure of the label, or when the label contradicts
the star rating (a 1-2 star review called positive, a 4-5 star one called negative).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from batch.engine import EngineResult
from batch.errors import SpecError
from batch.spec import JobSpec
from pipelines.generate import Generate


def needs_review(sentiment: str | None, confidence: float | None, rating: Any,
                 min_confidence: float) -> bool:  # fmt: skip
    """Route a row to a person: the label is unsure (below ``min_confidence``) or disagrees
    with the stars. An unknown confidence (not measurable) alone does not flag a row."""
    if confidence is not None and confidence < min_confidence:
        return True
    try:
        stars = int(rating)
    except (TypeError, ValueError):
        return False
    return (stars <= 2 and sentiment == "positive") or (stars >= 4 and sentiment == "negative")


class ReviewTriage(Generate):
    """generate with a typed ``sentiment`` field, plus ``needs_review`` (pipeline option
    ``min_confidence``, default 0.6)."""

    def __init__(self, spec: JobSpec, *, min_confidence: float = 0.6, **options: Any) -> None:
        super().__init__(spec, **options)
        if not any(f.name == "sentiment" for f in self._typed):
            raise SpecError(
                "pipeline: pipelines.reviews:ReviewTriage needs a typed 'sentiment' column; "
                "add response.fields.sentiment: [positive, negative, mixed]"
            )
        self.min_confidence = float(min_confidence)

    def required_columns(self) -> frozenset[str]:
        return super().required_columns() | {"rating"}

    def output_schema(self) -> pa.Schema:
        return super().output_schema().append(pa.field("needs_review", pa.bool_()))

    def finish(self, row: Mapping[str, Any], result: EngineResult) -> dict[str, Any]:
        out = super().finish(row, result)
        out["needs_review"] = needs_review(
            out.get("sentiment"), out.get("sentiment_confidence"), row.get("rating"),
            self.min_confidence,
        )  # fmt: skip
        return out
