"""Running a job on an existing Ray cluster through the Ray Jobs API, and on KubeRay: as a
RayJob with a cluster of its own, or on a standing RayCluster that scales its GPUs to zero.

A job is submitted under a deterministic **run id** (the job's name and a digest of its spec
fingerprint and output path, optionally with a tag such as an Airflow logical date), which is
also the Ray submission id of the first attempt. Submitting the same job again therefore
finds the job already there and attaches to it instead of starting a second one: idempotent
submission is what makes an orchestrator's retries safe. Only when the previous attempt
ended without success (FAILED, STOPPED) is a new attempt submitted, as ``<run id>-a<n>``; it
resumes from the output's markers like any rerun, so no row is computed twice.

The job runs on the cluster as ``python -m batch.cli submit job.yaml --address auto``: the
resolved spec (overrides applied) travels in the job's working directory and this package's
code (``batch``, ``pipelines``) as ``py_modules``, so the cluster needs the dependencies
(``pip install batchinfer[gpu]``) but not this exact version of the code.

Storage credentials never travel in a file: the spec shipped (working directory, RayJob
manifest) has every credential-like ``storage_options`` value removed. A cluster reaches
storage through its own identity (an IAM role, Pod Identity) or environment; a submission
whose spec holds credentials is refused unless the caller asks to move them into the job's
runtime environment (``credentials_to_env``), where Ray keeps them (see docs/cluster.md).

Authentication: a head started by ``ray start --head`` with a dashboard requires a token. As
with Ray's own CLI, set ``RAY_AUTH_MODE=token`` and give the token in ``RAY_AUTH_TOKEN`` or a
file named by ``RAY_AUTH_TOKEN_PATH`` (default ``~/.ray/auth_token``). The token is sent as an
HTTP header only; it is never written into a spec, a manifest, metadata or a log.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from batch.errors import ConfigurationError, SpecError, TransientError
from batch.spec import JobSpec, load_spec, parse_spec
from batch.summary import RunSummary

log = logging.getLogger(__name__)

ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
RUN_ID_KEY = "batchinfer_run_id"  # job metadata: which run an attempt belongs to
ATTEMPT_KEY = "batchinfer_attempt"
OUTPUT_KEY = "batchinfer_output"
MAX_RUN_ID = 47  # KubeRay: a RayJob name is at most 47 characters and a DNS-1035 label
SPEC_FILE = "job.yaml"
_ATTEMPT_ID = re.compile(r"^(?P<run>.+)-a(?P<n>\d+)$")


class ClusterError(TransientError):
    """The Ray cluster could not be reached, or its Jobs API refused a request."""


class ClusterAuthError(ConfigurationError):
    """The cluster wants a token this client does not have (or has a wrong one)."""


# --------------------------------------------------------------------------- run ids


def normalise_run_id(text: str) -> str:
    """A run id Ray and Kubernetes both accept: lowercase letters, digits and '-', starting
    with a letter, at most 47 characters (a RayJob name), e.g. ``enrich-reviews-3f2a...``.
    Raises ValueError when nothing usable is left.
    """
    rid = _slug(text)
    if not rid:
        raise ValueError(f"run id {text!r}: use letters, digits and '-'")
    if not rid[0].isalpha():
        rid = f"r-{rid}"
    if len(rid) > MAX_RUN_ID:
        raise ValueError(f"run id {text!r}: at most {MAX_RUN_ID} characters (a RayJob name)")
    return rid


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.strip().lower()).strip("-")


def resolved_path(path: str) -> str:
    """A local path made absolute (a trailing '/' kept), a URL (``s3://...``) as it is.

    The run id, the run's metadata and the spec shipped to the cluster all name the output
    this way: ``out`` typed in two folders is two outputs, and so two runs.
    """
    if "://" in path or os.path.isabs(path):
        return path
    return os.path.abspath(path) + ("/" if path.endswith("/") else "")


def run_digest(spec: JobSpec) -> str:
    """12 hex digits over the spec's fingerprint and its (resolved) output path: the same job
    written to another output is another run."""
    key = f"{spec.fingerprint()}|{resolved_path(spec.output.path).rstrip('/')}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def make_run_id(spec: JobSpec, *, tag: str | None = None) -> str:
    """``<name>-<digest>`` or ``<name>-<tag>-<digest>``: the same job (and tag) to the same
    output always gets the same id; any change to what determines the output rows, or to
    where they go, gives a new one. The name is normalised (lowercase, '-' for other
    characters) and shortened to fit 47 characters.
    """
    fp = run_digest(spec)
    if tag is not None and not _slug(tag):
        raise ValueError(f"tag {tag!r}: use letters, digits and '-'")
    suffix = f"{_slug(tag)}-{fp}" if tag else fp
    room = MAX_RUN_ID - len(suffix) - 1
    if room < 1:
        raise ValueError(f"tag {tag!r} is too long for a run id")
    try:
        name = normalise_run_id(spec.name)
    except ValueError:
        name = "job"
    name = name[:room].rstrip("-") or "job"
    return normalise_run_id(f"{name}-{suffix}")


def attempt_submission_id(run_id: str, attempt: int) -> str:
    """The Ray submission id of a run's n-th attempt: the run id itself, then ``-a2``, ..."""
    return run_id if attempt <= 1 else f"{run_id}-a{attempt}"


def is_jobs_api(address: str | None) -> bool:
    """``http(s)://`` addresses go through the Jobs API; ``ray://``, ``auto``, ``HOST:PORT``
    connect the driver directly (the job runs here, its tasks on the cluster)."""
    return bool(address) and str(address).startswith(("http://", "https://"))


# --------------------------------------------------------------------------- credentials

_SECRET_KEY = re.compile(r"key|secret|token|password|passwd|credential|sas", re.IGNORECASE)
CREDENTIALS_ENV = "BATCHINFER_STORAGE_CREDENTIALS"  # moved credentials, in the job's environment
# Set by this package (the job's env, the remote driver's ray.init): Ray refuses to merge a
# job's runtime env with the driver's when both set one variable, and its error prints both.
RESERVED_ENV = frozenset(
    {"PYTHONUNBUFFERED", "PYTHONPATH", "TOKENIZERS_PARALLELISM", "HF_HUB_OFFLINE",
     "VLLM_CONFIGURE_LOGGING", "RAY_worker_niceness", CREDENTIALS_ENV}
)  # fmt: skip


def _is_secret_key(key: Any) -> bool:
    return bool(_SECRET_KEY.search(str(key))) and key != "endpoint_url"


def without_secrets(options: Any) -> Any:
    """Storage options with every credential-like key removed (recursively): what may be
    written into a file that leaves this machine (a job's working dir, a manifest)."""
    if isinstance(options, dict):
        return {k: without_secrets(v) for k, v in options.items() if not _is_secret_key(k)}
    if isinstance(options, list):
        return [without_secrets(v) for v in options]
    return options


def secrets_of(options: Any) -> dict[str, Any]:
    """The credential-like values of storage options (non-empty ones), nested as they were:
    what ``without_secrets`` leaves out."""
    found: dict[str, Any] = {}
    if isinstance(options, dict):
        for k, v in options.items():
            if _is_secret_key(k):
                if v not in (None, "", {}, []):
                    found[k] = v
            elif isinstance(v, dict) and (inner := secrets_of(v)):
                found[k] = inner
    return found


def inline_credentials(spec: JobSpec) -> list[str]:
    """Where the spec holds credentials: ``["input.storage_options.key", ...]``."""

    def paths(tree: dict[str, Any], prefix: str) -> list[str]:
        out = []
        for k, v in tree.items():
            here = f"{prefix}.{k}"
            out += paths(v, here) if isinstance(v, dict) and not _is_secret_key(k) else [here]
        return out

    return [
        p
        for part in ("input", "output")
        for p in paths(secrets_of(getattr(spec, part).storage_options), f"{part}.storage_options")
    ]


def job_environment(
    spec: JobSpec,
    *,
    pass_env: Sequence[str] = (),
    credentials_to_env: bool = False,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The variables a Jobs API submission adds to the job's runtime environment.

    ``pass_env``: names copied from this process's environment (``AWS_ACCESS_KEY_ID``, ...).
    A spec holding credentials is refused (SpecError) unless ``credentials_to_env``: then
    they travel in the variable ``BATCHINFER_STORAGE_CREDENTIALS`` and the remote run puts
    them back into its storage options (``with_credentials_from_env``).
    """
    environ = os.environ if environ is None else environ
    found = inline_credentials(spec)
    if found and not credentials_to_env:
        raise SpecError(
            f"{', '.join(found)}: credentials in the spec would be written into the job's files "
            "on the cluster; remove them and let the cluster reach storage through its own "
            "identity (or pass variables with --env-from-local AWS_ACCESS_KEY_ID ...), or add "
            "--credentials-to-env to send them in the job's environment instead"
        )
    env: dict[str, str] = {}
    for name in pass_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise SpecError(f"--env-from-local {name!r}: give an environment variable's name")
        if name in RESERVED_ENV:
            raise SpecError(f"--env-from-local {name}: batchinfer sets that one itself")
        if name not in environ:
            raise SpecError(f"--env-from-local {name}: it is not set here; export it first")
        env[name] = environ[name]
    if found:
        moved = {p: secrets_of(getattr(spec, p).storage_options) for p in ("input", "output")}
        env[CREDENTIALS_ENV] = json.dumps({p: v for p, v in moved.items() if v})
    return env


def with_credentials_from_env(spec: JobSpec, environ: Mapping[str, str] | None = None) -> JobSpec:
    """On the cluster: the spec with the credentials ``job_environment`` moved into the job's
    environment put back into its storage options (the spec itself, without that variable)."""
    environ = os.environ if environ is None else environ
    text = environ.get(CREDENTIALS_ENV)
    if not text:
        return spec
    try:
        moved = json.loads(text)
    except ValueError:
        raise SpecError(f"${CREDENTIALS_ENV}: not the JSON batchinfer writes") from None
    doc = spec.model_dump(mode="json")
    for part in ("input", "output"):
        if isinstance(moved, dict) and isinstance(moved.get(part), dict):
            _merge(doc[part]["storage_options"], moved[part])
    return JobSpec.model_validate(doc)


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def load_job(job: str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """A job file, or ``env:NAME`` (the job's YAML in an environment variable, as a KubeRay
    RayJob passes it), with credentials moved into the environment put back. SpecError."""
    text = str(job)
    if text.startswith("env:"):
        name = text.removeprefix("env:")
        body = os.environ.get(name)
        if not body:
            raise SpecError(f"{text}: the environment variable {name} is not set or empty")
        spec = parse_spec(body, source=f"${name}", overrides=overrides)
    else:
        spec = load_spec(job, overrides)
    return with_credentials_from_env(spec)


# --------------------------------------------------------------------------- the Jobs API


@dataclass(frozen=True)
class RemoteRun:
    """A run of a job on a cluster: which attempt (Ray job) stands for it now."""

    address: str
    run_id: str
    submission_id: str  # the Ray job's submission id (== run_id for the first attempt)
    attached: bool  # True when an existing job for this run id was found and reused


def auth_headers() -> dict[str, str]:
    """The token header when ``RAY_AUTH_MODE=token``, read the way Ray reads it:
    ``RAY_AUTH_TOKEN``, else the file in ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``.
    """
    if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
        return {}
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        try:
            token = path.expanduser().read_text().strip()
        except OSError:
            raise ClusterAuthError(
                f"RAY_AUTH_MODE=token but no token: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH "
                f"to the token file ({path} is not readable)"
            ) from None
    return {"Authorization": f"Bearer {token}"}


def client(address: str) -> Any:
    """A ``JobSubmissionClient`` for an ``http(s)://`` address, with the token if configured.

    One per address (and token) in a process: building one costs two HTTP round trips (Ray
    checks the cluster's version), and the state is polled every few seconds.
    """
    if not is_jobs_api(address):
        raise ConfigurationError(
            f"--address {address}: the Jobs API needs the dashboard's http(s):// address, "
            "e.g. http://HEAD:8265"
        )
    return _client(address, tuple(sorted(auth_headers().items())))


@functools.lru_cache(maxsize=8)
def _client(address: str, headers: tuple[tuple[str, str], ...]) -> Any:
    # A failed construction raises and so is not cached: the next call tries again.
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=dict(headers))
    except Exception as exc:
        raise _cluster_error(address, exc) from None


def forget_clients() -> None:
    """Drop the cached Jobs API clients (tests; a process that changed its token)."""
    _client.cache_clear()


def _cluster_error(address: str, exc: BaseException) -> ClusterError | ClusterAuthError:
    text = str(exc)
    if "Authentication" in type(exc).__name__ or "Authentication required" in text:
        return ClusterAuthError(
            f"{address} requires a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
            "RAY_AUTH_TOKEN_PATH); see docs/cluster.md"
        )
    if "Authentication failed" in text or "Invalid authentication" in text:
        return ClusterAuthError(f"{address} refused the token (RAY_AUTH_TOKEN/_PATH is wrong)")
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return ClusterError(f"Ray cluster at {address}: {first[:300]}")


def _call(address: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except (ClusterError, ClusterAuthError):
        raise
    except Exception as exc:
        raise _cluster_error(address, exc) from None


def attempts(address: str, run_id: str, *, jobs_client: Any = None) -> list[Any]:
    """The Ray jobs (``JobDetails``) that are attempts of ``run_id``, oldest first.

    A job whose metadata names its run belongs to that run only, whatever its submission id
    looks like (``x-a2`` may be attempt 2 of ``x``, or a run named so with ``--run-id``); the
    submission id decides only for jobs without that metadata (submitted by other tools).
    """
    c = jobs_client or client(address)
    found = []
    for job in _call(address, c.list_jobs):
        sid = job.submission_id or ""
        owner = (job.metadata or {}).get(RUN_ID_KEY)
        if owner is not None:
            if owner == run_id:
                found.append(job)
            continue
        m = _ATTEMPT_ID.match(sid)
        if sid == run_id or (m and m["run"] == run_id):
            found.append(job)
    return sorted(found, key=_attempt_number)


def _attempt_number(job: Any) -> int:
    meta = job.metadata or {}
    if str(meta.get(ATTEMPT_KEY, "")).isdigit():
        return int(meta[ATTEMPT_KEY])
    m = _ATTEMPT_ID.match(job.submission_id or "")
    return int(m["n"]) if m else 1


def current_attempt(jobs: Sequence[Any]) -> Any | None:
    """The attempt that stands for the run: a live one, else one that succeeded."""
    for wanted in (ACTIVE, ("SUCCEEDED",)):
        chosen = [j for j in jobs if str(j.status) in wanted]
        if chosen:
            return chosen[-1]
    return None


def submit_remote(
    address: str,
    job: str | Path,
    overrides: Sequence[str] = (),
    *,
    run_id: str | None = None,
    wait: bool = False,
    verbose: bool = False,
    pass_env: Sequence[str] = (),
    credentials_to_env: bool = False,
) -> RemoteRun:
    """Submit a job to the cluster at ``address`` (``http://HEAD:8265``), or attach to it.

    Idempotent per run id: a PENDING/RUNNING/SUCCEEDED attempt is reused (``attached``);
    after a FAILED/STOPPED one a new attempt ``<run id>-a<n>`` is submitted, which resumes
    from the output's markers. Two clients racing to submit the same attempt both end up on
    one Ray job: the loser's submission is refused as "already exists" and attaches.
    ``wait``: the remote run waits for another run's lease instead of exiting 3.
    ``pass_env``, ``credentials_to_env``: see ``job_environment`` (a spec holding storage
    credentials is refused without the latter).
    Raises SpecError, ClusterError or ClusterAuthError.
    """
    spec = load_spec(job, overrides)
    env = job_environment(spec, pass_env=pass_env, credentials_to_env=credentials_to_env)
    rid = normalise_run_id(run_id) if run_id else make_run_id(spec)
    c = client(address)
    for _ in range(3):
        found = attempts(address, rid, jobs_client=c)
        current = current_attempt(found)
        if current is not None:
            return RemoteRun(address, rid, current.submission_id, attached=True)
        n = max((_attempt_number(j) for j in found), default=0) + 1
        sid = attempt_submission_id(rid, n)
        with job_package(spec, wait=wait, verbose=verbose, env=env) as (entrypoint, runtime_env):
            metadata = {
                RUN_ID_KEY: rid,
                ATTEMPT_KEY: str(n),
                "batchinfer_job": spec.name,
                "batchinfer_fingerprint": spec.fingerprint(),
                OUTPUT_KEY: resolved_path(spec.output.path),
            }
            try:
                c.submit_job(
                    entrypoint=entrypoint,
                    submission_id=sid,
                    runtime_env=runtime_env,
                    metadata=metadata,
                )
            except Exception as exc:
                if "already exists" in str(exc):
                    log.info("attempt %s was submitted by someone else; attaching", sid)
                    continue  # list again: attach to it (or to what replaced it)
                raise _cluster_error(address, exc) from None
        log.info("submitted %s (attempt %d of run %s)", sid, n, rid)
        return RemoteRun(address, rid, sid, attached=False)
    raise ClusterError(f"could not submit or attach to run {rid} on {address}")


def job_info(address: str, submission_id: str) -> Any:
    c = client(address)
    return _call(address, lambda: c.get_job_info(submission_id))


def remote_state(address: str, submission_id: str) -> str:
    """The job's state: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(job_info(address, submission_id).status)


def remote_logs(address: str, submission_id: str) -> str:
    """Everything the job printed so far (the remote CLI's JSON lines and final line)."""
    c = client(address)
    return str(_call(address, lambda: c.get_job_logs(submission_id)))


def stop_remote(address: str, submission_id: str) -> bool:
    """Ask Ray to stop the job (SIGTERM, then SIGKILL); True if it was running."""
    c = client(address)
    return bool(_call(address, lambda: c.stop_job(submission_id)))


def wait_terminal(address: str, submission_id: str, timeout: float = 60.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED (or ``timeout``); the last state."""
    deadline = time.monotonic() + timeout
    state = remote_state(address, submission_id)
    while state not in TERMINAL and time.monotonic() < deadline:
        time.sleep(0.5)
        state = remote_state(address, submission_id)
    return state


def exit_code(info: Any) -> int:
    """The exit code a local run would have had: 0, or the remote CLI's own 2/3, else 1."""
    status = str(info.status)
    if status == "SUCCEEDED":
        return 0
    code = getattr(info, "driver_exit_code", None)
    if status == "FAILED" and code in (2, 3):
        return int(code)
    return 1


def tail_logs(address: str, submission_id: str) -> Iterator[str]:
    """The job's output line by line, from its start, following it until the job ends.

    The Jobs API streams logs over a websocket (an async generator); it runs on a thread of
    its own so the caller's thread stays free for Ctrl-C.
    """
    c = client(address)
    lines: queue.Queue[str | BaseException | None] = queue.Queue()
    loop = asyncio.new_event_loop()

    async def pump() -> None:
        buf = ""
        async for text in c.tail_job_logs(submission_id):
            buf += text
            *complete, buf = buf.split("\n")
            for line in complete:
                lines.put(line)
        if buf:
            lines.put(buf)

    def run() -> None:
        try:
            loop.run_until_complete(pump())
        except BaseException as exc:  # reported to the caller's thread
            lines.put(exc)
        finally:
            with contextlib.suppress(BaseException):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()  # on its own thread, once nothing runs on it any more
            lines.put(None)

    thread = threading.Thread(target=run, name=f"logs-{submission_id}", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                return
            if isinstance(item, BaseException):
                if remote_state(address, submission_id) not in TERMINAL:
                    raise _cluster_error(address, item)
                return
            yield item
    finally:
        if thread.is_alive():
            # The loop may close between the check and the call: then there is nothing to stop.
            with contextlib.suppress(RuntimeError):
                for task in asyncio.all_tasks(loop):
                    loop.call_soon_threadsafe(task.cancel)
            thread.join(5)


# --------------------------------------------------------------------------- packaging


def shipped_spec(spec: JobSpec) -> dict[str, Any]:
    """The resolved spec as it runs on the cluster: local relative paths made absolute (the
    cluster's working directory is not the caller's; the cluster must see the same files),
    credentials removed (a file on the cluster is no place for them)."""
    doc = spec.model_dump(mode="json")
    for part in ("input", "output"):
        doc[part]["path"] = resolved_path(str(doc[part]["path"]))
        doc[part]["storage_options"] = without_secrets(doc[part]["storage_options"])
    return doc


def entrypoint_args(*, wait: bool = False, verbose: bool = False) -> list[str]:
    args = ["python", "-m", "batch.cli", "submit", SPEC_FILE, "--address", "auto"]
    if wait:
        args.append("--wait")
    if verbose:
        args.append("--verbose")
    return args


def code_modules() -> list[str]:
    """The folders of this project's packages, shipped with every job (``py_modules``)."""
    import batch
    import pipelines

    return [str(Path(batch.__file__).parent), str(Path(pipelines.__file__).parent)]


@contextmanager
def job_package(
    spec: JobSpec,
    *,
    wait: bool = False,
    verbose: bool = False,
    env: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(entrypoint, runtime_env) for a Jobs API submission; the working dir holds the spec
    (without credentials), ``env`` (``job_environment``) goes into the runtime env only."""
    folder = Path(tempfile.mkdtemp(prefix="batchinfer-job-"))
    try:
        (folder / SPEC_FILE).write_text(yaml.safe_dump(shipped_spec(spec), sort_keys=False))
        runtime_env = {
            "working_dir": str(folder),
            "py_modules": code_modules(),
            "excludes": ["__pycache__", "*.pyc"],
            # Only keys the driver's own ray.init leaves alone: Ray refuses to merge a job's
            # runtime env with the driver's when both set the same variable.
            "env_vars": {**(env or {}), "PYTHONUNBUFFERED": "1"},
        }
        yield " ".join(entrypoint_args(wait=wait, verbose=verbose)), runtime_env
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- progress


class RemoteEvents:
    """Turns the remote CLI's JSON lines back into calls on a local progress reporter.

    The remote run writes ``planned``, ``engines_starting``, ``progress`` (running totals),
    ``message`` and ``finished`` events; a progress event becomes one ``chunk_done`` with
    the difference since the last one. Log records (JSON with a ``level``) are shown when
    they are warnings or worse; other lines (the final summary, errors) pass through.
    """

    def __init__(self, reporter: Any, echo: Callable[[str], None]) -> None:
        self.reporter = reporter
        self.echo = echo
        self.last: dict[str, int] = {}
        self.finished: dict[str, Any] | None = None

    def feed(self, line: str) -> None:
        doc = _json_object(line)
        if doc is None:
            if line.strip():
                self.echo(line)
            return
        event = doc.get("event")
        if event == "planned":
            self.reporter.planned(doc)
        elif event == "engines_starting":
            self.reporter.engines_starting(
                int(doc.get("replicas", 1)), float(doc.get("usd_per_hour", 0.0))
            )
        elif event == "progress":
            # One chunk_done per chunk finished since the last event (the first carries the
            # rows and tokens), so the local bar counts chunks as the remote one did.
            delta, chunks = self._delta(doc)
            for i in range(max(1, chunks)):
                self.reporter.chunk_done(delta if i == 0 else dict.fromkeys(delta, 0))
        elif event == "message":
            self.reporter.message(str(doc.get("text", "")))
        elif event == "finished":
            self.finished = doc
            self.reporter.finished(_summary(doc))
        elif "level" in doc and doc["level"] in ("warning", "error", "critical"):
            self.echo(f"{doc['level'].upper()} {doc.get('logger', '')}: {doc.get('message', '')}")

    def _delta(self, doc: Mapping[str, Any]) -> tuple[dict[str, int], int]:
        now = {k: int(doc.get(k, 0)) for k in ("chunks", "rows", "failed_rows", "output_tokens")}
        d = {k: now[k] - self.last.get(k, 0) for k in now}
        self.last = now
        stats = {
            "rows": d["rows"] - d["failed_rows"],
            "failed_rows": d["failed_rows"],
            "input_tokens": 0,  # the remote progress event carries output tokens only
            "output_tokens": d["output_tokens"],
        }
        return stats, d["chunks"]


def _summary(doc: Mapping[str, Any]) -> RunSummary:
    """The remote run's ``finished`` event as a RunSummary (for the local reporter)."""
    return RunSummary(
        job=str(doc.get("job", "")),
        output=str(doc.get("output", "")),
        chunks=int(doc.get("chunks", 0)),
        chunks_run=int(doc.get("chunks_run", 0)),
        rows=int(doc.get("rows", 0)),
        failed_rows=int(doc.get("failed_rows", 0)),
        input_tokens=int(doc.get("input_tokens", 0)),
        output_tokens=int(doc.get("output_tokens", 0)),
        wall_seconds=float(doc.get("wall_seconds", 0.0)),
        gpu_seconds=0.0,
    )


def _json_object(line: str) -> dict[str, Any] | None:
    text = line.strip()
    if not (text.startswith("{") and text.endswith("}")):
        return None
    try:
        doc = json.loads(text)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


# --------------------------------------------------------------------------- KubeRay

KUBERAY_NAMESPACE = "batchinfer"  # what infra/terraform creates
KUBERAY_SERVICE_ACCOUNT = "batchinfer-ray"  # the only identity that can reach the bucket
KUBERAY_TTL_SECONDS = 600
KUBERAY_CLUSTER_NAME = "batchinfer"  # the standing RayCluster (infra/terraform's ray_cluster_name)
KUBERAY_IDLE_TIMEOUT_SECONDS = 120  # an idle GPU worker pod goes this long after its last task
GPU_RESOURCE = "nvidia.com/gpu"
NODE_ROLE = "batchinfer.io/node-role"  # the Karpenter pools' label: ray-cpu, ray-gpu
SPEC_ENV = "BATCHINFER_SPEC"


def default_image() -> str:
    from batch import __version__

    return f"batchinfer:{__version__}"


def _pod_groups(
    spec: JobSpec,
    *,
    image: str,
    service_account: str,
    worker_memory: str | None,
    labels: Mapping[str, str],
    env_secrets: Sequence[str] = (),
) -> tuple[dict[str, Any], dict[str, Any], int]:
    """(head group, worker group, worker pods the job needs): what a RayJob's cluster and a
    standing RayCluster share, so both put the same pods on the same nodes. Every Ray
    container takes its environment from the Kubernetes Secrets ``env_secrets`` (by name:
    the manifest never holds a value)."""
    res = spec.resources
    gpu = res.device == "gpu"
    pod_annotations = {"karpenter.sh/do-not-disrupt": "true"}  # no consolidation mid-job
    if gpu:
        per_pod_gpus = max(1, math.ceil(res.gpus_per_replica))
        replicas_per_pod = max(1, int(per_pod_gpus // res.gpus_per_replica))
    else:
        per_pod_gpus, replicas_per_pod = 0, 1
    pods = math.ceil(res.replicas / replicas_per_pod)
    # The engines' CPUs plus one for the light read and commit tasks (the head takes none).
    worker_cpus = math.ceil(res.cpus_per_replica * replicas_per_pod) + 1
    # Fits the smallest GPU nodes infra/terraform offers (g5.xlarge: 4 vCPUs, 16 GiB).
    memory = worker_memory or (f"{12 * per_pod_gpus}Gi" if gpu else "8Gi")
    worker_limits: dict[str, Any] = {"cpu": str(worker_cpus), "memory": memory}
    if gpu:
        worker_limits[GPU_RESOURCE] = per_pod_gpus
    worker_pod: dict[str, Any] = {
        "serviceAccountName": service_account,
        "nodeSelector": {NODE_ROLE: "ray-gpu" if gpu else "ray-cpu"},
        "containers": [
            {
                "name": "ray-worker",
                "image": image,
                "resources": {"limits": worker_limits, "requests": dict(worker_limits)},
                "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
                **_env_from(env_secrets),
            }
        ],
        # vLLM and Ray's object store use shared memory; a container's default is 64 MiB.
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if gpu:
        worker_pod["tolerations"] = [
            {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        ]
    head_resources = {"cpu": "2", "memory": "8Gi"}
    head_pod = {
        "serviceAccountName": service_account,
        "nodeSelector": {NODE_ROLE: "ray-cpu"},
        "containers": [
            {
                "name": "ray-head",
                "image": image,
                "ports": [
                    {"containerPort": 6379, "name": "gcs-server"},
                    {"containerPort": 8265, "name": "dashboard"},
                    {"containerPort": 10001, "name": "client"},
                ],
                "resources": {"limits": head_resources, "requests": dict(head_resources)},
                **_env_from(env_secrets),
            }
        ],
    }
    head = {
        # No tasks and no GPUs on the head: it runs the driver and Ray's services.
        "rayStartParams": {"num-cpus": "0", "num-gpus": "0"},
        "template": {
            "metadata": {"labels": dict(labels), "annotations": dict(pod_annotations)},
            "spec": head_pod,
        },
    }
    worker = {
        "groupName": "gpu" if gpu else "cpu",
        "replicas": pods,
        "minReplicas": pods,
        "maxReplicas": pods,
        "rayStartParams": {},
        "template": {
            "metadata": {"labels": dict(labels), "annotations": dict(pod_annotations)},
            "spec": worker_pod,
        },
    }
    return head, worker, pods


def _env_from(secrets: Sequence[str]) -> dict[str, Any]:
    return {"envFrom": [{"secretRef": {"name": name}} for name in secrets]} if secrets else {}


def _labels(**extra: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "batchinfer",
        "app.kubernetes.io/managed-by": "batchinfer",
    } | {f"batchinfer.io/{k.replace('_', '-')}": v for k, v in extra.items()}


def render_kuberay(
    spec: JobSpec,
    *,
    run_id: str | None = None,
    image: str | None = None,
    namespace: str = KUBERAY_NAMESPACE,
    service_account: str = KUBERAY_SERVICE_ACCOUNT,
    ttl_seconds: int = KUBERAY_TTL_SECONDS,
    worker_memory: str | None = None,
    env_secrets: Sequence[str] = (),
) -> dict[str, Any]:
    """A KubeRay ``RayJob`` (ray.io/v1) that runs this job on a cluster of its own.

    KubeRay creates a RayCluster (a head that takes no work, and one worker group sized from
    ``resources``: GPU pods with the ``nvidia.com/gpu`` toleration, or CPU pods), submits the
    entrypoint under the run id, and deletes the cluster ``ttl_seconds`` after the job ends.
    The spec travels inside the manifest (``runtimeEnvYAML``), never with credentials: the
    pods reach storage as ``service_account`` (its role), or through the environment the
    Kubernetes Secrets ``env_secrets`` give every Ray container. A spec holding credentials
    is refused (SpecError) unless such a Secret is named. The image must contain batchinfer
    with its engine (``pip install batchinfer[gpu]``). Token authentication is on
    (``authOptions``): KubeRay makes the token and hands it to the pods and the submitter
    itself, so no token is ever in the manifest.
    """
    found = inline_credentials(spec)
    if found and not env_secrets:
        raise SpecError(
            f"{', '.join(found)}: a manifest never carries credentials; remove them (the pods "
            f"use the service account {service_account}'s role), or put them in a Kubernetes "
            "Secret as environment variables (AWS_ACCESS_KEY_ID, ...) and name it with "
            "--env-secret NAME"
        )
    rid = normalise_run_id(run_id) if run_id else make_run_id(spec)
    doc = spec.model_dump(mode="json")
    for part in ("input", "output"):
        doc[part]["storage_options"] = without_secrets(doc[part]["storage_options"])
    # The spec as YAML text in an environment variable, read by `submit env:NAME`: readable in
    # the manifest, and no file system shared with whoever rendered it is needed.
    runtime_env = {"env_vars": {SPEC_ENV: _yaml(doc), "PYTHONUNBUFFERED": "1"}}
    # No shell syntax: KubeRay's submitter passes the entrypoint through a shell of its own.
    # --wait: a retry on a new cluster waits out the lease of a driver that died with the old
    # one (a minute) instead of exiting 3; the output's markers make the retry a resume.
    entrypoint = f"python -m batch.cli submit env:{SPEC_ENV} --address auto --wait"
    labels = _labels(run_id=rid)
    head, worker, _ = _pod_groups(
        spec, image=image or default_image(), service_account=service_account,
        worker_memory=worker_memory, labels=labels, env_secrets=env_secrets,
    )  # fmt: skip
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "name": rid,
            "namespace": namespace,
            "labels": labels,
            "annotations": {"batchinfer.io/fingerprint": spec.fingerprint()},
        },
        "spec": {
            "jobId": rid,  # the Ray submission id: the same run id as with the Jobs API
            "entrypoint": entrypoint,
            "runtimeEnvYAML": _yaml(runtime_env),
            "metadata": {RUN_ID_KEY: rid, ATTEMPT_KEY: "1", "batchinfer_job": spec.name},
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_seconds,
            # A retry gets a fresh cluster and resumes from the output's markers.
            "backoffLimit": 2,
            "rayClusterSpec": {
                "rayVersion": _ray_version(),
                "authOptions": {"mode": "token"},
                "headGroupSpec": head,
                "workerGroupSpecs": [worker],
            },
        },
    }


def head_service(name: str, namespace: str = KUBERAY_NAMESPACE) -> str:
    """The Jobs API of a RayCluster ``name`` inside Kubernetes: KubeRay's head Service is
    ``<name>-head-svc`` and serves the dashboard on 8265."""
    return f"http://{name}-head-svc.{namespace}.svc:8265"


def token_command(name: str, namespace: str = KUBERAY_NAMESPACE) -> str:
    """How to read a RayCluster's token: KubeRay keeps it in the Secret named like the
    cluster, key ``auth_token``. Printed, never run: the token stays in the user's hands."""
    return (
        f"kubectl -n {namespace} get secret {name} -o jsonpath='{{.data.auth_token}}' | base64 -d"
    )


def render_raycluster(
    spec: JobSpec,
    *,
    name: str = KUBERAY_CLUSTER_NAME,
    image: str | None = None,
    namespace: str = KUBERAY_NAMESPACE,
    service_account: str = KUBERAY_SERVICE_ACCOUNT,
    worker_memory: str | None = None,
    max_workers: int | None = None,
    idle_timeout_seconds: int = KUBERAY_IDLE_TIMEOUT_SECONDS,
    env_secrets: Sequence[str] = (),
) -> dict[str, Any]:
    """A standing KubeRay ``RayCluster`` (ray.io/v1) for ``submit --address`` and Airflow.

    The same head and worker pods as the RayJob (the head takes no work; its Service
    ``<name>-head-svc`` serves the Jobs API on 8265), but the worker group starts at zero
    and Ray's autoscaler adds pods while engines wait for GPUs and removes them
    ``idle_timeout_seconds`` after the last one left, so GPU nodes exist only while a job
    runs. ``max_workers`` caps the group (default: the pods this job needs). Token
    authentication is on; KubeRay keeps the token in the Secret ``<name>`` (see
    ``token_command``). ``env_secrets``: Kubernetes Secrets whose keys become every Ray
    container's environment (storage credentials for jobs submitted to it). The job only
    sizes the pods; its spec is not in the manifest.
    """
    try:
        name = normalise_run_id(name)
    except ValueError as exc:
        raise ValueError(str(exc).replace("run id", "cluster name")) from None
    labels = _labels(cluster=name)
    head, worker, pods = _pod_groups(
        spec, image=image or default_image(), service_account=service_account,
        worker_memory=worker_memory, labels=labels, env_secrets=env_secrets,
    )  # fmt: skip
    if max_workers is not None and max_workers < 1:
        raise ValueError(f"max workers {max_workers}: give at least 1")
    worker.update(replicas=0, minReplicas=0, maxReplicas=max_workers or pods)
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "rayVersion": _ray_version(),
            "authOptions": {"mode": "token"},
            # Ray's autoscaler as a sidecar of the head: it scales the worker group between
            # 0 and maxReplicas from what tasks and actors ask for; Karpenter follows with nodes.
            "enableInTreeAutoscaling": True,
            "autoscalerOptions": {"idleTimeoutSeconds": idle_timeout_seconds},
            "headGroupSpec": head,
            "workerGroupSpecs": [worker],
        },
    }


def _ray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:
        return "2.60.0"


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, no anchors: a manifest people read and diff."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


def _yaml(doc: Any) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100)


def manifest_yaml(manifest: Mapping[str, Any]) -> str:
    """The manifest as YAML for ``kubectl apply -f``."""
    return _yaml(dict(manifest))
