"""A simulated accelerator engine (``model.engine: sim``): vLLM's timing without a GPU.

For fleet tests and capacity planning, never the default. It answers every request the way
a real engine's scheduler would time it, from a small model of one accelerator calibrated on
published figures (``PROFILES``; sources and what is estimated in docs/simulated-engine.md):

- **continuous batching** with a batch limit (``max_num_seqs``): requests wait until a slot
  frees, and join the running batch at the next step;
- **prefill** of the newly admitted requests' prompts at ``prefill_tokens_per_s`` (a pause of
  the whole batch, as vLLM without chunked prefill does);
- **decode** steps of ``decode_base_ms + decode_per_seq_ms * batch``: memory-bound decode
  reads the weights once per step (the base) and each sequence's KV cache (the slope), so
  each sequence's rate falls as the batch grows while the batch's total rises;
- a **startup** delay (model load and warm-up) in the engine's constructor, as vLLM's;
- **realistic token counts**: input tokens from the prompt's length
  (``chars_per_token``), answers of a length drawn from a geometric distribution of mean
  ``output_tokens_mean`` seeded by the prompt (so a rerun gives the same rows), cut at
  ``max_tokens`` (``ignore_eos``: always ``max_tokens``).

Times are simulated seconds; ``time_scale`` runs them that many times faster than real time
(each actor's wall time, which the ledger bills as accelerator time exactly as for a real
engine, shrinks by the same factor). ``sim_seconds`` and ``stats`` keep the simulated clock,
which does not depend on how promptly the event loop wakes.

Typed answers (``response:``) are not simulated.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from batch.engine import EngineRequest, EngineResult, Sample, Watchdog, run_watched
from batch.errors import SpecError

if TYPE_CHECKING:
    from batch.spec import JobSpec


@dataclass(frozen=True)
class Profile:
    """One accelerator serving one model: the figures the simulation runs on."""

    name: str
    accelerator: str
    model: str
    decode_base_ms: float
    decode_per_seq_ms: float
    prefill_tokens_per_s: float
    max_num_seqs: int
    startup_s: float
    output_tokens_mean: float
    max_model_len: int = 8192


# Calibration points: (profile, batch, inter-token latency in ms) as published, or derived
# as docs/simulated-engine.md says. The profiles below are fitted to them (a line through the
# batch-1 and batch-200 points); tests/unit/test_engine_sim.py checks the simulation
# reproduces every point within its tolerance.
CALIBRATION: tuple[tuple[str, int, float, float], ...] = (
    # NVIDIA NIM 1.8.0, Llama-3.1-8B-Instruct, one H100 80GB (published ITL).
    ("h100-llama3-8b", 1, 4.63, 0.02),
    ("h100-llama3-8b", 50, 5.91, 0.15),  # the line overestimates mid-range batches
    ("h100-llama3-8b", 100, 7.57, 0.15),
    ("h100-llama3-8b", 200, 12.65, 0.02),
    # H200: the H100 line scaled by the memory-bandwidth ratio 3.35/4.8 TB/s (an estimate).
    ("h200-llama3-8b", 1, 3.23, 0.02),
    ("h200-llama3-8b", 200, 8.83, 0.02),
)

_H100_PER_SEQ = (12.65 - 4.63) / 199
_H100_BASE = 4.63 - _H100_PER_SEQ
_BANDWIDTH_RATIO = 3.35 / 4.8  # H100 SXM HBM3 / H200 HBM3e, TB/s (NVIDIA datasheets)

PROFILES: dict[str, Profile] = {
    "h100-llama3-8b": Profile(
        name="h100-llama3-8b",
        accelerator="H100 SXM 80GB",
        model="Llama 3.1 8B Instruct",
        decode_base_ms=_H100_BASE,
        decode_per_seq_ms=_H100_PER_SEQ,
        prefill_tokens_per_s=20_000.0,  # estimate (compute-bound; docs)
        max_num_seqs=256,
        startup_s=60.0,  # estimate: weights load + CUDA graph capture
        output_tokens_mean=200.0,  # estimate: a short enrichment answer
    ),
    "h200-llama3-8b": Profile(
        name="h200-llama3-8b",
        accelerator="H200 SXM 141GB",
        model="Llama 3.1 8B Instruct",
        decode_base_ms=_H100_BASE * _BANDWIDTH_RATIO,
        decode_per_seq_ms=_H100_PER_SEQ * _BANDWIDTH_RATIO,
        prefill_tokens_per_s=20_000.0,  # same compute as the H100 (estimate)
        max_num_seqs=256,
        startup_s=60.0,
        output_tokens_mean=200.0,
    ),
}


def profile_of(spec: JobSpec) -> Profile:
    """The spec's profile with its ``sim_options`` overrides applied."""
    from batch.spec import SimOptions

    opts = spec.model.sim_options or SimOptions()
    base = PROFILES[opts.profile]
    over = {
        k: v
        for k, v in opts.model_dump().items()
        if v is not None and k in Profile.__dataclass_fields__
    }
    return Profile(**{**base.__dict__, **over})


def step_seconds(p: Profile, batch: int) -> float:
    """Simulated seconds of one decode step with ``batch`` sequences running."""
    return (p.decode_base_ms + p.decode_per_seq_ms * batch) / 1000.0


def output_tokens(prompt: str, max_tokens: int, mean: float, salt: int = 0) -> int:
    """A deterministic answer length for a prompt: geometric with ``mean``, at most
    ``max_tokens`` (at least 1)."""
    digest = hashlib.sha256(f"{salt}:{prompt}".encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64  # in (0, 1)
    p = 1.0 / max(mean, 1.0)
    n = 1 + int(math.log(u) / math.log(1.0 - p)) if p < 1 else 1
    return max(1, min(max_tokens, n))


@dataclass(eq=False)
class _Seq:
    n_in: int
    left: int  # decode steps still to run
    future: asyncio.Future[float]  # set to the simulated finish time
    cancelled: bool = False


@dataclass
class SimStats:
    """The simulated clock's account (for tests and benchmarks)."""

    sim_seconds: float = 0.0  # simulated time the accelerator was busy (prefill + decode)
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    output_tokens: int = 0
    input_tokens: int = 0
    max_batch: int = 0
    batch_steps: dict[int, int] = field(default_factory=dict)  # batch size -> decode steps


class SimEngine:
    def __init__(self, spec: JobSpec) -> None:
        if spec.response is not None:
            raise SpecError("model.engine sim does not simulate typed answers; remove response")
        opts = spec.model.sim_options
        self.profile = profile_of(spec)
        self.time_scale = opts.time_scale if opts is not None else 1.0
        self.chars_per_token = opts.chars_per_token if opts is not None else 4.0
        self.task = spec.model.task
        self.max_tokens = spec.sampling.max_tokens
        self.n = spec.sampling.n
        self.ignore_eos = spec.sampling.ignore_eos
        self.stats = SimStats()
        self._waiting: deque[_Seq] = deque()
        self._running: list[_Seq] = []
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._watchdog = Watchdog(spec.resources.chunk_timeout_s)
        time.sleep(self.profile.startup_s / self.time_scale)  # load the model, warm up

    # ----------------------------------------------------------------- the protocol

    async def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]:
        return await run_watched([self._one(r) for r in requests], self._watchdog)

    def healthy(self) -> bool:
        return not self._watchdog.hung

    def processes(self) -> list[tuple[int, float]]:
        return []

    def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()

    # ----------------------------------------------------------------- requests

    def input_tokens(self, req: EngineRequest) -> int:
        if req.messages:
            text = " ".join(m["content"] for m in req.messages)
            overhead = 8 + 4 * len(req.messages)  # the chat template's tokens
        else:
            text, overhead = req.text or "", 0
        return overhead + max(1, math.ceil(len(text) / self.chars_per_token))

    async def _one(self, req: EngineRequest) -> EngineResult:
        prompt = _prompt(req)
        n_in = self.input_tokens(req)
        if n_in > self.profile.max_model_len:
            return EngineResult(
                key=req.key,
                input_tokens=n_in,
                error_kind="PromptTooLong",
                error=f"prompt has {n_in} tokens, more than max_model_len "
                f"{self.profile.max_model_len}",
            )
        if self.task == "embed":
            await self._submit(n_in, 0)
            return EngineResult(
                key=req.key, input_tokens=n_in, embedding=_vector(prompt), source="engine"
            )
        o = dict(req.sampling)
        max_tokens = int(o.get("max_tokens", self.max_tokens))
        n = int(o.get("n", self.n))
        lengths = [
            max_tokens
            if self.ignore_eos
            else output_tokens(prompt, max_tokens, self.profile.output_tokens_mean, salt=i)
            for i in range(n)
        ]
        # n answers share the prompt's prefill (prefix caching): the first pays for it.
        await asyncio.gather(*(self._submit(n_in if i == 0 else 0, k)
                               for i, k in enumerate(lengths)))  # fmt: skip
        samples = [
            Sample(
                text=_answer(prompt, k),
                finish_reason="length" if k == max_tokens else "stop",
                output_tokens=k,
            )
            for k in lengths
        ]
        first = samples[0]
        return EngineResult(
            key=req.key,
            text=first.text,
            finish_reason=first.finish_reason,
            input_tokens=n_in,
            output_tokens=sum(lengths),
            samples=samples,
            timings={"finished_at": time.time()},
        )

    async def _submit(self, n_in: int, n_out: int) -> float:
        """Queue one sequence; returns its simulated finish time."""
        loop = asyncio.get_running_loop()
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = loop.create_task(self._schedule())
        assert self._wake is not None
        seq = _Seq(n_in=n_in, left=n_out, future=loop.create_future())
        self._waiting.append(seq)
        self._wake.set()
        with self._watchdog.request():
            try:
                return await asyncio.shield(seq.future)
            except asyncio.CancelledError:
                seq.cancelled = True  # aborted: its slot frees at the next step
                raise

    # ----------------------------------------------------------------- the scheduler

    async def _sleep(self, sim_s: float) -> None:
        await asyncio.sleep(sim_s / self.time_scale)

    async def _schedule(self) -> None:
        """vLLM's loop in simulated time: admit, prefill, decode until a sequence ends or a
        new one can join, repeat."""
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        p, st = self.profile, self.stats
        while True:
            self._running = [s for s in self._running if not s.cancelled]
            admitted: list[_Seq] = []
            while self._waiting and len(self._running) + len(admitted) < p.max_num_seqs:
                s = self._waiting.popleft()
                if not s.cancelled:
                    admitted.append(s)
            if admitted:
                tokens = sum(s.n_in for s in admitted)
                prefill = tokens / p.prefill_tokens_per_s
                await self._sleep(prefill)
                st.prefill_seconds += prefill
                st.sim_seconds += prefill
                st.input_tokens += tokens
                self._running.extend(admitted)
                self._finish([s for s in admitted if s.left <= 0])
            self._running = [s for s in self._running if not s.cancelled and s.left > 0]
            if not self._running:
                if not self._waiting:
                    self._wake.clear()
                    await self._wake.wait()
                continue
            batch = len(self._running)
            st.max_batch = max(st.max_batch, batch)
            step = step_seconds(p, batch)
            steps = min(s.left for s in self._running)
            self._wake.clear()
            if batch < p.max_num_seqs:  # a request that arrives can join at the next step
                t0 = loop.time()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), steps * step / self.time_scale)
                elapsed = (loop.time() - t0) * self.time_scale
                done = min(steps, max(1, math.ceil(elapsed / step - 1e-9)))
                if done * step > elapsed:
                    await self._sleep(done * step - elapsed)  # to the step's end
            else:
                await self._sleep(steps * step)
                done = steps
            st.decode_steps += done
            st.sim_seconds += done * step
            st.output_tokens += done * batch
            st.batch_steps[batch] = st.batch_steps.get(batch, 0) + done
            for s in self._running:
                s.left -= done
            self._finish([s for s in self._running if s.left <= 0])

    def _finish(self, seqs: list[_Seq]) -> None:
        for s in seqs:
            if not s.future.done():
                s.future.set_result(self.stats.sim_seconds)
        if seqs:
            self._watchdog.progress()


def _prompt(req: EngineRequest) -> str:
    if req.messages:
        return " ".join(m["content"] for m in req.messages)
    return req.text or ""


def _answer(prompt: str, tokens: int) -> str:
    """Text of about ``tokens`` tokens (~4 characters each), from the prompt's words."""
    words = prompt.split() or ["sim"]
    out: list[str] = []
    size = 0
    while size < 4 * tokens:
        w = words[len(out) % len(words)]
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[: 4 * tokens]


def _vector(text: str, dims: int = 8) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    raw = [(digest[i % len(digest)] - 127.5) for i in range(dims)]
    norm = math.sqrt(sum(x * x for x in raw)) or 1.0
    return [x / norm for x in raw]


def describe(profile: Profile) -> dict[str, Any]:
    """A profile's figures and what they imply (for docs and benchmarks)."""
    b = profile.max_num_seqs
    return {
        **profile.__dict__,
        "decode_tokens_per_s_batch1": round(1 / step_seconds(profile, 1), 1),
        "decode_tokens_per_s_full": round(b / step_seconds(profile, b), 1),
    }
