"""Kill tests: SIGKILL the whole job at several points, resume until done, check exactly-once.

The engine is the deterministic fake (speed is not the point here; the commit protocol is),
the storage is local disk and a real S3 server (SeaweedFS), Ray is real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from batch.demo import reviews_table
from tests.integration.helpers import read_json, read_parts
from tests.s3server import S3Server

ROWS, FILES, ROWS_PER_CHUNK = 300, 3, 10
CHUNKS = ROWS // ROWS_PER_CHUNK


def job_yaml(inp: str, out: str, storage: str) -> str:
    # batch_size 20 keeps three chunks in flight (the runner raises chunks_in_flight to fill a
    # batch of 64 plus one), so the job runs long enough to be killed early and mid-run.
    return f"""
name: kill-test
input: {{path: "{inp}", id_column: review_id, storage_options: {storage}}}
output: {{path: "{out}", storage_options: {storage}}}
model: {{path: fake, engine: fake, fake_options: {{max_model_len: 400, delay_per_token: 0.01}}}}
prompt: {{template: "{{{{ product }}}}: {{{{ body }}}}"}}
sampling: {{max_tokens: 8}}
resources: {{rows_per_chunk: {ROWS_PER_CHUNK}, chunks_in_flight: 3, batch_size: 20}}
"""


class Target:
    """Where the job reads and writes (URLs for the job, paths for the test's filesystem)."""

    def __init__(self, fs: Any, inp_url: str, out_url: str, storage: str) -> None:
        self.fs, self.inp_url, self.out_url, self.storage = fs, inp_url, out_url, storage
        self.out = out_url.removeprefix("s3://")

    def markers(self) -> dict[str, bytes]:
        folder = f"{self.out}/_markers"
        self.fs.invalidate_cache()
        if not self.fs.exists(folder):
            return {}
        return {p.rsplit("/", 1)[-1]: self.fs.cat_file(p) for p in self.fs.find(folder)}


@pytest.fixture(params=["local", "s3"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "local":
        import fsspec

        fs = fsspec.filesystem("file")
        inp, out, storage = str(tmp_path / "in"), str(tmp_path / "out"), "{}"
        Path(inp).mkdir()
    else:
        s3: S3Server = request.getfixturevalue("s3")
        bucket = s3.make_bucket(f"kill-{int(time.time() * 1000) % 10**8}")
        fs = s3.new_fs()
        inp, out = f"{bucket}/in", f"{bucket}/out"
        o = s3.storage_options
        storage = (
            f"{{key: {o['key']}, secret: {o['secret']}, client_kwargs: "
            f"{{endpoint_url: '{o['client_kwargs']['endpoint_url']}', region_name: us-east-1}}}}"
        )
    for f in range(FILES):
        table = reviews_table(ROWS // FILES, start=f * (ROWS // FILES))
        with fs.open(f"{inp}/reviews-{f}.parquet", "wb") as fh:
            pq.write_table(table, fh, row_group_size=25)
    return Target(fs, inp, out, storage)


def start(job: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batch.cli", "submit", str(job), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], limit: float = 180) -> None:
    deadline = time.time() + limit
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the job ended before the kill point: {proc.communicate()}")
        assert time.time() < deadline, "kill point not reached"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def test_kill_and_resume_gives_exactly_once_output(target: Target, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(job_yaml(target.inp_url, target.out_url, target.storage))
    trials: list[str] = []
    snapshots: dict[str, bytes] = {}

    def run_killed(name: str, ready: Callable[[], bool], env: dict[str, str] | None = None) -> None:
        nonlocal snapshots
        before = target.markers()
        assert all(before[k] == v for k, v in snapshots.items()), "a committed marker changed"
        kill_when(start(job, env), ready)
        snapshots = target.markers()
        trials.append(f"{name}: {len(before)} -> {len(snapshots)} chunks committed")

    # 1. early: as soon as Ray is up and the plan is made (nothing committed yet)
    t0 = time.time()
    run_killed("early", lambda: time.time() - t0 > 4)
    # 2. mid-run: once a third of the chunks are committed
    n0 = len(snapshots)
    run_killed("mid-run", lambda: len(target.markers()) >= n0 + CHUNKS // 3)
    # 3. between a part write and its marker (the fault hook hangs the commit task there)
    flag_dir = tmp_path / "flags"
    flag_dir.mkdir()
    env = {"BATCHINFER_FAULT": "after-data-part", "BATCHINFER_FAULT_DIR": str(flag_dir)}
    run_killed("part-without-marker", lambda: any(flag_dir.iterdir()), env)
    parts = {p.rsplit("/", 1)[-1] for p in target.fs.find(f"{target.out}/data")}
    orphans = {p for p in parts if p.removeprefix("part-").removesuffix(".parquet") + ".json"
               not in snapshots}  # fmt: skip
    assert orphans, "the hook left a part whose marker was never written"
    # 4. resume to the end
    committed = len(snapshots)
    done = start(job)
    _, stderr = done.communicate(timeout=300)
    assert done.returncode == 0, stderr[-2000:]
    trials.append(f"final: {committed} -> {len(target.markers())} chunks committed")
    print("\n".join(trials))

    final = target.markers()
    assert len(final) == CHUNKS
    assert all(final[k] == v for k, v in snapshots.items()), "committed chunks were redone"
    data = read_parts(target.fs, f"{target.out}/data")
    failed = read_parts(target.fs, f"{target.out}/_failed")
    ids = Counter(data["review_id"].to_pylist() + failed["review_id"].to_pylist())
    expected = [f"r{i:06d}" for i in range(ROWS)]
    assert sorted(ids) == expected and max(ids.values()) == 1
    manifest = read_json(target.fs, f"{target.out}/_MANIFEST.json")
    on_disk = {p.split(f"{target.out}/", 1)[1] for p in target.fs.find(target.out)
               if p.endswith(".parquet")}  # fmt: skip
    assert on_disk == set(manifest["data_parts"]) | set(manifest["failed_parts"])
    orphan_marker = json.loads(final[next(iter(orphans)).removeprefix("part-")
                                     .removesuffix(".parquet") + ".json"])  # fmt: skip
    assert orphan_marker["adopted"], "the part written before the kill was adopted, not redone"
