"""Keep a local run's other processes off the CPU cores the engine computes on.

vLLM's CPU backend binds each worker's threads to all cores but the last few, which it
leaves "for other processes"; nothing keeps the other processes there. On a small machine
the Ray runtime, the driver, the read and commit tasks and vLLM's own scheduler process then
land on the worker's core whenever the others are busy, and take its time: on 2 cores that
cost 9% of decode throughput. When batchinfer started the Ray session itself (so every process
of it is the run's), the engine actor moves them all to the cores the engine left free once it
sees the engine's workers bound.

Only the bound processes are recognised here (their CPU affinity is narrower than the run's),
so nothing depends on which engine made them; with no bound process nothing is moved.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Session:
    """The processes of a Ray session the driver started on its own machine, and its CPUs."""

    driver: int  # the driver's pid
    ray: tuple[int, ...]  # the processes ray.init started (gcs, raylet, dashboard, ...)
    cpus: tuple[int, ...]  # the CPUs the run may use: the driver's affinity when it started Ray


def own_cpus() -> set[int]:
    return set(os.sched_getaffinity(0))


def children() -> set[int]:
    import psutil

    return {p.pid for p in psutil.Process().children()}


@contextlib.contextmanager
def local_session() -> Iterator[Any]:
    """Around ``ray.init`` of a local session: yields a callable that returns the Session.

    On leaving, the driver's threads get their CPUs back: an engine actor may have moved
    them, and a caller that runs jobs in its own process (tests, Airflow) must not stay moved.
    """
    cpus = tuple(sorted(own_cpus()))
    before = children()

    def session() -> Session:
        return Session(os.getpid(), tuple(sorted(children() - before)), cpus)

    try:
        yield session
    finally:
        _set_threads(os.getpid(), set(cpus))


def _set_threads(pid: int, cpus: set[int]) -> int:
    """Set the affinity of every thread of ``pid``; returns how many were set."""
    import psutil

    done = 0
    with contextlib.suppress(psutil.Error):
        for thread in psutil.Process(pid).threads():
            with contextlib.suppress(OSError):  # a thread that just ended
                os.sched_setaffinity(thread.id, cpus)
                done += 1
    return done


def _tree(pids: Iterable[int]) -> list[Any]:
    import psutil

    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            out.append(p)
            out.extend(p.children(recursive=True))
    return out


def bound(under: int, cpus: set[int]) -> dict[int, set[int]]:
    """Descendants of ``under`` bound to fewer CPUs than ``cpus``: {pid: their CPUs}."""
    import psutil

    found = {}
    for p in _tree([under])[1:]:
        with contextlib.suppress(psutil.Error, OSError):
            mine = set(os.sched_getaffinity(p.pid))
            if mine < cpus:
                found[p.pid] = mine
    return found


def isolate(session: Session, engine: dict[int, set[int]]) -> dict[str, Any]:
    """Move every thread of the session but the engine's bound processes to the other CPUs."""
    import psutil

    engine_cpus = set().union(*engine.values()) if engine else set()
    others = set(session.cpus) - engine_cpus
    if not engine_cpus or not others:
        return {}
    run = set(session.cpus)
    moved = 0
    for p in _tree([session.driver, *session.ray]):
        if p.pid in engine:
            continue
        with contextlib.suppress(psutil.Error, OSError):
            mine = set(os.sched_getaffinity(p.pid))
            if mine < run and mine != others:
                continue  # bound by itself: another replica's engine worker, left alone
            moved += _set_threads(p.pid, others)
    return {"engine": sorted(engine_cpus), "others": sorted(others), "threads_moved": moved}


class EngineCores:
    """In an engine actor, around building the engine: widen, watch, isolate.

    The actor first takes all of the run's CPUs again (a restarted actor is born moved), so the
    engine binds its workers as it would on a machine of its own. While the engine starts, a
    thread watches for them and isolates as soon as they are bound (vLLM's warm-up already
    runs on them); leaving does it once more, for processes started in between.
    """

    def __init__(self, session: Session | None, poll: float = 0.25) -> None:
        self.session = session
        self.poll = poll
        self.result: dict[str, Any] = {}
        self._engine: dict[int, set[int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> EngineCores:
        if self.session is None:
            return self
        _set_threads(os.getpid(), set(self.session.cpus))
        self._thread = threading.Thread(target=self._watch, name="engine-cores", daemon=True)
        self._thread.start()
        return self

    def _once(self) -> bool:
        assert self.session is not None
        # Processes we moved are narrower than the run's CPUs too; they are not the engine's.
        moved = set(self.result.get("others", ()))
        found = bound(os.getpid(), set(self.session.cpus))
        self._engine.update({pid: c for pid, c in found.items() if c != moved})
        live = {pid: c for pid, c in self._engine.items() if pid in found}
        if live:
            self.result = isolate(self.session, live) or self.result
        return bool(live)

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            try:
                if self._once():
                    return
            except Exception:  # never let the watcher take the engine down
                log.debug("engine core watch failed", exc_info=True)
                return

    def __exit__(self, *exc: object) -> None:
        if self.session is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc[0] is None:
            with contextlib.suppress(Exception):
                self._once()
            if self.result:
                log.info(
                    "engine computes on CPUs %s; the run's other processes moved to %s",
                    self.result["engine"], self.result["others"],
                )  # fmt: skip
