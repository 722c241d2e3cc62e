"""The engine boundary: batchinfer's own request/result records and a small async protocol.

Nothing here imports vllm or torch. ``build_engine`` imports the chosen engine module only
when an engine is actually built (inside an engine actor).

Failure model, shared by every engine (after Ray Data LLM's vLLM stage): an exception raised
for one request is that row's failure (a result with ``error_kind``), unless the engine
itself is broken (a fatal error, or ``healthy()`` is False), which fails the whole chunk. A
chunk that fails for any reason, cancellation included, first aborts its requests still in
the engine, so its retry does not run beside them. ``run_watched`` implements both.

Typed answers (``response:`` in the spec) are checked here, in the engine actor, because a
bad answer is drawn again from the same engine: ``draw_checked`` is the one check-and-resample
loop every engine uses. Re-samples happen inside one chunk attempt, before ``Engine.run``
returns, so the commit protocol does not know about them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar

from batch.errors import TransientError

if TYPE_CHECKING:
    from batch.response import Response
    from batch.spec import JobSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

# Bounds on the clean-up of a failed chunk: an engine that does not take an abort (or a
# request that ignores cancellation) must not hang the failure it is reporting.
_CLEANUP_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One row's model input. ``key`` is the row's position in its chunk."""

    key: int
    messages: tuple[dict[str, str], ...] | None = None  # chat messages (generate)
    text: str | None = None  # text to embed (embed)
    cache_key: bytes | None = None  # batch.cache.row_key: equal keys get one answer
    # This request's own sampling, on top of the spec's (``sampling_overrides``); () = none.
    sampling: tuple[tuple[str, Any], ...] = ()


#: Sampling settings a request may carry for itself (an OpenAI batch line's body does):
#: ``stop`` is a tuple of strings, ``json_schema`` the schema as JSON text (the answer must be
#: JSON of that schema), ``json_object`` True (the answer must be a JSON object).
SAMPLING_OVERRIDES = frozenset(
    {"max_tokens", "temperature", "top_p", "seed", "stop", "n", "presence_penalty",
     "frequency_penalty", "json_schema", "json_object"}
)  # fmt: skip


def sampling_overrides(**values: Any) -> tuple[tuple[str, Any], ...]:
    """A request's sampling overrides as ``EngineRequest.sampling``: the set ones, sorted by
    name, in hashable and picklable form (so the cache key sees them exactly)."""
    unknown = sorted(set(values) - SAMPLING_OVERRIDES)
    if unknown:
        raise ValueError(f"not a per-request sampling setting: {', '.join(unknown)}")
    out: list[tuple[str, Any]] = []
    for name in sorted(values):
        value = values[name]
        if value is None:
            continue
        if name == "stop":
            value = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
        out.append((name, value))
    return tuple(out)


@dataclass(slots=True)
class Sample:
    """One generated answer of a row (a request with n > 1 has n)."""

    text: str  # the answer, reasoning removed
    finish_reason: str | None
    output_tokens: int  # reasoning tokens included
    reasoning: str | None = None  # the model's thinking, when a reasoning parser split it off
    cumulative_logprob: float | None = None
    tokens: list[tuple[int, str, float]] | None = None  # (id, decoded, logprob) per token
    # the top sampling.logprobs candidates per generated token, best first (rank order)
    top: list[list[tuple[int, str, float]]] | None = None
    offset: int = 0  # where ``text`` starts in the tokens' text
    values: dict[str, Any] | None = None  # typed values, after the check
    confidence: dict[str, float | None] = field(default_factory=dict)


@dataclass(slots=True)
class EngineResult:
    """What the engine made of one request. ``error_kind`` set means the row failed.

    ``text`` and ``finish_reason`` are the (first) answer's. With a typed response,
    ``values`` holds the checked answer's columns and ``confidence`` its
    ``<field>_confidence`` values; ``resamples`` counts the extra draws the row needed,
    and the ``discarded_*`` tokens are what those draws and the answers thrown away cost.
    A row whose every draw failed the check is a ``SchemaViolation`` with its last answer
    in ``text``.
    """

    key: int
    text: str | None = None
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    embedding: list[float] | None = None
    error_kind: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # finished_at: unix time
    samples: list[Sample] = field(default_factory=list)
    values: dict[str, Any] | None = None
    confidence: dict[str, float | None] = field(default_factory=dict)
    resamples: int = 0  # extra generate calls for this row
    discarded_input_tokens: int = 0  # prompt tokens of the re-sample calls
    discarded_output_tokens: int = 0  # tokens of every answer thrown away
    # Where the answer came from: "engine" (computed for this row), "dup" (computed in this
    # run for an equal prompt) or "cache" (the result cache). Only "engine" rows cost tokens.
    source: str = "engine"


class EngineHung(TransientError):
    """The engine held requests and finished none of them for ``resources.chunk_timeout_s``.

    Raised by ``Engine.run``; the engine's ``healthy()`` is False from then on, so the
    actor replaces it (a hung engine cannot be trusted to come back).
    """


class Engine(Protocol):
    """An inference engine held by one engine actor for the whole job.

    ``run`` is called concurrently for several chunks; the engine must batch across them.
    Per-row failures come back as results with ``error_kind``; an exception from ``run``
    means the engine itself is broken and fails the chunk (its requests are aborted first).
    ``run`` raises :class:`EngineHung` when the engine makes no progress for
    ``resources.chunk_timeout_s``; ``healthy()`` is False afterwards.
    """

    task: Literal["generate", "embed"]

    async def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]: ...

    def healthy(self) -> bool:
        """False once the engine cannot serve again (its process died, or it hung): the
        actor must be restarted with a fresh engine."""
        ...

    def processes(self) -> list[tuple[int, float]]:
        """(pid, start time) of processes the engine started (the driver reaps them)."""
        ...

    def close(self) -> None: ...


def row_error(key: int, exc: BaseException, input_tokens: int = 0) -> EngineResult:
    """One request's exception as that row's failure: the error class and its message.

    A wrapper without a message of its own (vLLM's ``EngineGenerateError`` re-raises every
    unexpected per-request error that way) is unwrapped, so ``_failed/`` names the cause.
    """
    cause: BaseException = exc
    while not str(cause) and cause.__cause__ is not None:
        cause = cause.__cause__
    return EngineResult(
        key=key,
        input_tokens=input_tokens,
        error_kind=type(cause).__name__,
        error=(str(cause) or type(cause).__name__)[:500],
    )


class Watchdog:
    """Tells a hung engine from a busy one, for every chunk on one engine.

    The engine is hung when requests are pending in it and none of them finished (or
    produced output) for ``timeout_s``. A chunk queued behind other chunks is therefore not
    hung while the others make progress, and the clock starts when the engine gets work
    after being idle. ``timeout_s`` None never declares a hang.
    """

    def __init__(
        self, timeout_s: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self.pending = 0
        self.last_progress = clock()
        self.hung = False

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around one request's time in the engine; leaving it, except by cancellation, is
        progress (a row error is the engine answering too)."""
        if self.pending == 0:
            self.last_progress = self.clock()  # idle until now: the clock starts with work
        self.pending += 1
        cancelled = False
        try:
            yield
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self.pending -= 1
            if not cancelled:
                self.last_progress = self.clock()

    def progress(self) -> None:
        """A pending request produced output."""
        self.last_progress = self.clock()

    def seconds_left(self) -> float | None:
        """Seconds until the engine counts as hung if nothing happens (None: never)."""
        if self.timeout_s is None:
            return None
        if self.hung:
            return 0.0
        if self.pending == 0:
            return self.timeout_s
        return self.last_progress + self.timeout_s - self.clock()


async def run_watched(
    work: Iterable[Awaitable[T]],
    watchdog: Watchdog,
    abort: Callable[[], Awaitable[None]] | None = None,
) -> list[T]:
    """Await one chunk's requests together, in order; fail the chunk as a unit.

    If one of them raises (a fatal engine error: per-row errors are results by now), if the
    watchdog finds the engine hung, or if the chunk is cancelled, ``abort`` tells the engine
    to drop this chunk's requests, the remaining ones are cancelled, and the error
    propagates. After a hang, ``watchdog.hung`` stays True.
    """
    tasks = [asyncio.ensure_future(w) for w in work]
    if not tasks:
        return []
    try:
        while True:
            left = watchdog.seconds_left()
            _, pending = await asyncio.wait(
                tasks,
                timeout=None if left is None else max(left, 0.0) + 0.01,
                return_when=asyncio.FIRST_EXCEPTION,
            )
            for t in tasks:
                failure = t.exception() if t.done() and not t.cancelled() else None
                if failure is not None:
                    raise failure
            if not pending:
                return [t.result() for t in tasks]
            left = watchdog.seconds_left()
            if left is not None and left <= 0:
                watchdog.hung = True
                raise EngineHung(
                    f"the engine finished no request for {watchdog.timeout_s:g}s with "
                    f"{watchdog.pending} pending; it is replaced and the chunk retried (raise "
                    "resources.chunk_timeout_s if one request can legitimately take longer)"
                )
    except BaseException:
        await _stop(tasks, abort)
        raise


async def _stop(
    tasks: Sequence[asyncio.Future[T]], abort: Callable[[], Awaitable[None]] | None
) -> None:
    """Abort a failed chunk's requests in the engine, then cancel and reap their tasks."""
    running = [t for t in tasks if not t.done()]
    if abort is not None and running:
        try:
            await asyncio.wait_for(abort(), _CLEANUP_TIMEOUT_S)
        except Exception as exc:  # the chunk is failing already; its error is the news
            log.warning("could not abort the requests of a failed chunk: %s", exc)
    for t in running:
        t.cancel()
    if running:
        await asyncio.wait(running, timeout=_CLEANUP_TIMEOUT_S)
    for t in tasks:  # retrieve every exception, so asyncio does not log them as lost
        if t.done() and not t.cancelled():
            t.exception()


@dataclass(frozen=True, slots=True)
class Draw:
    """One generate call for a row: the first (round 0) or the k-th re-sample."""

    n: int
    round: int = 0
    temperature: float | None = None  # None: the spec's
    seed: int | None = None  # None: the spec's


@dataclass(frozen=True, slots=True)
class ResamplePolicy:
    """How often and how a row whose answer fails the check is drawn again."""

    n: int
    max_resamples: int
    temperature: float
    resample_temperature: float
    seed: int | None
    keep_tokens: bool = False  # keep Sample.tokens/top in the result (sampling.logprobs set)

    @classmethod
    def from_spec(cls, spec: JobSpec) -> ResamplePolicy:
        r = spec.response
        return cls(
            n=spec.sampling.n,
            max_resamples=r.max_resamples if r is not None else 0,
            temperature=spec.sampling.temperature,
            resample_temperature=r.resample_temperature if r is not None else 0.8,
            seed=spec.sampling.seed,
            keep_tokens=spec.sampling.logprobs is not None,
        )

    def redraw(self, n: int, round: int) -> Draw:
        """The k-th re-sample. Greedy would repeat the answer, so it samples at
        ``resample_temperature`` then; a seeded job stays reproducible (seed + round)."""
        temperature = self.temperature if self.temperature > 0 else self.resample_temperature
        seed = None if self.seed is None else self.seed + round
        return Draw(n=n, round=round, temperature=temperature, seed=seed)


DrawFn = Callable[[Draw], Awaitable[tuple[int, list[Sample]]]]  # -> (input tokens, samples)


async def draw_checked(
    key: int, draw: DrawFn, response: Response | None, policy: ResamplePolicy
) -> EngineResult:
    """Draw a row's answers, check them, and draw again the ones that fail.

    Without a response this is one draw of ``policy.n`` answers, returned as they are.
    With one, every answer
    must pass ``response.check``; a failing one is drawn again up to ``max_resamples``
    times, and if some still fails the row is a ``SchemaViolation`` carrying the last bad
    answer and its reason. All tokens of the answers thrown away are counted, so the ledger
    can show what validation cost.
    """
    input_tokens, samples = await draw(Draw(n=policy.n))
    if response is None:
        return _result(key, input_tokens, samples, policy)
    kept: list[Sample | None] = [None] * policy.n
    pending = list(range(policy.n))
    last_bad: tuple[str, str] = ("no answer", "")
    discarded_in = discarded_out = rounds = 0
    while True:
        for slot, s in zip(pending, samples, strict=True):
            c = response.check(
                s.text,
                s.finish_reason,
                tokens=_pairs(s.tokens),
                cumulative_logprob=s.cumulative_logprob,
                offset=s.offset,
            )
            if c.reason is None:
                s.values, s.confidence = c.values, dict(c.confidence)
                kept[slot] = s
            else:
                discarded_out += s.output_tokens
                last_bad = (c.reason, s.text)
        pending = [i for i, s in enumerate(kept) if s is None]
        if not pending or rounds >= policy.max_resamples:
            break
        rounds += 1
        more_in, samples = await draw(policy.redraw(len(pending), rounds))
        discarded_in += more_in
    if pending:  # every answer of a row must be valid, else the row fails
        discarded_out += sum(s.output_tokens for s in kept if s is not None)
        reason, text = last_bad
        return EngineResult(
            key=key,
            text=text,
            input_tokens=input_tokens,
            error_kind="SchemaViolation",
            error=f"{reason} (after {rounds} re-samples)"[:500],
            resamples=rounds,
            discarded_input_tokens=discarded_in,
            discarded_output_tokens=discarded_out,
        )
    result = _result(key, input_tokens, [s for s in kept if s is not None], policy)
    result.resamples = rounds
    result.discarded_input_tokens = discarded_in
    result.discarded_output_tokens = discarded_out
    return result


def _pairs(tokens: list[tuple[int, str, float]] | None) -> list[tuple[str, float]] | None:
    return None if tokens is None else [(text, lp) for _, text, lp in tokens]


def _result(
    key: int, input_tokens: int, samples: list[Sample], policy: ResamplePolicy
) -> EngineResult:
    """A row's result from its kept answers: the first one's text, every one's tokens."""
    if not samples:
        raise RuntimeError("the engine returned no answer")
    if not policy.keep_tokens:
        for s in samples:
            s.tokens = s.top = None  # token traces are large; the check has used them
    first = samples[0]
    return EngineResult(
        key=key,
        text=first.text,
        finish_reason=first.finish_reason,
        input_tokens=input_tokens,
        output_tokens=sum(s.output_tokens for s in samples),
        samples=samples,
        values=first.values,
        confidence=dict(first.confidence),
    )


def build_engine(spec: JobSpec, model_path: str) -> Engine:
    """Build the engine the spec names. Heavy imports happen here, not at module import."""
    if spec.model.engine == "fake":
        from batch.engine.fake import FakeEngine

        return FakeEngine(spec)
    if spec.model.engine == "sim":
        from batch.engine.sim import SimEngine

        return SimEngine(spec)
    from batch.engine.vllm import VLLMEngine

    return VLLMEngine(spec, model_path)
