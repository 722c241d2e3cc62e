"""embed: text (the rendered template) -> a fixed-size float32 vector."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from batch.engine import EngineResult
from batch.errors import RowError
from pipelines.base import ModelInput, Pipeline


class Embed(Pipeline):
    task = "embed"

    def prepare(self, row: Mapping[str, Any]) -> ModelInput:
        text = self.template.render(row)
        if not text.strip():
            raise RowError("EmptyText", "the text to embed is empty")
        return text

    def output_schema(self) -> pa.Schema:
        # The size is the model's; it is fixed per chunk by finish_batch.
        return pa.schema([("embedding", pa.list_(pa.float32())), ("input_tokens", pa.int32())])

    def finish_batch(
        self, rows: Sequence[Mapping[str, Any]], results: Sequence[EngineResult]
    ) -> pa.Table:
        vectors = [r.embedding or [] for r in results]
        dims = len(vectors[0]) if vectors else 0
        if any(len(v) != dims for v in vectors):
            raise ValueError("the engine returned embeddings of different sizes in one chunk")
        flat = pa.array(np.asarray(vectors, dtype=np.float32).reshape(-1), type=pa.float32())
        column = (
            pa.FixedSizeListArray.from_arrays(flat, dims)
            if vectors
            else pa.array([], pa.list_(pa.float32(), 0))
        )
        tokens = pa.array([r.input_tokens for r in results], pa.int32())
        return pa.table({"embedding": column, "input_tokens": tokens})
