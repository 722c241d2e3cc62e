"""A deterministic fake engine with injectable faults, for fast tests without vLLM.

It fails the way ``batch.engine`` says engines fail: an exception for one row is that row's
error, an engine fault fails the chunk, and an engine that finishes nothing for
``resources.chunk_timeout_s`` raises ``EngineHung`` and reports itself unhealthy.

``model.fake_options`` (all optional):
- ``max_model_len`` (int, default 512): prompts with more "tokens" (words) fail as too long.
- ``fail_rows_containing`` (str): rows whose prompt contains it fail with ``EngineError``.
- ``row_error_rate`` (float 0..1, default 0): each row fails with ``EngineError`` with this
  probability, drawn afresh on every attempt (so a retry splits the rows differently).
- ``raise_row_exception_on_text`` (str): computing a row whose prompt contains it raises
  ``FakeRowException``, which must come back as that row's error (``error_kind``
  ``FakeRowException``), the rest of the chunk unharmed.
- ``crash_on_text`` (str): a chunk holding a row with this text raises (engine fault).
- ``hang_on_text`` (str): a chunk holding a row with this text hangs the engine, as a stuck
  engine core would: it and every chunk still running never return, until cancelled or the
  engine is declared hung (nothing finished for ``resources.chunk_timeout_s``).
- ``delay_per_token`` (float seconds, default 0): simulated decode time.
- ``dims`` (int, default 8): embedding size.
- ``die_on_text`` (str) with ``die_flag_dir`` (path): the first time a chunk holds a row with
  this text, the engine actor's process exits (as a crashed engine takes its actor down);
  the flag file in ``die_flag_dir`` makes it happen once per text and job.

Typed answers (``response:`` in the spec) go through the same check-and-resample loop as on
vLLM (``draw_checked``). The answer is ``Response.example`` over the prompt's words, picked
by a hash of the prompt (deterministic, valid); its pseudo-tokens are 4-character slices with
a logprob from a hash, so confidences vary by row. An answer longer than
``sampling.max_tokens`` slices is cut there with finish_reason "length", as on vLLM. Options:
- ``violation_rate`` (float 0..1, default 0): each draw is cut off (finish_reason "length")
  with this probability, drawn afresh every time.
- ``violate_on_text`` (str) with ``violate_draws`` (int, default every draw): a row whose
  prompt contains the text is cut off on its first ``violate_draws`` draws (counted per row
  key and prompt, per engine), so a test can get "valid after 1 re-sample".
- ``regex_answer`` (str): the answer of a ``response.regex`` job (a regex cannot be inverted).
- ``reasoning`` (bool, default false): the model "thinks" first: every answer is generated as
  ``<think>fake</think>`` + the answer, and the thinking is split off into
  ``Sample.reasoning`` (its 3 pseudo-tokens count as output tokens), as vLLM's reasoning
  parser does.

A request's own sampling (``EngineRequest.sampling``) overrides the spec's ``max_tokens``,
``n``, ``temperature`` and ``stop`` (the answer ends before the first word holding a stop
string); the other overrides are accepted and ignored.

``sampling.n`` gives n answers per row (``EngineResult.samples``); at temperature > 0 each
differs. ``sampling.logprobs: k`` keeps a deterministic logprob per generated token in
``Sample.tokens`` and k candidates per token in ``Sample.top`` (the sampled one first).

``sampling.temperature`` > 0 makes generated text random: its last word is replaced by a
random one on every attempt (token counts unchanged), so a test can tell attempts apart.
The engine records the keys of requests it aborted (a failed or cancelled chunk's) in
``aborted``.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
import random
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from batch.engine import (
    Draw,
    EngineRequest,
    EngineResult,
    ResamplePolicy,
    Sample,
    Watchdog,
    draw_checked,
    row_error,
    run_watched,
)
from batch.response import Response

if TYPE_CHECKING:
    from batch.spec import JobSpec


class FakeEngineCrash(RuntimeError):
    """Raised by the fake engine when told to crash, as a dying engine would."""


class FakeRowException(RuntimeError):
    """Raised for one row when told to (``raise_row_exception_on_text``); a row error."""


# Fresh randomness in every process and attempt (a forked worker shares no seed with another).
_rng = random.SystemRandom()


class FakeEngine:
    def __init__(self, spec: JobSpec) -> None:
        opts: dict[str, Any] = dict(spec.model.fake_options)
        self.task = spec.model.task
        self.max_tokens = spec.sampling.max_tokens
        self.ignore_eos = spec.sampling.ignore_eos
        self.max_model_len = int(opts.get("max_model_len", 512))
        self.fail_marker = opts.get("fail_rows_containing")
        self.crash_marker = opts.get("crash_on_text")
        self.delay = float(opts.get("delay_per_token", 0.0))
        self.dims = int(opts.get("dims", 8))
        self.die_marker = opts.get("die_on_text")
        self.die_flag_dir = opts.get("die_flag_dir")
        self.row_error_rate = float(opts.get("row_error_rate", 0.0))
        self.raise_marker = opts.get("raise_row_exception_on_text")
        self.hang_marker = opts.get("hang_on_text")
        self.temperature = spec.sampling.temperature
        self.response = Response.from_spec(spec.response) if spec.response else None
        self.policy = ResamplePolicy.from_spec(spec)
        self.violation_rate = float(opts.get("violation_rate", 0.0))
        self.violate_marker = opts.get("violate_on_text")
        draws = opts.get("violate_draws")
        self.violate_draws = None if draws is None else int(draws)
        self.regex_answer = opts.get("regex_answer")
        self.reasoning = bool(opts.get("reasoning", False))
        self.top_k = spec.sampling.logprobs or 0
        self._violated: dict[tuple[int, str], int] = {}  # draws cut so far, per row
        self.aborted: list[int] = []
        self._stuck = False
        self._watchdog = Watchdog(spec.resources.chunk_timeout_s)

    async def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        keys = [r.key for r in requests]

        async def abort() -> None:
            self.aborted.extend(keys)

        (results,) = await run_watched([self._chunk(requests)], self._watchdog, abort)
        return results

    async def _chunk(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        with self._watchdog.request():
            results = []
            for req in requests:
                prompt = _prompt_text(req)
                if self.die_marker and self.die_marker in prompt:
                    self._maybe_die()
                if self.crash_marker and self.crash_marker in prompt:
                    raise FakeEngineCrash(f"fake engine told to crash on {self.crash_marker!r}")
                if self.hang_marker and self.hang_marker in prompt:
                    self._stuck = True
                try:
                    if self.response is not None and self.task == "generate":
                        results.append(await self._typed(req, prompt, self.response))
                    else:
                        results.append(self._one(req, prompt))
                except Exception as exc:  # as in the vLLM engine: one row's exception
                    results.append(row_error(req.key, exc))
            if self.delay:
                tokens = sum(r.output_tokens + r.discarded_output_tokens for r in results)
                await asyncio.sleep(self.delay * tokens)
            if self._stuck:
                await asyncio.Event().wait()  # until cancelled
        done = time.time()
        for r in results:
            r.timings["finished_at"] = done
        return results

    def _one(self, req: EngineRequest, prompt: str) -> EngineResult:
        n_in = _input_tokens(req, prompt)
        refused = self._refuse(req, prompt, n_in)
        if refused is not None:
            return refused
        if self.task == "embed":
            return EngineResult(
                key=req.key, input_tokens=n_in, embedding=_vector(prompt, self.dims)
            )
        o = dict(req.sampling)  # the request's own sampling, on top of the spec's
        n = int(o.get("n", self.policy.n))
        samples = [
            self._plain(
                prompt,
                int(o.get("max_tokens", self.max_tokens)),
                float(o.get("temperature", self.temperature)),
                tuple(o.get("stop", ())),
            )
            for _ in range(n)
        ]
        first = samples[0]
        if not self.policy.keep_tokens:
            for sample in samples:
                sample.tokens = sample.top = None
        return EngineResult(
            key=req.key,
            text=first.text,
            finish_reason=first.finish_reason,
            input_tokens=n_in,
            output_tokens=sum(sample.output_tokens for sample in samples),
            samples=samples,
        )

    def _plain(
        self,
        prompt: str,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: tuple[str, ...] = (),
    ) -> Sample:
        """A plain-text answer: the prompt's first words (one pseudo-token per word). A stop
        string ends it before the first word holding it, as vLLM leaves the stop out."""
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        temperature = self.temperature if temperature is None else temperature
        words = prompt.split()
        n_out = max_tokens if self.ignore_eos else min(max_tokens, max(1, len(words) // 2))
        out = (words * (n_out // max(1, len(words)) + 1))[:n_out]
        if temperature > 0 and out:
            out[-1] = f"~{_rng.getrandbits(40):010x}"  # sampling: differs on every attempt
        reason = "length" if n_out == max_tokens else "stop"
        cut = next((i for i, w in enumerate(out) if any(s in w for s in stop)), None)
        if cut is not None:
            out, n_out, reason = out[:cut], cut + 1, "stop"
        pieces = [w if i == 0 else f" {w}" for i, w in enumerate(out)]
        return self._sample(prompt, pieces, reason, n_out)

    def _sample(self, salt: str, pieces: list[str], reason: str, output_tokens: int) -> Sample:
        """A Sample over pseudo-tokens, with the thinking first when ``reasoning`` is set."""
        thinking = ["<think>", "fake", "</think>"] if self.reasoning else []
        every = thinking + pieces
        tokens = [(i, p, _logprob(salt, p, i)) for i, p in enumerate(every)]
        top = None
        if self.top_k:
            top = [_candidates(t, self.top_k) for t in tokens]
        text = "".join(pieces)
        return Sample(
            text=text,
            finish_reason=reason,
            output_tokens=output_tokens + len(thinking),
            reasoning="fake" if self.reasoning else None,
            cumulative_logprob=sum(lp for _, _, lp in tokens),
            tokens=tokens,
            top=top,
            offset=sum(len(p) for p in thinking),
        )

    async def _typed(self, req: EngineRequest, prompt: str, response: Response) -> EngineResult:
        """A typed answer, checked and re-sampled by the loop the vLLM engine uses."""
        n_in = _input_tokens(req, prompt)
        refused = self._refuse(req, prompt, n_in)
        if refused is not None:
            return refused

        async def draw(d: Draw) -> tuple[int, list[Sample]]:
            return n_in, [self._answer(req, prompt, response, d) for _ in range(d.n)]

        return await draw_checked(req.key, draw, response, self.policy)

    def _answer(self, req: EngineRequest, prompt: str, response: Response, d: Draw) -> Sample:
        words = prompt.split()
        pick = int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16)
        temperature = self.temperature if d.temperature is None else d.temperature
        if temperature > 0:  # sampling: a different valid answer on every draw
            pick = _rng.getrandbits(31)
            if words:
                words[-1] = f"~{_rng.getrandbits(40):010x}"
        if response.kind == "regex" and self.regex_answer is not None:
            text = str(self.regex_answer)
        else:
            text = response.example(words, pick)
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
        reason = "stop"
        if self._violates(req, prompt):  # cut off mid-answer, as a too small max_tokens does
            pieces = pieces[: len(pieces) // 2]
            reason = "length"
        if len(pieces) > self.max_tokens:
            pieces = pieces[: self.max_tokens]
            reason = "length"
        salt = f"{prompt}:{pick}"  # a row's confidence is its own
        n_out = self.max_tokens if reason == "length" else max(1, len(pieces))
        return self._sample(salt, pieces, reason, n_out)

    def _violates(self, req: EngineRequest, prompt: str) -> bool:
        if self.violation_rate and _rng.random() < self.violation_rate:
            return True
        if self.violate_marker and self.violate_marker in prompt:
            done = self._violated.get((req.key, prompt), 0)
            if self.violate_draws is None or done < self.violate_draws:
                self._violated[(req.key, prompt)] = done + 1
                return True
        return False

    def _refuse(self, req: EngineRequest, prompt: str, n_in: int) -> EngineResult | None:
        """The row's failure before generating, if it has one (the fault options)."""
        if n_in > self.max_model_len:
            return EngineResult(
                key=req.key,
                input_tokens=n_in,
                error_kind="PromptTooLong",
                error=f"prompt has {n_in} tokens, more than max_model_len {self.max_model_len}",
            )
        if self.fail_marker and self.fail_marker in prompt:
            return EngineResult(
                key=req.key, error_kind="EngineError", error="fake engine rejected the row"
            )
        if self.raise_marker and self.raise_marker in prompt:
            raise FakeRowException(f"fake engine told to raise on {self.raise_marker!r}")
        if self.row_error_rate and _rng.random() < self.row_error_rate:
            return EngineResult(
                key=req.key, error_kind="EngineError", error="fake engine failed the row at random"
            )
        return None

    def _maybe_die(self) -> None:
        flag = os.path.join(str(self.die_flag_dir or "."), "fake-engine-died")
        try:
            fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(3)

    def healthy(self) -> bool:
        return not self._watchdog.hung

    def processes(self) -> list[tuple[int, float]]:
        return []

    def close(self) -> None:
        return None


def _input_tokens(req: EngineRequest, prompt: str) -> int:
    return len(prompt.split()) + (4 if req.messages else 0)  # + a "chat template"


def _logprob(salt: str, piece: str, index: int) -> float:
    """A deterministic logprob in [-1.5, 0] for a pseudo-token."""
    digest = hashlib.sha256(f"{salt}:{index}:{piece}".encode()).digest()
    return -1.5 * digest[0] / 255


def _candidates(token: tuple[int, str, float], k: int) -> list[tuple[int, str, float]]:
    """k fake candidates for one position, best first: the sampled token, then worse ones."""
    tid, text, lp = token
    alternatives = [(100_000 + j, f"{text}~{j}", lp - 0.5 * j) for j in range(1, k)]
    return [(tid, text, lp), *alternatives]


def _prompt_text(req: EngineRequest) -> str:
    if req.messages:
        return " ".join(m["content"] for m in req.messages)
    return req.text or ""


def _vector(text: str, dims: int) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]
