"""Following a job's run on a Ray cluster from here: submit or attach, stream its log into
the local progress reporter, pick a dropped log stream up again, Ctrl-C to stop or leave
it, and the exit code a local run would have had. Also what ``status``/``stop`` ask the
cluster, and the notes that go with a rendered KubeRay manifest.

The Jobs API calls themselves are in :mod:`batch.cluster`; this module is the state machine
on top. It prints nothing itself: lines go to a ``Screen`` the CLI provides (stdout, stderr,
a yes/no question), so the CLI stays parsing, calling and printing.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from batch import cluster
from batch.errors import BatchInferError, SpecError
from batch.progress import NullReporter, Reporter
from batch.spec import JobSpec, load_spec

RECONNECT_S = 5.0  # between attempts to pick up a dropped log stream
SETTLE_S = 10.0  # a log stream that ended cleanly: how long the job may take to show it ended
UNREACHABLE_S = 600.0  # give up following (the job keeps running) after this long without an answer

_RAY_LOG_LINE = re.compile(r"^\[?\d{4}-\d\d-\d\d[ _]\d\d:\d\d:\d\d")
_RAY_NOISE = ("Running entrypoint for job", "[")


class Screen(Protocol):
    """Where following a remote job shows its lines, and how it asks a question."""

    def out(self, text: str) -> None: ...  # stdout: the job's lines, its summary
    def err(self, text: str) -> None: ...  # stderr: notices, warnings, errors
    def can_ask(self) -> bool: ...  # someone at a terminal can answer
    def confirm(self, question: str) -> bool: ...  # default: no


class LiveReporter(Reporter, Protocol):
    """A reporter that draws (a progress bar) and must be stopped before other output."""

    def stop(self) -> None: ...


@dataclass(frozen=True)
class FollowOptions:
    """How ``follow`` submits and shows a run (the ``submit --address http://`` flags)."""

    run_id: str | None = None
    wait: bool = False
    verbose: bool = False
    quiet: bool = False
    detach: bool = False
    json_lines: bool = False
    pass_env: Sequence[str] = ()
    credentials_to_env: bool = False


def follow(
    address: str,
    job: Path,
    overrides: list[str],
    opts: FollowOptions,
    screen: Screen,
    bar: LiveReporter | None = None,
) -> int:
    """Submit to (or attach to) the job's run on a cluster and follow it to its end.

    ``bar``: a live progress reporter to drive from the remote events (a terminal, not
    quiet). Returns the exit code a local run would have had: 0 done, 2 invalid spec, 3
    another run holds the output, 1 failed or stopped on the cluster, 130 interrupted here.
    """
    try:
        run = cluster.submit_remote(
            address, job, overrides, run_id=opts.run_id, wait=opts.wait, verbose=opts.verbose,
            pass_env=opts.pass_env, credentials_to_env=opts.credentials_to_env,
        )  # fmt: skip
    except SpecError as exc:
        screen.err(f"error: {exc}")
        return 2
    except ValueError as exc:  # a run id that cannot be one
        screen.err(f"error: --run-id: {exc}")
        return 2
    except BatchInferError as exc:
        screen.err(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        screen.err("interrupted before the job was submitted")
        return 130
    sid = run.submission_id
    if opts.json_lines:
        screen.out(
            json.dumps(
                {
                    "ts": round(time.time(), 3),
                    "event": "attached" if run.attached else "submitted",
                    "address": address,
                    "run_id": run.run_id,
                    "submission_id": sid,
                }
            )
        )
    elif not opts.quiet:
        state = ""
        if run.attached:
            with contextlib.suppress(BatchInferError):
                state = f", {cluster.remote_state(address, sid)}"
        verb = "attached to" if run.attached else "submitted"
        screen.err(f"{verb} {sid} (run {run.run_id}{state}) on {address}")
    if run.attached:
        warning = other_output_warning(address, sid, job, overrides)
        if warning:
            screen.err(warning)
    if opts.detach:
        screen.err(
            f"{sid}: running on {address}; follow it with the same command without --detach, "
            f"see it with `batchinfer status {job} --address {address}`, stop it with "
            f"`batchinfer stop {job} --address {address}`"
        )
        return 0

    reporter: Reporter = bar if bar is not None else NullReporter()
    last_line = ""

    def echo(line: str) -> None:
        nonlocal last_line
        if _RAY_LOG_LINE.match(line) or line.startswith(_RAY_NOISE):
            if opts.verbose:
                screen.err(line)
            return
        if line.startswith("error: ") or line.startswith("interrupted"):
            screen.err(line)
            return
        last_line = line
        if bar is not None and events.finished is None:
            bar.message(line)  # above the live bar
        elif not opts.quiet:
            screen.out(line)  # after the run: its summary line

    def feed(line: str) -> None:
        if opts.json_lines and not opts.quiet:
            doc = cluster._json_object(line)
            if doc is not None:  # the remote's JSON lines, as they are
                (screen.err if "level" in doc else screen.out)(line)
                return
        events.feed(line)

    def notice(text: str) -> None:
        if bar is not None:
            bar.message(text)
        else:
            screen.err(text)

    events = cluster.RemoteEvents(reporter, echo)
    try:
        follow_to_the_end(address, sid, feed, notice)
        info = cluster.job_info(address, sid)
    except KeyboardInterrupt:
        if bar is not None:
            bar.stop()
        return interrupted(address, sid, job, screen, interactive=not opts.json_lines)
    except BatchInferError as exc:
        if bar is not None:
            bar.stop()
        screen.err(f"error: {exc}")
        return 1
    if bar is not None:
        bar.stop()
    code = cluster.exit_code(info)
    if opts.quiet and last_line and code == 0:
        screen.out(last_line)
    if str(info.status) == "STOPPED":
        screen.err(
            f"error: {sid} was stopped on the cluster; committed chunks are kept, submit the "
            "same job again to resume"
        )
    elif code and (info.driver_exit_code is None):  # it never got to run our CLI
        message = (info.message or "").strip().splitlines()
        screen.err(f"error: {sid} {info.status}: {message[0] if message else ''}")
    return code


def follow_to_the_end(
    address: str, sid: str, feed: Callable[[str], None], notice: Callable[[str], None]
) -> None:
    """Feed the job's log lines, each once, until the job is SUCCEEDED, FAILED or STOPPED.

    A log stream can end before the job does (a dashboard restart, a proxy's idle timeout, a
    network blip). Then the stream is opened again; Ray replays it from the start, so the
    lines already fed are skipped. Raises ClusterAuthError when the token is refused, and
    ClusterError once the cluster has not answered for UNREACHABLE_S (the job may well still
    be running: the same command attaches to it again).
    """
    seen = 0  # lines fed so far; a new stream starts from the first line again
    broken = False  # a stream ended early: the last lines may only be in the stored log
    lost_since: float | None = None

    def ask() -> str | None:
        """The job's state, or None while the cluster does not answer."""
        nonlocal lost_since
        try:
            state = cluster.remote_state(address, sid)
        except cluster.ClusterAuthError:
            raise
        except BatchInferError as exc:
            now = time.monotonic()
            if lost_since is None:
                lost_since = now
                notice(
                    f"warning: lost {address} ({exc}); {sid} may still be running, trying "
                    f"again every {RECONNECT_S:.0f}s (Ctrl-C to stop following)"
                )
            elif now - lost_since >= UNREACHABLE_S:
                raise cluster.ClusterError(
                    f"{address} has not answered for {UNREACHABLE_S / 60:.0f} minutes ({exc}); "
                    f"{sid} may still be running: run the same command to attach to it again"
                ) from None
            return None
        lost_since = None
        return state

    while True:
        shown, reason = 0, ""
        try:
            for line in cluster.tail_logs(address, sid):
                shown += 1
                if shown > seen:
                    seen = shown
                    feed(line)
        except cluster.ClusterAuthError:
            raise
        except BatchInferError as exc:
            reason, broken = str(exc), True
        state = ask()
        if not reason:  # a stream that ends with the job: its state may lag a moment behind
            settle = time.monotonic() + SETTLE_S
            while state not in (None, *cluster.TERMINAL) and time.monotonic() < settle:
                time.sleep(0.5)
                state = ask()
        if state in cluster.TERMINAL:
            if broken:
                with contextlib.suppress(BatchInferError):
                    lines = cluster.remote_logs(address, sid).split("\n")
                    if lines and not lines[-1]:
                        lines.pop()  # as the stream splits it: no empty last line
                    for line in lines[seen:]:
                        feed(line)
            return
        if state is not None and (shown or reason):
            broken = True
            notice(
                f"warning: the log stream of {sid} dropped ({reason or 'it ended'}) while the "
                f"job is {state}; reconnecting in {RECONNECT_S:.0f}s"
            )
        time.sleep(RECONNECT_S)


def other_output_warning(address: str, sid: str, job: Path, overrides: list[str]) -> str | None:
    """A run id normally covers the output path, but one given with --run-id can name a run
    of the same job to another output: a warning when the run found writes somewhere else
    than this submission would."""
    try:
        theirs = (cluster.job_info(address, sid).metadata or {}).get(cluster.OUTPUT_KEY)
        ours = cluster.resolved_path(cluster.load_job(job, overrides).output.path)
    except BatchInferError:
        return None
    if theirs and theirs.rstrip("/") != ours.rstrip("/"):
        return (
            f"warning: run {sid} writes to {theirs}, not {ours}: that run id already names a "
            "run to another output; give another --run-id to run this one separately"
        )
    return None


def interrupted(address: str, sid: str, job: Path, screen: Screen, *, interactive: bool) -> int:
    """Ctrl-C (or SIGTERM) while following a remote job: stop it, or leave it running.

    On a terminal, ask (default: leave it running). Without one (a script, Airflow), stop
    it: the same as Ctrl-C on a local run, which ends the job. (To leave a job running from
    a script, submit it with --detach, which returns at once.)
    """
    if interactive and screen.can_ask():
        try:
            stop = screen.confirm(f"\nStop the remote job {sid}?")
        except KeyboardInterrupt:
            stop = False
    else:
        stop = True
    if stop:
        try:
            cluster.stop_remote(address, sid)
            state = cluster.wait_terminal(address, sid, timeout=60)
        except BatchInferError as exc:
            screen.err(f"error: could not stop {sid}: {exc}")
            return 130
        screen.err(
            f"interrupted: {sid} {state.lower()}; committed chunks are kept, run the same "
            "command to resume"
        )
    else:
        screen.err(
            f"interrupted: {sid} keeps running on {address}; run the same command to follow it "
            f"again, or `batchinfer stop {job} --address {address}`"
        )
    return 130


# --------------------------------------------------------------------------- status, stop


def remote_target(address: str, spec: JobSpec, run_id: str | None) -> tuple[str, Any, int]:
    """(run id, the JobDetails standing for it or None, how many attempts it has).

    Raises SpecError for an address that is not the Jobs API's or a run id that cannot be
    one, ClusterError/ClusterAuthError when the cluster does not answer.
    """
    if not cluster.is_jobs_api(address):
        raise SpecError(f"--address {address}: give the Jobs API's http(s)://HEAD:8265 address")
    try:
        rid = cluster.normalise_run_id(run_id) if run_id else cluster.make_run_id(spec)
    except ValueError as exc:
        raise SpecError(str(exc)) from None
    found = cluster.attempts(address, rid)
    current = cluster.current_attempt(found) or (found[-1] if found else None)
    return rid, current, len(found)


def cluster_status(address: str, spec: JobSpec, run_id: str | None) -> dict[str, Any]:
    """The run's state on the cluster, for ``status --address`` (``--json``: ``"cluster"``)."""
    rid, job, count = remote_target(address, spec, run_id)
    return {
        "address": address,
        "run_id": rid,
        "submission_id": job.submission_id if job else None,
        "state": str(job.status) if job else None,
        "attempts": count,
        "message": (job.message or "").strip().splitlines()[0] if job and job.message else "",
    }


def describe_cluster_status(doc: dict[str, Any]) -> str:
    if not doc["state"]:
        return f"cluster: no run {doc['run_id']} on {doc['address']}"
    n = doc["attempts"]
    return (
        f"cluster: {doc['state']} {doc['submission_id']} (run {doc['run_id']}, {n} "
        f"attempt{'s' if n != 1 else ''}) on {doc['address']}"
    )


class NotRunning(BatchInferError):
    """``stop``: the run has no live attempt on the cluster."""


def stop_run(address: str, spec: JobSpec, run_id: str | None) -> str:
    """Stop the run's live attempt; the line to print. Raises NotRunning, SpecError, or the
    cluster's errors."""
    rid, job, _ = remote_target(address, spec, run_id)
    if job is None or str(job.status) not in cluster.ACTIVE:
        state = f"its last attempt {job.submission_id} is {job.status}" if job else "none found"
        raise NotRunning(f"run {rid} is not running on {address} ({state})")
    cluster.stop_remote(address, job.submission_id)
    state = cluster.wait_terminal(address, job.submission_id, timeout=60)
    return f"{job.submission_id}: {state}; committed chunks are kept (submit again to resume)"


# --------------------------------------------------------------------------- render

RENDER_KINDS = ("kuberay", "raycluster")


@dataclass(frozen=True)
class Rendered:
    """A manifest as YAML, and what to tell the user about it (stderr lines)."""

    manifest: dict[str, Any]
    text: str
    notes: list[str]
    after: list[str]  # printed after the manifest was written: how to reach what it makes


def render(
    kind: str,
    job: Path,
    overrides: Sequence[str] = (),
    *,
    run_id: str | None = None,
    image: str | None = None,
    namespace: str = cluster.KUBERAY_NAMESPACE,
    service_account: str = cluster.KUBERAY_SERVICE_ACCOUNT,
    ttl_seconds: int = cluster.KUBERAY_TTL_SECONDS,
    worker_memory: str | None = None,
    name: str = cluster.KUBERAY_CLUSTER_NAME,
    max_workers: int | None = None,
    env_secrets: Sequence[str] = (),
) -> Rendered:
    """``render kuberay`` (a RayJob) or ``render raycluster`` (a standing RayCluster).

    Raises SpecError for an unknown kind, a run id given to a RayCluster, an invalid job, a
    spec holding credentials without ``env_secrets``, and a bad run id or cluster name (the
    message names the option).
    """
    if kind not in RENDER_KINDS:
        raise SpecError(
            f"render {kind}: give kuberay (a RayJob) or raycluster (a standing RayCluster)"
        )
    if kind == "raycluster" and run_id:
        raise SpecError("--run-id: a RayCluster is not one run; give --name to name the cluster")
    spec = load_spec(job, overrides)
    try:
        if kind == "raycluster":
            manifest = cluster.render_raycluster(
                spec, name=name, image=image, namespace=namespace,
                service_account=service_account, worker_memory=worker_memory,
                max_workers=max_workers, env_secrets=env_secrets,
            )  # fmt: skip
        else:
            manifest = cluster.render_kuberay(
                spec, run_id=run_id, image=image, namespace=namespace,
                service_account=service_account, ttl_seconds=ttl_seconds,
                worker_memory=worker_memory, env_secrets=env_secrets,
            )  # fmt: skip
    except ValueError as exc:
        raise SpecError(f"--{'name' if kind == 'raycluster' else 'run-id'}: {exc}") from None
    notes = []
    if image is None:
        notes.append(
            f"note: no --image: the pods would pull {cluster.default_image()}, which no "
            "registry has; build the Dockerfile, push it (infra/terraform/README.md) and pass "
            "--image REGISTRY/batchinfer:TAG"
        )
    if kind == "kuberay":
        for part in ("input", "output"):
            path = getattr(spec, part).path
            if "://" not in path or path.startswith("file://"):
                notes.append(
                    f"warning: {part}.path {path} is a local path; the cluster's pods will "
                    "not see it (use s3://...)"
                )
        for part in ("input", "output"):
            options = getattr(spec, part).storage_options
            if cluster.secrets_of(options):
                notes.append(
                    f"note: {part}.storage_options: credentials left out of the manifest; the "
                    f"pods take them from the environment the Secret {', '.join(env_secrets)} "
                    "gives them"
                )
    after = []
    if kind == "raycluster":
        rc = manifest["metadata"]["name"]
        after.append(
            f"Jobs API: {cluster.head_service(rc, namespace)} inside Kubernetes, or "
            f"`kubectl -n {namespace} port-forward svc/{rc}-head-svc 8265:8265` for "
            f"http://127.0.0.1:8265; its token: `{cluster.token_command(rc, namespace)}` "
            "(then RAY_AUTH_MODE=token and RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH)"
        )
    return Rendered(manifest, cluster.manifest_yaml(manifest), notes, after)
