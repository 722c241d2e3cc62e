"""generate: row -> chat messages -> generated text, finish reason and token counts.

With ``response:`` in the spec the answer is also typed: the engine constrains and checks it,
and ``finish`` puts its values into one column per field (plus ``*_confidence`` and
``resamples``). Without it the output is exactly the four columns above.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from batch.engine import EngineResult
from batch.errors import RowError, SpecError
from batch.prompt import Template
from batch.spec import JobSpec
from pipelines.base import ModelInput, Pipeline

if TYPE_CHECKING:
    from batch.response import Response


class Generate(Pipeline):
    task = "generate"

    def __init__(self, spec: JobSpec, **options: Any) -> None:
        super().__init__(spec, **options)
        system = spec.prompt.system
        self.system = Template(system, where="prompt.system") if system else None
        self.response: Response | None = None
        self.instruction = ""
        if spec.response is not None:
            from batch.response import Response

            self.response = Response.from_spec(spec.response)
            if spec.response.instruct:
                self.instruction = self.response.instruction()
        self._typed = self.response.fields() if self.response is not None else []

    def required_columns(self) -> frozenset[str]:
        extra = self.system.variables if self.system else frozenset()
        return self.template.variables | extra

    def check_input_schema(self, schema: pa.Schema) -> None:
        """A typed column may not share a name with an input column (it would replace it)."""
        clash = [f.name for f in self._typed if f.name in schema.names]
        if clash:
            raise SpecError(
                f"response: the typed column(s) {', '.join(clash)} would overwrite input "
                "columns of the same name; rename the field(s), or set response.column"
            )

    def prepare(self, row: Mapping[str, Any]) -> ModelInput:
        user = self.template.render(row)
        if not user.strip():
            raise RowError("EmptyPrompt", "the rendered prompt is empty")
        if self.instruction:
            user = f"{user.rstrip()}\n\n{self.instruction}"
        messages = []
        if self.system is not None:
            messages.append({"role": "system", "content": self.system.render(row)})
        messages.append({"role": "user", "content": user})
        return messages

    def output_schema(self) -> pa.Schema:
        fields = [
            pa.field("generated_text", pa.string()),
            pa.field("finish_reason", pa.string()),
            pa.field("input_tokens", pa.int32()),
            pa.field("output_tokens", pa.int32()),
        ]
        if self.response is None:
            return pa.schema(fields)
        return pa.schema([*fields, *self._typed, pa.field("resamples", pa.int16())])

    def finish(self, row: Mapping[str, Any], result: EngineResult) -> dict[str, Any]:
        out = {
            "generated_text": (result.text or "").strip(),
            "finish_reason": result.finish_reason,
            "input_tokens": result.input_tokens,
            "output_tokens": result.output_tokens,
        }
        if self.response is not None:
            # Already checked and coerced to the Arrow types by Response.check in the engine.
            found = {**(result.values or {}), **result.confidence}
            for f in self._typed:
                out[f.name] = found.get(f.name)
            out["resamples"] = result.resamples
        return out
