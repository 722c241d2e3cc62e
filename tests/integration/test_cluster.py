"""Jobs on a real Ray cluster through the Jobs API: a head started by the tests on 127.0.0.1
(``ray start --head``, token authentication on), jobs submitted with
``batchinfer submit --address http://...`` exactly as a user would.

One real-vLLM job (the demo model) end to end, submitted twice: the second submission
attaches to the first run instead of starting another. A slow fake-engine job for the
rest: attach while it runs, status from the cluster, Ctrl-C stopping it, and a new attempt
that resumes without redoing or duplicating a row.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq
import pytest

from batch import cluster
from batch.demo import write_reviews
from batch.spec import load_spec
from tests.conftest import write_job
from tests.integration.helpers import looks_like_english, read_json, read_parts
from tests.raycluster import RayHead


def batchinfer(head: RayHead, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batch.cli", *args],
        capture_output=True, text=True, timeout=timeout, env=head.client_env(),
    )  # fmt: skip


def events(stdout: str) -> list[dict[str, Any]]:
    out = []
    for line in stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def jobs_of(head: RayHead, run_id: str) -> list[dict[str, Any]]:
    return [
        j for j in head.jobs()
        if (j.get("metadata") or {}).get(cluster.RUN_ID_KEY) == run_id  # type: ignore[union-attr]
    ]  # fmt: skip


@pytest.fixture
def cluster_env(ray_cluster: RayHead, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayHead]:
    """This process as a client of the test cluster, for the library calls.

    Ray reads RAY_AUTH_MODE once per process and caches it; it is read here before the
    variable is set, so only batchinfer's own header carries the token and no later ray.init
    in this test process starts with token authentication.
    """
    from ray._private.authentication import authentication_utils

    authentication_utils.is_token_auth_enabled()
    for key, value in ray_cluster.env.items():
        monkeypatch.setenv(key, value)
    yield ray_cluster


def input_ids(folder: Path) -> list[str]:
    return [
        i
        for p in sorted(folder.glob("*.parquet"))
        for i in pq.read_table(p)["review_id"].to_pylist()
    ]


def ids_exactly_once(out: Path, expected: list[str]) -> tuple[int, int]:
    fs = fsspec.filesystem("file")
    data = read_parts(fs, f"{out}/data")
    failed = read_parts(fs, f"{out}/_failed")
    ids = data["review_id"].to_pylist() + (
        failed["review_id"].to_pylist() if failed.num_rows else []
    )
    counts = collections.Counter(ids)
    assert sorted(counts) == sorted(expected), "every input row in the output"
    assert max(counts.values()) == 1, "and exactly once"
    return data.num_rows, failed.num_rows


# --------------------------------------------------------------------------- real vLLM


def test_generate_job_on_the_cluster_and_resubmit_attaches(
    ray_cluster: RayHead, demo_models: dict[str, Path], tmp_path: Path
) -> None:
    inp, out = tmp_path / "reviews", tmp_path / "out"
    write_reviews(inp, rows=16, files=2)
    sets = [
        # plain text (this test is about the cluster, not typed answers), short answers
        f"input.path={inp}", f"output.path={out}", "response=null", "sampling.max_tokens=16",
        "resources.rows_per_chunk=4",
    ]  # fmt: skip
    args = ["submit", "jobs/enrich.yaml", "--address", ray_cluster.address]
    for item in sets:
        args += ["--set", item]
    rid = cluster.make_run_id(load_spec("jobs/enrich.yaml", sets))

    t0 = time.monotonic()
    first = batchinfer(ray_cluster, *args)
    took = time.monotonic() - t0
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    ev = events(first.stdout)
    assert ev[0]["event"] == "submitted" and ev[0]["submission_id"] == rid
    kinds = [e.get("event") for e in ev]
    assert "planned" in kinds and "progress" in kinds and "finished" in kinds, kinds
    expected = input_ids(inp)
    rows, failed = ids_exactly_once(out, expected)
    assert failed >= 1, "the demo data's null bodies fail, as rows"
    summary = f"enrich-reviews: {rows} rows, {failed} failed"
    assert first.stdout.strip().splitlines()[-1].startswith(summary), first.stdout[-500:]
    assert "Bearer" not in first.stdout + first.stderr, "the token never reaches a log"
    assert "Uploading package" not in first.stderr, "Ray's client chatter stays quiet"
    fs = fsspec.filesystem("file")
    data = read_parts(fs, f"{out}/data").to_pylist()
    english = [r for r in data if looks_like_english(r["generated_text"])]
    assert len(english) >= 0.8 * len(data), [r["generated_text"] for r in data[:3]]
    assert read_json(fs, f"{out}/_MANIFEST.json")["rows"] == rows

    # The same command again: the run is found and followed, not started a second time.
    t0 = time.monotonic()
    again = batchinfer(ray_cluster, *args)
    assert again.returncode == 0, again.stderr[-3000:]
    ev = events(again.stdout)
    assert ev[0]["event"] == "attached" and ev[0]["submission_id"] == rid
    assert again.stdout.strip().splitlines()[-1].startswith(summary)
    assert time.monotonic() - t0 < took, "attaching replays the log; nothing runs again"
    (job,) = jobs_of(ray_cluster, rid)
    assert job["status"] == "SUCCEEDED" and job["submission_id"] == rid
    assert ids_exactly_once(out, expected) == (rows, failed)


# --------------------------------------------------------------------------- fake engine


def slow_fake_job(tmp_path: Path, rows: int = 48) -> tuple[Path, Path, list[str]]:
    """12 chunks of about 5 s, two at a time (batch_size 4 keeps the runner from raising
    chunks_in_flight to fill a batch of 64): the job is still running while a test attaches,
    asks for its status and stops it."""
    inp, out = tmp_path / "reviews", tmp_path / "out"
    write_reviews(inp, rows=rows, files=2)
    job = write_job(
        tmp_path / "slow.yaml",
        f"""\
        name: slow-fake
        input: {{path: "{inp}", id_column: review_id}}
        output: {{path: "{out}"}}
        model: {{path: m, engine: fake,
                 fake_options: {{max_model_len: 400, delay_per_token: 0.15}}}}
        prompt: {{template: "{{{{ body }}}}"}}
        sampling: {{max_tokens: 8}}
        resources: {{rows_per_chunk: 4, chunks_in_flight: 1, batch_size: 4}}
        """,
    )
    return job, out, input_ids(inp)


def wait_for_markers(out: Path, n: int, proc: subprocess.Popen[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = len(list((out / "_markers").glob("*.json"))) if (out / "_markers").exists() else 0
        if done >= n:
            return done
        assert proc.poll() is None, "the client ended before the job made progress"
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} chunks committed in {timeout}s")


def test_attach_status_ctrl_c_and_resume_on_the_cluster(
    cluster_env: RayHead, tmp_path: Path
) -> None:
    head = cluster_env
    job, out, expected = slow_fake_job(tmp_path)
    rid = cluster.make_run_id(load_spec(job))
    follower = subprocess.Popen(
        [sys.executable, "-m", "batch.cli", "submit", str(job), "--address", head.address],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=head.client_env(),
    )  # fmt: skip
    try:
        wait_for_markers(out, 1, follower, timeout=240)

        # A second submission while it runs attaches (and --detach returns at once).
        second = batchinfer(head, "submit", str(job), "--address", head.address, "--detach")
        assert second.returncode == 0, second.stderr
        (ev,) = events(second.stdout)
        assert (ev["event"], ev["submission_id"]) == ("attached", rid)
        assert "batchinfer stop" in second.stderr, "says how to follow and stop it"
        # The library call the Airflow operator uses says the same.
        run = cluster.submit_remote(head.address, job)
        assert run == cluster.RemoteRun(head.address, rid, rid, attached=True)
        assert len(jobs_of(head, rid)) == 1, "never two Ray jobs for one run"

        # status: the output's progress and the cluster's state side by side.
        st = batchinfer(head, "status", str(job), "--address", head.address, "--json")
        assert st.returncode == 0, st.stderr
        doc = json.loads(st.stdout)
        assert doc["state"] == "running" and doc["chunks_done"] >= 1
        assert doc["cluster"]["state"] == "RUNNING" and doc["cluster"]["submission_id"] == rid
        assert cluster.remote_state(head.address, rid) == "RUNNING"

        # Ctrl-C without a terminal stops the remote job (as it would end a local one).
        follower.send_signal(signal.SIGINT)
        _, stderr = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 130, stderr[-2000:]
    assert f"interrupted: {rid} stopped" in stderr
    assert cluster.remote_state(head.address, rid) == "STOPPED"
    assert '"event": "planned"' in cluster.remote_logs(head.address, rid)
    committed = {p.name: p.stat().st_mtime_ns for p in (out / "_markers").glob("*.json")}
    assert 1 <= len(committed) < 12, "stopped part way"

    # Submitting again starts attempt 2, which resumes: only the rest runs, nothing twice.
    again = batchinfer(head, "submit", str(job), "--address", head.address)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    ev2 = events(again.stdout)
    assert (ev2[0]["event"], ev2[0]["submission_id"]) == ("submitted", f"{rid}-a2")
    planned = next(e for e in ev2 if e.get("event") == "planned")
    assert planned["committed_chunks"] == len(committed) and planned["chunks"] == 12
    finished = next(e for e in ev2 if e.get("event") == "finished")
    assert finished["chunks_run"] == 12 - len(committed)
    for name, mtime in committed.items():
        assert (out / "_markers" / name).stat().st_mtime_ns == mtime, "no chunk redone"
    assert ids_exactly_once(out, expected) == (44, 4)
    states = {j["submission_id"]: j["status"] for j in jobs_of(head, rid)}
    assert states == {rid: "STOPPED", f"{rid}-a2": "SUCCEEDED"}
    # And once it succeeded, submitting attaches to the successful attempt.
    run = cluster.submit_remote(head.address, job)
    assert (run.submission_id, run.attached) == (f"{rid}-a2", True)
    assert cluster.stop_remote(head.address, f"{rid}-a2") is False, "nothing left to stop"
    assert os.environ.get("RAY_AUTH_MODE") == "token"  # (the client env was in use)
