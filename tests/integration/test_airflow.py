"""The example DAG (jobs/nightly_enrich.py) on real Apache Airflow 3.3.2 against a real Ray
cluster, run twice for the same logical date: one Ray job, every review exactly once, the
manifest's URI and totals in XCom.

Airflow runs in its own virtual environment (scripts/airflow_venv.py: built once, about 3
minutes, then reused), with a metadata database (SQLite) in a temporary AIRFLOW_HOME. Each
DAG run is ``dag.test(logical_date=...)`` in a subprocess of that environment: the whole DAG
(operator, deferral, trigger run in line, XCom, the downstream task) without a scheduler.
The job itself runs on the Ray head the tests start, with the real vLLM engine on the
bundled SmolLM2 (one engine start for the whole file).
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import fsspec
import pytest
import yaml

from batch import cluster, orchestration
from batch.demo import write_reviews
from tests.integration.helpers import read_parts
from tests.raycluster import RayHead

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "jobs" / "nightly_enrich.py"
DAY = "2026-01-01"

# Runs one DAG run with dag.test() inside the Airflow environment and prints the outcome:
# the run's state, each task's state and the XCom return values.
DRIVER = """
import importlib.util, json, sys
from datetime import UTC, datetime

path, day = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("nightly_enrich", path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
dr = module.nightly.test(logical_date=datetime.fromisoformat(day).replace(tzinfo=UTC))

from airflow.models.taskinstance import TaskInstance
from airflow.models.xcom import XComModel
from airflow.utils.session import create_session

with create_session() as session:
    tis = session.query(TaskInstance).filter_by(dag_id=dr.dag_id, run_id=dr.run_id).all()
    xcoms = session.query(XComModel).filter_by(
        dag_id=dr.dag_id, run_id=dr.run_id, key="return_value"
    ).all()
    outcome = {
        "state": str(dr.state),
        "run_id": dr.run_id,
        "tasks": {ti.task_id: str(ti.state) for ti in tis},
        "xcom": {x.task_id: x.value for x in xcoms},
    }
print("OUTCOME " + json.dumps(outcome, default=str))
"""


@pytest.fixture(scope="module")
def airflow_python() -> Path:
    """The Airflow environment's interpreter (built on first use)."""
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "airflow_venv.py")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"airflow venv ready in {time.monotonic() - started:.0f}s\n{proc.stderr}")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def airflow_env(airflow_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """An AIRFLOW_HOME of its own with a migrated SQLite database; DAGs from jobs/."""
    home = tmp_path_factory.mktemp("airflow")
    env = {
        **os.environ,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "jobs"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONDONTWRITEBYTECODE": "1",  # nothing written into jobs/
        "NO_COLOR": "1",
    }
    for name in ("VIRTUAL_ENV", "PYTHONPATH", "RAY_ADDRESS"):
        env.pop(name, None)
    migrate = subprocess.run(
        [str(airflow_python.parent / "airflow"), "db", "migrate"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert migrate.returncode == 0, migrate.stdout[-2000:] + migrate.stderr[-2000:]
    return env


def test_operator_unit_tests_pass_with_airflow_installed(
    airflow_python: Path, airflow_env: dict[str, str]
) -> None:
    """tests/unit/test_airflow_operator.py skips its Airflow half in the main environment;
    here it runs all of it against the real Airflow SDK."""
    proc = subprocess.run(
        [str(airflow_python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "tests/unit/test_airflow_operator.py"],
        cwd=REPO, capture_output=True, text=True, env=airflow_env, timeout=600, check=False,
    )  # fmt: skip
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary, summary


def run_dag(airflow_python: Path, env: dict[str, str], day: str) -> tuple[dict[str, Any], str]:
    """One DAG run for ``day``; (outcome, the task logs)."""
    started = time.monotonic()
    proc = subprocess.run(
        [str(airflow_python), "-c", DRIVER, str(DAG_FILE), day],
        capture_output=True, text=True, env=env, timeout=900, check=False,
    )  # fmt: skip
    log = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("OUTCOME ")]
    assert proc.returncode == 0 and lines, log[-6000:]
    outcome: dict[str, Any] = json.loads(lines[-1].removeprefix("OUTCOME "))
    outcome["seconds"] = round(time.monotonic() - started, 1)
    print(f"--- dag.test for {day}: {outcome['state']} in {outcome['seconds']}s")
    for line in log.splitlines():  # the operator's, the trigger's and the report's lines
        if any(key in line for key in KEY_LINES):
            print("   ", line[:300])
    return outcome, log


KEY_LINES = ("Ray job", "already complete", "RayJobTrigger", "trigger in line", "result:",
             "enriched ", "log (last lines)", '"event": "finished"', "DagRun Finished")  # fmt: skip


def test_nightly_dag_twice_for_one_date_runs_the_job_once(
    airflow_python: Path,
    airflow_env: dict[str, str],
    ray_cluster: RayHead,
    demo_models: dict[str, Path],
    tmp_path: Path,
) -> None:
    # The day's input partition, laid out as the DAG expects: <base>/dt=<ds>/.
    inputs, outputs = tmp_path / "reviews", tmp_path / "enriched"
    write_reviews(inputs / f"dt={DAY}", rows=16, files=1)  # two of them cannot be processed
    # The demo job with short answers: one engine start, a few seconds of generation.
    doc = yaml.safe_load((REPO / "jobs" / "enrich.yaml").read_text())
    doc.pop("response")  # plain text: this test is about Airflow, not typed answers
    doc["sampling"]["max_tokens"] = 8
    job = tmp_path / "enrich.yaml"
    job.write_text(yaml.safe_dump(doc))
    env = {
        **airflow_env,
        **ray_cluster.env,  # RAY_AUTH_MODE=token and the token's path, as a user sets them
        "BATCHINFER_RAY_ADDRESS": ray_cluster.address,
        "BATCHINFER_INPUT_BASE": str(inputs),
        "BATCHINFER_OUTPUT_BASE": str(outputs),
        "BATCHINFER_JOB": str(job),
    }

    first, log1 = run_dag(airflow_python, env, DAY)
    out = outputs / f"dt={DAY}"
    manifest = (out / "_MANIFEST.json").read_bytes()
    parts = sorted(p.name for p in out.rglob("*.parquet"))
    second, log2 = run_dag(airflow_python, env, DAY)
    print(f"first DAG run {first['seconds']}s, second {second['seconds']}s")

    for outcome, log in ((first, log1), (second, log2)):
        assert outcome["state"] == "success", log[-6000:]
        assert outcome["tasks"] == {"enrich_reviews": "success", "report": "success"}, log[-6000:]

    # One run id for the date, one Ray job: the second DAG run attached to the finished one.
    spec = orchestration.load_job(
        job, {"input.path": f"{inputs}/dt={DAY}/", "output.path": f"{outputs}/dt={DAY}/"}
    )
    rid = orchestration.run_id_for(spec, DAY.replace("-", ""))
    jobs = [
        j for j in ray_cluster.jobs() if (j.get("metadata") or {}).get(cluster.RUN_ID_KEY) == rid
    ]
    assert [(j["submission_id"], j["status"]) for j in jobs] == [(rid, "SUCCEEDED")], jobs
    assert f"submitted Ray job {rid}" in log1 and "[DAG TEST] running trigger in line" in log1
    assert f"attached to Ray job {rid}" in log2 and "already complete" in log2
    assert "running trigger in line" not in log2, "nothing left to wait for"

    # Every input review exactly once (in data/ or _failed/), nothing rewritten.
    fs = fsspec.filesystem("file")
    data, failed = read_parts(fs, f"{out}/data"), read_parts(fs, f"{out}/_failed")
    ids = data["review_id"].to_pylist() + failed["review_id"].to_pylist()
    counts = collections.Counter(ids)
    assert sorted(counts) == [f"r{i:06d}" for i in range(16)] and max(counts.values()) == 1
    assert (out / "_MANIFEST.json").read_bytes() == manifest
    assert sorted(p.name for p in out.rglob("*.parquet")) == parts

    # XCom: the manifest's URI and the totals, the same from both DAG runs.
    payload = first["xcom"]["enrich_reviews"]
    assert second["xcom"]["enrich_reviews"] == payload
    assert payload["manifest"] == f"{out}/_MANIFEST.json"
    assert payload["rows"] == data.num_rows == 14 and payload["failed_rows"] == 2
    assert payload["input_tokens"] == sum(data["input_tokens"].to_pylist()) > 0
    assert 0 < payload["output_tokens"] <= 14 * 8
    assert payload["run_cost_usd"] > 0 and payload["comparisons_best_batch_usd"] > 0
    assert set(payload) == {
        "manifest", "rows", "failed_rows", "input_tokens", "output_tokens", "run_cost_usd",
        "comparisons_best_batch_usd", "comparisons_best_batch",
    }  # fmt: skip
    assert "enriched 14 reviews (2 failed)" in log2 and payload["manifest"] in log2
