"""The record of one finished run: what the runner returns, the reporters show and the CLI
prints. It lives here, below both, so ``progress`` need not import ``runner``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RunSummary:
    job: str
    output: str
    chunks: int
    chunks_run: int
    rows: int
    failed_rows: int
    input_tokens: int
    output_tokens: int
    wall_seconds: float
    gpu_seconds: float
    already_complete: bool = False
    cached_rows: int = 0  # answers from the result cache or shared with an equal prompt

    @property
    def tokens_per_second(self) -> float:
        return (
            (self.input_tokens + self.output_tokens) / self.wall_seconds
            if self.wall_seconds
            else 0.0
        )

    @property
    def output_tokens_per_second(self) -> float:
        return self.output_tokens / self.wall_seconds if self.wall_seconds else 0.0
