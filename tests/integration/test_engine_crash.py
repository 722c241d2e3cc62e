"""A real vLLM engine process killed mid-run: the actor is replaced and the job completes
with exactly-once output; no chunk is given up for it."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow.parquet as pq

from batch.demo import write_reviews
from tests.integration.helpers import read_parts, wait_for_no_leftovers


def engine_core_pids() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    rows = [ln.split(None, 2) for ln in out.splitlines()[1:]]
    return [int(r[0]) for r in rows if len(r) == 3 and "Z" not in r[1] and "EngineCore" in r[2]]


def test_killed_engine_process_is_replaced(demo_models: dict[str, Path], tmp_path: Path) -> None:
    inp, out = tmp_path / "reviews", tmp_path / "out"
    write_reviews(inp, rows=48, files=1)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "batch.cli", "submit", "jobs/enrich.yaml",
            "--set", f"input.path={inp}", "--set", f"output.path={out}",
            "--set", "resources.rows_per_chunk=4", "--set", "sampling.max_tokens=24",
            "--set", "response=null",  # plain text: this test is about the engine dying
            # A batch of one chunk, so chunks pass through the engine a few at a time and it
            # is still generating when the first one is committed (a batch holding all of
            # them finishes them together, and the engine is gone before the first commit).
            "--set", "resources.batch_size=4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait until the engine has committed its first chunk
            if line.startswith("{") and json.loads(line)["event"] == "progress":
                break
        victims = engine_core_pids()
        assert victims, "a vLLM engine core process should be running"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, err[-3000:]
    # the killed core's workers were ended too: no vLLM or Ray process outlives the job
    assert wait_for_no_leftovers() == []
    fs = fsspec.filesystem("file")
    data, failed = read_parts(fs, str(out / "data")), read_parts(fs, str(out / "_failed"))
    ids = collections.Counter(data["review_id"].to_pylist() + failed["review_id"].to_pylist())
    assert sorted(ids) == sorted(pq.read_table(inp)["review_id"].to_pylist())
    assert max(ids.values()) == 1
    assert "ChunkFailed" not in failed["_error_class"].to_pylist()
    assert sorted(failed["_error_class"].to_pylist()) == ["NullValue", "PromptTooLong"]
