"""The pipeline contract: what a row becomes (``prepare``) and what comes back (``finish``).

A pipeline is any class with this small interface; a job names it as ``module:Class``.
``prepare`` runs in read tasks, ``finish`` in commit tasks, never in the engine actor, so a
slow pipeline does not hold the accelerator. A bad row is reported by raising
``batch.errors.RowError`` from ``prepare``; the runner writes it to ``_failed/``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import pyarrow as pa

from batch.engine import EngineRequest, EngineResult
from batch.prompt import Template
from batch.spec import JobSpec

ModelInput = list[dict[str, str]] | str | EngineRequest
"""Chat messages (generate) or the text to embed (embed); or a whole ``EngineRequest`` when
the row brings its own sampling (``sampling``; its ``key`` is set by the runner)."""


class Pipeline:
    """Base class of the built-in pipelines, and a convenient one for user pipelines."""

    task: ClassVar[Literal["generate", "embed"]]

    def __init__(self, spec: JobSpec, **options: Any) -> None:
        if options:
            raise TypeError(
                f"{type(self).__name__} takes no pipeline_options (got {', '.join(options)})"
            )
        self.spec = spec
        self.template = Template(spec.prompt.template)

    def required_columns(self) -> frozenset[str]:
        """Input columns the pipeline reads; checked against the input schema before any work."""
        return self.template.variables

    def check_input_schema(self, schema: pa.Schema) -> None:
        """Refuse (SpecError) an input whose columns the output would overwrite; a no-op here."""

    def prepare(self, row: Mapping[str, Any]) -> ModelInput:
        raise NotImplementedError

    def output_schema(self) -> pa.Schema:
        """The columns ``finish`` adds to each output row."""
        raise NotImplementedError

    def finish(self, row: Mapping[str, Any], result: EngineResult) -> dict[str, Any]:
        raise NotImplementedError

    def finish_batch(
        self, rows: Sequence[Mapping[str, Any]], results: Sequence[EngineResult]
    ) -> pa.Table:
        """All output columns of a chunk's successful rows, one output row per input row."""
        out = [self.finish(row, res) for row, res in zip(rows, results, strict=True)]
        return pa.Table.from_pylist(out, schema=self.output_schema())
