"""The Airflow operator: run ids per logical date, overrides, the XCom payload, and the
operator's wiring (local subprocess, Ray Jobs API with a trigger, on_kill).

The first half runs anywhere (``batch.orchestration`` imports no Airflow). The second half
needs Airflow and is skipped without it: in the main environment it is skipped, and
tests/integration/test_airflow.py runs this file again inside the Airflow environment.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from batch import cluster, orchestration, store
from batch.spec import JobSpec
from tests.conftest import write_job

REPO = Path(__file__).resolve().parents[2]
DAG_FILE = REPO / "jobs" / "nightly_enrich.py"

JOB = """\
name: enrich-reviews
input: {path: /data/reviews/, id_column: review_id}
output: {path: /data/enriched/}
model: {path: builtin:smollm2-135m-instruct, engine: fake}
prompt: {template: "{{ body }}"}
"""

LEDGER = {
    "rows": 14,
    "failed_rows": 2,
    "input_tokens": 1200,
    "output_tokens": 96,
    "run_cost_usd": 0.00021,
    "wall_seconds": 61.2,
    "comparisons": [
        {"provider": "openai", "model": "gpt-5-nano", "list_usd": 0.0002, "batch_usd": 0.0001},
        {"provider": "groq", "model": "llama-3.1-8b-instant", "list_usd": 5e-5, "batch_usd": 5e-5},
        {"provider": "x", "model": "no-batch", "list_usd": 1e-6, "batch_usd": None},
    ],
}
PAYLOAD_KEYS = {
    "manifest", "rows", "failed_rows", "input_tokens", "output_tokens", "run_cost_usd",
    "comparisons_best_batch_usd", "comparisons_best_batch",
}  # fmt: skip


@pytest.fixture
def job(tmp_path: Path) -> Path:
    return write_job(tmp_path / "job.yaml", JOB)


def finished_output(out: Path, *, ledger: dict[str, Any] | None = None) -> None:
    """What a finished run leaves for the payload: a manifest and a ledger (the contract)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / store.MANIFEST).write_text(json.dumps({"rows": 14, "failed_rows": 2}))
    (out / store.LEDGER).write_text(json.dumps(ledger if ledger is not None else LEDGER))


# ============================================================== without Airflow


def test_overrides_mapping_becomes_set_items_like_the_cli() -> None:
    items = orchestration.overrides_list(
        {
            "input.path": "s3://b/reviews/dt=2026-01-01/",
            "resources.replicas": 2,
            "model.engine_args": {"max_model_len": 4096, "enforce_eager": True},
            "sampling.stop": ["\n\n"],
        }
    )
    assert items == [
        "input.path=s3://b/reviews/dt=2026-01-01/",
        "resources.replicas=2",
        'model.engine_args={"max_model_len": 4096, "enforce_eager": true}',
        'sampling.stop=["\\n\\n"]',
    ]
    assert orchestration.overrides_list(["a.b=1"]) == ["a.b=1"]
    assert orchestration.overrides_list(None) == []
    with pytest.raises(TypeError):
        orchestration.overrides_list("a.b=1")


def test_overrides_reach_the_spec(job: Path) -> None:
    spec = orchestration.load_job(
        job,
        {
            "input.path": "/in/dt=2026-01-01/",
            "resources.replicas": 3,
            "model.engine_args": {"max_model_len": 4096},
            "sampling.max_tokens": "8",  # a rendered template is a string: read as YAML
            "sampling.stop": ["\n\n"],
        },
    )
    assert spec.input.path == "/in/dt=2026-01-01/"
    assert spec.resources.replicas == 3
    assert spec.model.engine_args == {"max_model_len": 4096}
    assert spec.sampling.max_tokens == 8
    assert spec.sampling.stop == ["\n\n"]


def test_schedule_tag_names_the_schedule_slot() -> None:
    tag = orchestration.schedule_tag
    assert tag(datetime(2026, 1, 1, tzinfo=UTC)) == "20260101"
    assert tag(datetime(2026, 1, 1, 6, 30, tzinfo=UTC)) == "20260101t063000"
    # The same instant in another zone is the same slot.
    cet = timezone(timedelta(hours=1))
    assert tag(datetime(2026, 1, 1, 1, 0, tzinfo=cet)) == "20260101"
    # Airflow 3 manual runs may have no logical date: the DAG run's id stands in, stably.
    manual = tag(None, "manual__2026-01-01T10:00:00+00:00")
    assert manual == tag(None, "manual__2026-01-01T10:00:00+00:00")
    assert manual.startswith("r") and len(manual) == 9
    with pytest.raises(ValueError, match="run_tag"):
        tag(None, None)


def test_run_id_same_for_a_retry_new_for_another_day_or_spec(job: Path) -> None:
    day1 = {"input.path": "/in/dt=2026-01-01/", "output.path": "/out/dt=2026-01-01/"}
    day2 = {"input.path": "/in/dt=2026-01-02/", "output.path": "/out/dt=2026-01-02/"}
    spec1 = orchestration.load_job(job, day1)
    rid = orchestration.run_id_for(spec1, "20260101")
    assert rid == f"enrich-reviews-20260101-{cluster.run_digest(spec1)}"
    assert orchestration.run_id_for(orchestration.load_job(job, day1), "20260101") == rid
    assert orchestration.run_id_for(orchestration.load_job(job, day2), "20260102") != rid
    changed = orchestration.load_job(job, {**day1, "sampling.max_tokens": 9})
    assert orchestration.run_id_for(changed, "20260101") != rid
    assert len(orchestration.run_id_for(spec1, "20260101t063000")) <= cluster.MAX_RUN_ID


def test_payload_is_the_manifest_uri_and_ledger_totals(tmp_path: Path, job: Path) -> None:
    out = tmp_path / "enriched" / "dt=2026-01-01"
    finished_output(out)
    spec = orchestration.load_job(job, {"output.path": f"{out}/"})
    payload = orchestration.result_summary(spec)
    assert set(payload) == PAYLOAD_KEYS, "only the URI and totals go to XCom, never rows"
    assert payload == {
        "manifest": f"{out}/_MANIFEST.json",
        "rows": 14,
        "failed_rows": 2,
        "input_tokens": 1200,
        "output_tokens": 96,
        "run_cost_usd": 0.00021,
        "comparisons_best_batch_usd": 5e-5,
        "comparisons_best_batch": "groq/llama-3.1-8b-instant",
    }
    json.dumps(payload)  # XCom values are JSON


def test_payload_of_a_relative_output_names_an_absolute_uri(
    tmp_path: Path, job: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    finished_output(tmp_path / "out" / "x", ledger={})
    spec = orchestration.load_job(job, {"output.path": "out/x/"})
    payload = orchestration.result_summary(spec)
    assert payload["manifest"] == f"{tmp_path}/out/x/_MANIFEST.json"
    assert payload["rows"] == 14, "without a ledger the manifest's counts stand"
    assert payload["comparisons_best_batch_usd"] is None


def test_no_manifest_means_the_run_did_not_finish_this_output(tmp_path: Path, job: Path) -> None:
    spec = orchestration.load_job(job, {"output.path": f"{tmp_path}/none/"})
    with pytest.raises(orchestration.OutputIncomplete, match=r"_MANIFEST\.json does not exist"):
        orchestration.result_summary(spec)


def test_local_command_runs_batchinfer_submit_and_waits() -> None:
    cmd = orchestration.local_command(
        "/opt/bi/bin/batchinfer", "jobs/enrich.yaml", {"output.path": "/o/"}, address=None
    )
    assert cmd == [
        "/opt/bi/bin/batchinfer", "submit", "jobs/enrich.yaml", "--set", "output.path=/o/",
        "--wait",
    ]  # fmt: skip
    cmd = orchestration.local_command("bi", "j.yaml", None, address="ray://h:10001", wait=False)
    assert cmd == ["bi", "submit", "j.yaml", "--address", "ray://h:10001"]


class Stops:
    """cluster.stop_remote and cluster.remote_state, recorded and scripted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, states: list[Any]) -> None:
        self.states = states
        self.stopped: list[str] = []
        monkeypatch.setattr(cluster, "remote_state", self.remote_state)
        monkeypatch.setattr(cluster, "stop_remote", self.stop_remote)

    def remote_state(self, address: str, sid: str) -> str:
        answer = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    def stop_remote(self, address: str, sid: str) -> bool:
        self.stopped.append(sid)
        return True


def test_the_wait_stops_the_job_when_its_deadline_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduler's timeout alone would leave the Ray job running: the wait stops it."""
    import time

    fake = Stops(monkeypatch, ["RUNNING"])
    result = asyncio.run(
        orchestration.watch_remote(
            "http://h:8265", "run-1", poll_interval=0.01, deadline=time.time() + 0.05
        )
    )
    assert result["state"] == orchestration.TIMEOUT and "run-1 was stopped" in result["message"]
    assert fake.stopped == ["run-1"]
    fake.states[:] = ["RUNNING", "SUCCEEDED"]
    done = asyncio.run(orchestration.watch_remote("http://h:8265", "run-1", poll_interval=0))
    assert done == {"state": "SUCCEEDED"} and fake.stopped == ["run-1"], "no deadline: no stop"


def test_the_wait_rides_out_transient_errors_and_ends_on_a_refused_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Stops(monkeypatch, [cluster.ClusterError("connection refused"), "RUNNING", "FAILED"])
    done = asyncio.run(orchestration.watch_remote("http://h:8265", "s", poll_interval=0))
    assert done == {"state": "FAILED"}
    Stops(monkeypatch, [cluster.ClusterAuthError("needs a token")])
    done = asyncio.run(orchestration.watch_remote("http://h:8265", "s", poll_interval=0))
    assert done["state"] == orchestration.ERROR and "token" in done["message"]
    Stops(monkeypatch, [cluster.ClusterError("down")])
    done = asyncio.run(
        orchestration.watch_remote("http://h:8265", "s", poll_interval=0, max_poll_errors=3)
    )
    assert done["state"] == orchestration.ERROR, "gives up after max_poll_errors in a row"


def test_stopping_quietly_never_raises_for_an_unreachable_cluster(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unreachable(address: str, sid: str) -> bool:
        raise cluster.ClusterError("Ray cluster at http://h:8265: connection refused")

    monkeypatch.setattr(cluster, "stop_remote", unreachable)
    assert asyncio.run(orchestration.stop_quietly("http://h:8265", "s")) is False


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_batch_airflow_imports_airflow() -> None:
    importers = sorted(
        str(p.relative_to(REPO)) for p in (REPO / "batch").rglob("*.py") if "airflow" in _imports(p)
    )
    assert importers == ["batch/airflow.py"]


def test_import_batch_and_the_cli_never_load_airflow() -> None:
    """Meaningful where Airflow is installed (the integration test runs this file there)."""
    probe = textwrap.dedent(
        """
        import sys
        import batch, batch.cli, batch.cluster, batch.orchestration, batch.spec, pipelines
        from batch.cli import app
        sys.argv = ["batchinfer", "--help"]
        try:
            app()
        except SystemExit:
            pass
        loaded = [m for m in sys.modules if m == "airflow" or m.startswith("airflow.")]
        print("AIRFLOW_LOADED:", bool(loaded))
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert "AIRFLOW_LOADED: False" in out.stdout


# ============================================================== with Airflow


@pytest.fixture
def af() -> Iterator[Any]:
    """batch.airflow, when Airflow is installed; execute() called directly, as a test does."""
    # Not a missing part: Airflow has an environment of its own (scripts/airflow_venv.py), and
    # tests/integration/test_airflow.py runs this file there and fails on any skip.
    pytest.importorskip(
        "airflow.sdk",
        reason="Airflow lives in its own venv; tests/integration/test_airflow.py runs these there",
    )
    from airflow.sdk.bases.operator import ExecutorSafeguard

    import batch.airflow as module

    ExecutorSafeguard.test_mode = True
    yield module
    ExecutorSafeguard.test_mode = False


CONTEXT = {"logical_date": datetime(2026, 1, 1, tzinfo=UTC), "run_id": "scheduled__2026-01-01"}

FAKE_BATCHINFER = """\
#!{python}
# Stands in for `batchinfer submit`: records its arguments, finishes the output, exits.
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
Path(os.environ["FAKE_ARGS"]).write_text(json.dumps(args))
out = Path(next(a.split("=", 1)[1] for a in args if a.startswith("output.path=")))
code = int(os.environ.get("FAKE_EXIT", "0"))
if code == 0:
    out.mkdir(parents=True, exist_ok=True)
    (out / "_MANIFEST.json").write_text(json.dumps({{"rows": 3, "failed_rows": 0}}))
    (out / "ledger.json").write_text(json.dumps({{"rows": 3, "failed_rows": 0,
        "input_tokens": 30, "output_tokens": 6, "run_cost_usd": 1e-6, "comparisons": []}}))
print(json.dumps({{"event": "planned", "chunks": 1}}))
print("enrich-reviews: 3 rows, 0 failed")
sys.exit(code)
"""


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "batchinfer"
    path.write_text(FAKE_BATCHINFER.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_ARGS", str(tmp_path / "args.json"))
    return path


def operator(af: Any, job: Path, out: Path, **kwargs: Any) -> Any:
    return af.BatchInferOperator(
        task_id="enrich",
        job=str(job),
        overrides={"input.path": "/in/dt=2026-01-01/", "output.path": f"{out}/"},
        **kwargs,
    )


def test_local_run_streams_batchinfer_and_returns_the_payload(
    af: Any, job: Path, tmp_path: Path, fake_bin: Path
) -> None:
    out = tmp_path / "out"
    op = operator(af, job, out, batchinfer_bin=str(fake_bin))
    payload = op.execute(CONTEXT)
    assert payload["manifest"] == f"{out}/_MANIFEST.json" and payload["rows"] == 3
    assert set(payload) == PAYLOAD_KEYS
    args = json.loads((tmp_path / "args.json").read_text())
    assert args == [
        "submit", str(job), "--set", "input.path=/in/dt=2026-01-01/",
        "--set", f"output.path={out}/", "--wait",
    ]  # fmt: skip


def test_local_exit_codes_fail_or_retry(
    af: Any, job: Path, tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    op = operator(af, job, tmp_path / "out", batchinfer_bin=str(fake_bin))
    monkeypatch.setenv("FAKE_EXIT", "2")
    with pytest.raises(AirflowFailException, match="a retry will not help"):
        op.execute(CONTEXT)
    monkeypatch.setenv("FAKE_EXIT", "1")
    with pytest.raises(AirflowException, match="resumes") as failed:
        op.execute(CONTEXT)
    assert not isinstance(failed.value, AirflowFailException), "exit 1 is worth a retry"
    missing = operator(af, job, tmp_path / "out", batchinfer_bin=str(tmp_path / "nope"))
    with pytest.raises(AirflowFailException, match="batchinfer_bin"):
        missing.execute(CONTEXT)


def test_a_bad_spec_fails_without_retries(af: Any, job: Path, tmp_path: Path) -> None:
    from airflow.sdk.exceptions import AirflowFailException

    op = af.BatchInferOperator(task_id="t", job=str(job), overrides={"sampling.max_tokens": 0})
    with pytest.raises(AirflowFailException, match=r"sampling\.max_tokens"):
        op.execute(CONTEXT)


class FakeCluster:
    """batch.cluster's Jobs API functions, recorded; states play out in order."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, states: list[str], attached: bool) -> None:
        self.states = states
        self.attached = attached
        self.submitted: list[tuple[Any, ...]] = []
        self.stopped: list[str] = []
        monkeypatch.setattr(cluster, "submit_remote", self.submit_remote)
        monkeypatch.setattr(cluster, "remote_state", self.remote_state)
        monkeypatch.setattr(cluster, "remote_logs", lambda a, s: "line 1\nerror: boom\n")
        monkeypatch.setattr(cluster, "stop_remote", self.stop_remote)

    def submit_remote(self, address: str, job: Any, overrides: Any, **kw: Any) -> Any:
        self.submitted.append((address, job, tuple(overrides), kw))
        return cluster.RemoteRun(address, kw["run_id"], kw["run_id"], attached=self.attached)

    def remote_state(self, address: str, sid: str) -> str:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def stop_remote(self, address: str, sid: str) -> bool:
        self.stopped.append(sid)
        return True


ADDRESS = "http://127.0.0.1:8265"


def test_remote_submits_under_the_run_id_then_defers_to_the_trigger(
    af: Any, job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    fake = FakeCluster(monkeypatch, ["PENDING"], attached=False)
    out = tmp_path / "out"
    op = operator(af, job, out, address=ADDRESS, poll_interval=0.01)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(CONTEXT)
    spec: JobSpec = orchestration.load_job(job, op.overrides)
    rid = f"enrich-reviews-20260101-{cluster.run_digest(spec)}"
    assert fake.submitted == [
        (ADDRESS, str(job), tuple(orchestration.overrides_list(op.overrides)),
         {"run_id": rid, "wait": True, "pass_env": [], "credentials_to_env": False}),
    ]  # fmt: skip
    trigger = deferred.value.trigger
    assert deferred.value.method_name == "execute_complete"
    classpath, kwargs = trigger.serialize()
    assert classpath == "batch.airflow.RayJobTrigger"
    assert kwargs["submission_id"] == rid and "token" not in json.dumps(kwargs).lower()

    # The triggerer rebuilds the trigger from its serialized form and polls to the end.
    fake.states[:] = ["PENDING", "RUNNING", "RUNNING", "SUCCEEDED"]
    rebuilt = af.RayJobTrigger(**kwargs)
    events = asyncio.run(_collect(rebuilt.run()))
    assert [e.payload["state"] for e in events] == ["SUCCEEDED"]

    finished_output(out)
    payload = op.execute_complete(CONTEXT, events[0].payload)
    assert payload["manifest"] == f"{out}/_MANIFEST.json"


async def _collect(gen: Any) -> list[Any]:
    return [event async for event in gen]


def test_a_retry_attaches_to_a_finished_run_without_resubmitting(
    af: Any, job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    FakeCluster(monkeypatch, ["SUCCEEDED"], attached=True)
    out = tmp_path / "out"
    finished_output(out)
    payload = operator(af, job, out, address=ADDRESS).execute(CONTEXT)  # no TaskDeferred
    assert payload["rows"] == 14


def test_a_failed_remote_run_raises_with_its_log(
    af: Any, job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import AirflowException

    FakeCluster(monkeypatch, ["FAILED"], attached=True)
    op = operator(af, job, tmp_path / "out", address=ADDRESS)
    with pytest.raises(AirflowException, match=r"FAILED.*retry resumes[\s\S]*error: boom"):
        op.execute(CONTEXT)


def test_not_deferrable_follows_the_job_in_the_task(
    af: Any, job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeCluster(monkeypatch, ["RUNNING"], attached=False)
    monkeypatch.setattr(cluster, "tail_logs", lambda a, s: iter(["progress 1", "done"]))
    fake.states[:] = ["RUNNING", "RUNNING", "SUCCEEDED"]  # the state lags behind the log
    out = tmp_path / "out"
    finished_output(out)
    op = operator(af, job, out, address=ADDRESS, deferrable=False, poll_interval=0.01)
    assert op.execute(CONTEXT)["rows"] == 14


def test_trigger_rides_out_transient_errors_and_reports_auth_errors(
    af: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers: list[Any] = [cluster.ClusterError("connection refused"), "RUNNING", "STOPPED"]

    def state(address: str, sid: str) -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    monkeypatch.setattr(cluster, "remote_state", state)
    trigger = af.RayJobTrigger(address=ADDRESS, submission_id="s", run_id="r", poll_interval=0)
    assert [e.payload["state"] for e in asyncio.run(_collect(trigger.run()))] == ["STOPPED"]

    def refused(address: str, sid: str) -> str:
        raise cluster.ClusterAuthError("needs a token")

    monkeypatch.setattr(cluster, "remote_state", refused)
    (event,) = asyncio.run(_collect(trigger.run()))
    assert event.payload["state"] == "ERROR" and "token" in event.payload["message"]


def test_a_deferred_task_stops_its_job_before_execution_timeout(
    af: Any, job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Airflow calls no on_kill when a deferred task times out: the trigger's own deadline,
    set a margin before execution_timeout, stops the Ray job, and the task fails (retryable)."""
    import time

    from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

    fake = FakeCluster(monkeypatch, ["RUNNING"], attached=False)
    op = operator(
        af, job, tmp_path / "out", address=ADDRESS, poll_interval=0.01,
        execution_timeout=timedelta(hours=6),
    )  # fmt: skip
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(CONTEXT)
    _, kwargs = deferred.value.trigger.serialize()
    left = kwargs["deadline"] - time.time()
    assert 6 * 3600 - 120 < left < 6 * 3600 - 60, "a minute (and a poll) before the timeout"

    kwargs["deadline"] = time.time() + 0.05  # as if six hours had gone by
    (event,) = asyncio.run(_collect(af.RayJobTrigger(**kwargs).run()))
    assert event.payload["state"] == "TIMEOUT" and fake.stopped == [kwargs["submission_id"]]
    with pytest.raises(AirflowException, match="execution_timeout") as failed:
        op.execute_complete(CONTEXT, event.payload)
    assert not isinstance(failed.value, AirflowFailException), "a retry resumes"


def test_trigger_on_kill_survives_an_unreachable_cluster(
    af: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unreachable(address: str, sid: str) -> bool:
        raise cluster.ClusterError("connection refused")

    monkeypatch.setattr(cluster, "stop_remote", unreachable)
    trigger = af.RayJobTrigger(address=ADDRESS, submission_id="s", run_id="r")
    asyncio.run(trigger.on_kill())  # logs, does not raise


def test_on_kill_stops_the_remote_job(
    af: Any, job: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from airflow.sdk.exceptions import TaskDeferred

    fake = FakeCluster(monkeypatch, ["RUNNING"], attached=False)
    op = operator(af, job, tmp_path / "out", address=ADDRESS)
    with pytest.raises(TaskDeferred) as deferred:
        op.execute(CONTEXT)
    op.on_kill()
    trigger = deferred.value.trigger
    asyncio.run(trigger.on_kill())  # killed while deferred: the triggerer stops it
    sid = deferred.value.trigger.submission_id
    assert fake.stopped == [sid, sid]


def test_example_dag_parses_with_templated_daily_paths(
    af: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("nightly_enrich", DAG_FILE)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    dag = module.nightly
    assert dag.dag_id == "nightly_enrich" and not dag.catchup
    enrich = dag.get_task("enrich_reviews")
    assert isinstance(enrich, af.BatchInferOperator)
    assert enrich.overrides["input.path"].endswith("/dt={{ ds }}/")
    assert enrich.overrides["output.path"].endswith("/dt={{ ds }}/")
    assert set(dag.task_ids) == {"enrich_reviews", "report"}
    monkeypatch.setenv("BATCHINFER_INPUT_BASE", "/data/reviews")
    monkeypatch.setattr(module.Variable, "get", staticmethod(lambda name, default=None: default))
    assert module.setting("batchinfer_input_base") == "/data/reviews"
    assert module.setting("batchinfer_ray_address") == ""
    assert os.path.isfile(module.setting("batchinfer_job"))
