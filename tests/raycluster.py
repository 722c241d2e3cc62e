"""A real Ray cluster for tests: ``ray start --head`` on 127.0.0.1, on free ports.

Why a real head: ``batchinfer submit --address http://...`` goes through the Ray Jobs API
(the dashboard's HTTP server, runtime-env packaging, the job supervisor, log tailing); a
mock would only echo our own assumptions about them.

The head runs from this interpreter's venv, with token authentication on (Ray's default
for a head with a dashboard) and a token of its own in the cluster's temporary folder, so
it neither reads nor writes ``~/.ray/auth_token``. A client reaches it with ``RayHead.env``
in its environment (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``), exactly as a user
would. Every port the head opens is chosen here, on 127.0.0.1 only, so the head never meets
another test's Ray (nor the default ports 6379, 8265, 10001, 52365).

Stopping: ``ray stop`` ends every Ray on the machine, other people's too, so it is not used.
The head runs as ``ray start --block`` in a session of its own; stopping it sends SIGTERM
(``--block`` then ends the processes it started), and any process left that carries this
head's marker in its environment (workers, job drivers, engine processes) is killed.

Usage (e.g. from a conftest)::

    @pytest.fixture(scope="session")
    def ray_cluster(tmp_path_factory):
        with ray_head(tmp_path_factory.mktemp("ray")) as head:
            yield head
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests import realparts

HOST = "127.0.0.1"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 30.0
MARKER = "BATCHINFER_TEST_RAY_HEAD"  # env var every process of one head inherits


class RayHeadError(RuntimeError):
    """The head did not come up (the message carries the tail of its log)."""


@dataclass
class RayHead:
    """A running Ray head and what a client needs to reach it."""

    address: str  # the Jobs API: http://127.0.0.1:<dashboard port>
    gcs_address: str  # 127.0.0.1:<gcs port>, for ray.init(address=...) on this machine
    env: dict[str, str]  # add to a client's environment: RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH
    temp_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    ports: dict[str, int] = field(default_factory=dict)
    marker: str = ""  # MARKER's value in every process of this head (and of its worker nodes)
    proc_env: dict[str, str] = field(default_factory=dict)  # the environment `ray start` had

    def client_env(self) -> dict[str, str]:
        """This process's environment plus :attr:`env`, for a client subprocess."""
        return {**os.environ, **self.env}

    def headers(self) -> dict[str, str]:
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def jobs(self) -> list[dict[str, object]]:
        """Every job the head knows (GET /api/jobs/), as plain dicts."""
        req = urllib.request.Request(f"{self.address}/api/jobs/", headers=self.headers())
        with urllib.request.urlopen(req, timeout=10) as resp:
            jobs: list[dict[str, object]] = json.loads(resp.read())
        return jobs

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def pids_with(name: str, value: str) -> list[int]:
    """Processes (not zombies) whose environment has ``name=value``."""
    needle = f"{name}={value}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().split(") ", 1)[1].startswith("Z"):
                continue
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except (OSError, IndexError):
            continue
    return pids


def marked_pids(marker_value: str) -> list[int]:
    """Processes (not zombies) whose environment carries this head's marker."""
    return pids_with(MARKER, marker_value)


def _jobs_api_ready(address: str, headers: dict[str, str]) -> bool:
    req = urllib.request.Request(f"{address}/api/jobs/", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, TimeoutError):
        return False


@contextlib.contextmanager
def ray_head(
    tmp_dir: Path,
    *,
    num_cpus: int = 2,
    num_gpus: int = 0,
    extra_env: dict[str, str] | None = None,
    resources: dict[str, float] | None = None,
) -> Iterator[RayHead]:
    """Start a Ray head on 127.0.0.1, wait until its Jobs API answers, stop it after.

    ``tmp_dir`` holds the head's log and token; Ray's own session folder goes to a short path
    under the system temp folder (Unix socket paths are limited to 107 bytes) and is removed.
    No ``ray`` CLI skips the test, or fails it under CI (tests/realparts.py).
    ``num_gpus`` declares GPUs the machine need not have (Ray schedules against them);
    ``extra_env`` reaches every process of the head (e.g. ``RAY_health_check_*``);
    ``resources`` are custom resources of the head node. tests/multinode.py adds worker nodes.
    """
    ray = realparts.ray_binary()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    temp_dir = Path(tempfile.mkdtemp(prefix="bi-ray-"))
    token_path = tmp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    names = ("gcs", "dashboard", "client", "agent_listen", "agent_grpc", "runtime_env_agent",
             "metrics_export", "node_manager", "object_manager")  # fmt: skip
    # The worker port range (201 ports) must not hold any of the other ports, or `ray start`
    # refuses ("... is trying to use a port number ... used by other components"): a 6%
    # chance per draw with 9 ports in the ephemeral range, so draw again until they are apart.
    for _ in range(100):
        ports = dict(zip(names, _free_ports(len(names)), strict=True))
        worker_lo = _free_ports(1)[0]
        if worker_lo + 200 <= 65535 and not any(
            worker_lo <= p <= worker_lo + 200 for p in ports.values()
        ):
            break
    marker = temp_dir.name
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    env = {
        **os.environ,
        **client_env,
        MARKER: marker,
        "RAY_USAGE_STATS_ENABLED": "0",
        # SIGTERM ends the head at once (no Serve replicas to drain; 30 s by default).
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        # As if the venv were activated: a job's entrypoint `python` is this interpreter.
        "PATH": os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", ""))),
        **(extra_env or {}),
    }
    env.pop("RAY_ADDRESS", None)
    args = [
        str(ray), "start", "--head", "--block", "--disable-usage-stats",
        f"--node-ip-address={HOST}", f"--dashboard-host={HOST}",
        f"--port={ports['gcs']}", f"--dashboard-port={ports['dashboard']}",
        f"--ray-client-server-port={ports['client']}",
        f"--dashboard-agent-listen-port={ports['agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        f"--metrics-export-port={ports['metrics_export']}",
        f"--node-manager-port={ports['node_manager']}",
        f"--object-manager-port={ports['object_manager']}",
        f"--min-worker-port={worker_lo}", f"--max-worker-port={worker_lo + 200}",
        f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
        f"--object-store-memory={512 * 1024**2}", f"--temp-dir={temp_dir}",
        *([f"--resources={json.dumps(resources)}"] if resources else []),
    ]  # fmt: skip
    log_path = tmp_dir / "ray-head.log"
    log = log_path.open("wb")
    proc = subprocess.Popen(
        args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    head = RayHead(
        address=f"http://{HOST}:{ports['dashboard']}",
        gcs_address=f"{HOST}:{ports['gcs']}",
        env=client_env,
        temp_dir=temp_dir,
        log_path=log_path,
        process=proc,
        ports=ports,
        marker=marker,
        proc_env=env,
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        headers = head.headers()
        while not _jobs_api_ready(head.address, headers):
            if proc.poll() is not None:
                raise RayHeadError(f"ray start exited {proc.returncode}:\n{head.log_tail()}")
            if time.monotonic() > deadline:
                raise RayHeadError(f"the Jobs API did not answer in time:\n{head.log_tail()}")
            time.sleep(0.5)
        yield head
    finally:
        _stop(proc, marker)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes], marker: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # Workers, job drivers and engine processes of this head that outlived it.
    deadline = time.monotonic() + 5
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in marked_pids(marker):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
