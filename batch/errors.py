"""Errors of batchinfer: one base class, transient vs terminal, picklable across Ray workers.

A bad *row* is never an exception here: it becomes an error row in ``_failed/``.
These classes are for things that stop a chunk or the whole job.
"""

from __future__ import annotations


class BatchInferError(Exception):
    """Base class. Carries the job and chunk ids so a message seen in a worker log is traceable."""

    def __init__(self, message: str, *, job: str | None = None, chunk: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.job = job
        self.chunk = chunk

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only arguments do not survive the default pickling; Ray pickles errors.
        return (_rebuild, (type(self), self.message, self.job, self.chunk))

    def __str__(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in (("job", self.job), ("chunk", self.chunk)) if v)
        return f"{self.message} ({where})" if where else self.message


def _rebuild(
    cls: type[BatchInferError], message: str, job: str | None, chunk: str | None
) -> BatchInferError:
    return cls(message, job=job, chunk=chunk)


class TransientError(BatchInferError):
    """Worth retrying as is: a storage hiccup, an engine that died and can be replaced."""


class TerminalError(BatchInferError):
    """Retrying will not help; the user has to change something (the message says what)."""


class SpecError(TerminalError):
    """The job spec is invalid. The message names the YAML path and what to change."""


class LeaseHeld(TerminalError):
    """Another run holds the output's lease."""


class InputChanged(TerminalError):
    """An input file changed while the job ran (or since it was planned)."""


class LeaseLost(TerminalError):
    """Another run took the output's lease over while this run held it; this run stopped."""


class ConfigurationError(TerminalError):
    """The environment cannot run this job (missing package, no such model directory, ...)."""


class RowError(Exception):
    """Raised by a pipeline's ``prepare`` for one row; the runner turns it into an error row.

    ``kind`` is the error class written to ``_failed/`` (e.g. ``MissingColumn``).
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[object, ...]:
        return (RowError, (self.kind, self.message))


class UnsupportedStorage(SpecError, NotImplementedError):
    """The output cannot live on this filesystem: it has no create-only write, or Ray's worker
    processes cannot see it (``memory://``)."""


class StorageUnreachable(TransientError):
    """The storage endpoint did not answer, after retries."""


class UnreadableRecord(TerminalError):
    """A small JSON record of the output (lease, marker, manifest) is still not JSON after a
    few reads: damaged, not merely caught mid-write."""
