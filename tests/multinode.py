"""A local multi-node Ray cluster for tests and benchmarks: a head and worker nodes, each its
own ``ray start`` (own raylet, object store and workers) on this machine, each declaring GPUs
it does not have. Ray Data schedules against them exactly as on a real fleet.

Every process of a worker node carries ``NODE_MARKER=<its tag>`` in its environment (the
raylet hands its environment to the workers it starts), so :meth:`Node.kill` can end the node
the way a spot reclaim does: SIGKILL to its raylet, object store, agents and every worker and
engine on it, at once. Every node also carries the head's marker, so stopping the head
reaps whatever a node left behind.

Usage::

    with local_cluster(tmp, workers=2, gpus_per_node=2) as cluster:
        cluster.nodes["w1"].kill()
        cluster.add_node("w3")
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import realparts
from tests.raycluster import (
    HOST,
    RayHead,
    RayHeadError,
    _free_ports,
    _tail,
    pids_with,
    ray_head,
)

NODE_MARKER = "BATCHINFER_TEST_RAY_NODE"
# Node loss is noticed in about 3 s, not Ray's default 15 s or more (a spot reclaim's raylet
# does not say goodbye either; only the health check finds it).
FAST_HEALTH_CHECK = {
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
    "RAY_health_check_initial_delay_ms": "1000",
}
NODE_READY_TIMEOUT_S = 90.0


@dataclass
class Node:
    """A worker node: its ``ray start --block`` process and the tag its processes carry."""

    name: str
    tag: str
    process: subprocess.Popen[bytes]
    log_path: Path
    num_gpus: int
    node_id: str = ""
    killed_at: float | None = None

    def pids(self) -> list[int]:
        return pids_with(NODE_MARKER, self.tag)

    def kill(self) -> float:
        """SIGKILL every process of the node until none is left; returns when it was done
        (unix time of the first signal)."""
        first = time.time()
        deadline = time.monotonic() + 20
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        if self.pids():
            raise RuntimeError(f"node {self.name} still has processes: {self.pids()}")
        self.killed_at = first
        return first

    def log_tail(self, lines: int = 40) -> str:
        return _tail(self.log_path, lines)


@dataclass
class LocalCluster:
    head: RayHead
    tmp_dir: Path
    head_gpus: int
    nodes: dict[str, Node] = field(default_factory=dict)
    head_node_id: str = ""

    # ------------------------------------------------------------------ nodes

    def add_node(self, name: str, *, num_gpus: int = 2, num_cpus: float = 1) -> Node:
        """Start a worker node and wait until the cluster counts it alive (one retry: on a
        loaded machine a raylet can miss `ray start`'s fixed 30 s to register)."""
        try:
            return self.wait_joined(self.start_node(name, num_gpus=num_gpus, num_cpus=num_cpus))
        except RayHeadError:
            self.nodes[name].kill()
            return self.wait_joined(self.start_node(name, num_gpus=num_gpus, num_cpus=num_cpus))

    def start_node(self, name: str, *, num_gpus: int = 2, num_cpus: float = 1) -> Node:
        """Start a worker node (``wait_joined`` waits for it)."""
        ray = realparts.ray_binary()
        names = ("node_manager", "object_manager", "agent_listen", "agent_grpc",
                 "runtime_env_agent", "metrics_export")  # fmt: skip
        for _ in range(100):
            ports = dict(zip(names, _free_ports(len(names)), strict=True))
            lo = _free_ports(1)[0]
            if lo + 100 <= 65535 and not any(lo <= p <= lo + 100 for p in ports.values()):
                break
        tag = f"{self.head.marker}-{name}"
        env = {**self.head.proc_env, NODE_MARKER: tag}
        args = [
            str(ray), "start", "--block", f"--address={self.head.gcs_address}",
            "--disable-usage-stats", f"--node-ip-address={HOST}",
            f"--node-manager-port={ports['node_manager']}",
            f"--object-manager-port={ports['object_manager']}",
            f"--dashboard-agent-listen-port={ports['agent_listen']}",
            f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
            f"--runtime-env-agent-port={ports['runtime_env_agent']}",
            f"--metrics-export-port={ports['metrics_export']}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 100}",
            f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}",
            f"--object-store-memory={256 * 1024**2}",
            f"--resources={json.dumps({self.resource(name): 1})}",
        ]  # fmt: skip
        log_path = self.tmp_dir / f"ray-node-{name}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        node = Node(name=name, tag=tag, process=proc, log_path=log_path, num_gpus=num_gpus)
        self.nodes[name] = node
        return node

    def wait_joined(self, node: Node) -> Node:
        name, proc = node.name, node.process
        deadline = time.monotonic() + NODE_READY_TIMEOUT_S
        while not node.node_id:
            if proc.poll() is not None:
                raise RayHeadError(f"node {name}: ray start exited {proc.returncode}:\n"
                                   f"{node.log_tail()}")  # fmt: skip
            if time.monotonic() > deadline:
                raise RayHeadError(f"node {name} did not join in time:\n{node.log_tail()}")
            node.node_id = self._node_id_with(self.resource(name))
            time.sleep(0.5)
        return node

    @staticmethod
    def resource(name: str) -> str:
        return f"fleet-node-{name}"

    # ------------------------------------------------------------------ the state API

    def state(self, what: str, **params: str) -> list[dict[str, Any]]:
        """``GET /api/v0/<what>`` of the head's state API (nodes, actors...)."""
        query = "&".join(f"{k}={v}" for k, v in {"limit": "10000", **params}.items())
        req = urllib.request.Request(
            f"{self.head.address}/api/v0/{what}?{query}", headers=self.head.headers()
        )
        with urllib.request.urlopen(req, timeout=20) as resp:
            doc = json.loads(resp.read())
        result: list[dict[str, Any]] = doc["data"]["result"]["result"]
        return result

    def _node_id_with(self, resource: str) -> str:
        try:
            nodes = self.state("nodes", detail="true")
        except OSError:
            return ""
        for n in nodes:
            if n.get("state") == "ALIVE" and resource in (n.get("resources_total") or {}):
                return str(n["node_id"])
        return ""

    def alive_node_ids(self) -> set[str]:
        return {str(n["node_id"]) for n in self.state("nodes") if n.get("state") == "ALIVE"}

    def node_names(self) -> dict[str, str]:
        """node id -> name (``head`` for the head)."""
        out = {n.node_id: name for name, n in self.nodes.items() if n.node_id}
        out[self.head_node_id] = "head"
        return out

    def engine_actors(self) -> list[dict[str, Any]]:
        """Ray Data's map-worker actors (the engine replicas), every state."""
        return [
            a for a in self.state("actors", detail="true")
            if "MapWorker" in str(a.get("class_name", ""))
        ]  # fmt: skip

    def wait_dead(self, node: Node, timeout: float = 60) -> float:
        """Wait until the cluster has noticed a killed node; returns the seconds it took."""
        t0 = time.monotonic()
        while node.node_id in self.alive_node_ids():
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"node {node.name} still alive {timeout}s after its kill")
            time.sleep(0.3)
        return time.monotonic() - t0

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.killed_at is None and node.process.poll() is None:
                node.process.send_signal(signal.SIGTERM)
        for node in self.nodes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.process.wait(20)
            for pid in node.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def local_cluster(
    tmp_dir: Path,
    *,
    workers: int = 2,
    gpus_per_node: int = 2,
    head_cpus: int = 2,
    worker_cpus: float = 1,
    head_gpus: int | None = None,
) -> Iterator[LocalCluster]:
    """A head (``gpus_per_node`` GPUs unless ``head_gpus``) and ``workers`` worker nodes
    named w1, w2, ... (``gpus_per_node`` GPUs, ``worker_cpus`` CPUs each), fast node-loss
    detection; everything is stopped after."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    gpus = gpus_per_node if head_gpus is None else head_gpus
    with ray_head(
        tmp_dir, num_cpus=head_cpus, num_gpus=gpus, extra_env=FAST_HEALTH_CHECK,
        resources={LocalCluster.resource("head"): 1},
    ) as head:  # fmt: skip
        cluster = LocalCluster(head=head, tmp_dir=tmp_dir, head_gpus=gpus)
        try:
            deadline = time.monotonic() + NODE_READY_TIMEOUT_S
            while not cluster.head_node_id:
                cluster.head_node_id = cluster._node_id_with(LocalCluster.resource("head"))
                if time.monotonic() > deadline:
                    raise RayHeadError(f"the head node is not listed:\n{head.log_tail()}")
                time.sleep(0.3)
            # One at a time: `ray start` gives a raylet 30 s to register, which a busy
            # 2-core machine can miss when several start at once.
            for i in range(1, workers + 1):
                cluster.add_node(f"w{i}", num_gpus=gpus_per_node, num_cpus=worker_cpus)
            yield cluster
        finally:
            cluster.stop()
