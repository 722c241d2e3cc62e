"""The engine boundary: batchinfer's own request/result records and a small async protocol.

Nothing here imports vllm or torch. ``build_engine`` imports the chosen engine module only
when an engine is actually built (inside an engine actor).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

if TYPE_CHECKING:
    from batch.spec import JobSpec


@dataclass(frozen=True, slots=True)
class EngineRequest:
    """One row's model input. ``key`` is the row's position in its chunk."""

    key: int
    messages: tuple[dict[str, str], ...] | None = None  # chat messages (generate)
    text: str | None = None  # text to embed (embed)


@dataclass(slots=True)
class EngineResult:
    """What the engine made of one request. ``error_kind`` set means the row failed."""

    key: int
    text: str | None = None
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    embedding: list[float] | None = None
    error_kind: str | None = None
    error: str | None = None
    timings: dict[str, float] = field(default_factory=dict)  # finished_at: unix time


class Engine(Protocol):
    """An inference engine held by one engine actor for the whole job.

    ``run`` is called concurrently for several chunks; the engine must batch across them.
    Per-row failures come back as results with ``error_kind``; an exception from ``run``
    means the engine itself is broken and fails the chunk.
    """

    task: Literal["generate", "embed"]

    async def run(self, requests: Sequence[EngineRequest]) -> list[EngineResult]: ...

    def healthy(self) -> bool:
        """False once the engine cannot serve again (its process died); the actor restarts."""
        ...

    def processes(self) -> list[tuple[int, float]]:
        """(pid, start time) of processes the engine started (the driver reaps them)."""
        ...

    def close(self) -> None: ...


def build_engine(spec: JobSpec, model_path: str) -> Engine:
    """Build the engine the spec names. Heavy imports happen here, not at module import."""
    if spec.model.engine == "fake":
        from batch.engine.fake import FakeEngine

        return FakeEngine(spec)
    from batch.engine.vllm import VLLMEngine

    return VLLMEngine(spec, model_path)
