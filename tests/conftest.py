"""Shared fixtures: sample inputs and job files written into a temporary folder."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from batch.demo import write_reviews

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def reviews(tmp_path: Path) -> Path:
    """96 sample reviews in two Parquet files (one null body, one over-long body per file)."""
    folder = tmp_path / "reviews"
    write_reviews(folder, rows=96, files=2)
    return folder


def write_job(path: Path, body: str) -> Path:
    path.write_text(textwrap.dedent(body))
    return path
