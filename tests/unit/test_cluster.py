"""Running on a cluster, without one: run ids, the KubeRay manifests (RayJob and standing
RayCluster), storage credentials that never travel in a file, progress from remote lines,
auth headers, following a remote job through a dropped log stream and Ctrl-C, and the CLI's
arguments. (The Jobs API itself, against a real Ray head: tests/integration.)"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import yaml

from batch import cli, cluster, remote
from batch.errors import ConfigurationError, SpecError
from batch.spec import JobSpec, load_spec, parse_spec

SCHEMA = Path(__file__).parent.parent / "data" / "kuberay_rayjob_v1_schema.yaml"
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

JOB = """\
name: Enrich_Reviews.v2
input: {path: "s3://bucket/in/", id_column: review_id,
        storage_options: {client_kwargs: {endpoint_url: "http://s3:8333"}}}
output: {path: "s3://bucket/out/"}
model: {path: Qwen/Qwen3-8B}
prompt: {template: "Summarise: {{ body }}"}
resources: {device: gpu, replicas: 3, gpus_per_replica: 2}
"""
# The same job with credentials inline, in both places fsspec's S3 takes them.
SECRETS = ("AKIAEXAMPLE", "hush-input", "hush-output", "sess-t0k3n")
JOB_WITH_KEYS = JOB.replace(
    '{client_kwargs: {endpoint_url: "http://s3:8333"}}',
    '{key: AKIAEXAMPLE, secret: hush-input, client_kwargs: {endpoint_url: "http://s3:8333"}}',
).replace(
    'output: {path: "s3://bucket/out/"}',
    'output: {path: "s3://bucket/out/", storage_options: {client_kwargs: '
    "{aws_secret_access_key: hush-output, aws_session_token: sess-t0k3n}}}",
)


def spec(overrides: tuple[str, ...] = (), text: str = JOB) -> JobSpec:
    return parse_spec(text, overrides=overrides)


def batchinfer(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "batch.cli", *args], capture_output=True, text=True, env=env
    )


# --------------------------------------------------------------------------- run ids


def test_run_id_is_the_name_and_a_digest_of_fingerprint_and_output_and_stable() -> None:
    s = spec()
    rid = cluster.make_run_id(s)
    assert rid == f"enrich-reviews-v2-{cluster.run_digest(s)}"
    assert cluster.make_run_id(spec()) == rid, "the same job gets the same id"
    # How fast it runs does not change the rows: same run.
    assert cluster.make_run_id(spec(("resources.replicas=8",))) == rid
    # What determines the rows does, and so does where they go (another output, another run).
    assert cluster.make_run_id(spec(("sampling.max_tokens=7",))) != rid
    assert cluster.make_run_id(spec(("output.path=s3://other/",))) != rid


def test_a_relative_output_names_a_run_by_where_it_was_typed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `output.path=out` from two folders is two outputs (the cluster is told the absolute
    # path), so two runs; from the same folder it is the same run.
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path / "a")
    in_a = cluster.make_run_id(spec(("output.path=out",)))
    assert cluster.make_run_id(spec(("output.path=out",))) == in_a
    monkeypatch.chdir(tmp_path / "b")
    relative = spec(("output.path=out/",))
    in_b = cluster.make_run_id(relative)
    assert in_b != in_a
    assert cluster.make_run_id(spec(("output.path=out",))) == in_b, "a trailing / is the same"
    # The run id, and what the cluster is told, name one and the same output.
    assert cluster.shipped_spec(relative)["output"]["path"] == f"{tmp_path}/b/out/"
    assert cluster.make_run_id(spec((f"output.path={tmp_path}/b/out",))) == in_b
    assert cluster.resolved_path("s3://bucket/out/") == "s3://bucket/out/", "URLs as typed"


def test_run_id_with_a_tag_for_one_run_a_day() -> None:
    s = spec()
    rid = cluster.make_run_id(s, tag="2026-11-22")
    assert rid == f"enrich-reviews-v2-2026-11-22-{cluster.run_digest(s)}"
    assert cluster.make_run_id(s, tag="2026-11-23") != rid


def test_run_ids_fit_ray_and_kuberay_names() -> None:
    long = spec(("name=" + "Very_Long.Job-Name" * 5,))
    for rid in (cluster.make_run_id(long), cluster.make_run_id(long, tag="20261122T000000")):
        assert len(rid) <= cluster.MAX_RUN_ID and DNS_1035.match(rid), rid
        assert rid.endswith(cluster.run_digest(long)), "the fingerprint is never cut off"
    assert cluster.make_run_id(spec(("name=2024_report",))).startswith("r-2024-report-")


def test_explicit_run_ids_are_normalised_or_refused() -> None:
    assert cluster.normalise_run_id("Nightly_Run.7") == "nightly-run-7"
    with pytest.raises(ValueError, match="letters, digits"):
        cluster.normalise_run_id("__")
    with pytest.raises(ValueError, match="at most 47"):
        cluster.normalise_run_id("x" * 48)
    assert cluster.attempt_submission_id("run-1", 1) == "run-1"
    assert cluster.attempt_submission_id("run-1", 3) == "run-1-a3"


def test_which_addresses_use_the_jobs_api() -> None:
    assert cluster.is_jobs_api("http://127.0.0.1:8265")
    assert cluster.is_jobs_api("https://ray.example.com")
    for other in ("ray://head:10001", "auto", "127.0.0.1:6379", None, ""):
        assert not cluster.is_jobs_api(other)


# --------------------------------------------------------------------------- Jobs API bits


def test_exit_codes_follow_the_remote_cli() -> None:
    def info(status: str, code: int | None) -> Any:
        return SimpleNamespace(status=status, driver_exit_code=code)

    assert cluster.exit_code(info("SUCCEEDED", 0)) == 0
    assert cluster.exit_code(info("FAILED", 2)) == 2, "invalid spec or input"
    assert cluster.exit_code(info("FAILED", 3)) == 3, "another run holds the output"
    assert cluster.exit_code(info("FAILED", 1)) == 1
    assert cluster.exit_code(info("FAILED", None)) == 1, "runtime env never came up"
    assert cluster.exit_code(info("STOPPED", -15)) == 1


def test_attach_prefers_a_live_attempt_then_a_success() -> None:
    def job(sid: str, status: str) -> Any:
        return SimpleNamespace(submission_id=sid, status=status, metadata={})

    assert cluster.current_attempt([job("r", "FAILED"), job("r-a2", "RUNNING")]).submission_id == (
        "r-a2"
    )
    assert cluster.current_attempt([job("r", "SUCCEEDED")]).submission_id == "r"
    assert cluster.current_attempt([job("r", "FAILED"), job("r-a2", "STOPPED")]) is None


def job_details(sid: str, status: str = "FAILED", run: str | None = None) -> Any:
    meta = {cluster.RUN_ID_KEY: run} if run else {}
    return SimpleNamespace(submission_id=sid, status=status, metadata=meta)


def test_a_job_whose_metadata_names_another_run_is_not_an_attempt() -> None:
    jobs = [
        job_details("nightly", run="nightly"),
        # `--run-id nightly-a2` is a run of its own, not attempt 2 of `nightly`
        job_details("nightly-a2", "RUNNING", run="nightly-a2"),
        job_details("nightly-a3", run="nightly"),
        job_details("nightly-a4"),  # no metadata (another tool): the id decides
        job_details("retry-7", run="nightly"),  # the metadata decides, whatever the id
        job_details("other", run="other"),
    ]
    fake = SimpleNamespace(list_jobs=lambda: jobs)
    found = cluster.attempts("http://h:8265", "nightly", jobs_client=fake)
    assert {j.submission_id for j in found} == {"nightly", "nightly-a3", "nightly-a4", "retry-7"}
    assert cluster.current_attempt(found) is None, "the RUNNING job belongs to another run"
    (own,) = cluster.attempts("http://h:8265", "nightly-a2", jobs_client=fake)
    assert own.submission_id == "nightly-a2"


def test_one_jobs_api_client_per_address(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray.job_submission

    built: list[tuple[str, dict[str, str]]] = []

    class Client:
        def __init__(self, address: str, headers: dict[str, str]) -> None:
            built.append((address, headers))

        def get_job_info(self, sid: str) -> Any:
            return SimpleNamespace(status="RUNNING")

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Client)
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    cluster.forget_clients()
    try:
        for _ in range(3):  # as wait_terminal and the Airflow trigger poll
            assert cluster.remote_state("http://a:8265", "s") == "RUNNING"
        cluster.remote_state("http://b:8265", "s")
        assert [a for a, _ in built] == ["http://a:8265", "http://b:8265"]
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", "t0k3n")
        cluster.remote_state("http://a:8265", "s")  # another token: another client
        assert built[-1] == ("http://a:8265", {"Authorization": "Bearer t0k3n"})
    finally:
        cluster.forget_clients()


def test_auth_header_comes_from_the_token_the_way_ray_reads_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    assert cluster.auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigurationError, match="RAY_AUTH_TOKEN"):
        cluster.auth_headers()
    (tmp_path / "token").write_text("abc123\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert cluster.auth_headers() == {"Authorization": "Bearer abc123"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert cluster.auth_headers() == {"Authorization": "Bearer fromenv"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def planned(self, plan: dict[str, Any]) -> None:
        self.calls.append(("planned", plan["pending_chunks"]))

    def engines_starting(self, replicas: int, usd_per_hour: float = 0.0) -> None:
        self.calls.append(("engines", replicas))

    def chunk_done(self, stats: dict[str, Any]) -> None:
        self.calls.append(("chunk", (stats["rows"], stats["failed_rows"], stats["output_tokens"])))

    def message(self, text: str) -> None:
        self.calls.append(("message", text))

    def finished(self, summary: Any) -> None:
        self.calls.append(("finished", None))


def test_remote_progress_lines_drive_the_local_reporter() -> None:
    rec, shown = Recorder(), []
    events = cluster.RemoteEvents(rec, shown.append)
    lines = [
        "Running entrypoint for job x: python -m batch.cli submit job.yaml --address auto",
        '{"ts": 1, "event": "planned", "files": 1, "rows": 24, "chunks": 3, '
        '"committed_chunks": 0, "pending_chunks": 3, "pending_rows": 24}',
        '{"ts": 2, "event": "engines_starting", "replicas": 2, "usd_per_hour": 0.1}',
        '{"ts": 3, "level": "info", "logger": "batch.runner", "message": "quiet"}',
        '{"ts": 4, "level": "warning", "logger": "batch.runner", "message": "loud"}',
        '{"ts": 5, "event": "progress", "chunks": 1, "rows": 8, "failed_rows": 1, '
        '"output_tokens": 50}',
        '{"ts": 6, "event": "progress", "chunks": 3, "rows": 24, "failed_rows": 1, '
        '"output_tokens": 150}',
        '{"ts": 7, "event": "finished", "job": "x", "rows": 23}',
        "x: 23 rows, 1 failed, ... -> out/",
    ]
    for line in lines:
        events.feed(line)
    chunks = [c[1] for c in rec.calls if c[0] == "chunk"]
    assert chunks == [(7, 1, 50), (16, 0, 100), (0, 0, 0)], "one call per chunk, totals kept"
    assert ("planned", 3) in rec.calls and ("engines", 2) in rec.calls
    assert "WARNING batch.runner: loud" in shown and not any("quiet" in s for s in shown)
    assert shown[-1] == "x: 23 rows, 1 failed, ... -> out/"
    assert events.finished is not None and events.finished["rows"] == 23
    assert rec.calls[-1] == ("finished", None)


def test_jobs_api_package_ships_the_resolved_spec_and_the_code(tmp_path: Path) -> None:
    s = spec(("input.path=data/in/",))
    with cluster.job_package(s, wait=True) as (entrypoint, env):
        shipped = yaml.safe_load((Path(env["working_dir"]) / "job.yaml").read_text())
        assert entrypoint == "python -m batch.cli submit job.yaml --address auto --wait"
        assert {Path(p).name for p in env["py_modules"]} == {"batch", "pipelines"}
    assert not Path(env["working_dir"]).exists(), "the temporary folder is removed"
    assert Path(shipped["input"]["path"]).is_absolute(), "relative paths made absolute"
    assert shipped["resources"]["replicas"] == 3


# --------------------------------------------------------------------------- KubeRay


def strict(schema: Any) -> Any:
    """Unknown fields are errors (as with kubectl apply --validate=strict)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def strict_validator(schema: Any) -> jsonschema.protocols.Validator:
    schema = strict(schema)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    cls.check_schema(schema)
    return cls(schema)


@pytest.fixture(scope="module")
def validator() -> jsonschema.protocols.Validator:
    return strict_validator(yaml.safe_load(SCHEMA.read_text()))


@pytest.fixture(scope="module")
def raycluster_validator() -> jsonschema.protocols.Validator:
    """KubeRay's RayCluster CRD: its spec is the RayClusterSpec a RayJob embeds (one Go type,
    one schema in both CRDs), so the vendored RayJob schema's rayClusterSpec is used."""
    rayjob = yaml.safe_load(SCHEMA.read_text())
    return strict_validator(
        {
            "type": "object",
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": rayjob["properties"]["spec"]["properties"]["rayClusterSpec"],
            },
            "$defs": rayjob["$defs"],
        }
    )


def test_gpu_manifest_is_a_valid_rayjob_sized_from_the_job(
    validator: jsonschema.protocols.Validator,
) -> None:
    s = spec()
    m = cluster.render_kuberay(s, image="registry.example/batchinfer:1")
    validator.validate(m)
    # a manifest that strays from the CRD is caught (the strict schema is not vacuous)
    bad = copy.deepcopy(m)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["tolerationz"] = []
    with pytest.raises(jsonschema.ValidationError):
        validator.validate(bad)

    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayJob")
    rid = cluster.make_run_id(s)
    assert m["metadata"]["name"] == rid and m["spec"]["jobId"] == rid
    assert len(rid) <= 47 and DNS_1035.match(rid), "KubeRay's RayJob name rule"
    assert m["metadata"]["namespace"] == "batchinfer"
    spec_ = m["spec"]
    assert spec_["shutdownAfterJobFinishes"] is True and spec_["ttlSecondsAfterFinished"] == 600
    assert spec_["entrypoint"].startswith("python -m batch.cli submit env:BATCHINFER_SPEC")
    assert "--address auto" in spec_["entrypoint"]
    assert not set("|&;><$`'\"") & set(spec_["entrypoint"]), "no shell syntax"

    head = spec_["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    head_pod = head["template"]["spec"]
    assert "tolerations" not in head_pod
    assert not any("nvidia.com/gpu" in c["resources"]["limits"] for c in head_pod["containers"])

    (group,) = spec_["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (container,) = pod["containers"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2, "gpus_per_replica"
    assert container["image"] == "registry.example/batchinfer:1"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    for p in (head_pod, pod):
        assert p["serviceAccountName"] == "batchinfer-ray"
    # Ray's token authentication: KubeRay makes the token and gives it to every pod itself.
    assert spec_["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    version = tuple(int(x) for x in spec_["rayClusterSpec"]["rayVersion"].split(".")[:2])
    assert version >= (2, 52), "authOptions needs Ray 2.52 or newer"


def test_standing_raycluster_scales_gpus_to_zero_and_serves_the_jobs_api(
    validator: jsonschema.protocols.Validator,
    raycluster_validator: jsonschema.protocols.Validator,
) -> None:
    s = spec()
    m = cluster.render_raycluster(s, image="registry.example/batchinfer:1")
    raycluster_validator.validate(m)
    bad = copy.deepcopy(m)
    bad["spec"]["workerGroupSpecs"][0]["minReplicaz"] = 0
    with pytest.raises(jsonschema.ValidationError):
        raycluster_validator.validate(bad)

    assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", "RayCluster")
    assert m["metadata"] == {
        "name": "batchinfer",
        "namespace": "batchinfer",
        "labels": m["metadata"]["labels"],
    }
    spec_ = m["spec"]
    assert spec_["enableInTreeAutoscaling"] is True
    assert spec_["authOptions"] == {"mode": "token"}
    head = spec_["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0" and head["rayStartParams"]["num-cpus"] == "0"
    (container,) = head["template"]["spec"]["containers"]
    assert {"containerPort": 8265, "name": "dashboard"} in container["ports"]
    (group,) = spec_["workerGroupSpecs"]
    assert group["minReplicas"] == group["replicas"] == 0, "no GPU held between runs"
    assert group["maxReplicas"] == 3, "the job's replicas, one pod each (2 GPUs per pod)"

    # The same pods as the RayJob's cluster: image, service account, GPUs, toleration.
    rayjob = cluster.render_kuberay(s, image="registry.example/batchinfer:1")
    job_cluster = rayjob["spec"]["rayClusterSpec"]
    assert group["template"]["spec"] == job_cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert head["template"]["spec"] == job_cluster["headGroupSpec"]["template"]["spec"]
    validator.validate(rayjob)

    assert "BATCHINFER_SPEC" not in cluster.manifest_yaml(m), "the job only sizes the pods"
    text = cluster.manifest_yaml(cluster.render_raycluster(spec(text=JOB_WITH_KEYS)))
    assert not [x for x in SECRETS if x in text]
    assert cluster.head_service("batchinfer") == "http://batchinfer-head-svc.batchinfer.svc:8265"
    assert "get secret batchinfer" in cluster.token_command("batchinfer")

    capped = cluster.render_raycluster(s, name="Team_A", max_workers=8, namespace="ml")
    raycluster_validator.validate(capped)
    assert capped["metadata"]["name"] == "team-a" and capped["metadata"]["namespace"] == "ml"
    assert capped["spec"]["workerGroupSpecs"][0]["maxReplicas"] == 8
    with pytest.raises(ValueError, match="cluster name"):
        cluster.render_raycluster(s, name="__")


def test_the_manifest_carries_the_spec_and_credentials_only_by_a_secret_s_name(
    validator: jsonschema.protocols.Validator,
) -> None:
    s = spec(text=JOB_WITH_KEYS)
    # Credentials in the spec: refused, saying how to give the pods access instead.
    with pytest.raises(SpecError) as refused:
        cluster.render_kuberay(s)
    message = str(refused.value)
    assert "input.storage_options.key" in message and "input.storage_options.secret" in message
    assert "output.storage_options.client_kwargs.aws_session_token" in message
    assert "--env-secret" in message and "batchinfer-ray" in message
    assert not [x for x in SECRETS if x in message], "the error names keys, never values"

    m = cluster.render_kuberay(s, env_secrets=("s3-creds",))
    text = cluster.manifest_yaml(m)
    assert not [x for x in SECRETS if x in text], "no credential value in the manifest"
    validator.validate(m)
    pods = [m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]]
    pods += [g["template"]["spec"] for g in m["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for pod in pods:  # every Ray container takes the Secret's keys as its environment
        for c in pod["containers"]:
            assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    runtime_env = yaml.safe_load(m["spec"]["runtimeEnvYAML"])
    carried = parse_spec(runtime_env["env_vars"]["BATCHINFER_SPEC"])
    assert carried.fingerprint() == s.fingerprint(), "the same job runs on the cluster"
    assert carried.input.storage_options == {"client_kwargs": {"endpoint_url": "http://s3:8333"}}
    assert carried.output.storage_options == {"client_kwargs": {}}
    # Without credentials in the spec nothing is needed: the service account's role.
    plain = cluster.render_kuberay(spec())
    assert "envFrom" not in cluster.manifest_yaml(plain)


class FakeJobsClient:
    """The Jobs API client ``submit_remote`` talks to: no jobs yet; a submission is kept
    with every file its working directory would upload, read while it still exists."""

    def __init__(self) -> None:
        self.submitted: list[dict[str, Any]] = []

    def list_jobs(self) -> list[Any]:
        return []

    def submit_job(self, **kw: Any) -> str:
        folder = Path(kw["runtime_env"]["working_dir"])
        kw["files"] = {
            str(f.relative_to(folder)): f.read_text() for f in folder.rglob("*") if f.is_file()
        }
        self.submitted.append(kw)
        return str(kw["submission_id"])


@pytest.fixture
def jobs_client(monkeypatch: pytest.MonkeyPatch) -> FakeJobsClient:
    fake = FakeJobsClient()
    monkeypatch.setattr(cluster, "client", lambda address: fake)
    return fake


def test_a_jobs_api_submission_writes_no_credential_into_the_job_s_files(
    tmp_path: Path, jobs_client: FakeJobsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB_WITH_KEYS)
    # Refused as it stands: the spec would ship the keys in job.yaml on the cluster.
    with pytest.raises(SpecError) as refused:
        cluster.submit_remote("http://h:8265", job)
    message = str(refused.value)
    assert "--credentials-to-env" in message and "--env-from-local" in message
    assert not [x for x in SECRETS if x in message]
    assert jobs_client.submitted == [], "nothing was sent"

    # Asked to: the files have no credential; the job's environment carries them.
    cluster.submit_remote("http://h:8265", job, credentials_to_env=True)
    (sub,) = jobs_client.submitted
    shipped = "".join(sub["files"].values()) + sub["entrypoint"] + json.dumps(sub["metadata"])
    assert set(sub["files"]) == {"job.yaml"}
    assert not [x for x in SECRETS if x in shipped], "no credential in a file or the command"
    env = sub["runtime_env"]["env_vars"]
    assert set(env) == {cluster.CREDENTIALS_ENV, "PYTHONUNBUFFERED"}
    # On the cluster, the remote CLI puts them back: the same storage options as here.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "remote.yaml").write_text(sub["files"]["job.yaml"])
    monkeypatch.setenv(cluster.CREDENTIALS_ENV, env[cluster.CREDENTIALS_ENV])
    there = cluster.load_job("remote.yaml")
    here = load_spec(job)
    assert there.input.storage_options == here.input.storage_options
    assert there.output.storage_options == here.output.storage_options
    assert there.fingerprint() == here.fingerprint()


def test_variables_from_here_go_into_the_job_s_environment_only(
    tmp_path: Path, jobs_client: FakeJobsClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hush-input")
    cluster.submit_remote(
        "http://h:8265", job, pass_env=["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]
    )
    (sub,) = jobs_client.submitted
    assert sub["runtime_env"]["env_vars"] == {
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "hush-input",
        "PYTHONUNBUFFERED": "1",
    }
    assert not [x for x in SECRETS if x in "".join(sub["files"].values())]
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    for name, why in (
        ("AWS_SESSION_TOKEN", "not set here"),
        ("PYTHONPATH", "batchinfer sets that one"),  # Ray would refuse to merge it
        ("A=B", "variable's name"),
    ):
        with pytest.raises(SpecError, match=why):
            cluster.submit_remote("http://h:8265", job, pass_env=[name])
    assert len(jobs_client.submitted) == 1


def test_cpu_job_gets_a_cpu_worker_group(validator: jsonschema.protocols.Validator) -> None:
    m = cluster.render_kuberay(
        spec(("resources.device=cpu", "resources.replicas=2")),
        namespace="team-a",
        service_account="team-a-ray",
        ttl_seconds=60,
    )
    validator.validate(m)
    (group,) = m["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    assert group["groupName"] == "cpu" and group["replicas"] == 2
    assert "tolerations" not in pod
    assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["limits"]
    assert m["metadata"]["namespace"] == "team-a" and pod["serviceAccountName"] == "team-a-ray"
    assert m["spec"]["ttlSecondsAfterFinished"] == 60


def test_fractional_gpus_share_a_pod(validator: jsonschema.protocols.Validator) -> None:
    m = cluster.render_kuberay(spec(("resources.gpus_per_replica=0.5", "resources.replicas=3")))
    validator.validate(m)
    (group,) = m["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 2, "two replicas per GPU, three replicas -> two pods"
    assert group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


# --------------------------------------------------------------------------- CLI


def test_render_kuberay_cli_writes_a_manifest(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB_WITH_KEYS)
    out = tmp_path / "rayjob.yaml"
    args = ("render", "kuberay", str(job), "--set", "resources.replicas=1", "--image", "img:1")
    res = batchinfer(*args, "-o", str(out))
    assert res.returncode == 2 and "--env-secret" in res.stderr and not out.exists()
    assert len(res.stderr.strip().splitlines()) == 1
    res = batchinfer(*args, "--run-id", "Nightly_7", "--env-secret", "s3-creds", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "credentials left out" in res.stderr and "kubectl apply -f" in res.stderr
    m = yaml.safe_load(out.read_text())
    assert m["metadata"]["name"] == "nightly-7"
    assert m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 1
    assert not [x for x in SECRETS if x in out.read_text()]


def test_submit_with_credentials_in_the_spec_is_refused_before_reaching_the_cluster(
    tmp_path: Path,
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB_WITH_KEYS)
    res = batchinfer("submit", str(job), "--address", "http://127.0.0.1:9")
    assert res.returncode == 2, res.stderr
    assert "--credentials-to-env" in res.stderr and "input.storage_options.key" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = batchinfer("submit", str(job), "--credentials-to-env")
    assert res.returncode == 2 and "--address http://" in res.stderr


def test_render_raycluster_cli_says_where_the_jobs_api_and_token_are(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    out = tmp_path / "raycluster.yaml"
    res = batchinfer("render", "raycluster", str(job), "--image", "img:1", "-o", str(out))
    assert res.returncode == 0, res.stderr
    assert "RayCluster batchinfer in namespace batchinfer" in res.stderr
    assert "http://batchinfer-head-svc.batchinfer.svc:8265" in res.stderr
    assert "port-forward svc/batchinfer-head-svc 8265:8265" in res.stderr
    assert "get secret batchinfer" in res.stderr and "RAY_AUTH_MODE=token" in res.stderr
    m = yaml.safe_load(out.read_text())
    assert m["kind"] == "RayCluster" and m["spec"]["workerGroupSpecs"][0]["minReplicas"] == 0
    res = batchinfer("render", "raycluster", str(job), "--run-id", "x")
    assert res.returncode == 2 and "--name" in res.stderr
    res = batchinfer("render", "kuberay", str(job))
    assert "no --image" in res.stderr, "the default image exists in no registry: say so"


def test_render_refuses_unknown_kinds_and_bad_specs(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    res = batchinfer("render", "helm", str(job))
    assert res.returncode == 2 and "kuberay" in res.stderr and "raycluster" in res.stderr
    res = batchinfer("render", "kuberay", str(job), "--set", "resources.replicas=0")
    assert res.returncode == 2 and "resources.replicas" in res.stderr


def test_cluster_options_need_a_jobs_api_address(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    res = batchinfer("submit", str(job), "--run-id", "x")
    assert res.returncode == 2 and "--address http://" in res.stderr
    res = batchinfer("status", str(job), "--address", "ray://head:10001")
    assert res.returncode == 2 and "http(s)://" in res.stderr
    res = batchinfer("submit", str(job), "--address", "http://x:8265", "--run-id", "__")
    assert res.returncode == 2 and "--run-id" in res.stderr
    res = batchinfer("status", str(job), "--run-id", "nightly-7")  # not silently ignored
    assert res.returncode == 2 and "--address http://" in res.stderr


def test_unreachable_cluster_is_one_line_exit_1(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    res = batchinfer("submit", str(job), "--address", "http://127.0.0.1:9")
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error: Ray cluster at http://127.0.0.1:9")
    assert len(res.stderr.strip().splitlines()) == 1


def test_submit_reads_a_job_from_an_environment_variable() -> None:
    res = batchinfer("submit", "env:BATCHINFER_NO_SUCH_VAR")
    assert res.returncode == 2 and "BATCHINFER_NO_SUCH_VAR is not set" in res.stderr


def test_loaded_job_file_and_shipped_spec_agree() -> None:
    s = load_spec("jobs/enrich.yaml")
    shipped = parse_spec(json.dumps(cluster.shipped_spec(s)))
    assert shipped.fingerprint() != "" and shipped.name == s.name
    assert shipped.resources == s.resources and shipped.prompt == s.prompt


# --------------------------------------------------------------------------- following


class FakeRemote:
    """The Jobs API calls `submit --address` makes, scripted: each log stream in turn (a
    list of lines, ending in an exception to drop it), then the job's states in order."""

    def __init__(
        self, monkeypatch: pytest.MonkeyPatch, streams: list[list[Any]], states: list[str]
    ) -> None:
        self.streams, self.states = streams, states
        self.opened = 0
        self.stopped: list[str] = []
        self.log = "".join(f"{x}\n" for x in streams[-1] if isinstance(x, str))
        monkeypatch.setattr(remote, "RECONNECT_S", 0.0)
        monkeypatch.setattr(cluster, "submit_remote", self.submit_remote)
        monkeypatch.setattr(cluster, "tail_logs", self.tail_logs)
        monkeypatch.setattr(cluster, "remote_state", self.remote_state)
        monkeypatch.setattr(cluster, "remote_logs", lambda a, s: self.log)
        monkeypatch.setattr(cluster, "stop_remote", self.stop_remote)
        monkeypatch.setattr(cluster, "wait_terminal", lambda a, s, timeout=60: "STOPPED")
        monkeypatch.setattr(
            cluster,
            "job_info",
            lambda a, s: SimpleNamespace(
                status=self.states[-1], driver_exit_code=0, message="", metadata={}
            ),
        )

    def submit_remote(self, address: str, job: Any, overrides: Any, **kw: Any) -> Any:
        return cluster.RemoteRun(address, "run-1", "run-1", attached=False)

    def tail_logs(self, address: str, sid: str) -> Any:
        stream = self.streams[min(self.opened, len(self.streams) - 1)]
        self.opened += 1
        for item in stream:
            if isinstance(item, BaseException):
                raise item
            yield item

    def remote_state(self, address: str, sid: str) -> str:
        return self.states.pop(0) if len(self.states) > 1 else self.states[0]

    def stop_remote(self, address: str, sid: str) -> bool:
        self.stopped.append(sid)
        return True


def follow(job: Path, *, json_lines: bool = True, quiet: bool = False) -> int:
    return cli._follow_remote(
        "http://h:8265", job, [], run_id=None, wait=False, verbose=True, quiet=quiet,
        detach=False, json_lines=json_lines,
    )  # fmt: skip


@pytest.fixture
def job_file(tmp_path: Path) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    return job


def test_a_dropped_log_stream_is_picked_up_again_until_the_job_ends(
    job_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    drop = cluster.ClusterError("Ray cluster at http://h:8265: connection reset")
    # The first stream drops while the job runs; the second replays the log from the start.
    fake = FakeRemote(
        monkeypatch,
        streams=[["one", "two", drop], ["one", "two", "three", "four: done"]],
        states=["RUNNING", "SUCCEEDED"],
    )
    assert follow(job_file) == 0, "a job that succeeded is exit 0, not 1"
    out, err = capsys.readouterr()
    assert fake.opened == 2
    lines = [ln for ln in out.splitlines() if not ln.startswith("{")]
    assert lines == ["one", "two", "three", "four: done"], "every line once, none replayed"
    assert "log stream of run-1 dropped" in err and "RUNNING" in err and "reconnecting" in err


def test_the_last_lines_are_read_when_the_job_ends_while_reconnecting(
    job_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    drop = cluster.ClusterError("Ray cluster at http://h:8265: connection reset")
    fake = FakeRemote(monkeypatch, streams=[["one", drop]], states=["SUCCEEDED"])
    fake.log = "one\ntwo\nthe summary line\n"
    assert follow(job_file) == 0
    out, _ = capsys.readouterr()
    assert [ln for ln in out.splitlines() if not ln.startswith("{")] == [
        "one", "two", "the summary line",
    ]  # fmt: skip


def test_a_failed_job_after_a_dropped_stream_keeps_its_exit_code(
    job_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drop = cluster.ClusterError("Ray cluster at http://h:8265: connection reset")
    fake = FakeRemote(monkeypatch, streams=[["one", drop], ["one"]], states=["RUNNING", "FAILED"])
    monkeypatch.setattr(
        cluster,
        "job_info",
        lambda a, s: SimpleNamespace(status="FAILED", driver_exit_code=3, message="", metadata={}),
    )
    assert follow(job_file) == 3, "the remote CLI's own exit code, as a local run"
    assert fake.opened == 2


@pytest.mark.parametrize("answer", [True, False, None])  # None: just Enter (the default)
def test_ctrl_c_on_a_terminal_asks_whether_to_stop_the_remote_job(
    answer: bool | None,
    job_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = FakeRemote(monkeypatch, streams=[["one", KeyboardInterrupt()]], states=["RUNNING"])
    asked: list[tuple[str, bool]] = []

    def confirm(text: str, default: bool = False) -> bool:
        asked.append((text, default))
        return default if answer is None else answer

    monkeypatch.setattr("sys.stdin", SimpleNamespace(isatty=lambda: True))
    monkeypatch.setattr(cli.typer, "confirm", confirm)
    assert follow(job_file, json_lines=False, quiet=True) == 130
    err = capsys.readouterr().err
    assert asked == [("\nStop the remote job run-1?", False)], "asked once; default: keep it"
    if answer:
        assert fake.stopped == ["run-1"]
        assert "interrupted: run-1 stopped; committed chunks are kept" in err
    else:
        assert fake.stopped == [], "the job keeps running on the cluster"
        assert "run-1 keeps running on http://h:8265" in err
        assert "run the same command to follow it again" in err


def test_ctrl_c_without_a_terminal_stops_the_remote_job(
    job_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = FakeRemote(monkeypatch, streams=[["one", KeyboardInterrupt()]], states=["RUNNING"])
    monkeypatch.setattr(cli.typer, "confirm", lambda *a, **k: pytest.fail("no one to ask"))
    assert follow(job_file, json_lines=True) == 130
    assert fake.stopped == ["run-1"]
    assert "interrupted: run-1 stopped" in capsys.readouterr().err
