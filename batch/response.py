"""The typed answer of a generate job: the constraint sent to vLLM, the Arrow columns, the
instruction line and the per-row checker, all derived from ``response:`` in the spec.

A leaf module (spec imports it, it never imports spec at runtime). The rows are checked in
the engine actor, because re-sampling an invalid answer needs the engine; the values
:meth:`Response.check` returns are already of the exact Arrow type, so committing them never
fails a cast.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match

if TYPE_CHECKING:
    from batch.spec import ResponseSpec

TYPE_WORDS: dict[str, dict[str, Any]] = {
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "float": {"type": "number"},
    "bool": {"type": "boolean"},
}
JSON_TYPES = ("string", "integer", "number", "boolean", "array", "object")
RESERVED = frozenset(
    {
        "generated_text",
        "finish_reason",
        "input_tokens",
        "output_tokens",
        "reasoning",
        "logprobs",
        "resamples",
    }
)
ALLOWED_KEYWORDS = frozenset(
    {
        "type",
        "properties",
        "required",
        "items",
        "enum",
        "description",
        "title",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
        "minItems",
        "maxItems",
        "additionalProperties",
        "default",
        "examples",
        "$schema",
    }
)
CUT_OFF = (
    "cut off at sampling.max_tokens before the answer was complete; raise sampling.max_tokens "
    "(retry-failed --set sampling.max_tokens=N) or bound strings with maxLength"
)
YAML_BOOL = "YAML reads yes/no/true/false/on/off as booleans; quote the labels, e.g. ['yes', 'no']"
_COMPACT_HINT = "use str, int, float, bool, [labels], [T] or a mapping"

Path = tuple[str | int, ...]


class SchemaProblem(ValueError):
    """A response schema the typed columns cannot support; ``path`` is where, inside it."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = tuple(path)
        self.message = message


# --------------------------------------------------------------------------- schemas


def compact_to_json_schema(fields: Mapping[str, Any]) -> dict[str, Any]:
    """{sentiment: [a, b], n: int, tags: [str], who: {name: str}} -> an object JSON Schema, all
    fields required. Raises SchemaProblem at the first bad field (path = field names)."""
    if not isinstance(fields, Mapping) or not fields:
        raise SchemaProblem((), "write at least one field, e.g. {summary: str}")
    _check_column_names(fields, ())
    return _compact_object(fields, ())


def _compact_object(fields: Mapping[str, Any], path: Path) -> dict[str, Any]:
    props = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise SchemaProblem(path, f"field names are strings; got {name!r}")
        props[name] = _compact(value, (*path, name))
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }


def _compact(value: Any, path: Path) -> dict[str, Any]:
    if isinstance(value, str):
        if value in TYPE_WORDS:
            return dict(TYPE_WORDS[value])
        close = difflib.get_close_matches(value, [*TYPE_WORDS, *JSON_TYPES], n=1, cutoff=0.5)
        if close and close[0] in JSON_TYPES:
            close = [w for w, s in TYPE_WORDS.items() if s["type"] == close[0]] or close
        hint = f"did you mean '{close[0]}'? " if close else ""
        return _raise(path, f"unknown type '{value}'; {hint}{_COMPACT_HINT}")
    if isinstance(value, list):
        if len(value) == 1:
            inner = value[0]
            if isinstance(inner, str) and inner not in TYPE_WORDS:
                close = difflib.get_close_matches(inner, list(TYPE_WORDS), n=1, cutoff=0.5)
                typo = f"for a list write [{close[0]}]; " if close else "for a list write [str]; "
                raise SchemaProblem(
                    path,
                    f"a one-label enum [{inner}] has a single answer; {typo}otherwise write the "
                    "value in the prompt, or list 2+ labels",
                )
            return {"type": "array", "items": _compact(inner, (*path, 0))}
        if len(value) < 2:
            raise SchemaProblem(path, f"an empty list is no type; {_COMPACT_HINT}")
        labels = []
        for i, label in enumerate(value):
            if isinstance(label, bool):
                raise SchemaProblem((*path, i), YAML_BOOL)
            if not isinstance(label, str | int | float) or label == "":
                raise SchemaProblem((*path, i), f"enum labels are non-empty text; got {label!r}")
            labels.append(str(label))
        if len(set(labels)) != len(labels):
            dup = next(x for x in labels if labels.count(x) > 1)
            raise SchemaProblem(path, f"label '{dup}' is listed twice; list each label once")
        return {"type": "string", "enum": labels}
    if isinstance(value, Mapping):
        if not value:
            raise SchemaProblem(path, "an empty mapping has no fields; add at least one")
        if isinstance(value.get("type"), str | list) and _is_json_type(value["type"]):
            return _check_node(dict(value), path, top=False)
        return _compact_object(value, path)
    return _raise(path, f"{value!r} is no type; {_COMPACT_HINT}")


def _is_json_type(t: Any) -> bool:
    if isinstance(t, str):
        return t in JSON_TYPES
    return isinstance(t, list) and any(x in JSON_TYPES for x in t)


def _raise(path: Path, message: str) -> dict[str, Any]:
    raise SchemaProblem(path, message)


def check_json_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The schema, checked against the meta-schema and the subset typed columns support (top
    level: an object with >= 1 property; enums of strings; one ``items`` schema; no $ref, anyOf,
    oneOf, allOf, patternProperties, prefixItems, format; not pattern together with
    min/maxLength, which xgrammar cannot do). Returned normalised: additionalProperties: false
    on every object. Raises SchemaProblem(path inside the schema)."""
    if not isinstance(schema, Mapping):
        raise SchemaProblem(
            (), "write the schema as a mapping, e.g. {type: object, properties: ...}"
        )
    checked = _check_node(dict(schema), (), top=True)
    _check_column_names(checked["properties"], ("properties",))
    return checked


def _check_node(node: dict[str, Any], path: Path, *, top: bool) -> dict[str, Any]:
    """Meta-schema, then the supported subset; a normalised deep copy."""
    try:
        Draft202012Validator.check_schema(node)
    except SchemaError as exc:
        raise SchemaProblem((*path, *exc.path), f"not valid JSON Schema: {exc.message}") from None
    return _subset(copy.deepcopy(node), path, top=top)


def _subset(node: Any, path: Path, *, top: bool = False) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise SchemaProblem(path, "a schema here is a mapping with a type, e.g. {type: string}")
    for key in node:
        if key not in ALLOWED_KEYWORDS:
            close = difflib.get_close_matches(key, sorted(ALLOWED_KEYWORDS), n=1, cutoff=0.7)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise SchemaProblem(
                (*path, key),
                f"'{key}' is not supported for typed columns; {hint}use one type per field with "
                "type, properties, required, items, enum, min/max*, minLength/maxLength, pattern",
            )
    jtype, nullable = _type_of(node)
    if top and (jtype != "object" or nullable):
        raise SchemaProblem(path, "the answer is an object: write type: object with properties")
    if "enum" in node:
        enum = node["enum"]
        if jtype != "string" or not all(isinstance(x, str) and x for x in enum):
            raise SchemaProblem(
                (*path, "enum"), "enum labels are non-empty strings; write them as text"
            )
        if len(enum) < 2:
            raise SchemaProblem(
                (*path, "enum"),
                "a one-label enum has a single answer; write the value in the prompt",
            )
    if jtype == "string" and "pattern" in node:
        if "minLength" in node or "maxLength" in node:
            raise SchemaProblem(
                (*path, "pattern"),
                "xgrammar cannot combine pattern with minLength/maxLength; bound the length "
                "in the pattern, e.g. ^.{0,160}$",
            )
        try:
            re.compile(node["pattern"])
        except re.error as exc:
            raise SchemaProblem((*path, "pattern"), f"not a regular expression: {exc}") from None
    if jtype == "array":
        items = node.get("items")
        if not isinstance(items, dict):
            raise SchemaProblem(path, "an array needs one items schema, e.g. items: {type: string}")
        node["items"] = _subset(items, (*path, "items"))
    if jtype == "object":
        props = node.get("properties")
        if not isinstance(props, dict) or not props:
            raise SchemaProblem(
                path,
                "an object needs properties (its columns), e.g. properties: {a: {type: string}}",
            )
        if node.get("additionalProperties", False) is not False:
            raise SchemaProblem(
                (*path, "additionalProperties"),
                "typed columns need every key listed; remove additionalProperties or set it false",
            )
        node["properties"] = {k: _subset(v, (*path, "properties", k)) for k, v in props.items()}
        for name in node.get("required", []):
            if name not in props:
                raise SchemaProblem(
                    (*path, "required"), f"'{name}' is required but not in properties; add it"
                )
        node["additionalProperties"] = False
    return node


def _type_of(node: Mapping[str, Any]) -> tuple[str, bool]:
    """(JSON type, nullable). A bare enum is a string enum."""
    t = node.get("type")
    if t is None:
        if "enum" in node:
            return "string", False
        raise SchemaProblem((), "every schema names its type, e.g. type: string")
    if isinstance(t, str):
        if t not in JSON_TYPES:
            raise SchemaProblem(
                ("type",), f"type '{t}' is not supported; use {', '.join(JSON_TYPES)}"
            )
        return t, False
    kinds = [x for x in t if x != "null"]
    if len(kinds) != 1 or kinds[0] not in JSON_TYPES:
        raise SchemaProblem(("type",), "one type per field; nullable is [T, 'null']")
    return kinds[0], "null" in t


def _check_column_names(fields: Mapping[str, Any], path: Path) -> None:
    for name in fields:
        if isinstance(name, str) and (name in RESERVED or name.startswith("_")):
            raise SchemaProblem(
                (*path, name),
                f"'{name}' is a reserved column name (generate's own columns, or a leading "
                "'_'); rename the field",
            )


def arrow_type(schema: Mapping[str, Any]) -> pa.DataType:
    """The Arrow type of a (checked) schema: enum and string -> string, integer -> int64, number
    -> float64, boolean -> bool, array -> list, object -> struct (optional keys nullable)."""
    jtype, _ = _type_of(schema)
    if jtype == "string":
        return pa.string()
    if jtype == "integer":
        return pa.int64()
    if jtype == "number":
        return pa.float64()
    if jtype == "boolean":
        return pa.bool_()
    if jtype == "array":
        return pa.list_(arrow_type(schema["items"]))
    required = set(schema.get("required", []))
    return pa.struct(
        [
            pa.field(k, arrow_type(v), nullable=k not in required or _type_of(v)[1])
            for k, v in schema["properties"].items()
        ]
    )


# --------------------------------------------------------------------------- the response


@dataclass(frozen=True, slots=True)
class Checked:
    """One answer, checked: its typed values, or why it is invalid."""

    values: dict[str, Any] | None  # column -> Python value of exactly the Arrow type
    confidence: dict[str, float | None] = field(default_factory=dict)  # "<f>_confidence" -> p
    reason: str | None = None  # None: valid


class Response:
    """A response spec, compiled: constraint, columns, instruction and checker."""

    def __init__(
        self,
        *,
        kind: Literal["json", "choice", "regex"],
        schema: dict[str, Any] | None,
        labels: list[str] | None,
        pattern: str | None,
        column: str,
        confidence: bool,
        instruct: bool,
    ) -> None:
        self.kind = kind
        self.schema = schema
        self.labels = labels
        self.pattern = pattern
        self.column = column
        self.confidence = confidence
        self.instruct = instruct
        self._validator = Draft202012Validator(schema) if schema is not None else None
        self._regex = re.compile(pattern) if pattern is not None else None

    @classmethod
    def from_spec(cls, spec: ResponseSpec) -> Response:
        if spec.fields is not None:
            return cls._json(compact_to_json_schema(spec.fields), spec)
        if spec.json_schema is not None:
            return cls._json(check_json_schema(spec.json_schema), spec)
        if spec.choice is not None:
            return cls(
                kind="choice",
                schema=None,
                labels=list(spec.choice),
                pattern=None,
                column=spec.column or "label",
                confidence=spec.confidence,
                instruct=spec.instruct,
            )
        return cls(
            kind="regex",
            schema=None,
            labels=None,
            pattern=spec.regex,
            column=spec.column or "match",
            confidence=False,
            instruct=spec.instruct,
        )

    @classmethod
    def _json(cls, schema: dict[str, Any], spec: ResponseSpec) -> Response:
        return cls(
            kind="json",
            schema=schema,
            labels=None,
            pattern=None,
            column="",
            confidence=spec.confidence,
            instruct=spec.instruct,
        )

    # ---- what the engine and the pipeline need

    def structured_outputs(self) -> dict[str, Any]:
        """Keyword arguments of vllm StructuredOutputsParams."""
        if self.kind == "json":
            return {"json": self.schema}
        if self.kind == "choice":
            return {"choice": list(self.labels or [])}
        return {"regex": self.pattern}

    def _enum_fields(self) -> list[str]:
        """Top-level string enum fields (they get a confidence column)."""
        if self.schema is None:
            return []
        return [k for k, v in self.schema["properties"].items() if "enum" in v]

    def _confidence_columns(self) -> list[str]:
        if not self.confidence:
            return []
        if self.kind == "choice":
            return [f"{self.column}_confidence"]
        return [f"{k}_confidence" for k in self._enum_fields()]

    def wants_logprobs(self) -> bool:
        """Confidence needs the sampled tokens' logprobs (vLLM SamplingParams.logprobs=0)."""
        return bool(self._confidence_columns())

    def fields(self) -> list[pa.Field]:
        """The typed columns, then the *_confidence columns (float64)."""
        if self.schema is None:
            cols = [pa.field(self.column, pa.string())]
        else:
            cols = [pa.field(k, arrow_type(v)) for k, v in self.schema["properties"].items()]
        return cols + [pa.field(c, pa.float64()) for c in self._confidence_columns()]

    def instruction(self) -> str:
        """The line that tells the model the format (the grammar forces syntax, not meaning)."""
        if self.kind == "choice":
            return f"Answer with exactly one of: {', '.join(self.labels or [])}."
        if self.kind == "regex":
            return f"Answer with text matching the regular expression {self.pattern}."
        assert self.schema is not None
        parts = [f"{json.dumps(k)}: {_say(v)}" for k, v in self.schema["properties"].items()]
        return "Answer with a JSON object: " + "; ".join(parts) + "."

    def skeleton(self) -> str:
        """The shortest valid answer (for token budgets)."""
        if self.kind == "choice":
            return min(self.labels or [""], key=len)
        if self.kind == "regex":
            return ""
        assert self.schema is not None
        return json.dumps(_minimal(self.schema), separators=(",", ":"), ensure_ascii=False)

    def example(self, words: Sequence[str], pick: int) -> str:
        """A valid answer built from prompt words, deterministic in ``pick`` (for the fake
        engine). For regex it is '' (a regex cannot be inverted: the fake takes
        fake_options.regex_answer)."""
        if self.kind == "choice":
            labels = self.labels or [""]
            return labels[pick % len(labels)]
        if self.kind == "regex":
            return ""
        assert self.schema is not None
        words = [w for w in words if w] or ["answer"]
        counter = [pick]
        value = _example(self.schema, words, counter)
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)

    # ---- the checker

    def check(
        self,
        text: str,
        finish_reason: str | None,
        *,
        tokens: Sequence[tuple[str, float]] | None = None,
        cumulative_logprob: float | None = None,
        offset: int = 0,
    ) -> Checked:
        """Valid typed values and confidences, or the reason the answer is invalid.

        ``tokens`` are (decoded text, logprob) per generated token, ``offset`` where ``text``
        starts in their concatenation (after reasoning)."""
        if finish_reason == "length":
            return Checked(None, {}, CUT_OFF)
        if self.kind == "choice":
            if text not in (self.labels or []):
                return Checked(
                    None,
                    {},
                    f"{_short(text)} is not one of the labels: {', '.join(self.labels or [])}",
                )
            conf: dict[str, float | None] = {}
            if self.confidence:
                if offset == 0 and cumulative_logprob is not None:
                    p: float | None = _prob(cumulative_logprob)
                else:
                    p = _span_prob(tokens, text, offset, 0, len(text))
                conf[f"{self.column}_confidence"] = p
            return Checked({self.column: text}, conf, None)
        if self.kind == "regex":
            assert self._regex is not None
            if not self._regex.fullmatch(text):
                return Checked(None, {}, f"{_short(text)} does not match {self.pattern}")
            return Checked({self.column: text}, {}, None)
        return self._check_json(text, tokens, offset)

    def _check_json(
        self, text: str, tokens: Sequence[tuple[str, float]] | None, offset: int
    ) -> Checked:
        assert self.schema is not None and self._validator is not None
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            return Checked(None, {}, f"not valid JSON: {exc.msg} at character {exc.pos}")
        error = best_match(self._validator.iter_errors(doc))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "answer"
            return Checked(None, {}, f"{where}: {error.message}"[:300])
        values = _coerce(doc, self.schema)
        conf: dict[str, float | None] = {}
        if self.confidence:
            for k in self._enum_fields():
                conf[f"{k}_confidence"] = _enum_prob(text, k, values[k], tokens, offset)
        return Checked(values, conf, None)


# --------------------------------------------------------------------------- helpers


def _short(text: str) -> str:
    return repr(text if len(text) <= 80 else text[:77] + "...")


def _prob(logprob: float) -> float:
    return min(1.0, max(0.0, math.exp(logprob)))


def _span_prob(
    tokens: Sequence[tuple[str, float]] | None, text: str, offset: int, start: int, end: int
) -> float | None:
    """exp(sum of the logprobs of the tokens overlapping text[start:end]), or None if the
    tokens' text does not line up with ``text`` (then no honest number exists)."""
    if not tokens:
        return None
    full = "".join(t for t, _ in tokens)
    if full[offset : offset + end] != text[:end]:
        return None
    lo, hi = offset + start, offset + end
    pos, total, seen = 0, 0.0, False
    for piece, logprob in tokens:
        a, b = pos, pos + len(piece)
        pos = b
        if b > lo and a < hi:
            total += logprob
            seen = True
        if a >= hi:
            break
    return _prob(total) if seen else None


def _enum_prob(
    text: str, key: str, value: Any, tokens: Sequence[tuple[str, float]] | None, offset: int
) -> float | None:
    if not isinstance(value, str):
        return None
    m = re.search(re.escape(json.dumps(key, ensure_ascii=False)) + r"\s*:\s*", text)
    if m is None:
        return None
    literal = json.dumps(value, ensure_ascii=False)
    if not text.startswith(literal, m.end()):
        return None
    start = m.end() + 1  # the value's characters, quotes excluded
    return _span_prob(tokens, text, offset, start, start + len(literal) - 2)


def _coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    """A valid JSON value as exactly its Arrow type's Python value (1.0 -> 1 for integer, ...)."""
    if value is None:
        return None
    jtype, _ = _type_of(schema)
    if jtype == "integer":
        return int(value)
    if jtype == "number":
        return float(value)
    if jtype == "array":
        return [_coerce(v, schema["items"]) for v in value]
    if jtype == "object":
        return {k: _coerce(value.get(k), sub) for k, sub in schema["properties"].items()}
    return value


def _number(candidate: float, schema: Mapping[str, Any], integer: bool) -> int | float:
    """``candidate`` moved inside the schema's bounds (strictly inside exclusive ones)."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    xlo, xhi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if integer:
        if xlo is not None:
            lo = max(lo, math.floor(xlo) + 1) if lo is not None else math.floor(xlo) + 1
        if xhi is not None:
            hi = min(hi, math.ceil(xhi) - 1) if hi is not None else math.ceil(xhi) - 1
        value = math.ceil(candidate)
        if lo is not None:
            value = max(value, math.ceil(lo))
        if hi is not None:
            value = min(value, math.floor(hi))
        return int(value)
    low = [(v, x) for v, x in ((lo, False), (xlo, True)) if v is not None]
    high = [(v, x) for v, x in ((hi, False), (xhi, True)) if v is not None]
    low_b = max(low, key=lambda x: (x[0], x[1])) if low else None
    high_b = min(high, key=lambda x: (x[0], not x[1])) if high else None
    number = float(candidate)
    too_low = low_b is not None and (number < low_b[0] or (low_b[1] and number <= low_b[0]))
    too_high = high_b is not None and (number > high_b[0] or (high_b[1] and number >= high_b[0]))
    if not (too_low or too_high):
        return number
    if low_b is not None and high_b is not None:
        return (low_b[0] + high_b[0]) / 2
    if low_b is not None:
        return float(low_b[0]) + (1.0 if low_b[1] else 0.0)
    assert high_b is not None
    return float(high_b[0]) - (1.0 if high_b[1] else 0.0)


def _minimal(schema: Mapping[str, Any]) -> Any:
    jtype, _ = _type_of(schema)
    if "enum" in schema:
        return min(schema["enum"], key=len)
    if jtype == "string":
        return "a" * int(schema.get("minLength", 0))
    if jtype in ("integer", "number"):
        return _number(0, schema, jtype == "integer")
    if jtype == "boolean":
        return False
    if jtype == "array":
        return [_minimal(schema["items"]) for _ in range(int(schema.get("minItems", 0)))]
    required = schema.get("required", [])
    return {k: _minimal(v) for k, v in schema["properties"].items() if k in required}


def _example(schema: Mapping[str, Any], words: Sequence[str], counter: list[int]) -> Any:
    """A valid value; ``counter`` advances so that fields differ from one another."""
    jtype, _ = _type_of(schema)
    pick = counter[0]
    counter[0] += 1
    if "enum" in schema:
        return schema["enum"][pick % len(schema["enum"])]
    if jtype == "string":
        n = len(words)
        start = pick % n
        text = " ".join((list(words[start:]) + list(words[:start]))[: 1 + pick % 6])
        if "maxLength" in schema:
            text = text[: int(schema["maxLength"])]
        return text.ljust(int(schema.get("minLength", 0)), "x")
    if jtype in ("integer", "number"):
        integer = jtype == "integer"
        return _number(len(words) + pick % 5 if integer else len(words) / 2, schema, integer)
    if jtype == "boolean":
        return pick % 2 == 0
    if jtype == "array":
        lo = int(schema.get("minItems", 0))
        hi = int(schema.get("maxItems", max(lo, 2)))
        count = min(hi, max(lo, 1 + pick % 2))
        return [_example(schema["items"], words, counter) for _ in range(count)]
    return {k: _example(v, words, counter) for k, v in schema["properties"].items()}


def _say(schema: Mapping[str, Any]) -> str:
    """How the instruction line describes a field."""
    jtype, nullable = _type_of(schema)
    if "enum" in schema:
        what = "one of " + ", ".join(schema["enum"])
    elif jtype == "string":
        what = "text"
        if "maxLength" in schema:
            what += f" of at most {schema['maxLength']} characters"
        if "pattern" in schema:
            what += f" matching {schema['pattern']}"
    elif jtype == "integer":
        what = "an integer" + _range(schema)
    elif jtype == "number":
        what = "a number" + _range(schema)
    elif jtype == "boolean":
        what = "true or false"
    elif jtype == "array":
        what = f"a list of {_say(schema['items'])}"
    else:
        inner = ", ".join(f"{json.dumps(k)}: {_say(v)}" for k, v in schema["properties"].items())
        what = f"an object with {inner}"
    if schema.get("description"):
        what = f"{schema['description']} ({what})"
    return what + (" or null" if nullable else "")


def _range(schema: Mapping[str, Any]) -> str:
    lo, hi = schema.get("minimum"), schema.get("maximum")
    if lo is not None and hi is not None:
        return f" from {lo} to {hi}"
    if lo is not None:
        return f" of at least {lo}"
    if hi is not None:
        return f" of at most {hi}"
    return ""
