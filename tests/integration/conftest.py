"""Integration fixtures: the bundled demo models, prepared once, a real S3 server and a real
Ray cluster (a head on 127.0.0.1 with the Jobs API)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import realparts
from tests.raycluster import RayHead, ray_head
from tests.s3server import S3Server, seaweedfs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """Both bundled models, converted/located once (cached across runs), for the tests that
    run them on real vLLM: without vLLM or a model package they skip, or fail under CI."""
    from batch.models import prepare_all

    realparts.vllm()
    realparts.demo_models()
    return prepare_all()


_SERVERS: list[S3Server] = []
# Where the shared SeaweedFS was found dead: (test during or before which, exit code).
WEED_DEATHS: list[tuple[str, int | None]] = []


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("s3")) as server:
        _SERVERS.append(server)
        try:
            yield server
        finally:
            _SERVERS.remove(server)


@pytest.fixture(autouse=True)
def _s3_outlives_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """The shared SeaweedFS must outlive every test. In two CI-like runs it shut down
    (gracefully, exit 0: someone sent it SIGTERM) between two tests, and every later S3 test
    failed with a connection error. It is checked before and after every test, whether the
    test uses it or not: found dead, it is started again on the same ports and data, so one
    death does not fail the rest of the suite; a test that used it while it died fails with
    weed's log, and the run's summary says during which test it died."""
    _revive(f"before {request.node.nodeid}")
    yield
    died = _revive(f"during {request.node.nodeid}")
    if died is not None and "s3" in request.fixturenames:
        pytest.fail(f"SeaweedFS exited with code {died[0]} during this test:\n{died[1]}")


def _revive(when: str) -> tuple[int, str] | None:
    for server in _SERVERS:
        code = server.process.poll()
        if code is not None:
            tail = server.log_tail(80)
            WEED_DEATHS.append((when, code))
            server.restart()
            return code, tail
    return None


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if WEED_DEATHS:
        terminalreporter.section("SeaweedFS deaths (restarted each time)")
        for when, code in WEED_DEATHS:
            terminalreporter.write_line(f"exit code {code}, found dead {when}")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A Ray head (``ray start --head``) shared by the session; clients need ``.env``."""
    with ray_head(tmp_path_factory.mktemp("ray")) as head:
        yield head
