"""The Batch API server's batches as batchinfer jobs: start, watch, cut short, finish.

A :class:`Supervisor` thread drives every unfinished batch of the store through OpenAI's
states: ``validating`` (the file is read: no requests, a custom_id twice -> ``failed``),
``in_progress`` (``batchinfer submit`` runs the job in a subprocess, locally or with
``--address`` on a Ray cluster; a run that fails other than on its spec is started again, up
to JOB_ATTEMPTS runs, resume keeping what was committed), then ``completed`` (the job's
openai/output.jsonl and errors.jsonl become the batch's files), ``failed`` (the job failed:
its last line), ``expired`` (past ``expires_at``: the job is stopped, requests not done go
to the error file as ``batch_expired``) or, after a cancel, ``cancelling`` -> ``cancelled``
(the same, as ``batch_cancelled``). Jobs start in creation order, ``max_running`` at once.

Everything it knows is in the store (:mod:`batch.serve_state`), so a restarted server picks
up where the last one stopped: a batch still ``in_progress`` is submitted again and
batchinfer's resume runs only the chunks not committed (exactly once). Child jobs die with the
server (``PR_SET_PDEATHSIG``), so a killed server leaves no job writing behind its back.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from batch import openai_files, request_files, storage, store
from batch.errors import SpecError
from batch.serve_state import TERMINAL, Store
from batch.spec import JobSpec

log = logging.getLogger(__name__)

MAX_REQUESTS = 50_000  # OpenAI's cap per batch file
JOB_ATTEMPTS = 3  # runs of a batch's job that fail (exit code other than 2) before the batch does
STOP_GRACE_S = 60.0  # after SIGINT, seconds before the job is killed
_CUT_SHORT = {
    "expired": ("batch_expired",
                "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was not executed: the batch was cancelled."),
}  # fmt: skip

# Run batchinfer with the parent-death signal set, so the job ends with the server. The
# check after prctl closes the race of a parent that died before it.
_PRELUDE = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(143)\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'batch.cli', *sys.argv[2:]])\n"
)


@dataclass
class Running:
    """A job subprocess of a batch."""

    proc: subprocess.Popen[bytes]
    log_path: Path
    stop_sent_at: float | None = None


@dataclass
class Supervisor:
    """Drives the store's unfinished batches (see the module docstring)."""

    store: Store
    bases: Mapping[str, Mapping[str, Any]]  # endpoint -> base job (raw YAML mapping)
    address: str | None = None
    max_running: int = 1
    poll_s: float = 1.0
    clock: Callable[[], float] = time.time
    lock: threading.RLock = field(default_factory=threading.RLock)
    _running: dict[str, Running] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _halt: threading.Event = field(default_factory=threading.Event)
    _workdir: Path | None = None
    _active: set[str] = field(default_factory=set)  # ids of unfinished batches (cache of the store)

    # ------------------------------------------------------------------ life

    def start(self) -> None:
        self._workdir = Path(tempfile.mkdtemp(prefix="batchinfer-serve-"))
        self._active = {b["id"] for b in self.store.batches() if b["status"] not in TERMINAL}
        self._halt.clear()
        self._thread = threading.Thread(target=self._loop, name="batch-supervisor", daemon=True)
        self._thread.start()

    def stop(self, grace: float = 30.0) -> None:
        """Stop watching; ask running jobs to stop (they resume when a server starts again)."""
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=grace + 5)

    def _loop(self) -> None:
        while not self._halt.is_set():
            try:
                self.tick()
            except Exception:  # a bad tick must not end the server's supervision
                log.exception("supervisor tick failed")
            self._halt.wait(self.poll_s)
        for run in self._running.values():
            with contextlib.suppress(ProcessLookupError):
                run.proc.send_signal(signal.SIGINT)
        deadline = time.time() + 30
        for run in self._running.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                run.proc.wait(max(0.1, deadline - time.time()))
            if run.proc.poll() is None:
                run.proc.kill()

    # ------------------------------------------------------------------ one pass

    def watch(self, batch_id: str) -> None:
        """A batch just created (the API's call): drive it from the next pass on."""
        self._active.add(batch_id)

    def tick(self) -> None:
        """One pass over the unfinished batches: start, watch, stop, finish."""
        records = [self.store.batch(b) for b in sorted(self._active)]
        active = [b for b in records if b is not None and b["status"] not in TERMINAL]
        active.sort(key=lambda b: (b["created_at"], b["id"]))
        self._active &= {b["id"] for b in active}
        for record in active:
            self._step(record["id"])
        started = [b["id"] for b in active if b["id"] in self._running]
        for record in active:
            if len(started) >= self.max_running:
                break
            fresh = self.store.batch(record["id"])
            if fresh and fresh["status"] == "in_progress" and fresh["id"] not in self._running:
                self._launch(fresh)
                started.append(fresh["id"])

    def _step(self, batch_id: str) -> None:
        with self.lock:
            record = self.store.batch(batch_id)
            if record is None or record["status"] in TERMINAL:
                return
            now = self.clock()
            status = record["status"]
            if status == "validating":
                self._validate(record, now)
                return
            run = self._running.get(batch_id)
            if status == "in_progress" and now >= float(record["expires_at"]):
                record["stop_reason"] = "expired"
                self.store.save_batch(record)
            if status == "cancelling" or record.get("stop_reason"):
                if run is None or run.proc.poll() is not None:
                    self._running.pop(batch_id, None)
                    reason = "cancelled" if status == "cancelling" else "expired"
                    self._cut_short(record, reason, now)
                else:
                    self._stop(run)
                return
            if run is None or run.proc.poll() is None:
                return
            self._running.pop(batch_id)
            self._finished(record, run, now)

    # ------------------------------------------------------------------ states

    def _validate(self, record: dict[str, Any], now: float) -> None:
        problem = self._check_input(record)
        if problem is not None:
            code, message, line = problem
            record.update(status="failed", failed_at=int(now), errors={"object": "list",
                          "data": [{"code": code, "message": message, "param": None,
                                    "line": line}]})  # fmt: skip
        else:
            record.update(status="in_progress", in_progress_at=int(now))
        self.store.save_batch(record)

    def _check_input(self, record: dict[str, Any]) -> tuple[str, str, int | None] | None:
        meta = self.store.file(str(record["input_file_id"]))
        if meta is None:
            return "file_not_found", "The input file is gone.", None
        seen: dict[str, int] = {}
        count = 0
        for number, raw in enumerate(self.store.file_bytes(meta).splitlines(), start=1):
            if not raw.strip():
                continue
            count += 1
            try:
                doc = json.loads(raw)
            except ValueError:
                continue  # a malformed line is that request's failure, not the batch's
            cid = doc.get("custom_id") if isinstance(doc, dict) else None
            if isinstance(cid, str):
                if cid in seen:
                    return ("duplicate_custom_id", f"The custom_id {cid!r} is used on line "
                            f"{seen[cid]} and line {number}; each request needs its own.",
                            number)  # fmt: skip
                seen[cid] = number
        if count == 0:
            return "empty_file", "The input file has no requests.", None
        if count > MAX_REQUESTS:
            message = f"The file has {count} requests; at most {MAX_REQUESTS} a batch."
            return "too_many_requests", message, None
        record["total"] = count
        return None

    def _finished(self, record: dict[str, Any], run: Running, now: float) -> None:
        code = run.proc.returncode
        spec = self.spec(record)
        counts = request_counts(spec, int(record.get("total") or 0))
        if code == 0 and (files := self._job_files(record, spec)) is not None:
            record.update(status="completed", finalizing_at=int(now), completed_at=int(now),
                          request_counts=counts, **files)  # fmt: skip
        elif code != 2 and int(record.get("job_attempts") or 1) < JOB_ATTEMPTS:
            # a failure a spec cannot explain (a Ray start timed out, a node lost): run the
            # job again; resume makes that safe, committed chunks are not redone
            record["job_attempts"] = int(record.get("job_attempts") or 1) + 1
            log.warning("batch %s: job exited %s, starting it again: %s", record["id"], code,
                        last_error(run.log_path))  # fmt: skip
        else:
            message = last_error(run.log_path) or f"the job exited with code {code}"
            record.update(status="failed", failed_at=int(now), request_counts=counts,
                          errors={"object": "list", "data": [{"code": "job_failed",
                                  "message": message, "param": None, "line": None}]})  # fmt: skip
        self.store.save_batch(record)

    def _job_files(self, record: Mapping[str, Any], spec: JobSpec) -> dict[str, Any] | None:
        """output_file_id and error_file_id of a completed job (None if its files are not
        there: the job did not finish)."""
        fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
        out: dict[str, Any] = {}
        for kind, name in (("output", openai_files.OUTPUT), ("error", openai_files.ERRORS)):
            path = storage.join(root, name)
            if not storage.exists(fs, path):
                return None
            size = int(fs.size(path))
            out[f"{kind}_file_id"] = self._file_record(
                record, kind, f"{record['output']}/{name}", size
            ) if size else None  # fmt: skip
        return out

    def _file_record(self, record: Mapping[str, Any], kind: str, location: str, size: int) -> str:
        file_id = f"file-{record['id'].removeprefix('batch_')}-{kind}"
        self.store.add_file_record(
            {"id": file_id, "object": "file", "bytes": size, "created_at": int(self.clock()),
             "filename": f"batch_{record['id']}_{kind}.jsonl", "purpose": "batch_output",
             "status": "processed", "owner": record["owner"], "location": location}
        )  # fmt: skip
        return file_id

    def _cut_short(self, record: dict[str, Any], reason: str, now: float) -> None:
        """A stopped batch: its committed requests in the output file, the rest in the error
        file with the reason's code."""
        spec = self.spec(record)
        code, message = _CUT_SHORT[reason]
        meta = self.store.file(str(record["input_file_id"]))
        raw = self.store.file_bytes(meta) if meta else b""
        ok, errors = cut_short_lines(spec, raw, code, message)
        files = {}
        for kind, lines in (("output", ok), ("error", errors)):
            location = f"batches/{record['id']}/files/{kind}.jsonl"
            body = "".join(line + "\n" for line in lines).encode()
            self.store.write(location, body)
            files[f"{kind}_file_id"] = (
                self._file_record(record, kind, location, len(body)) if lines else None
            )
        record.update(status=reason, **{f"{reason}_at": int(now)}, **files,
                      request_counts={"total": len(ok) + len(errors), "completed": len(ok),
                                      "failed": len(errors)})  # fmt: skip
        self.store.save_batch(record)

    # ------------------------------------------------------------------ jobs

    def spec(self, record: Mapping[str, Any]) -> JobSpec:
        base = self.bases[str(record["endpoint"])]
        meta = self.store.file(str(record["input_file_id"])) or {"location": "missing"}
        return request_files.spec_for(
            base,
            name=str(record["id"]),
            input_path=self.store.url_of(str(meta["location"])),
            output_path=self.store.url_of(str(record["output"])),
            storage_options=self.store.storage_options,
            source=f"the job of {record['id']}",
        )

    def _launch(self, record: dict[str, Any]) -> None:
        assert self._workdir is not None
        try:
            spec = self.spec(record)
        except SpecError as exc:
            record.update(status="failed", failed_at=int(self.clock()),
                          errors={"object": "list", "data": [{"code": "job_failed",
                                  "message": str(exc), "param": None, "line": None}]})  # fmt: skip
            self.store.save_batch(record)
            return
        job = self._workdir / f"{record['id']}.yaml"
        fd = os.open(job, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # may hold credentials
        with os.fdopen(fd, "w") as fh:
            yaml.safe_dump(spec.model_dump(mode="json"), fh, sort_keys=False)
        log_path = self._workdir / f"{record['id']}.log"
        args = ["submit", str(job), "--quiet", "--wait"]
        if self.address:
            args += ["--address", self.address]
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-c", _PRELUDE, str(os.getpid()), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        log.info("batch %s: job started (pid %d)", record["id"], proc.pid)
        self._running[record["id"]] = Running(proc, log_path)

    def _stop(self, run: Running) -> None:
        """Ctrl-C for the job (it releases its engines; on a cluster it stops the Ray job),
        then a kill if it has not ended after the grace period."""
        if run.stop_sent_at is None:
            run.stop_sent_at = time.time()
            with contextlib.suppress(ProcessLookupError):
                run.proc.send_signal(signal.SIGINT)
        elif time.time() - run.stop_sent_at > STOP_GRACE_S:
            run.proc.kill()

    def is_running(self, batch_id: str) -> bool:
        run = self._running.get(batch_id)
        return run is not None and run.proc.poll() is None


# --------------------------------------------------------------------------- figures


def request_counts(spec: JobSpec, total: int) -> dict[str, int]:
    """OpenAI's request_counts from the job's markers: rows answered, rows failed."""
    try:
        t = store.totals(store.read_markers(spec))
    except FileNotFoundError:
        return {"total": total, "completed": 0, "failed": 0}
    return {"total": max(total, t.rows + t.failed_rows), "completed": t.rows,
            "failed": t.failed_rows}  # fmt: skip


def cut_short_lines(
    spec: JobSpec, raw: bytes, code: str, message: str
) -> tuple[list[str], list[str]]:
    """The output and error lines of a job stopped before the end: the committed requests as
    the job would write them, then every request not committed with ``code``."""
    fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    job = store.read_job_record(fs, root)
    fingerprint = str(job["fingerprint"]) if job else spec.fingerprint()
    markers = store.read_markers(spec) if job else []
    ok: list[str] = []
    errors: list[str] = []
    for succeeded, line in openai_files.output_lines(spec, markers, fingerprint):
        (ok if succeeded else errors).append(line)
    done = {int(r.get("_line") or 0) for r in openai_files.requests_in_order(spec, markers)}
    for number, line_raw in enumerate(raw.split(b"\n"), start=1):
        if not line_raw.strip() or number in done:
            continue
        try:
            doc = json.loads(line_raw)
        except ValueError:
            doc = None
        cid = doc.get("custom_id") if isinstance(doc, dict) else None
        tag = str(cid) if cid is not None else f"line {number}"
        line_id = (
            "batch_req_"
            + hashlib.blake2b(f"{fingerprint}\0cut\0{tag}".encode(), digest_size=12).hexdigest()
        )
        errors.append(json.dumps({"id": line_id, "custom_id": cid, "response": None,
                                  "error": {"code": code, "message": message}},
                                 separators=(",", ":")))  # fmt: skip
    return ok, errors


def last_error(log_path: Path) -> str | None:
    """The job's last ``error:`` line (batchinfer's one-line reason), else its last line."""
    try:
        lines = [ln.strip() for ln in log_path.read_text(errors="replace").splitlines()]
    except OSError:
        return None
    lines = [ln for ln in lines if ln]
    for ln in reversed(lines):
        if ln.startswith("error:"):
            return ln.removeprefix("error:").strip()[:1000]
    return lines[-1][:1000] if lines else None
