"""Randomized kill test: SIGKILL the whole job at random moments and at every named fault
point, resume until done, and check the output store's promise on a real S3 server.

The engine is the fake (speed is not the point here; the commit protocol is), with sampling
at temperature > 0 (two attempts at a chunk give different texts), rows that fail at random
(two attempts split a chunk's rows differently between data/ and _failed/) and typed answers
cut off at random (every attempt re-samples different rows, and a few end as
SchemaViolation): the interleavings the protocol was not designed around. Storage is
SeaweedFS, Ray is real.

After the final run:
- every input id is exactly once across data/ + _failed/ read as folders, and through the
  manifest's parts;
- no committed marker ever changed;
- no chunk was given up without its engine failing it (the fake never fails a chunk here);
- every data part has the typed columns with valid values, and the ledger's re-samples are
  the sum over the committed markers (a killed attempt's re-samples are not counted);
- the ledger lists every run and its accelerator-seconds are at least the engine lifetimes
  the test itself saw in the killed runs.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batch.demo import reviews_table
from tests.integration.helpers import read_json, read_parts
from tests.s3server import S3Server

ROWS, FILES, ROWS_PER_CHUNK = 1200, 3, 10
CHUNKS = ROWS // ROWS_PER_CHUNK
# Random kills per run: 6 in the suite (each costs a Ray start, ~15 s on 2 cores); set
# BATCHINFER_KILLS for a longer hunt, with BATCHINFER_KILL_SEED to replay one.
RANDOM_KILLS = int(os.environ.get("BATCHINFER_KILLS", "6"))
LABELS = ("positive", "negative", "mixed")
FAULT_POINTS = ("after-data-part", "after-failed-part", "before-marker", "after-marker")


def job_yaml(inp: str, out: str, storage: str) -> str:
    # batch_size 20 keeps three chunks in flight, so the job runs long enough to be killed
    # anywhere: before Ray is up, while engines load, mid-run, while committing, finalizing.
    # A typed answer is about 14 fake tokens (plus re-samples), so delay_per_token is lower
    # than for plain text to keep the same pace.
    return f"""
name: kill-test
input: {{path: "{inp}", id_column: review_id, storage_options: {storage}}}
output: {{path: "{out}", storage_options: {storage}}}
model:
  path: fake
  engine: fake
  fake_options: {{max_model_len: 400, delay_per_token: 0.004, row_error_rate: 0.2,
                  violation_rate: 0.2}}
prompt: {{template: "{{{{ product }}}}: {{{{ body }}}}"}}
response: {{fields: {{sentiment: [{", ".join(LABELS)}], summary: str}}}}
sampling: {{max_tokens: 32, temperature: 1.0}}
resources: {{rows_per_chunk: {ROWS_PER_CHUNK}, chunks_in_flight: 3, batch_size: 20}}
"""


class Output:
    def __init__(self, fs: Any, url: str) -> None:
        self.fs, self.url, self.path = fs, url, url.removeprefix("s3://")

    def markers(self) -> dict[str, bytes]:
        folder = f"{self.path}/_markers"
        self.fs.invalidate_cache()
        if not self.fs.exists(folder):
            return {}
        return {p.rsplit("/", 1)[-1]: self.fs.cat_file(p) for p in self.fs.find(folder)}

    def parts(self) -> set[str]:
        self.fs.invalidate_cache()
        return {
            p.removeprefix(f"{self.path}/")
            for p in self.fs.find(self.path)
            if p.endswith(".parquet") and "/part-" in p
        }


def engine_pids(session: int | None = None) -> set[int]:
    """Engine actors of a local run (Ray names the worker process after the actor class);
    with ``session``, only those of that job (its driver leads the session, and the local Ray
    it starts, workers included, stays in it), not another test's running beside it."""
    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info.get("cmdline") or [])
        if "EngineStage" not in cmd or "pytest" in cmd:
            continue
        try:
            if session is None or os.getsid(p.pid) == session:
                pids.add(p.pid)
        except ProcessLookupError:
            continue
    return pids


def start(job: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "batch.cli", "submit", str(job), "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )


def run_and_kill(job: Path, ready: Callable[[], bool], env: dict[str, str] | None = None,
                 limit: float = 180) -> tuple[bool, float]:  # fmt: skip
    """Start the job, SIGKILL its whole process group once ``ready()``; returns whether it was
    killed (False: it finished first) and the engine-seconds the test saw before the kill."""
    proc = start(job, env)
    deadline = time.time() + limit
    first_seen: dict[int, float] = {}
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            assert proc.returncode == 0, err[-2000:]
            return False, 0.0
        assert time.time() < deadline, "kill point not reached"
        now = time.time()
        for pid in engine_pids(proc.pid):
            first_seen.setdefault(pid, now)
        time.sleep(0.1)
    killed_at = time.time()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    # The run's Ray processes die with it; wait so the next run starts on a quiet machine.
    for _ in range(100):
        if not engine_pids(proc.pid):
            break
        time.sleep(0.2)
    return True, sum(killed_at - t for t in first_seen.values())


@pytest.fixture
def output(s3: S3Server, tmp_path: Path) -> tuple[Output, Path]:
    bucket = s3.make_bucket(f"kill-{int(time.time() * 1000) % 10**8}").removeprefix("s3://")
    fs = s3.new_fs()
    inp, out = f"{bucket}/in", f"s3://{bucket}/out"
    for f in range(FILES):
        table = reviews_table(ROWS // FILES, start=f * (ROWS // FILES))
        with fs.open(f"{inp}/reviews-{f}.parquet", "wb") as fh:
            pq.write_table(table, fh, row_group_size=25)
    o = s3.storage_options
    storage = (
        f"{{key: {o['key']}, secret: {o['secret']}, client_kwargs: "
        f"{{endpoint_url: '{o['client_kwargs']['endpoint_url']}', region_name: us-east-1}}}}"
    )
    job = tmp_path / "job.yaml"
    job.write_text(job_yaml(f"s3://{inp}", out, storage))
    return Output(fs, out), job


def status(job: Path) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "batch.cli", "status", str(job), "--json"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_random_kills_and_every_fault_point_give_exactly_once_output(
    output: tuple[Output, Path], tmp_path: Path
) -> None:
    out, job = output
    rng = random.Random(int(os.environ.get("BATCHINFER_KILL_SEED", time.time())))
    seen: dict[str, bytes] = {}
    log: list[str] = []
    killed_engine_seconds = 0.0
    killed_runs = runs_with_engines = 0

    def check_markers_unchanged() -> dict[str, bytes]:
        now = out.markers()
        changed = [k for k, v in seen.items() if now.get(k) != v]
        assert not changed, f"committed markers changed: {changed[:3]}"
        seen.update(now)
        return now

    # Every named fault point once: the job hangs there, the test kills it there.
    for point in FAULT_POINTS:
        flags = tmp_path / f"flags-{point}"
        flags.mkdir()
        env = {"BATCHINFER_FAULT": point, "BATCHINFER_FAULT_DIR": str(flags)}
        killed, engine_s = run_and_kill(job, lambda f=flags: any(f.iterdir()), env)
        assert killed, f"fault point {point} was never reached"
        killed_runs += 1
        runs_with_engines += engine_s > 0
        killed_engine_seconds += engine_s
        check_markers_unchanged()
        log.append(f"{point}: {len(seen)} chunks committed")
        if point == "after-data-part":
            # status after a kill says exactly what is committed, orphaned and pending
            doc = status(job)
            committed = {k.removesuffix(".json") for k in seen}
            assert doc["chunks_done"] == len(committed)
            assert doc["chunks_pending"] == CHUNKS - len(committed)
            named = {p for p in out.parts()
                     if any(p.startswith(f"{k}/part-{c}.") for c in committed
                            for k in ("data", "_failed"))}  # fmt: skip
            assert set(doc["parts_orphaned"]) == out.parts() - named
            assert doc["parts_orphaned"], "the part written before the kill is orphaned"

    # Then random moments. Half are a random time after the start (before Ray is up, while
    # planning, while engines start); half come once 1-3 more chunks have committed, plus a
    # random delay (mid-run: other chunks in the engine, in a commit, between part and marker).
    trial = kills = 0
    while kills < RANDOM_KILLS and trial < 2 * RANDOM_KILLS and len(seen) < CHUNKS:
        trial += 1
        t0 = time.time()
        if trial % 2 == 0:
            wait = rng.uniform(0.5, 12.0)
            ready: Callable[[], bool] = lambda t0=t0, w=wait: time.time() - t0 > w  # noqa: E731
            moment = f"{wait:.1f}s after start"
        else:
            target, extra = len(seen) + rng.randint(1, 2), rng.uniform(0.0, 2.0)
            reached: list[float] = []

            def ready(target: int = target, extra: float = extra, reached: list[float] = reached
                      ) -> bool:  # fmt: skip
                if not reached and len(out.markers()) >= target:
                    reached.append(time.time())
                return bool(reached) and time.time() - reached[0] >= extra

            moment = f"{extra:.1f}s after chunk {target} committed"
        killed, engine_s = run_and_kill(job, ready)
        killed_runs += killed
        kills += killed
        runs_with_engines += engine_s > 0
        killed_engine_seconds += engine_s
        check_markers_unchanged()
        log.append(f"random {trial}, {moment}: {len(seen)} chunks committed"
                   + ("" if killed else " (finished first)"))  # fmt: skip

    print("\n".join(log))
    assert kills >= RANDOM_KILLS, f"only {kills} random kills landed before the job finished"
    final = start(job)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-2000:]
    markers = check_markers_unchanged()
    assert len(markers) == CHUNKS

    data = read_parts(out.fs, f"{out.path}/data")
    failed = read_parts(out.fs, f"{out.path}/_failed")
    ids = Counter(data["review_id"].to_pylist() + failed["review_id"].to_pylist())
    expected = [f"r{i:06d}" for i in range(ROWS)]
    assert sorted(ids) == expected and max(ids.values()) == 1, "each id once, read as folders"
    manifest = read_json(out.fs, f"{out.path}/_MANIFEST.json")
    assert out.parts() == set(manifest["data_parts"]) | set(manifest["failed_parts"])
    assert manifest["rows"] + manifest["failed_rows"] == ROWS
    assert failed.num_rows and "ChunkFailed" not in failed["_error_class"].to_pylist(), (
        "a chunk was given up although its engine never failed it"
    )

    # typed columns: one schema in every part, and only valid values in it
    typed = [
        pa.field("sentiment", pa.string()),
        pa.field("summary", pa.string()),
        pa.field("sentiment_confidence", pa.float64()),
        pa.field("resamples", pa.int16()),
    ]
    for part in sorted(p for p in out.parts() if p.startswith("data/")):
        with out.fs.open(f"{out.path}/{part}", "rb") as fh:
            table = pq.read_table(fh)
        assert all(table.schema.field(f.name) == f for f in typed), (part, table.schema)
        assert set(table["sentiment"].to_pylist()) <= set(LABELS), part
        assert None not in table["summary"].to_pylist(), part
        conf = table["sentiment_confidence"].to_pylist()
        assert all(c is None or 0.0 <= c <= 1.0 for c in conf), part
    violations = failed.filter(pc.equal(failed["_error_class"], "SchemaViolation"))
    assert None not in violations["_output_text"].to_pylist()

    ledger = read_json(out.fs, f"{out.path}/ledger.json")
    committed = [json.loads(m) for m in markers.values()]
    assert ledger["resamples"] == sum(m.get("resamples", 0) for m in committed) > 0
    assert runs_with_engines > 0, "the test saw no engine of its own job (session filter)"
    # every run that got as far as starting engines has its record (earlier kills may not)
    assert len(ledger["runs"]) >= runs_with_engines + 1
    assert ledger["gpu_seconds"] >= killed_engine_seconds, (
        f"the ledger's {ledger['gpu_seconds']} s misses killed runs' engine time "
        f"(at least {killed_engine_seconds:.1f} s)"
    )
    assert ledger["paid_not_committed"]["runs_unfinished"] >= runs_with_engines
    assert status(job)["state"] == "complete"
