"""Planning scale benchmark: time and peak memory of planning a large job.

What it measures, and why (from the issue): "plan a job over 10,000 input files and
1,000,000 chunks of synthetic metadata with half of them committed, and record planning time
and peak memory; planning memory must not grow with the number of rows."

Planning (``batch.plan``) runs on the driver before every run and every resume, so its cost
bounds how large a job can be and how quickly a resume starts. It reads only listings and
Parquet footers, so its cost should grow with files and chunks, never with rows. This
benchmark checks that with numbers:

* ``plan_chunks`` (the pure part) over synthetic metadata: 10,000 files x 100 chunks = 1,000,000
  chunks, half of them committed (the ``done`` set holds their real chunk ids);
* rows scaling: the same 1,000,000 chunks with 10x and 100x more rows per chunk
  (``rows_per_chunk`` 100, 1,000, 10,000); peak memory should stay the same;
* chunks scaling: 100k, 250k, 500k and 1M chunks over the same 10,000 files; memory should grow
  linearly in chunks (the slope is reported in bytes per chunk);
* the I/O part at a smaller but real scale: ``committed_chunk_ids`` over 100,000 real marker files
  (a listing, no reads), and ``make_plan`` end to end over 200 real Parquet files (footers only)
  with half of their chunks committed.

Every measurement runs in a fresh subprocess (this script, re-run with ``--worker``), so peak
memory is that measurement's own. In it the call is made twice: once untraced, for wall time and
peak RSS (the kernel's high-water mark, reset just before the call via /proc/self/clear_refs),
and once under tracemalloc, for the Python heap the call allocates (peak and still held after).

Run from the repository root (about 2-3 minutes on 2 cores)::

    .venv/bin/python benchmarks/plan_scale.py

It prints tables and writes ``benchmarks/results/plan_scale.json`` and ``plan_scale.md``.
``--quick`` runs everything at 1/10 scale as a smoke test and writes no results unless
``--results`` is given.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.table import Table

from batch.plan import (
    InputFile,
    chunk_id,
    committed_chunk_ids,
    cut_chunks,
    list_input,
    make_plan,
    plan_chunks,
    read_footer,
)
from batch.spec import JobSpec, parse_spec
from batch.store import MARKERS

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
COMMAND = ".venv/bin/python benchmarks/plan_scale.py"
MIB = 1024 * 1024
FLAT_TOLERANCE = 0.05  # rows scaling: peak memory may differ by at most 5% to count as flat

Result = dict[str, Any]


# --- measuring ----------------------------------------------------------------------------


def _status_bytes(field: str) -> int | None:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _rss() -> int:
    return _status_bytes("VmRSS") or 0


def _reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _peak_rss() -> int:
    hwm = _status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(call: Callable[[], Any]) -> tuple[Any, Result]:
    """Call twice: untraced (wall time, peak RSS), then under tracemalloc (Python heap).

    Returns the first call's result, for checking, and the figures.
    """
    gc.collect()
    rss_before = _rss()
    hwm_reset = _reset_peak_rss()
    started = time.perf_counter()
    value = call()
    seconds = time.perf_counter() - started
    peak = _peak_rss()
    rss_after = _rss()
    del value
    gc.collect()

    tracemalloc.start()
    started = time.perf_counter()
    value = call()
    traced_seconds = time.perf_counter() - started
    heap_retained, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return value, {
        "seconds": seconds,
        "rss_before_bytes": rss_before,
        "peak_rss_bytes": peak,
        "peak_rss_delta_bytes": peak - rss_before,
        "rss_after_bytes": rss_after,
        "peak_rss_reset": hwm_reset,
        "traced_seconds": traced_seconds,
        "heap_peak_bytes": heap_peak,
        "heap_retained_bytes": heap_retained,
    }


# --- inputs -------------------------------------------------------------------------------


def job_spec(input_path: str, output_path: str, rows_per_chunk: int) -> JobSpec:
    return parse_spec(f"""
name: plan-scale
input: {{path: "{input_path}", id_column: review_id}}
output: {{path: "{output_path}"}}
model: {{path: m, engine: fake}}
prompt: {{template: "{{{{ body }}}}"}}
resources: {{rows_per_chunk: {rows_per_chunk}}}
""")


def synthetic_files(files: int, rows_per_file: int) -> list[InputFile]:
    """Metadata only: no file exists. Relative paths are nested, as partitioned data is."""
    out = []
    for i in range(files):
        rel = f"shard={i // 1000:03d}/part-{i:05d}.parquet"
        out.append(InputFile(f"/data/reviews/{rel}", rel, rows_per_file))
    return out


def committed_ids(files: list[InputFile], rows_per_chunk: int, every: int) -> set[str]:
    """Real chunk ids of every ``every``-th chunk: what committed_chunk_ids would return."""
    ids: set[str] = set()
    i = 0
    for f in files:  # the order and the ranges of cut_chunks, without building every Chunk
        for start in range(0, f.num_rows, rows_per_chunk):
            if i % every == 0:
                ids.add(chunk_id(f.relpath, start, min(start + rows_per_chunk, f.num_rows)))
            i += 1
    return ids


# --- workers (each runs in its own subprocess) ----------------------------------------------


def worker_plan(p: Result) -> Result:
    """plan_chunks over synthetic metadata; ``done`` holds 1 in ``commit_every`` chunk ids."""
    rss_import = _rss()
    rows_per_chunk = int(p["rows_per_chunk"])
    rows_per_file = int(p["chunks_per_file"]) * rows_per_chunk
    started = time.perf_counter()
    files = synthetic_files(int(p["files"]), rows_per_file)
    done = committed_ids(files, rows_per_chunk, int(p["commit_every"]))
    inputs_seconds = time.perf_counter() - started
    gc.collect()
    rss_inputs = _rss()
    spec = job_spec("/data/reviews", "/data/out", rows_per_chunk)

    plan, figures = measure(lambda: plan_chunks(spec, files, done))
    chunks = int(p["files"]) * int(p["chunks_per_file"])
    if len(plan.chunks) != chunks or len(plan.chunks) - len(plan.pending) != len(done):
        raise AssertionError(f"unexpected plan: {len(plan.chunks)} chunks, {len(done)} done")
    return {
        **figures,
        "files": len(files),
        "chunks": len(plan.chunks),
        "committed": len(plan.chunks) - len(plan.pending),
        "pending": len(plan.pending),
        "rows_per_chunk": rows_per_chunk,
        "total_rows": plan.total_rows,
        "rss_import_bytes": rss_import,
        "inputs_rss_bytes": rss_inputs - rss_import,
        "inputs_seconds": inputs_seconds,
        "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }


def worker_markers(p: Result) -> Result:
    """committed_chunk_ids over real marker files (a listing, no reads), and a scandir floor."""
    rss_import = _rss()
    spec = job_spec("/data/reviews", str(p["output"]), 100)
    ids, figures = measure(lambda: committed_chunk_ids(spec))
    if len(ids) != int(p["markers"]):
        raise AssertionError(f"listed {len(ids)} markers, wrote {p['markers']}")
    folder = os.path.join(str(p["output"]), MARKERS)
    started = time.perf_counter()
    with os.scandir(folder) as entries:
        floor = {e.name.removesuffix(".json") for e in entries if e.name.endswith(".json")}
    scandir_seconds = time.perf_counter() - started
    if floor != ids:
        raise AssertionError("os.scandir and committed_chunk_ids disagree")
    return {
        **figures,
        "markers": len(ids),
        "rss_import_bytes": rss_import,
        "scandir_seconds": scandir_seconds,
    }


def worker_make_plan(p: Result) -> Result:
    """make_plan end to end over real Parquet files, then its stages one by one (warm)."""
    rss_import = _rss()
    spec = job_spec(str(p["input"]), str(p["output"]), int(p["rows_per_chunk"]))
    plan, figures = measure(lambda: make_plan(spec, required_columns={"body"}))
    if len(plan.files) != int(p["files"]) or len(plan.chunks) - len(plan.pending) != int(
        p["committed"]
    ):
        raise AssertionError(f"unexpected plan: {len(plan.files)} files, {len(plan.chunks)}")

    # The stages make_plan runs, timed one by one (after the two calls above: warm caches).
    from concurrent.futures import ThreadPoolExecutor

    from batch import storage

    stages: dict[str, float] = {}
    started = time.perf_counter()
    fs, root = storage.open_fs(spec.input.path, spec.input.storage_options)
    listed = list_input(fs, root)
    stages["list_input"] = time.perf_counter() - started
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=16) as pool:  # as make_plan reads them
        footers = list(pool.map(lambda x: read_footer(fs, x[0]), listed))
    stages["read_footers"] = time.perf_counter() - started
    started = time.perf_counter()
    done = committed_chunk_ids(spec)
    stages["committed_chunk_ids"] = time.perf_counter() - started
    files = [InputFile(q, rel, n) for (q, rel), (n, _) in zip(listed, footers, strict=True)]
    started = time.perf_counter()
    plan_chunks(spec, files, done)
    stages["plan_chunks"] = time.perf_counter() - started
    return {
        **figures,
        "files": len(plan.files),
        "chunks": len(plan.chunks),
        "committed": len(plan.chunks) - len(plan.pending),
        "total_rows": plan.total_rows,
        "rss_import_bytes": rss_import,
        "stages_warm_seconds": stages,
    }


WORKERS: dict[str, Callable[[Result], Result]] = {
    "plan": worker_plan,
    "markers": worker_markers,
    "make_plan": worker_make_plan,
}


def run_worker(kind: str, params: Result) -> Result:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind]
    cmd += ["--params", json.dumps(params)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"worker {kind} {params} failed:\n{done.stderr}")
    result: Result = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# --- real files for the I/O part ------------------------------------------------------------


def write_markers(output: Path, ids: Sequence[str]) -> None:
    folder = output / MARKERS
    folder.mkdir(parents=True)
    for cid in ids:
        (folder / f"{cid}.json").write_text(json.dumps({"chunk_id": cid, "rows": 100}))


def write_parquet_inputs(folder: Path, files: int, rows: int) -> None:
    folder.mkdir(parents=True)
    body = pa.array(["a short review body"] * rows, pa.string())
    for i in range(files):
        ids = pa.array([f"r{i:05d}-{j:07d}" for j in range(rows)], pa.string())
        pq.write_table(pa.table({"review_id": ids, "body": body}), folder / f"part-{i:05d}.parquet")


# --- the run --------------------------------------------------------------------------------


def machine() -> Result:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = _meminfo_bytes("MemTotal")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": cpu,
        "cores_usable": cores,
        "cpu_count": os.cpu_count(),
        "ram_bytes": ram,
        "os": platform.platform(),
    }


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def software() -> Result:
    def version(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "python": platform.python_version(),
        "batchinfer": version("batchinfer"),
        "pyarrow": pa.__version__,
        "fsspec": version("fsspec"),
    }


def git_state() -> Result:
    def git(*args: str) -> str:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Least squares y = a + b x: (intercept, slope, r^2)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    slope = sxy / sxx
    intercept = my - slope * mx
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys, strict=True))
    ss_tot = sum((y - my) ** 2 for y in ys)
    return intercept, slope, 1 - ss_res / ss_tot if ss_tot else 1.0


def spread(values: Sequence[float]) -> float:
    return (max(values) - min(values)) / min(values)


def mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def run(quick: bool, console: Console) -> Result:
    scale = 10 if quick else 1
    files = 10_000 // scale
    params: Result = {
        "files": files,
        "chunks_per_file": 100,
        "committed": "every 2nd chunk (half)",
        "rows_per_chunk_series": [100, 1_000, 10_000],
        "chunks_per_file_series": [10, 25, 50, 100],
        "markers": 100_000 // scale,
        "make_plan": {"files": 200 // scale, "rows_per_file": 5_000, "rows_per_chunk": 100},
        "quick": quick,
    }

    # plan_chunks over synthetic metadata: the rows series and the chunks series share 1M/100.
    cases: dict[tuple[int, int], Result] = {}
    keys = [(100, cpf) for cpf in params["chunks_per_file_series"]]
    keys += [(rpc, 100) for rpc in params["rows_per_chunk_series"] if rpc != 100]
    for rpc, cpf in sorted(set(keys), key=lambda k: (k[1], k[0])):
        console.print(f"plan_chunks: {files:,} files x {cpf} chunks, rows_per_chunk {rpc} ...")
        cases[(rpc, cpf)] = run_worker(
            "plan",
            {"files": files, "chunks_per_file": cpf, "rows_per_chunk": rpc, "commit_every": 2},
        )

    rows_series = [cases[(rpc, 100)] for rpc in params["rows_per_chunk_series"]]
    chunk_series = [cases[(100, cpf)] for cpf in params["chunks_per_file_series"]]
    xs = [float(r["chunks"]) for r in chunk_series]
    heap_fit = linear_fit(xs, [float(r["heap_peak_bytes"]) for r in chunk_series])
    retained_fit = linear_fit(xs, [float(r["heap_retained_bytes"]) for r in chunk_series])
    rss_fit = linear_fit(xs, [float(r["peak_rss_delta_bytes"]) for r in chunk_series])
    time_fit = linear_fit(xs, [float(r["seconds"]) for r in chunk_series])
    rows_heap_spread = spread([float(r["heap_peak_bytes"]) for r in rows_series])
    rows_rss_spread = spread([float(r["peak_rss_delta_bytes"]) for r in rows_series])

    # The I/O part, on real files.
    tmp = Path(tempfile.mkdtemp(prefix="plan_scale-"))
    try:
        n_markers = int(params["markers"])
        marker_files = synthetic_files(n_markers // 100, 100 * 100)
        ids = [c.chunk_id for c in cut_chunks(marker_files, 100)]
        console.print(f"writing {n_markers:,} marker files ...")
        started = time.perf_counter()
        write_markers(tmp / "markers-out", ids)
        markers_write_seconds = time.perf_counter() - started
        console.print(f"committed_chunk_ids over {n_markers:,} markers ...")
        markers = run_worker("markers", {"output": str(tmp / "markers-out"), "markers": n_markers})
        markers["write_seconds"] = markers_write_seconds
        shutil.rmtree(tmp / "markers-out")

        mp = params["make_plan"]
        console.print(f"writing {mp['files']} Parquet files and markers for half the chunks ...")
        write_parquet_inputs(tmp / "in", mp["files"], mp["rows_per_file"])
        parquet_bytes = sum(f.stat().st_size for f in (tmp / "in").iterdir())
        real = [
            InputFile(
                str(tmp / "in" / f"part-{i:05d}.parquet"),
                f"part-{i:05d}.parquet",
                mp["rows_per_file"],
            )
            for i in range(mp["files"])
        ]
        half = sorted(committed_ids(real, mp["rows_per_chunk"], 2))
        write_markers(tmp / "out", half)
        console.print("make_plan end to end ...")
        end_to_end = run_worker(
            "make_plan",
            {
                "input": str(tmp / "in"),
                "output": str(tmp / "out"),
                "rows_per_chunk": mp["rows_per_chunk"],
                "files": mp["files"],
                "committed": len(half),
            },
        )
        end_to_end["parquet_bytes"] = parquet_bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    headline = cases[(100, 100)]
    return {
        "benchmark": "plan_scale",
        "command": COMMAND + (" --quick" if quick else ""),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "software": software(),
        "git": git_state(),
        "parameters": params,
        "results": {
            "headline": headline,
            "rows_scaling": {
                "cases": rows_series,
                "heap_peak_spread": rows_heap_spread,
                "peak_rss_delta_spread": rows_rss_spread,
                "flat": max(rows_heap_spread, rows_rss_spread) <= FLAT_TOLERANCE,
                "tolerance": FLAT_TOLERANCE,
            },
            "chunks_scaling": {
                "cases": chunk_series,
                "heap_peak_bytes_per_chunk": heap_fit[1],
                "heap_peak_fit_r2": heap_fit[2],
                "heap_retained_bytes_per_chunk": retained_fit[1],
                "peak_rss_delta_bytes_per_chunk": rss_fit[1],
                "peak_rss_delta_fit_r2": rss_fit[2],
                "seconds_per_million_chunks": time_fit[1] * 1e6,
                "seconds_fit_r2": time_fit[2],
            },
            "markers": markers,
            "make_plan": end_to_end,
        },
    }


# --- reporting ------------------------------------------------------------------------------

PLAN_HEADERS = [
    "rows/chunk",
    "files",
    "chunks",
    "committed",
    "rows",
    "time s",
    "peak RSS MiB",
    "RSS Δ MiB",
    "heap peak MiB",
    "heap held MiB",
    "heap B/chunk",
]


def plan_row(r: Result) -> list[str]:
    return [
        f"{r['rows_per_chunk']:,}",
        f"{r['files']:,}",
        f"{r['chunks']:,}",
        f"{r['committed']:,}",
        f"{r['total_rows']:,}",
        f"{r['seconds']:.2f}",
        mib(r["peak_rss_bytes"]),
        mib(r["peak_rss_delta_bytes"]),
        mib(r["heap_peak_bytes"]),
        mib(r["heap_retained_bytes"]),
        f"{r['heap_peak_bytes'] / r['chunks']:.0f}",
    ]


def _fit(series: Result, name: str, unit: str) -> str:
    if name == "seconds":
        slope, r2 = series["seconds_per_million_chunks"], series["seconds_fit_r2"]
        return f"{slope:.2f} {unit} (r² {r2:.4f})"
    slope, r2 = series[f"{name}_bytes_per_chunk"], series[f"{name}_fit_r2"]
    return f"{slope:.0f} {unit} (r² {r2:.4f})"


def tables(doc: Result) -> list[tuple[str, list[str], list[list[str]]]]:
    res = doc["results"]
    rows_s, chunks_s = res["rows_scaling"], res["chunks_scaling"]
    m, e2e = res["markers"], res["make_plan"]
    h = res["headline"]
    head = [
        ["files", f"{h['files']:,}"],
        [
            "chunks (committed / pending)",
            f"{h['chunks']:,} ({h['committed']:,} / {h['pending']:,})",
        ],
        [
            "plan_chunks wall time",
            f"{h['seconds']:.2f} s (under tracemalloc {h['traced_seconds']:.2f} s)",
        ],
        ["peak RSS of the process during the call", f"{mib(h['peak_rss_bytes'])} MiB"],
        ["  of which the call added", f"{mib(h['peak_rss_delta_bytes'])} MiB"],
        ["  before the call: interpreter + imports", f"{mib(h['rss_import_bytes'])} MiB"],
        ["  before the call: inputs (files, done set)", f"{mib(h['inputs_rss_bytes'])} MiB"],
        ["Python heap allocated by the call: peak", f"{mib(h['heap_peak_bytes'])} MiB"],
        ["Python heap still held by the returned Plan", f"{mib(h['heap_retained_bytes'])} MiB"],
    ]
    verdict = "flat" if rows_s["flat"] else "NOT flat"
    rows_summary = [
        ["heap peak spread across rows/chunk 100..10,000", f"{rows_s['heap_peak_spread']:.2%}"],
        [
            "peak RSS Δ spread across rows/chunk 100..10,000",
            f"{rows_s['peak_rss_delta_spread']:.2%}",
        ],
        [f"memory vs rows (tolerance {rows_s['tolerance']:.0%})", verdict],
        ["heap peak per chunk (slope of the chunks series)", _fit(chunks_s, "heap_peak", "B")],
        ["heap held per chunk (slope)", f"{chunks_s['heap_retained_bytes_per_chunk']:.0f} B"],
        ["peak RSS Δ per chunk (slope)", _fit(chunks_s, "peak_rss_delta", "B")],
        ["time per 1M chunks (slope)", _fit(chunks_s, "seconds", "s")],
    ]
    io = [
        [
            f"committed_chunk_ids, {m['markers']:,} marker files",
            f"{m['seconds']:.2f} s",
            f"{mib(m['peak_rss_delta_bytes'])} MiB RSS Δ, "
            f"{mib(m['heap_peak_bytes'])} MiB heap peak "
            f"({m['heap_peak_bytes'] / m['markers']:.0f} B/marker)",
        ],
        ["  floor: os.scandir of the same folder", f"{m['scandir_seconds']:.2f} s", ""],
        ["  writing the markers (setup, not planning)", f"{m['write_seconds']:.2f} s", ""],
        [
            f"make_plan, {e2e['files']} Parquet files, {e2e['chunks']:,} chunks, "
            f"{e2e['committed']:,} committed",
            f"{e2e['seconds']:.2f} s",
            f"{mib(e2e['peak_rss_delta_bytes'])} MiB RSS Δ, {mib(e2e['heap_peak_bytes'])} MiB heap "
            f"peak; a 2nd (warm, traced) call {e2e['traced_seconds']:.2f} s",
        ],
    ]
    for stage, secs in e2e["stages_warm_seconds"].items():
        io.append([f"  stage {stage} (warm, alone)", f"{secs:.3f} s", ""])
    return [
        (
            "Headline: 1,000,000 chunks over 10,000 files, half committed"
            if not doc["parameters"]["quick"]
            else "Headline (quick: 1/10 scale)",
            ["", "value"],
            head,
        ),
        (
            "plan_chunks, rows scaling (same chunks, 10x and 100x rows)",
            PLAN_HEADERS,
            [plan_row(r) for r in rows_s["cases"]],
        ),
        (
            "plan_chunks, chunks scaling (same files)",
            PLAN_HEADERS,
            [plan_row(r) for r in chunks_s["cases"]],
        ),
        ("Scaling summary", ["", "value"], rows_summary),
        ("I/O at real scale (local disk, warm page cache)", ["", "time", "memory"], io),
    ]


def print_tables(doc: Result, console: Console) -> None:
    for title, headers, rows in tables(doc):
        table = Table(title=title, title_justify="left")
        for i, header in enumerate(headers):
            table.add_column(header, justify="left" if i == 0 else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)


def markdown(doc: Result) -> str:
    mach, sw, git = doc["machine"], doc["software"], doc["git"]
    ram = f"{mach['ram_bytes'] / 1024**3:.1f} GiB" if mach["ram_bytes"] else "unknown"
    lines = [
        "# Planning scale benchmark",
        "",
        "Produced by (from the repository root):",
        "",
        "```",
        doc["command"],
        "```",
        "",
        f"- date: {doc['date']}",
        f"- machine: {mach['cpu']}, {mach['cores_usable']} usable cores, {ram} RAM",
        f"- python {sw['python']}, batchinfer {sw['batchinfer']}, pyarrow {sw['pyarrow']}, "
        f"fsspec {sw['fsspec']}",
        f"- git: {git['commit'][:12]}{' (with uncommitted changes)' if git['dirty'] else ''}",
        "",
        "Each measurement runs in a fresh subprocess. Time and peak RSS come from an untraced "
        "call (peak RSS is the kernel's high-water mark, reset just before the call; "
        '"RSS Δ" is that peak minus the RSS just before the call). Heap figures come from a '
        'second call under tracemalloc: "peak" is the most the call had allocated at once, '
        '"held" what the returned Plan still holds. The `done` set (the committed chunk ids, '
        "an input) is built before the call and not counted in the call's figures. "
        "Synthetic metadata: no input file exists for the plan_chunks rows. "
        "Full figures: `plan_scale.json`.",
        "",
    ]
    for title, headers, rows in tables(doc):
        lines += [f"## {title}", ""]
        lines.append("| " + " | ".join(h or " " for h in headers) + " |")
        aligns = [":--" if i == 0 else "--:" for i in range(len(headers))]
        lines.append("| " + " | ".join(aligns) + " |")
        for row in rows:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="1/10 scale smoke run")
    parser.add_argument("--results", type=Path, help=f"where to write results (default {RESULTS})")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(WORKERS[args.worker](json.loads(args.params))))
        return 0

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # a log or a pipe: no wrapping of the wide tables
    started = time.perf_counter()
    doc = run(args.quick, console)
    doc["benchmark_seconds"] = time.perf_counter() - started
    print_tables(doc, console)
    out = args.results if args.results else (None if args.quick else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan_scale.json").write_text(json.dumps(doc, indent=2) + "\n")
        (out / "plan_scale.md").write_text(markdown(doc))
        console.print(f"wrote {out / 'plan_scale.json'} and {out / 'plan_scale.md'}")
    console.print(f"benchmark took {doc['benchmark_seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
