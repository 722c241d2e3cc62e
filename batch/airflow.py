"""Airflow integration: ``BatchInferOperator`` runs a job, ``RayJobTrigger`` waits for it.

The only module of the package that imports Airflow (3.x, ``airflow.sdk``); nothing else
imports it, so ``import batch`` and the CLI work without Airflow installed. Install Airflow
in an environment of its own with ``pip install batchinfer`` (no engine extra): the engine
runs on the Ray cluster, or in the environment named by ``batchinfer_bin``. See
docs/airflow.md.

Idempotence: a task's run id is the job's name, the DAG run's logical date and a digest of
the spec's fingerprint and output path (``enrich-reviews-20260101-3f2a9c...``), so a retry, a
cleared task or a second DAG run for the same date finds the run already there: on a
cluster it attaches to the Ray job (or, after a failed attempt, submits one that resumes
from the output's markers); on the worker, ``batchinfer submit`` skips committed chunks and
waits for a run that holds the output. Output is never duplicated either way: a chunk is
committed exactly once.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import datetime
from typing import Any, ClassVar

from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowException, AirflowFailException
from airflow.triggers.base import BaseTrigger, TriggerEvent

from batch import cluster, orchestration
from batch.errors import BatchInferError, ConfigurationError, SpecError
from batch.spec import JobSpec

LOG_TAIL_LINES = 40  # of the remote job's log, shown when it failed
STOP_GRACE_S = 60.0  # for a local run to release its engines after SIGINT
# The trigger stops the job this long before Airflow's own timeout would abandon the wait.
DEADLINE_MARGIN_S = 60.0


class RayJobTrigger(BaseTrigger):
    """Polls a Ray job through the Jobs API until it is SUCCEEDED, FAILED or STOPPED, then
    fires one event ``{"state", "submission_id", "run_id", "address"}``; ``state`` is
    ``ERROR`` (with ``message``) when the cluster could not be asked, and ``TIMEOUT`` when
    ``deadline`` (epoch seconds) passed first: then the trigger has stopped the job itself,
    because Airflow calls no ``on_kill`` when a deferred task times out.

    Runs in the triggerer, which needs the cluster's token in its environment like the
    worker does (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN`` or ``RAY_AUTH_TOKEN_PATH``):
    the token is never part of the trigger's serialized arguments (they are stored in
    Airflow's database).
    """

    def __init__(
        self,
        *,
        address: str,
        submission_id: str,
        run_id: str,
        poll_interval: float = 10.0,
        max_poll_errors: int = 10,
        deadline: float | None = None,
    ) -> None:
        super().__init__()
        self.address = address
        self.submission_id = submission_id
        self.run_id = run_id
        self.poll_interval = poll_interval
        self.max_poll_errors = max_poll_errors
        self.deadline = deadline

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "address": self.address,
                "submission_id": self.submission_id,
                "run_id": self.run_id,
                "poll_interval": self.poll_interval,
                "max_poll_errors": self.max_poll_errors,
                "deadline": self.deadline,
            },
        )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        self.log.info("waiting for %s (run %s) on %s", self.submission_id, self.run_id,
                      self.address)  # fmt: skip
        result = await orchestration.watch_remote(
            self.address, self.submission_id, poll_interval=self.poll_interval,
            max_poll_errors=self.max_poll_errors, deadline=self.deadline, log=self.log,
        )  # fmt: skip
        yield TriggerEvent(
            {
                "submission_id": self.submission_id,
                "run_id": self.run_id,
                "address": self.address,
                **result,
            }
        )

    async def on_kill(self) -> None:
        """The user killed the deferred task (mark failed, clear): stop the Ray job too.
        Committed chunks are kept; the next try submits an attempt that resumes. Never
        raises: a cluster that cannot be reached is logged, not an error of the kill."""
        await orchestration.stop_quietly(self.address, self.submission_id, log=self.log)


class BatchInferOperator(BaseOperator):
    """Run a batchinfer job (``jobs/enrich.yaml``) from Airflow, exactly once per DAG run.

    :param job: The job file (YAML), on the worker. Templated.
    :param overrides: Spec overrides, ``{"output.path": "s3://b/out/dt={{ ds }}/"}`` (or a list
        of ``"a.b=value"``), applied like ``--set``. Templated: dates go into paths here.
    :param address: Where the job runs. ``http(s)://HEAD:8265``: on that Ray cluster through
        the Jobs API (deferrable). Empty/None: on this worker, by ``batchinfer submit`` in a
        subprocess (a local Ray that starts and stops with the job); ``ray://`` or ``auto``
        are passed to that subprocess as ``--address``. Templated.
    :param run_tag: What names the scheduled run in the run id. Default: the logical date
        (``20260101``, or ``20260101t063000`` off midnight). Templated.
    :param deferrable: With a cluster address, wait in the triggerer (needs one running)
        instead of holding a worker slot; ``False`` follows the job's log in the task.
        Either way ``execution_timeout`` stops the Ray job when it runs out.
    :param poll_interval: Seconds between state polls of the Ray job.
    :param wait: When another run holds the output, wait for it (else the task fails).
    :param batchinfer_bin: The ``batchinfer`` executable for local runs: one installed with
        an engine (``pip install batchinfer[gpu]`` or ``[cpu]``), e.g. ``/opt/bi/bin/batchinfer``.
        Templated.
    :param env_from_worker: With a cluster address: names of environment variables copied
        from the worker into the Ray job's environment (``--env-from-local``), e.g.
        ``["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"]``. Prefer the cluster's own identity.
    :param credentials_to_env: With a cluster address: send credentials written in the job's
        ``storage_options`` in the Ray job's environment (``--credentials-to-env``); without
        it such a job fails, as no credential is written into the job's files on the cluster.

    Returns (XCom ``return_value``) only the manifest's URI and the ledger's totals:
    ``manifest``, ``rows``, ``failed_rows``, ``input_tokens``, ``output_tokens``,
    ``run_cost_usd``, ``comparisons_best_batch_usd``, ``comparisons_best_batch``.
    """

    template_fields: Sequence[str] = ("job", "overrides", "address", "run_tag", "batchinfer_bin")
    template_fields_renderers: ClassVar[dict[str, str]] = {"overrides": "json"}
    ui_color = "#e8f0fe"

    def __init__(
        self,
        *,
        job: str,
        overrides: Mapping[str, Any] | Sequence[str] | None = None,
        address: str | None = None,
        run_tag: str | None = None,
        deferrable: bool = True,
        poll_interval: float = 10.0,
        wait: bool = True,
        batchinfer_bin: str = "batchinfer",
        env_from_worker: Sequence[str] = (),
        credentials_to_env: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.job = job
        self.overrides = overrides
        self.address = address
        self.run_tag = run_tag
        self.deferrable = deferrable
        self.poll_interval = poll_interval
        self.wait = wait
        self.batchinfer_bin = batchinfer_bin
        self.env_from_worker = list(env_from_worker)
        self.credentials_to_env = credentials_to_env
        self._remote: cluster.RemoteRun | None = None
        self._proc: subprocess.Popen[str] | None = None

    # ------------------------------------------------------------------ the task

    def execute(self, context: Any) -> dict[str, Any]:
        spec = self._spec()
        rid = self._run_id(spec, context)
        address = self._address()
        if address and cluster.is_jobs_api(address):
            return self._execute_remote(context, spec, rid, address)
        return self._execute_local(spec, rid, address)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> dict[str, Any]:
        """Back from the trigger: the Ray job has ended (or could not be asked about)."""
        spec = self._spec()
        self._remote = cluster.RemoteRun(
            event["address"], event["run_id"], event["submission_id"], attached=True
        )
        return self._finish_remote(spec, self._remote, event["state"], event.get("message"))

    def on_kill(self) -> None:
        """The task is being killed: stop what runs for it. Committed chunks are kept."""
        if self._remote is not None:
            self.log.info("stopping %s on %s", self._remote.submission_id, self._remote.address)
            with contextlib.suppress(BatchInferError):
                cluster.stop_remote(self._remote.address, self._remote.submission_id)
        proc = self._proc
        if proc is not None and proc.poll() is None:
            # Ctrl-C for batchinfer: it releases its engines and exits 130.
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()

    # ------------------------------------------------------------------ helpers

    def _spec(self) -> JobSpec:
        try:
            return orchestration.load_job(self.job, self.overrides)
        except SpecError as exc:  # a retry cannot fix a spec
            raise AirflowFailException(f"{self.job}: {exc}") from None

    def _run_id(self, spec: JobSpec, context: Any) -> str:
        try:
            tag = self.run_tag or orchestration.schedule_tag(
                context.get("logical_date"), context.get("run_id")
            )
            return orchestration.run_id_for(spec, tag)
        except ValueError as exc:
            raise AirflowFailException(f"run id: {exc}") from None

    def _address(self) -> str | None:
        return (self.address or "").strip() or None

    def _result(self, spec: JobSpec) -> dict[str, Any]:
        try:
            result = orchestration.result_summary(spec)
        except OSError as exc:
            raise AirflowException(
                f"the job finished but its output could not be read here "
                f"({orchestration.output_uri(spec)}): {exc}; the worker needs read access"
            ) from None
        except BatchInferError as exc:
            raise AirflowFailException(str(exc)) from None
        self.log.info("result: %s", result)
        return result

    # ------------------------------------------------------------------ on a Ray cluster

    def _execute_remote(
        self, context: Any, spec: JobSpec, rid: str, address: str
    ) -> dict[str, Any]:
        try:
            run = cluster.submit_remote(
                address, self.job, orchestration.overrides_list(self.overrides),
                run_id=rid, wait=self.wait, pass_env=self.env_from_worker,
                credentials_to_env=self.credentials_to_env,
            )  # fmt: skip
            state = cluster.remote_state(address, run.submission_id)
        except (SpecError, ConfigurationError) as exc:
            raise AirflowFailException(str(exc)) from None
        except BatchInferError as exc:  # the cluster could not be reached: retry later
            raise AirflowException(str(exc)) from None
        self._remote = run
        verb = "attached to" if run.attached else "submitted"
        self.log.info(
            "%s Ray job %s (run %s) on %s: %s", verb, run.submission_id, run.run_id, address, state
        )
        if state in cluster.TERMINAL:
            if state == "SUCCEEDED" and run.attached:
                self.log.info("run %s is already complete; nothing to run again", run.run_id)
            return self._finish_remote(spec, run, state)
        if self.deferrable:  # raises TaskDeferred; execute_complete takes over
            self.defer(
                trigger=RayJobTrigger(
                    address=address,
                    submission_id=run.submission_id,
                    run_id=run.run_id,
                    poll_interval=self.poll_interval,
                    deadline=self._deadline(context),
                ),
                method_name="execute_complete",
                # Airflow's own timeout only ends the wait (and calls no on_kill); the
                # trigger's deadline, a minute earlier, stops the job. This one is the backstop
                # for a triggerer that is down.
                timeout=self.execution_timeout,
            )
        try:
            state = self._follow(run)
        except BaseException:
            # Interrupted while following (execution_timeout raises inside execute, SIGTERM):
            # do not leave the job running behind the task. Committed chunks are kept.
            self.log.warning("stopping %s: the task ended while it runs", run.submission_id)
            with contextlib.suppress(BatchInferError):
                cluster.stop_remote(run.address, run.submission_id)
            raise
        return self._finish_remote(spec, run, state)

    def _deadline(self, context: Any) -> float | None:
        """When the trigger must stop the job: ``execution_timeout`` after the task started,
        less a margin so it acts before Airflow's own timeout abandons the wait."""
        if self.execution_timeout is None:
            return None
        ti = context.get("ti") if hasattr(context, "get") else None
        started = getattr(ti, "start_date", None)
        start = started.timestamp() if isinstance(started, datetime) else time.time()
        budget = self.execution_timeout.total_seconds()
        margin = min(DEADLINE_MARGIN_S + self.poll_interval, budget / 2)
        return start + budget - margin

    def _follow(self, run: cluster.RemoteRun) -> str:
        """Not deferred: copy the job's log into the task log until it ends; its final state."""
        try:
            for line in cluster.tail_logs(run.address, run.submission_id):
                if line.strip():
                    self.log.info("%s", line)
        except BatchInferError as exc:
            self.log.warning("following %s's log failed (%s); polling", run.submission_id, exc)
        while True:  # the log ends with the job; its state may lag a moment behind
            try:
                state = cluster.remote_state(run.address, run.submission_id)
            except BatchInferError as exc:
                self.log.warning("asking about %s failed: %s", run.submission_id, exc)
                state = ""
            if state in cluster.TERMINAL:
                return state
            time.sleep(self.poll_interval)

    def _finish_remote(
        self, spec: JobSpec, run: cluster.RemoteRun, state: str, message: str | None = None
    ) -> dict[str, Any]:
        if state == "SUCCEEDED":
            self._log_tail(run, lines=3)  # the job's own summary line
            return self._result(spec)
        if state == orchestration.ERROR:
            raise AirflowException(
                f"could not follow {run.submission_id} on {run.address}: {message}; the job may "
                "still be running: a retry attaches to it"
            )
        if state == orchestration.TIMEOUT:
            raise AirflowException(
                f"{run.submission_id} (run {run.run_id}) ran past execution_timeout "
                f"({self.execution_timeout}): {message}; committed chunks are kept and a retry "
                "resumes"
            )
        tail = self._log_tail(run, lines=LOG_TAIL_LINES, echo=False)
        raise AirflowException(
            f"{run.submission_id} (run {run.run_id}) {state} on {run.address}; committed chunks "
            f"are kept and a retry resumes. Last lines of its log:\n{tail}"
        )

    def _log_tail(self, run: cluster.RemoteRun, *, lines: int, echo: bool = True) -> str:
        try:
            text = cluster.remote_logs(run.address, run.submission_id)
        except BatchInferError as exc:
            return f"(its log could not be read: {exc})"
        tail = "\n".join(ln for ln in text.splitlines() if ln.strip())
        tail = "\n".join(tail.splitlines()[-lines:])
        if echo and tail:
            self.log.info("%s log (last lines):\n%s", run.submission_id, tail)
        return tail

    # ------------------------------------------------------------------ on this worker

    def _execute_local(self, spec: JobSpec, rid: str, address: str | None) -> dict[str, Any]:
        cmd = orchestration.local_command(
            self.batchinfer_bin, self.job, self.overrides, address=address, wait=self.wait
        )
        self.log.info("run %s on this worker: %s", rid, subprocess.list2cmdline(cmd))
        try:
            self._proc = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
            )
        except OSError as exc:
            raise AirflowFailException(
                f"cannot run {self.batchinfer_bin!r} ({exc}): set batchinfer_bin to the "
                "batchinfer of an environment with an engine (pip install 'batchinfer[cpu]')"
            ) from None
        assert self._proc.stdout is not None
        for line in self._proc.stdout:  # JSON lines: progress, then the summary
            self.log.info("%s", line.rstrip())
        code = self._proc.wait()
        self._proc = None
        if code == orchestration.EXIT_OK:
            return self._result(spec)
        reason = orchestration.describe_exit(code)
        if code == orchestration.EXIT_SPEC:
            raise AirflowFailException(f"batchinfer exited {code}: {reason}")
        raise AirflowException(f"batchinfer exited {code}: {reason}")


__all__ = ["BatchInferOperator", "RayJobTrigger"]
