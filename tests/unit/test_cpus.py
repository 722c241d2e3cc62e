"""Keeping a local run's processes off the engine's cores, on real processes and affinities.

A stand-in for vLLM's CPU worker binds itself to CPU 0, as vLLM's worker binds its threads;
everything else of the "session" must end up on the other CPUs, and nothing outside it moves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from batch import cpus

pytestmark = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="needs at least two CPUs to partition"
)

ALL = sorted(os.sched_getaffinity(0))
ENGINE = {ALL[0]}
OTHERS = set(ALL) - ENGINE

# A process that starts an unbound child and a child that binds itself (like vLLM's worker),
# then prints the children's pids and sleeps.
TREE = textwrap.dedent(
    f"""
    import os, subprocess, sys, time
    bound = subprocess.Popen([sys.executable, "-c",
        "import os, time; os.sched_setaffinity(0, {ENGINE!r}); time.sleep(60)"])
    free = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.3)
    print(bound.pid, free.pid, flush=True)
    time.sleep(60)
    """
)


def _affinity(pid: int) -> set[int]:
    return set(os.sched_getaffinity(pid))


@pytest.fixture
def tree() -> Iterator[tuple[subprocess.Popen[str], int, int]]:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    bound, free = (int(x) for x in proc.stdout.readline().split())
    try:
        yield proc, bound, free
    finally:
        import psutil

        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()


def test_bound_finds_only_processes_narrower_than_the_run(
    tree: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, bound, _ = tree
    assert cpus.bound(proc.pid, set(ALL)) == {bound: ENGINE}


def test_isolate_moves_the_session_but_not_the_engine_nor_strangers(
    tree: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, bound, free = tree
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        session = cpus.Session(driver=proc.pid, ray=(), cpus=tuple(ALL))
        result = cpus.isolate(session, {bound: ENGINE})
        assert result["engine"] == sorted(ENGINE) and result["others"] == sorted(OTHERS)
        assert result["threads_moved"] >= 2
        assert _affinity(proc.pid) == OTHERS and _affinity(free) == OTHERS
        assert _affinity(bound) == ENGINE, "the engine keeps its cores"
        assert _affinity(stranger.pid) == set(ALL), "a process outside the session is untouched"
    finally:
        stranger.kill()
        stranger.wait()


def test_another_replicas_bound_worker_is_left_where_it_is(
    tree: tuple[subprocess.Popen[str], int, int],
) -> None:
    proc, bound, free = tree  # here ``bound`` stands for a second replica's engine worker
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.sched_setaffinity(other.pid, ENGINE)  # the replica that is isolating
        session = cpus.Session(driver=proc.pid, ray=(), cpus=tuple(ALL))
        cpus.isolate(session, {other.pid: ENGINE})
        assert _affinity(bound) == ENGINE and _affinity(free) == OTHERS
    finally:
        other.kill()
        other.wait()


def test_nothing_moves_when_the_engine_is_not_bound() -> None:
    session = cpus.Session(driver=os.getpid(), ray=(), cpus=tuple(ALL))
    assert cpus.isolate(session, {}) == {}
    assert cpus.isolate(session, {123: set(ALL)}) == {}, "an engine on every CPU leaves none"
    assert _affinity(0) == set(ALL)


def test_local_session_names_what_started_inside_and_gives_the_driver_its_cpus_back() -> None:
    with cpus.local_session() as session:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            os.sched_setaffinity(0, OTHERS)  # as an engine actor would move the driver
            s = session()
            assert s.driver == os.getpid() and child.pid in s.ray and s.cpus == tuple(ALL)
        finally:
            child.kill()
            child.wait()
    assert _affinity(0) == set(ALL)


# The actor side, in a process of its own (it moves its own threads): it starts the engine
# (a child that binds itself after a while, as vLLM's worker does during engine start), and
# the watcher must isolate while the "engine" is still starting.
ACTOR = textwrap.dedent(
    f"""
    import json, os, subprocess, sys, time
    from batch import cpus
    os.sched_setaffinity(0, {OTHERS!r})  # a restarted actor is born moved
    session = cpus.Session(driver=os.getpid(), ray=(), cpus={tuple(ALL)!r})
    code = "import os, time; time.sleep(0.6); os.sched_setaffinity(0, {ENGINE!r}); time.sleep(30)"
    with cpus.EngineCores(session, poll=0.05) as cores:
        widened = sorted(os.sched_getaffinity(0))
        worker = subprocess.Popen([sys.executable, "-c", code])
        core = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        deadline = time.time() + 10
        while not cores.result and time.time() < deadline:
            time.sleep(0.05)
        during = dict(cores.result)
    print(json.dumps({{
        "widened": widened, "during": during, "after": cores.result,
        "self": sorted(os.sched_getaffinity(0)),
        "worker": sorted(os.sched_getaffinity(worker.pid)),
        "core": sorted(os.sched_getaffinity(core.pid)),
    }}))
    worker.kill(); core.kill()
    """
)


def test_engine_cores_widens_then_isolates_while_the_engine_starts() -> None:
    started = time.time()
    res = subprocess.run([sys.executable, "-c", ACTOR], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["widened"] == ALL, "vLLM must see every CPU of the run to bind its workers"
    assert doc["during"]["engine"] == sorted(ENGINE), "isolated before the engine was ready"
    assert doc["after"]["others"] == sorted(OTHERS)
    assert doc["self"] == sorted(OTHERS) and doc["core"] == sorted(OTHERS)
    assert doc["worker"] == sorted(ENGINE)
    assert time.time() - started < 30


def test_no_session_does_nothing() -> None:
    with cpus.EngineCores(None) as cores:
        pass
    assert cores.result == {} and _affinity(0) == set(ALL)
