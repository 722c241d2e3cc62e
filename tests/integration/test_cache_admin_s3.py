"""`batchinfer cache stats` and `cache gc` on a real S3 server (SeaweedFS), the cache named by
a job file that carries its storage options (the unit tests cover the same on a local folder).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.s3server import S3Server
from tests.unit.test_cache_admin import A, B, C, build, found, job_yaml, run, stats_json

_buckets = itertools.count()


@pytest.fixture(autouse=True)
def _quiet_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # The commands point the root logger at the stderr of the moment (CliRunner's, here).
    monkeypatch.setattr("batch.cli._configure_logging", lambda verbose, json_lines: None)


def test_stats_and_gc_on_s3_with_options_from_a_job_file(s3: S3Server, tmp_path: Path) -> None:
    root = s3.make_bucket(f"cache-admin-{next(_buckets)}") + "/cache/"
    options = json.dumps(s3.storage_options)
    build(tmp_path, root, options=options, storage=s3.storage_options)
    job = str(job_yaml(tmp_path / "job.yaml", root, options=options))

    doc = stats_json(job)
    assert doc["entries"] == 12 and doc["bytes"] > 0
    assert {n["namespace"]: n["entries"] for n in doc["namespaces"]} == {A: 3, B: 6, C: 3}

    dry = run("cache", "gc", job, "--unused-for", "30d", "--model", "m-drop", "--dry-run")
    assert dry.exit_code == 0, dry.output
    assert dry.stdout.startswith("would remove 6 of 12 entries")
    res = run("cache", "gc", job, "--unused-for", "30d", "--model", "m-drop")
    assert res.exit_code == 0, res.output
    assert "removed 6 of 12 entries" in res.stdout and "1 namespace record" in res.stdout
    assert found(root, s3.storage_options) == {A: set(), B: {0, 1, 2, 3, 4, 5}, C: set()}
    assert {n["namespace"]: n["entries"] for n in stats_json(job)["namespaces"]} == {B: 6, C: 0}
