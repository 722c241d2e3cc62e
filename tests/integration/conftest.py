"""Integration fixtures: the bundled demo models, prepared once, a real S3 server and a real
Ray cluster (a head on 127.0.0.1 with the Jobs API)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("s3")) as server:
        yield server


@pytest.fixture(autouse=True)
def _s3_outlives_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """The shared SeaweedFS must outlive every test that used it. In one CI run it died
    unexplained and every later S3 test failed with a connection error; this fails the test
    during which it died, with weed's exit code and the tail of its log."""
    yield
    if "s3" not in request.fixturenames:
        return
    server: S3Server = request.getfixturevalue("s3")
    code = server.process.poll()
    if code is not None:
        pytest.fail(f"SeaweedFS exited with code {code} during this test:\n{server.log_tail(80)}")


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A Ray head (``ray start --head``) shared by the session; clients need ``.env``."""
    with ray_head(tmp_path_factory.mktemp("ray")) as head:
        yield head
