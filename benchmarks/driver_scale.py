"""Driver load: peak memory and CPU of the ``batchinfer submit`` process over 1,000,000 rows.

The driver must never be the bottleneck: it plans, hands chunk descriptions to Ray Data and
consumes only small per-chunk stats, while reads, engine calls and commits run on workers. This
benchmark runs a real job (real Ray, the fake engine so the engine is not what is measured) over
synthetic reviews at two sizes, and samples the driver process alone (not Ray's own processes,
not the workers) every 0.2 s:

* peak RSS: the kernel's high-water mark (``VmHWM``) of the driver process;
* CPU: the driver's user+system seconds, and that over the wall time (1.0 = one core busy).

The expectation (issue 5): under 1 GB of driver memory at 1,000,000 rows, flat in rows, and a
small CPU share. Run from the repository root (about 5 minutes on 2 cores)::

    .venv/bin/python benchmarks/driver_scale.py

It prints a table and writes ``benchmarks/results/driver_scale.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def write_input(folder: Path, rows: int, files: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    words = np.array(
        ["good", "bad", "fine", "great", "awful", "okay", "sturdy", "flimsy", "cheap", "pricey"]
    )
    rng = np.random.default_rng(7)
    per_file = rows // files
    for f in range(files):
        start = f * per_file
        picks = rng.integers(0, len(words), size=(per_file, 8))
        text = [" ".join(w) for w in words[picks]]
        ids = [f"r{i:08d}" for i in range(start, start + per_file)]
        table = pa.table({"review_id": ids, "text": text})
        pq.write_table(table, folder / f"part-{f:04d}.parquet", row_group_size=50_000)


def job_yaml(data: Path, out: Path, rows_per_chunk: int) -> str:
    return f"""
name: driver-scale
input: {{path: "{data}/", id_column: review_id}}
output: {{path: "{out}/"}}
model: {{path: fake, engine: fake}}
prompt: {{template: "Summarise: {{{{ text }}}}"}}
sampling: {{max_tokens: 4}}
resources: {{rows_per_chunk: {rows_per_chunk}, chunks_in_flight: 8, replicas: 1}}
"""


class Sampler(threading.Thread):
    """Samples one process's VmHWM / VmRSS and CPU times until it exits."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.hwm_kb = 0
        self.cpu_s = 0.0
        self.samples = 0

    def run(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while True:
            try:
                status = Path(f"/proc/{self.pid}/status").read_text()
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.hwm_kb = max(self.hwm_kb, int(line.split()[1]))
                t = proc.cpu_times()
                self.cpu_s = t.user + t.system
                self.samples += 1
            except (OSError, psutil.Error):
                return
            time.sleep(0.2)


def measure(rows: int, rows_per_chunk: int, work: Path) -> dict[str, Any]:
    data = work / f"in-{rows}"
    if not data.exists():
        write_input(data, rows, files=10)
    out = work / f"out-{rows}-{rows_per_chunk}"
    job = work / f"job-{rows}-{rows_per_chunk}.yaml"
    job.write_text(job_yaml(data, out, rows_per_chunk))
    cmd = [str(Path(sys.executable).with_name("batchinfer")), "submit", str(job), "--quiet"]
    started = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sampler = Sampler(proc.pid)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.time() - started
    sampler.join(timeout=2)
    if proc.returncode != 0:
        raise SystemExit(f"job failed ({proc.returncode}):\n{output.decode()[-2000:]}")
    ledger = json.loads((out / "ledger.json").read_text())
    return {
        "rows": rows,
        "rows_per_chunk": rows_per_chunk,
        "chunks": -(-rows // rows_per_chunk),
        "rows_out": ledger["rows"],
        "failed_rows": ledger["failed_rows"],
        "wall_s": round(wall, 1),
        "driver_peak_rss_mib": round(sampler.hwm_kb / 1024, 1),
        "driver_cpu_s": round(sampler.cpu_s, 1),
        "driver_cpu_share": round(sampler.cpu_s / wall, 3),
        "last_line": output.decode().strip().splitlines()[-1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", default="100000,1000000", help="comma-separated sizes")
    p.add_argument("--rows-per-chunk", type=int, default=1000)
    p.add_argument("--work", default=None)
    p.add_argument("--results", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="driver-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for rows in (int(r) for r in a.rows.split(",")):
        print(f"{rows:,} rows ...", flush=True)
        runs.append(measure(rows, a.rows_per_chunk, work))
        print(f"  {json.dumps(runs[-1])}", flush=True)
    lines = [
        "# Driver load over 1,000,000 rows (fake engine, real Ray)",
        "",
        f"Command: `python benchmarks/driver_scale.py --rows {a.rows} "
        f"--rows-per-chunk {a.rows_per_chunk}`  ",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| rows | chunks | wall s | driver peak RSS MiB | driver CPU s | driver CPU share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['rows']:,} | {r['chunks']:,} | {r['wall_s']} | {r['driver_peak_rss_mib']} | "
            f"{r['driver_cpu_s']} | {r['driver_cpu_share']:.1%} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "driver_scale.json").write_text(json.dumps({"runs": runs}, indent=2) + "\n")
    (out / "driver_scale.md").write_text(text)


if __name__ == "__main__":
    main()
