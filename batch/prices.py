"""The price table: API list prices, batch discounts and GPU/CPU rates, as validated data.

Prices move, so they are data with a version (``batch/data/prices.yaml``), not constants in
code, and every row carries its source and the date it was read: the ledger copies the rows
it used, so a cost comparison can be checked and re-priced later. A job may point at another
table of the same format (``ledger.price_table``) or replace and add rows
(``ledger.prices``, applied with :meth:`PriceTable.merged`). Errors name the file (or
``ledger.prices``), the row and the field, and say what to change.

Keys: chat and embedding rows are ``provider/model``, batch discounts ``provider``, GPU rows
``provider/gpu`` (plus ``/instance`` where one provider prices several instance shapes),
CPU rows ``provider/instance``. One row per key and list.
"""

from __future__ import annotations

import datetime as dt
import difflib
import re
import typing
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from batch import yamldoc
from batch.errors import ConfigurationError

PACKAGED = "batch/data/prices.yaml"
LISTS = ("chat", "embedding", "batch_discounts", "gpu", "cpu")

_DATE = re.compile(r"\d{4}(-\d{2}(-\d{2})?)?|undated")

Loc = yamldoc.Loc


class UnknownPriceError(ConfigurationError, KeyError):
    """No row for a key. A KeyError too, so ``except KeyError`` callers keep working;
    the message lists close matches, because the usual cause is a typo in a job file."""


# --------------------------------------------------------------------------- field types


def _date_text(value: Any) -> Any:
    # Unquoted YAML dates arrive as datetime.date; the table keeps dates as text so that
    # partial dates (2026-08) and "undated" fit the same field.
    return value.isoformat() if isinstance(value, dt.date) else value


def _check_date(value: str) -> str:
    if not _DATE.fullmatch(value):
        raise ValueError("write the date as YYYY-MM-DD, YYYY-MM, YYYY or 'undated'")
    return value


def _check_text(value: str) -> str:
    if not value.strip():
        raise ValueError("is empty; write it out")
    return value


Usd = Annotated[float, Field(ge=0, strict=True, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, strict=True, allow_inf_nan=False)]
DateText = Annotated[str, BeforeValidator(_date_text), AfterValidator(_check_date)]
Text = Annotated[str, AfterValidator(_check_text)]
Name = Annotated[str, Field(pattern=r"^[^/\s]+$")]


def _source_field() -> Any:
    return Field(
        description="Where the price comes from: keys of the table's sources, separated by "
        "';', each optionally followed by detail, e.g. 'GP; AE' or 'job: our contract'."
    )


def _date_field() -> Any:
    return Field(
        description="When the price was read or published: YYYY-MM-DD, YYYY-MM, YYYY, or "
        "'undated' when the source carries no date."
    )


def _note_field() -> Any:
    return Field(default=None, description="Anything a reader of the ledger should know.")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Row(_Model):
    """A priced row. ``KEY_FIELDS`` make up its key; one row per key in a list."""

    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("provider",)

    @classmethod
    def key_of(cls, values: Mapping[str, Any]) -> str:
        """The key of a (possibly invalid) raw row, for lookups and error messages."""
        return "/".join(str(values[f]) for f in cls.KEY_FIELDS if values.get(f) is not None)

    @property
    def key(self) -> str:
        return self.key_of(self.__dict__)


class ChatPrice(_Row):
    """List price of a generation model, in USD per 1M tokens."""

    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("provider", "model")

    provider: Name = Field(description="Provider or host, e.g. openai, together; no '/'.")
    model: Text = Field(description="The provider's model name, e.g. gpt-4o-mini.")
    input: Usd = Field(description="USD per 1M input tokens at list price.")
    cached_input: Usd | None = Field(
        default=None,
        description="USD per 1M input tokens served from the prompt cache; without it, "
        "cached tokens are billed as input.",
    )
    output: Usd = Field(description="USD per 1M output tokens at list price.")
    note: str | None = _note_field()
    source: Text = _source_field()
    date: DateText = _date_field()


class EmbeddingPrice(_Row):
    """List price of an embedding model, in USD per 1M input tokens."""

    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("provider", "model")

    provider: Name = Field(description="Provider or host, e.g. openai, voyage; no '/'.")
    model: Text = Field(description="The provider's model name, e.g. text-embedding-3-small.")
    input: Usd = Field(description="USD per 1M input tokens at list price.")
    note: str | None = _note_field()
    source: Text = _source_field()
    date: DateText = _date_field()


class BatchDiscount(_Row):
    """What a provider's batch API takes off its list price, in exchange for latency."""

    provider: Name = Field(description="Provider, as in the chat and embedding rows.")
    discount: Fraction = Field(
        description="Fraction off the list price: 0.5 is 50% off, so the batch price is "
        "list x (1 - discount)."
    )
    turnaround: Text = Field(description="How long a batch may take, as the provider says.")
    note: str | None = _note_field()
    source: Text = _source_field()
    date: DateText = _date_field()


class GpuPrice(_Row):
    """On-demand rate of one accelerator on one cloud, in USD per GPU-hour."""

    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("provider", "gpu", "instance")

    provider: Name = Field(description="Cloud, e.g. aws, lambda, runpod-secure; no '/'.")
    gpu: Name = Field(description="Accelerator, e.g. H100-SXM, H200, A100-80GB, L40S, L4, B200.")
    instance: Name | None = Field(
        default=None,
        description="Instance shape (e.g. 1x, 8x) where the cloud prices shapes differently; "
        "a lookup without one takes the row without an instance, else the first listed.",
    )
    usd_per_hour: Usd = Field(description="USD per GPU-hour, on demand.")
    note: str | None = _note_field()
    source: Text = _source_field()
    date: DateText = _date_field()


class CpuPrice(_Row):
    """Rate of a CPU instance, in USD per instance-hour (the default device is cpu)."""

    KEY_FIELDS: ClassVar[tuple[str, ...]] = ("provider", "instance")

    provider: Name = Field(description="Cloud, or generic for an assumed rate; no '/'.")
    instance: Text = Field(description="Instance type or size, e.g. '2 vCPU' or m7i.large.")
    usd_per_hour: Usd = Field(description="USD per instance-hour.")
    note: str | None = _note_field()
    source: Text = _source_field()
    date: DateText = _date_field()


class GpuDefault(_Model):
    """The rate used when a GPU job names no accelerator or cloud."""

    provider: Name = Field(description="Cloud of a gpu row, e.g. lambda.")
    gpu: Name = Field(description="Accelerator of a gpu row, e.g. H100-SXM.")


class Defaults(_Model):
    """What the ledger compares with, and at which rate, unless the job says otherwise."""

    generate_comparators: list[str] = Field(
        min_length=1, description="Chat rows (provider/model) a generate run is compared with."
    )
    embed_comparators: list[str] = Field(
        min_length=1, description="Embedding rows (provider/model) an embed run is compared with."
    )
    gpu: GpuDefault = Field(description="The gpu row for GPU runs.")
    cpu: str = Field(description="The cpu row (provider/instance) for CPU runs.")


ROW_MODELS: dict[str, type[_Row]] = {
    "chat": ChatPrice,
    "embedding": EmbeddingPrice,
    "batch_discounts": BatchDiscount,
    "gpu": GpuPrice,
    "cpu": CpuPrice,
}

R = TypeVar("R", bound=_Row)


class _TableProblems(ValueError):
    """Cross-row problems (duplicates, unknown sources, dangling defaults), each with its
    location, so the loader can point at the line of each."""

    def __init__(self, problems: list[tuple[Loc, str]]) -> None:
        super().__init__("; ".join(f"{_render_loc(loc)}: {msg}" for loc, msg in problems))
        self.problems = problems


class PriceTable(_Model):
    """A versioned price table. Build it with :func:`load_price_table`, not by hand."""

    version: Text = Field(
        description="The table's version: the date it was collected; '+overrides' when a "
        "job's rows were applied."
    )
    collected: DateText = Field(description="When the prices were read from their sources.")
    currency: Literal["USD"] = Field(description="Currency of every price; the ledger is in USD.")
    sources: dict[str, Text] = Field(
        description="Source key -> what and where it is (URL, commit, read date)."
    )
    chat: list[ChatPrice] = Field(description="Generation models, USD per 1M tokens.")
    embedding: list[EmbeddingPrice] = Field(description="Embedding models, USD per 1M tokens.")
    batch_discounts: list[BatchDiscount] = Field(description="Batch-API discounts by provider.")
    gpu: list[GpuPrice] = Field(description="On-demand GPU rates, USD per GPU-hour.")
    cpu: list[CpuPrice] = Field(description="CPU instance rates, USD per instance-hour.")
    defaults: Defaults = Field(
        description="Comparators and rates used unless the job names its own."
    )

    @model_validator(mode="after")
    def _consistent(self) -> PriceTable:
        problems: list[tuple[Loc, str]] = []
        for name in LISTS:
            problems += _row_problems(name, getattr(self, name), self.sources)
        d = self.defaults
        for field, rows in (
            ("generate_comparators", self.chat),
            ("embed_comparators", self.embedding),
        ):
            keys = [r.key for r in rows]
            for i, key in enumerate(getattr(d, field)):
                if key not in keys:
                    kind = "chat" if field == "generate_comparators" else "embedding"
                    msg = f"{key!r} is not a {kind} row; " + _no_row(key, keys, "provider/model")
                    problems.append((("defaults", field, i), msg))
        if not any(r.provider == d.gpu.provider and r.gpu == d.gpu.gpu for r in self.gpu):
            pairs = sorted({f"{r.provider}/{r.gpu}" for r in self.gpu})
            key = f"{d.gpu.provider}/{d.gpu.gpu}"
            msg = f"{key!r} is not a gpu row; " + _no_row(key, pairs, "provider/gpu")
            problems.append((("defaults", "gpu"), msg))
        cpu_keys = [r.key for r in self.cpu]
        if d.cpu not in cpu_keys:
            msg = f"{d.cpu!r} is not a cpu row; " + _no_row(d.cpu, cpu_keys, "provider/instance")
            problems.append((("defaults", "cpu"), msg))
        if problems:
            raise _TableProblems(problems)
        return self

    # ------------------------------------------------------------------ lookups

    def chat_price(self, key: str) -> ChatPrice:
        """The chat row for ``provider/model``. Raises UnknownPriceError naming close keys."""
        return _lookup(self.chat, key, "chat", "provider/model")

    def embedding_price(self, key: str) -> EmbeddingPrice:
        """The embedding row for ``provider/model``. Raises UnknownPriceError."""
        return _lookup(self.embedding, key, "embedding", "provider/model")

    def batch_discount_row(self, provider: str) -> BatchDiscount | None:
        """The provider's batch-API row, for the ledger's provenance; None if it has none."""
        for row in self.batch_discounts:
            if row.provider == provider:
                return row
        return None

    def batch_discount(self, provider: str) -> float:
        """Fraction off list price with the provider's batch API; 0.0 if it has none here."""
        row = self.batch_discount_row(provider)
        return row.discount if row else 0.0

    def gpu_rate(self, provider: str, gpu: str, instance: str | None = None) -> GpuPrice:
        """The rate of ``gpu`` on ``provider``.

        Where a provider prices several instance shapes, give ``instance`` to choose one;
        without it a row with no instance wins (a job override adds one), else the first
        listed (the packaged table lists the 1-GPU shape first: what a one-GPU job rents).
        """
        rows = [r for r in self.gpu if r.provider == provider and r.gpu == gpu]
        if not rows:  # case slips (h100-sxm) are not worth an error
            rows = [
                r
                for r in self.gpu
                if r.provider.casefold() == provider.casefold()
                and r.gpu.casefold() == gpu.casefold()
            ]
        if instance is not None:
            rows = [r for r in rows if r.instance == instance]
        if not rows:
            key = f"{provider}/{gpu}" + (f"/{instance}" if instance else "")
            raise UnknownPriceError(f"no gpu price for {key!r}: " + self._gpu_hint(provider, gpu))
        unqualified = [r for r in rows if r.instance is None]
        return (unqualified or rows)[0]

    def _gpu_hint(self, provider: str, gpu: str) -> str:
        """What the table does have, by cloud and by accelerator: the two ways to fix a miss."""
        providers = sorted({r.provider for r in self.gpu})
        offered = sorted(
            {
                f"{r.gpu}" + (f" ({r.instance})" if r.instance else "")
                for r in self.gpu
                if r.provider == provider
            }
        )
        if offered:
            text = f"{provider} has {', '.join(offered)}"
        else:
            hint = _did_you_mean(provider, providers)
            text = f"no cloud {provider!r}{hint} (clouds: {', '.join(providers)})"
        clouds = sorted({r.provider for r in self.gpu if r.gpu == gpu})
        if clouds:
            text += f"; {gpu} is priced on {', '.join(clouds)}"
        else:
            gpus = sorted({r.gpu for r in self.gpu})
            hint = _did_you_mean(gpu, gpus)
            text += f"; no cloud here prices {gpu!r}{hint} (gpus: {', '.join(gpus)})"
        return text + " (or add a row under ledger.prices.gpu, with source and date)"

    def cpu_rate(self, key: str | None = None) -> CpuPrice:
        """The CPU row for ``provider/instance``; default: the table's default."""
        return _lookup(self.cpu, key or self.defaults.cpu, "cpu", "provider/instance")

    # ------------------------------------------------------------------ overrides

    def merged(self, overrides: Mapping[str, Any], *, source: str = "ledger.prices") -> PriceTable:
        """A new table with a job's rows applied: a row with the key of an existing row
        replaces it (in place), other rows are added at the end of their list.

        ``overrides`` maps list names (chat, embedding, batch_discounts, gpu, cpu) to lists
        of complete rows, source and date included, and may add ``sources`` keys. Rows are
        validated like the file's; errors name ``source``, the list index and the field.
        The version gets a ``+overrides`` suffix so the ledger shows that rows were changed.
        """
        if not overrides:
            return self
        allowed = (*LISTS, "sources")
        unknown = [k for k in overrides if k not in allowed]
        if unknown:
            hints = [_did_you_mean(str(k), allowed) for k in unknown]
            raise ConfigurationError(
                f"{source}: unknown key(s) {', '.join(map(repr, unknown))}{''.join(hints)}; "
                f"use {', '.join(allowed)} (the job's ledger section sets comparators and gpu)"
            )
        sources = dict(self.sources)
        extra_sources = overrides.get("sources", {})
        if not isinstance(extra_sources, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) and v.strip()
            for k, v in extra_sources.items()
        ):
            raise ConfigurationError(
                f"{source}: sources must map keys to descriptions, e.g. {{ours: 'our contract'}}"
            )
        sources.update(extra_sources)

        problems: list[str] = []
        merged_rows: dict[str, list[dict[str, Any]]] = {}
        for name in LISTS:
            if name not in overrides:
                continue
            raw_rows = overrides[name]
            if not isinstance(raw_rows, list):
                problems.append(f"{source}: {name}: must be a list of rows (got {raw_rows!r})")
                continue
            model = ROW_MODELS[name]
            valid: list[_Row] = []
            for i, raw in enumerate(raw_rows):
                try:
                    valid.append(model.model_validate(raw))
                except ValidationError as exc:
                    for err in exc.errors():
                        loc = (name, i, *err["loc"])
                        problems.append(_describe({**err, "loc": loc}, source, {}, overrides))
            if len(valid) < len(raw_rows):
                continue
            for loc, msg in _row_problems(name, valid, sources):
                problems.append(_format(loc, msg, source, {}, overrides))
            rows = [r.model_dump() for r in getattr(self, name)]
            index = {model.key_of(r): i for i, r in enumerate(rows)}
            for row in valid:
                if row.key in index:
                    rows[index[row.key]] = row.model_dump()
                else:
                    rows.append(row.model_dump())
            merged_rows[name] = rows
        if problems:
            raise ConfigurationError(f"invalid {source}:\n  " + "\n  ".join(problems))

        raw_table = self.model_dump()
        raw_table.update(merged_rows)
        raw_table["sources"] = sources
        if not self.version.endswith("+overrides"):
            raw_table["version"] = f"{self.version}+overrides"
        return _validate(raw_table, f"price table with {source} applied", {})


# --------------------------------------------------------------------------- loading


def load_price_table(path: str | Path | None = None) -> PriceTable:
    """Read and validate a price table; default: the packaged ``batch/data/prices.yaml``.

    Raises ConfigurationError naming the file, the row and the field of every problem.
    """
    if path is None:
        text = (resources.files("batch") / "data" / "prices.yaml").read_text(encoding="utf-8")
        return parse_price_table(text, source=PACKAGED)
    path = Path(path).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigurationError(
            f"{path}: no such price table; ledger.price_table must name a YAML file in the "
            f"format of {PACKAGED} (or leave it out to use that one)"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot read the price table: {exc}") from None
    return parse_price_table(text, source=str(path))


def parse_price_table(text: str, *, source: str = "<prices>") -> PriceTable:
    """Validate a price table given as YAML text; ``source`` names it in errors."""
    raw, lines = yamldoc.load(text, source, ConfigurationError)
    if not isinstance(raw, dict):
        raise ConfigurationError(
            f"{source}: a price table is a mapping with version, collected, currency, sources, "
            f"{', '.join(LISTS)} and defaults (see {PACKAGED})"
        )
    return _validate(raw, source, lines)


def _validate(raw: Mapping[str, Any], source: str, lines: Mapping[Loc, int]) -> PriceTable:
    try:
        return PriceTable.model_validate(raw)
    except ValidationError as exc:
        problems: list[str] = []
        for err in exc.errors():
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _TableProblems):
                problems += [_format(loc, msg, source, lines, raw) for loc, msg in cause.problems]
            else:
                problems.append(_describe(err, source, lines, raw))
        raise ConfigurationError("invalid price table:\n  " + "\n  ".join(problems)) from None


# --------------------------------------------------------------------------- costs


def api_cost(
    price: ChatPrice, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0
) -> float:
    """USD for these tokens at list price (before any batch discount).

    ``cached_input_tokens`` are the part of ``input_tokens`` served from the prompt cache
    (OpenAI's convention), billed at ``cached_input`` where the row has one.
    """
    _check_counts(
        input_tokens=input_tokens, output_tokens=output_tokens, cached=cached_input_tokens
    )
    if cached_input_tokens > input_tokens:
        raise ValueError(
            f"cached_input_tokens ({cached_input_tokens}) is part of input_tokens "
            f"({input_tokens}), so it cannot be larger"
        )
    cached_rate = price.cached_input if price.cached_input is not None else price.input
    usd_millionths = (
        (input_tokens - cached_input_tokens) * price.input
        + cached_input_tokens * cached_rate
        + output_tokens * price.output
    )
    return usd_millionths / 1_000_000


def embedding_cost(price: EmbeddingPrice, input_tokens: int) -> float:
    """USD for embedding ``input_tokens`` at list price."""
    _check_counts(input_tokens=input_tokens)
    return input_tokens * price.input / 1_000_000


def _check_counts(**counts: int) -> None:
    for name, n in counts.items():
        if n < 0:
            raise ValueError(f"{name} must be >= 0 (got {n})")


# --------------------------------------------------------------------------- helpers


def _source_keys(ref: str) -> list[str]:
    """'GP; AE' -> [GP, AE]; 'GP together.yml' -> [GP]; 'job: our contract' -> [job]."""
    return [part.split()[0].rstrip(":,") for part in ref.split(";") if part.strip()]


def _row_problems(
    name: str, rows: Sequence[_Row], sources: Mapping[str, str]
) -> list[tuple[Loc, str]]:
    """Duplicate keys and sources that name no key of ``sources``, in one list."""
    problems: list[tuple[Loc, str]] = []
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.key in seen:
            problems.append(
                (
                    (name, i),
                    f"same key as {name}[{seen[row.key]}] ({row.key}); keep one row per key",
                )
            )
        else:
            seen[row.key] = i
        ref = str(getattr(row, "source", ""))
        missing = [k for k in _source_keys(ref) if k not in sources]
        if missing:
            problems.append(
                (
                    (name, i, "source"),
                    f"{', '.join(map(repr, missing))} is not a key of sources "
                    f"({', '.join(sources)}); start each ';'-separated reference with one "
                    f"(got {ref!r})",
                )
            )
    return problems


def _lookup(rows: Sequence[R], key: str, kind: str, form: str) -> R:
    for row in rows:
        if row.key == key:
            return row
    folded = [row for row in rows if row.key.casefold() == key.casefold()]
    if len(folded) == 1:  # case slips are not worth an error
        return folded[0]
    keys = [row.key for row in rows]
    raise UnknownPriceError(f"no {kind} price for {key!r}: " + _no_row(key, keys, form, kind))


def _no_row(key: str, keys: Sequence[str], form: str, kind: str | None = None) -> str:
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if close:
        text = f"did you mean {', '.join(close)}?"
    else:
        text = f"keys are {form}; the table has {', '.join(keys)}"
    if "/" not in key:
        text = f"write it as {form}; " + text
    if kind:
        text += f" (or add a row under ledger.prices.{kind}, with source and date)"
    return text


def _did_you_mean(word: str, options: Sequence[str]) -> str:
    # A prefix ("H100" for "H100-SXM") beats difflib's nearest spelling ("H200").
    prefixed = [o for o in options if o.casefold().startswith(word.casefold())]
    close = prefixed[:1] or difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _render_loc(loc: Loc, raw: Mapping[str, Any] | None = None) -> str:
    """('chat', 3, 'output') -> 'chat[3] (openai/gpt-4o) output'."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
            if i == 1 and loc[0] in ROW_MODELS:
                row = _raw_at(raw, loc[:2])
                key = ROW_MODELS[str(loc[0])].key_of(row) if isinstance(row, Mapping) else ""
                text += f" ({key})" if key else ""
                text += " " if i + 1 < len(loc) else ""
        else:
            text += ("." if text and not text.endswith(" ") else "") + part
    return text


def _raw_at(raw: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            raw = raw[part]
        except (KeyError, IndexError, TypeError):
            return None
    return raw


def _line_of(loc: Loc, lines: Mapping[Loc, int]) -> int | None:
    for i in range(len(loc), 0, -1):
        if loc[:i] in lines:
            return lines[loc[:i]]
    return None


def _format(loc: Loc, msg: str, source: str, lines: Mapping[Loc, int], raw: Any) -> str:
    line = _line_of(loc, lines)
    where = f"{source}:{line}" if line else source
    return f"{where}: {_render_loc(loc, raw)}: {msg}" if loc else f"{where}: {msg}"


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The model that holds the last element of ``loc`` (for field names and help)."""
    model: Any = PriceTable
    for part in loc:
        if isinstance(part, int):
            args = typing.get_args(model)
            model = args[0] if args else None
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
        field = model.model_fields.get(part)
        model = field.annotation if field else None
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(err: Mapping[str, Any], source: str, lines: Mapping[Loc, int], raw: Any) -> str:
    """One pydantic error as 'file:line: chat[3] (openai/gpt-4o) output: what is wrong'."""
    loc: Loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    kind = err["type"]
    ctx = err.get("ctx") or {}
    parent = _model_at(loc[:-1]) if loc else None
    field = parent.model_fields.get(str(loc[-1])) if parent and loc else None
    desc = field.description if field else None
    got = err.get("input")
    shown = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    if kind == "missing":
        msg = "missing; add it" + (f" ({desc})" if desc else "")
    elif kind == "extra_forbidden":
        valid = list(parent.model_fields) if parent else []
        msg = f"unknown field{_did_you_mean(str(loc[-1]), valid)}; valid fields: {', '.join(valid)}"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        model = _model_at(loc)
        fields = f" ({', '.join(model.model_fields)})" if model else ""
        msg = f"must be a mapping of fields{fields}{shown}"
    elif kind == "list_type":
        msg = f"must be a list{' of rows' if loc and loc[-1] in LISTS else ''}{shown}"
    elif kind == "greater_than_equal":
        msg = f"must be >= {ctx['ge']:g}{shown}" + (f"; {desc}" if desc else "")
    elif kind == "less_than_equal":
        msg = f"must be <= {ctx['le']:g}{shown}" + (f"; {desc}" if desc else "")
    elif kind in ("float_type", "float_parsing", "finite_number"):
        msg = f"must be a number{shown}" + (f"; {desc}" if desc else "")
    elif kind == "string_type":
        msg = f"must be text{shown}"
    elif kind == "string_pattern_mismatch":
        msg = f"must be a single name without '/' or spaces{shown}"
    else:
        text = str(err["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
        msg = f"{text}{shown}"
    return _format(loc, msg, source, lines, raw)
