"""Start a local multi-node Ray cluster (tests/multinode.py) and keep it up until Ctrl-C.

A head and ``--workers`` worker nodes, each its own ``ray start`` on 127.0.0.1 with
``--gpus`` declared GPUs (the machine needs none), token authentication on. Prints the Jobs
API address and the environment a client needs, e.g.::

    .venv/bin/python scripts/local_fleet.py --workers 2 --gpus 2
    # in another shell, with the printed environment:
    batchinfer submit job.yaml --address http://127.0.0.1:<port>   # device: gpu, engine: sim

Type ``kill <node>`` and Enter to SIGKILL every process of a worker node (a spot reclaim),
``add <node>`` to start one more, ``nodes`` to list them, ``quit`` (or Ctrl-C) to stop all.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.multinode import local_cluster


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--gpus", type=int, default=2, help="declared GPUs per node")
    ap.add_argument("--worker-cpus", type=float, default=1)
    ap.add_argument("--dir", type=Path, default=None)
    args = ap.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="local-fleet-"))
    with local_cluster(
        folder, workers=args.workers, gpus_per_node=args.gpus, worker_cpus=args.worker_cpus
    ) as cluster:
        print(f"Jobs API: {cluster.head.address}   GCS: {cluster.head.gcs_address}")
        print("client environment: " + " ".join(f"{k}={v}" for k, v in cluster.head.env.items()))
        print(f"nodes: head {cluster.head_node_id[:12]}, "
              + ", ".join(f"{n} {x.node_id[:12]}" for n, x in cluster.nodes.items()))  # fmt: skip
        try:
            for line in sys.stdin:
                cmd, _, name = line.strip().partition(" ")
                if cmd == "kill" and name in cluster.nodes:
                    node = cluster.nodes[name]
                    node.kill()
                    print(f"{name} killed; noticed in {cluster.wait_dead(node):.1f}s")
                elif cmd == "add" and name:
                    node = cluster.add_node(name, num_gpus=args.gpus, num_cpus=args.worker_cpus)
                    print(f"{name} joined as {node.node_id[:12]}")
                elif cmd == "nodes":
                    print(sorted(cluster.node_names().values()))
                elif cmd == "quit":
                    break
                else:
                    print("commands: kill <node> | add <node> | nodes | quit")
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
