"""Fleet scaling: simulated throughput at 1, 4, 16 and 32 engine replicas on a local
multi-node Ray cluster (tests/multinode.py: a head and worker nodes, ``ray start`` each, with
declared GPUs), the ``device: gpu`` job path with the simulated engine (``model.engine: sim``,
H100 Llama 3.1 8B profile; ``--time-scale`` sets its ``time_scale``).

Each replica count runs one job submitted through the Jobs API (``batchinfer submit
--address``) with the same chunks per replica, so a perfect fleet takes the same time at
every size. Throughput is output tokens committed per second in the steady middle of the job
(between the 25th and 75th percentile of the chunks' engine end times, so replica start-up
and the tail are left out); the whole-window figure (first chunk in an engine to last out) is
reported too. Scaling efficiency = throughput(N) / (N x throughput(1)).

What limits it here: the whole fleet (every raylet, every engine actor's event loop, every
read and commit task, the driver) shares this machine's 2 cores, while on a real fleet each
GPU node brings its own CPUs. The engine takes no CPU to speak of (it sleeps its simulated
time), so what falls short of linear is orchestration competing for 2 cores. ``--time-scale
0.25`` runs the simulated accelerator 4 times slower than real time, giving the orchestration
4 wall seconds of these cores per simulated second (what 8 cores give at real time); rates are
reported per simulated second, so the efficiency is the fleet's, with the CPU it needs.

Run from the repository root (about 17 minutes on 2 cores)::

    .venv/bin/python benchmarks/fleet.py --chunks-per-replica 6 --time-scale 0.25

It prints a table and writes ``benchmarks/results/fleet.{json,md}``. ``--replicas 1,4`` and
``--chunks-per-replica`` make shorter runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from batch.engine.sim import PROFILES, describe  # noqa: E402
from tests.multinode import local_cluster  # noqa: E402

GPUS_PER_NODE = 8


def write_input(folder: Path, rows: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ids = [f"r{i:07d}" for i in range(rows)]
    text = [f"Review {i}: the product works well and arrived on time." for i in range(rows)]
    pq.write_table(pa.table({"id": ids, "text": text}), folder / "part-0.parquet")


def job_file(work: Path, replicas: int, chunks_per_replica: int, args: argparse.Namespace) -> Path:
    inp, out = work / f"in-{replicas}", work / f"out-{replicas}"
    write_input(inp, replicas * chunks_per_replica * args.rows_per_chunk)
    path = work / f"fleet-{replicas}.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            name: fleet-bench-{replicas}
            input: {{path: "{inp}", id_column: id}}
            output: {{path: "{out}"}}
            model: {{path: llama-3.1-8b, engine: sim,
                     sim_options: {{profile: {args.profile}, startup_s: 5,
                                  time_scale: {args.time_scale}}}}}
            prompt: {{template: "{{{{ text }}}}"}}
            sampling: {{max_tokens: {args.max_tokens}, ignore_eos: true}}
            resources: {{device: gpu, gpus_per_replica: 1, replicas: {replicas},
                         cpus_per_replica: 0.05, rows_per_chunk: {args.rows_per_chunk},
                         batch_size: {args.rows_per_chunk}, chunks_in_flight: 2}}
            """
        )
    )
    return path


def markers(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (out / "_markers").glob("*.json")]


def measure(out: Path, replicas: int, time_scale: float) -> dict[str, Any]:
    """Token rates per simulated second: wall rates divided by ``time_scale``."""
    ms = markers(out)
    ends = sorted((float(m["timings"]["engine_end"]), int(m["output_tokens"])) for m in ms)
    starts = [float(m["timings"]["engine_start"]) for m in ms]
    tokens = sum(t for _, t in ends)
    lo, hi = ends[len(ends) // 4][0], ends[(3 * len(ends)) // 4][0]
    mid = sum(t for e, t in ends if lo < e <= hi)
    ledger = json.loads((out / "ledger.json").read_text())
    nodes = {str(m.get("engine", {}).get("node_id", "")) for m in ms}
    return {
        "replicas": replicas,
        "chunks": len(ms),
        "output_tokens": tokens,
        "steady_tokens_per_s": round(mid / (hi - lo) / time_scale, 1) if hi > lo else None,
        "window_tokens_per_s": round(
            tokens / (max(e for e, _ in ends) - min(starts)) / time_scale, 1
        ),
        "engine_idle_fraction": ledger.get("engine_idle_fraction"),
        "gpu_seconds": ledger.get("gpu_seconds"),
        "nodes_used": len(nodes),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replicas", default="1,4,16,32")
    ap.add_argument("--chunks-per-replica", type=int, default=4)
    ap.add_argument("--rows-per-chunk", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument(
        "--time-scale",
        type=float,
        default=1.0,
        help="simulated seconds per wall second; below 1 the engine runs slower than a real "
        "one, so orchestration gets 1/x wall seconds of these cores per simulated second",
    )
    ap.add_argument("--profile", default="h100-llama3-8b", choices=sorted(PROFILES))
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    ap.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE)
    ap.add_argument(
        "--merge",
        type=Path,
        default=None,
        help="a fleet.json of an earlier run on this machine whose sizes this run does not "
        "measure again (a long run done in parts)",
    )
    args = ap.parse_args()
    counts = [int(x) for x in args.replicas.split(",")]
    gpn = args.gpus_per_node
    nodes = max(1, -(-max(counts) // gpn))
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    if args.merge:
        earlier = json.loads(args.merge.read_text())["results"]
        rows = [
            dict(r, merged_from=str(args.merge)) for r in earlier if r["replicas"] not in counts
        ]
    t0 = time.monotonic()
    cluster_up = 0.0
    with local_cluster(
        work / "cluster", workers=nodes - 1, gpus_per_node=gpn, worker_cpus=2
    ) as cluster:
        cluster_up = time.monotonic() - t0
        print(f"cluster: {nodes} nodes x {gpn} GPUs up in {cluster_up:.0f}s")
        for n in counts:
            job = job_file(work, n, args.chunks_per_replica, args)
            t = time.monotonic()
            run = subprocess.run(
                [sys.executable, "-m", "batch.cli", "submit", str(job),
                 "--address", cluster.head.address],
                capture_output=True, text=True, env=cluster.head.client_env(), timeout=900,
            )  # fmt: skip
            if run.returncode != 0:
                raise SystemExit(f"{n} replicas: exit {run.returncode}\n{run.stderr[-3000:]}")
            row = measure(work / f"out-{n}", n, args.time_scale)
            row["wall_s"] = round(time.monotonic() - t, 1)
            rows.append(row)
            rows.sort(key=lambda r: int(r["replicas"]))
            print(json.dumps(row), flush=True)
            write(args, nodes, cluster_up, rows, t0)  # after each size: a cut-short run keeps them
    print((args.results / "fleet.md").read_text())


def write(
    args: argparse.Namespace, nodes: int, cluster_up: float, rows: list[dict[str, Any]],
    t0: float,
) -> None:  # fmt: skip
    base = next((r for r in rows if r["replicas"] == 1), None)
    for r in rows:
        for key in ("steady", "window"):
            if base and base[f"{key}_tokens_per_s"] and r[f"{key}_tokens_per_s"]:
                linear = base[f"{key}_tokens_per_s"] * r["replicas"]
                r[f"{key}_efficiency"] = round(r[f"{key}_tokens_per_s"] / linear, 3)
    doc = {
        "benchmark": "fleet",
        "command": "python benchmarks/fleet.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "cluster": {"nodes": nodes, "gpus_per_node": args.gpus_per_node, "up_s": round(cluster_up)},
        "profile": describe(PROFILES[args.profile]),
        "job": {
            "chunks_per_replica": args.chunks_per_replica,
            "rows_per_chunk": args.rows_per_chunk,
            "max_tokens": args.max_tokens,
            "ignore_eos": True,
            "time_scale": args.time_scale,
        },
        "results": rows,
        "total_s": round(time.monotonic() - t0),
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "fleet.json").write_text(json.dumps(doc, indent=2) + "\n")
    (args.results / "fleet.md").write_text(render(doc))


def timing(scale: float) -> str:
    if scale == 1.0:
        return "real time"
    return (
        f"time_scale {scale:g} (a simulated second takes {1 / scale:g} wall seconds; token "
        "rates are per simulated second)"
    )


def render(doc: dict[str, Any]) -> str:
    p = doc["profile"]
    lines = [
        "# Fleet scaling: simulated throughput on a local multi-node Ray cluster",
        "",
        f"`{doc['command']}`; {doc['machine']['cpus']} cores; {doc['cluster']['nodes']} Ray "
        f"nodes x {doc['cluster']['gpus_per_node']} declared GPUs (`ray start` each); engine "
        f"`sim` profile `{p['name']}` ({p['accelerator']}, {p['model']}), "
        f"{timing(doc['job'].get('time_scale', 1.0))}; "
        f"{doc['job']['chunks_per_replica']} chunks of {doc['job']['rows_per_chunk']} rows per "
        f"replica, {doc['job']['max_tokens']} output tokens per row.",
        "",
        "| replicas | chunks | steady tok/s | efficiency | window tok/s | efficiency | "
        "engine idle | nodes used | wall s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in doc["results"]:
        lines.append(
            f"| {r['replicas']} | {r['chunks']} | {r['steady_tokens_per_s']} | "
            f"{r.get('steady_efficiency', '')} | {r['window_tokens_per_s']} | "
            f"{r.get('window_efficiency', '')} | {r['engine_idle_fraction']} | "
            f"{r['nodes_used']} | {r['wall_s']} |"
        )
    lines += [
        "",
        "Steady: output tokens committed between the 25th and 75th percentile of the chunks' "
        "engine end times, per second. Window: all tokens over first chunk in an engine to "
        "last out (replica start-up stagger included). Efficiency: over replicas x the "
        "1-replica figure.",
        "",
        "What limits efficiency here: every node, engine actor, read and commit task and the "
        "driver share this machine's 2 cores (and other work on it); on a real fleet each GPU "
        "node brings its own CPUs. The simulated engine itself uses next to no CPU.",
        "",
        *([doc["note"], ""] if doc.get("note") else []),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
