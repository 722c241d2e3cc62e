"""generate: row -> chat messages -> generated text, finish reason and token counts.

With ``response:`` in the spec the answer is also typed: the engine constrains and checks it,
and ``finish`` puts its values into one column per field (plus ``*_confidence`` and
``resamples``). ``sampling.logprobs`` adds a ``logprobs`` column, a reasoning parser a
``reasoning`` column, and ``sampling.n > 1`` turns every per-answer column into a list of n
(token counts and ``resamples`` stay per row). Without these options the output is exactly
the four columns above. The schema depends on the spec alone, so every part has the same one.
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
    from batch.engine import Sample
    from batch.response import Response

_TOKEN = [("token_id", pa.int32()), ("token", pa.string()), ("logprob", pa.float32())]
LOGPROBS_TYPE = pa.list_(pa.struct([*_TOKEN, ("top", pa.list_(pa.struct(_TOKEN)))]))
"""One entry per generated token: the sampled token and the top-k alternatives by rank."""


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
        self.n = int(spec.sampling.n)
        self.keep_logprobs = spec.sampling.logprobs is not None
        self.reasoning = bool(
            spec.model.engine_args.get("reasoning_parser")
            or spec.model.fake_options.get("reasoning")
        )

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

    def _per_sample(self) -> list[pa.Field]:
        """The columns each answer fills: one value per row, or a list of n with n > 1."""
        fields = [pa.field("generated_text", pa.string()), pa.field("finish_reason", pa.string())]
        fields += self._typed
        if self.reasoning:
            fields.append(pa.field("reasoning", pa.string()))
        if self.keep_logprobs:
            fields.append(pa.field("logprobs", LOGPROBS_TYPE))
        if self.n > 1:
            fields = [pa.field(f.name, pa.list_(f.type)) for f in fields]
        return fields

    def output_schema(self) -> pa.Schema:
        fields = self._per_sample()
        fields[2:2] = [pa.field("input_tokens", pa.int32()), pa.field("output_tokens", pa.int32())]
        if self.response is not None:
            fields.append(pa.field("resamples", pa.int16()))
        return pa.schema(fields)

    def finish(self, row: Mapping[str, Any], result: EngineResult) -> dict[str, Any]:
        answers = [self._answer(s) for s in result.samples]
        if not answers:  # an engine that fills only the row's fields (n = 1)
            answers = [self._answer(None, result)]
        out: dict[str, Any] = {}
        for f in self._per_sample():
            values = [a.get(f.name) for a in answers]
            out[f.name] = values if self.n > 1 else values[0]
        out["input_tokens"] = result.input_tokens
        out["output_tokens"] = result.output_tokens
        if self.response is not None:
            out["resamples"] = result.resamples
        return out

    def _answer(self, s: Sample | None, result: EngineResult | None = None) -> dict[str, Any]:
        """One answer's columns. Typed values are already checked and coerced to the Arrow
        types by ``Response.check`` in the engine."""
        if s is None:
            assert result is not None
            text, reason, reasoning = result.text, result.finish_reason, None
            values, confidence, tokens, top = result.values, result.confidence, None, None
        else:
            text, reason, reasoning = s.text, s.finish_reason, s.reasoning
            values, confidence = s.values, s.confidence
            tokens, top = s.tokens, s.top
        out: dict[str, Any] = {"generated_text": (text or "").strip(), "finish_reason": reason}
        found = {**(values or {}), **confidence}
        for f in self._typed:
            out[f.name] = found.get(f.name)
        if self.reasoning:
            out["reasoning"] = reasoning
        if self.keep_logprobs:
            out["logprobs"] = _logprobs(tokens, top)
        return out


def _logprobs(
    tokens: list[tuple[int, str, float]] | None, top: list[list[tuple[int, str, float]]] | None
) -> list[dict[str, Any]] | None:
    """The ``logprobs`` cell of one answer; null when the engine kept no token trace."""
    if tokens is None:
        return None

    def entry(t: tuple[int, str, float]) -> dict[str, Any]:
        return {"token_id": t[0], "token": t[1], "logprob": t[2]}

    return [
        {**entry(t), "top": [entry(a) for a in (top[i] if top and i < len(top) else [])]}
        for i, t in enumerate(tokens)
    ]
