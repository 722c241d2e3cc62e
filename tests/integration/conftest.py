"""Integration fixtures: the bundled demo models, prepared once, and a real S3 server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3server import S3Server, seaweedfs


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def demo_models() -> dict[str, Path]:
    """Both bundled models, converted/located once (cached across runs)."""
    from batch.models import prepare_all

    return prepare_all()


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("s3")) as server:
        yield server
