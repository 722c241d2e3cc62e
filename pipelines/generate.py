"""generate: row -> chat messages -> generated text, finish reason and token counts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

from batch.engine import EngineResult
from batch.errors import RowError
from batch.prompt import Template
from batch.spec import JobSpec
from pipelines.base import ModelInput, Pipeline


class Generate(Pipeline):
    task = "generate"

    def __init__(self, spec: JobSpec, **options: Any) -> None:
        super().__init__(spec, **options)
        system = spec.prompt.system
        self.system = Template(system, where="prompt.system") if system else None

    def required_columns(self) -> frozenset[str]:
        extra = self.system.variables if self.system else frozenset()
        return self.template.variables | extra

    def prepare(self, row: Mapping[str, Any]) -> ModelInput:
        user = self.template.render(row)
        if not user.strip():
            raise RowError("EmptyPrompt", "the rendered prompt is empty")
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system.render(row)})
        messages.append({"role": "user", "content": user})
        return messages

    def output_schema(self) -> pa.Schema:
        return pa.schema(
            [
                ("generated_text", pa.string()),
                ("finish_reason", pa.string()),
                ("input_tokens", pa.int32()),
                ("output_tokens", pa.int32()),
            ]
        )

    def finish(self, row: Mapping[str, Any], result: EngineResult) -> dict[str, Any]:
        return {
            "generated_text": (result.text or "").strip(),
            "finish_reason": result.finish_reason,
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
        }
