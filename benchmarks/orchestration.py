"""The orchestration's own cost (issue 16): everything but the engine, measured.

With the fake engine taking no time, a job's cost is all orchestration: planning, Ray Data's
scheduling, the read and prepare tasks, the commit tasks (parts and markers), the driver's
loop over per-chunk stats, and finalizing. Three parts, each optional:

``jobs``  real ``batchinfer submit`` runs (real Ray, fake engine, tiny rows: an id and a short
          text) at the given rows:chunks cases, on local disk and/or SeaweedFS. Sampled every
          0.5 s from outside: CPU seconds of the driver and every process below it (Ray's
          daemons and workers; per process the last value seen, so a process that exits
          between samples loses at most 0.5 s), the driver's peak RSS (``VmHWM``) and the
          object store's peak (pages of Ray's plasma file in /dev/shm, a high-water mark:
          the store never hands pages back). From the job's JSON lines: time to plan (start to
          the ``planned`` event) and to finalize (the last ``progress`` event to ``finished``,
          which includes Ray's shutdown). Then ``batchinfer status --json`` and a second
          ``submit`` of the complete job (the resume path: plan and read the markers) are
          timed.
``plan``  the driver side of a job too large to run here: make_plan on a real input of R
          rows in C chunks and the chunk feed Ray Data is given (consumed, as the executor
          does), in a fresh process; its peak RSS and time.
``markers`` N synthetic markers (the commit's format) in an output on local disk and/or
          SeaweedFS: time to read them all the old way (one request per marker), finalize
          (cold: no rollup yet; it writes one) and ``status`` with the rollup.

Run from the repository root, e.g.::

    .venv/bin/python benchmarks/orchestration.py --cases 1000000:1000,1000000:4000 \
        --storage local,s3 --plan 10000000:100000 --markers 100000

``--code before=/tmp/base,after=.`` runs every case with each checkout's code (side by side in
one run). Results are appended to ``benchmarks/results/orchestration.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(ROOT))

FILES = 10


# --------------------------------------------------------------------------- inputs


def write_input(fs: Any, folder: str, rows: int, files: int = FILES) -> None:
    """``files`` Parquet files of ``id`` (r00000001) and ``text`` (a few words)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    words = np.array(["good", "bad", "fine", "great", "okay", "cheap"])
    rng = np.random.default_rng(7)
    per_file = rows // files
    fs.makedirs(folder, exist_ok=True)
    for f in range(files):
        start = f * per_file
        picks = rng.integers(0, len(words), size=(per_file, 3))
        text = pa.array([" ".join(w) for w in words[picks]])
        ids = pa.array([f"r{i:09d}" for i in range(start, start + per_file)])
        with fs.open(f"{folder}/part-{f:04d}.parquet", "wb") as fh:
            pq.write_table(pa.table({"id": ids, "text": text}), fh, row_group_size=100_000)


def job_yaml(input_path: str, output_path: str, rows_per_chunk: int, so: dict[str, Any]) -> str:
    doc = {
        "name": "orchestration",
        "input": {"path": input_path, "id_column": "id", "storage_options": so},
        "output": {"path": output_path, "storage_options": so},
        "model": {"path": "fake", "engine": "fake"},
        "prompt": {"template": "{{ text }}"},
        "sampling": {"max_tokens": 2},
        "cache": {"dedup": False},
        "resources": {"rows_per_chunk": rows_per_chunk, "chunks_in_flight": 8, "replicas": 1},
    }
    return json.dumps(doc)  # JSON is YAML


# --------------------------------------------------------------------------- sampling


def _plasma_kib(pids: list[int]) -> int:
    """KiB allocated in the plasma file (Ray's object store, in /dev/shm, unlinked) that these
    processes map: touched pages, which the store never hands back, so a high-water mark."""
    seen: dict[int, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "/dev/shm/plasma" not in line:
                    continue
                span, inode = line.split()[0], int(line.split()[4])
                if inode not in seen:
                    with contextlib.suppress(OSError):
                        seen[inode] = os.stat(f"/proc/{pid}/map_files/{span}").st_blocks // 2
    return sum(seen.values())


class TreeSampler(threading.Thread):
    """CPU of a process and its descendants, its own peak RSS, and the plasma peak."""

    def __init__(self, pid: int, every: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.cpu: dict[tuple[int, float], float] = {}
        self.driver_cpu = 0.0
        self.hwm_kib = 0
        self.rss: list[tuple[float, int]] = []  # (time, the driver's RSS in KiB)
        # (time, the driver's private KiB: RssAnon + RssFile, and its RssShmem: pages of the
        # object store's shared file it has touched, which are the store's, not the driver's)
        self.split: list[tuple[float, int, int]] = []
        self.plasma_kib = 0
        self.private_peak_kib = 0
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        root = psutil.Process(self.pid)
        while not self.stop.is_set():
            try:
                procs = [root, *root.children(recursive=True)]
            except psutil.Error:
                return
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    self.cpu[(p.pid, p.create_time())] = t.user + t.system
                    if p.pid == self.pid:
                        self.driver_cpu = t.user + t.system
            with contextlib.suppress(OSError):
                fields = {}
                for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                        fields[key] = int(value.split()[0])
                now = time.time()
                self.hwm_kib = max(self.hwm_kib, fields.get("VmHWM", 0))
                if "VmRSS" in fields:
                    self.rss.append((now, fields["VmRSS"]))
                if "RssAnon" in fields:
                    private = fields["RssAnon"] + fields.get("RssFile", 0)
                    self.split.append((now, private, fields.get("RssShmem", 0)))
                    self.private_peak_kib = max(self.private_peak_kib, private)
            raylets = [p.pid for p in procs if _name(p) == "raylet"]
            self.plasma_kib = max(self.plasma_kib, _plasma_kib(raylets))
            self.stop.wait(self.every)

    @property
    def tree_cpu(self) -> float:
        return sum(self.cpu.values())


def _name(p: Any) -> str:
    try:
        return str(p.name())
    except Exception:
        return ""


def _cli(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("batchinfer")), *args]


def _env(code: Path) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(code))


# --------------------------------------------------------------------------- jobs


def run_job(job: Path, out_note: str, code: Path) -> dict[str, Any]:
    started = time.time()
    proc = subprocess.Popen(_cli("submit", str(job)), cwd=code, env=_env(code),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    sampler = TreeSampler(proc.pid)
    sampler.start()
    stdout, stderr = proc.communicate()
    wall = time.time() - started
    sampler.stop.set()
    sampler.join(timeout=5)
    if proc.returncode != 0:
        raise SystemExit(f"{out_note}: job failed ({proc.returncode}):\n{stderr.decode()[-3000:]}")
    events = [json.loads(x) for x in stdout.decode().splitlines() if x.startswith("{")]
    by = {}
    for e in events:
        by.setdefault(e["event"], []).append(e)
    planned = by["planned"][0]["ts"] - started
    progress = by.get("progress", [])
    finished = by["finished"][-1]
    finalize = finished["ts"] - (progress[-1]["ts"] if progress else finished["ts"])
    growth = rss_growth(sampler.rss, progress)
    own = [(t, kib) for t, kib, _ in sampler.split]
    private, shared = (
        rss_growth(own, progress),
        rss_growth([(t, kib) for t, _, kib in sampler.split], progress),
    )
    if private and shared:
        growth["driver_private_growth_kib_per_chunk"] = private["driver_growth_kib_per_chunk"]
        growth["driver_private_at_end_mib"] = private["driver_rss_at_end_mib"]
        growth["driver_store_pages_growth_kib_per_chunk"] = shared["driver_growth_kib_per_chunk"]
        growth["driver_store_pages_at_end_mib"] = shared["driver_rss_at_end_mib"]
        growth["driver_private_growth_last_half_kib_per_chunk"] = rss_growth(
            own, progress, start=0.5
        ).get("driver_growth_kib_per_chunk")
    return {
        **growth,
        "wall_s": round(wall, 1),
        "plan_s": round(planned, 2),
        "finalize_s": round(finalize, 2),
        "tree_cpu_s": round(sampler.tree_cpu, 1),
        "driver_cpu_s": round(sampler.driver_cpu, 1),
        "driver_peak_rss_mib": round(sampler.hwm_kib / 1024, 1),
        "driver_private_peak_mib": round(sampler.private_peak_kib / 1024, 1),
        "plasma_peak_mib": round(sampler.plasma_kib / 1024, 1),
        "rows_out": finished.get("rows"),
        "failed_rows": finished.get("failed_rows"),
    }


def rss_growth(
    rss: list[tuple[float, int]], progress: list[dict[str, Any]], start: float = 0.1
) -> dict[str, Any]:
    """The driver's growth while chunks commit: its RSS when ``start`` (a tenth) of the chunks
    had committed against its RSS at the last progress event, per chunk committed in between
    (engine start and Ray's own start-up left out). A driver that keeps per-chunk state grows
    linearly here; one that streams stays flat."""
    if not rss or not progress:
        return {}
    total = int(progress[-1]["chunks_total"])
    early = next((e for e in progress if int(e["chunks"]) >= total * start), None)
    late = progress[-1]
    if early is None or int(late["chunks"]) <= int(early["chunks"]):
        return {}

    def at(ts: float) -> int:
        before = [kib for t, kib in rss if t <= ts]
        return before[-1] if before else rss[0][1]

    lo, hi = at(float(early["ts"])), at(float(late["ts"]))
    chunks = int(late["chunks"]) - int(early["chunks"])
    return {
        "driver_rss_at_10pct_mib": round(lo / 1024, 1),
        "driver_rss_at_end_mib": round(hi / 1024, 1),
        "driver_growth_kib_per_chunk": round((hi - lo) / chunks, 2),
    }


def timed(cmd: list[str], code: Path) -> tuple[float, str]:
    t0 = time.time()
    p = subprocess.run(cmd, cwd=code, env=_env(code), capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {p.stderr[-2000:]}")
    return time.time() - t0, p.stdout


def job_case(rows: int, chunks: int, where: str, base: str, so: dict[str, Any], fs: Any,
             work: Path, tag: str, code: Path) -> dict[str, Any]:  # fmt: skip
    data = f"{base}/in-{rows}"
    if not fs.exists(f"{data}/part-0000.parquet"):
        write_input(fs, data, rows)
    out = f"{base}/out-{rows}-{chunks}-{time.time_ns()}"
    proto = "s3://" if where == "s3" else ""
    job = work / f"job-{where}-{rows}-{chunks}.yaml"
    job.write_text(job_yaml(f"{proto}{data}/", f"{proto}{out}/", -(-rows // chunks), so))
    print(f"  {tag}: job {where} {rows:,} rows / {chunks:,} chunks ...", flush=True)
    r = run_job(job, f"{where} {rows}/{chunks}", code)
    r.update(code=tag, storage=where, rows=rows, chunks=chunks)
    r["cpu_s_per_million_rows"] = round(r["tree_cpu_s"] / rows * 1e6, 1)
    r["cpu_ms_per_chunk"] = round(r["tree_cpu_s"] / chunks * 1e3, 1)
    r["status_s"], _ = timed(_cli("status", str(job), "--json"), code)
    r["resubmit_s"], _ = timed(_cli("submit", str(job)), code)
    r["status_s"], r["resubmit_s"] = round(r["status_s"], 2), round(r["resubmit_s"], 2)
    print(f"    {json.dumps(r)}", flush=True)
    return r


# --------------------------------------------------------------------------- plan (driver side)


PLAN_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
from batch.spec import parse_spec
from batch import plan as planning, runner
spec = parse_spec(open(sys.argv[2]).read(), source="job")
t0 = time.perf_counter()
plan = planning.make_plan(spec, required_columns=["text"])
t1 = time.perf_counter()
n = 0
feed = getattr(runner, "chunk_feed", None)
if feed is not None:  # the streaming feed: what Ray Data pulls
    for _ in feed(plan):
        n += 1
else:  # the old feed: every pending chunk pickled into one list for from_items
    import pickle
    items = [{"chunk": pickle.dumps(c), "identity": plan.identities.get(c.path, "")}
             for c in plan.pending]
    n = len(items)
t2 = time.perf_counter()
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a child started by a big
# parent would report the parent's peak.
peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(json.dumps({"plan_s": round(t1 - t0, 2), "feed_s": round(t2 - t1, 2), "fed": n,
                  "peak_rss_mib": round(peak / 1024, 1)}))
"""


def plan_case(rows: int, chunks: int, base: str, fs: Any, work: Path, tag: str,
              code: Path) -> dict[str, Any]:  # fmt: skip
    data = f"{base}/in-{rows}"
    if not fs.exists(f"{data}/part-0000.parquet"):
        print(f"  writing {rows:,} rows ...", flush=True)
        write_input(fs, data, rows)
    job = work / f"plan-{rows}-{chunks}.yaml"
    job.write_text(job_yaml(f"{data}/", f"{base}/plan-out-{time.time_ns()}/", -(-rows // chunks),
                            {}))  # fmt: skip
    t0 = time.time()
    p = subprocess.run([sys.executable, "-c", PLAN_CHILD, str(code), str(job)], cwd=code,
                       env=_env(code), capture_output=True, text=True)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(p.stderr[-2000:])
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r.update(code=tag, rows=rows, chunks=chunks, process_s=round(time.time() - t0, 1))
    print(f"    plan {json.dumps(r)}", flush=True)
    return r


# --------------------------------------------------------------------------- markers


def _marker(i: int, fingerprint: str) -> dict[str, Any]:
    cid = f"part-{i // 10000:04d}.{i:09d}-{i + 1:09d}.{i:010x}"
    return {
        "chunk_id": cid, "file": f"part-{i // 10000:04d}.parquet", "row_start": i,
        "row_end": i + 100, "fingerprint": fingerprint, "run_id": "bench", "attempts": 1,
        "rows": 100, "failed_rows": 0, "input_tokens": 300, "output_tokens": 200,
        "data_part": f"data/part-{cid}.{i:012x}.parquet", "failed_part": None,
        "adopted": False, "supersedes": None, "attempts_run": 1,
        "committed_at": time.time(), "engine": {"actor": "a1", "host": "h"},
        "timings": {"read_s": 0.001, "prepare_s": 0.001, "engine_s": 0.01},
    }  # fmt: skip


def markers_case(n: int, where: str, base: str, so: dict[str, Any], fs: Any, work: Path,
                 variants: list[tuple[str, Path]], as_driver: bool = False
                 ) -> dict[str, Any]:  # fmt: skip
    from batch import storage, store
    from batch.spec import parse_spec

    proto = "s3://" if where == "s3" else ""
    out = f"{base}/markers-{n}-{time.time_ns()}"
    job = work / f"markers-{where}-{n}.yaml"
    job.write_text(job_yaml(f"{proto}{base}/unused/", f"{proto}{out}/", 100, so))
    spec = parse_spec(job.read_text(), source="job")
    ofs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
    record = store.job_record(spec, fingerprint="f" * 16, listing="l", files=n // 10000 + 1,
                              rows=n * 100, chunks=n)  # fmt: skip
    store.ensure_job_record(spec, record)
    print(f"  markers {where}: writing {n:,} ...", flush=True)
    t0 = time.time()

    rollups = store.RollupWriter(spec) if as_driver else None
    lock = threading.Lock()

    def put(i: int) -> None:
        m = _marker(i, "f" * 16)
        path = storage.join(root, store.marker_name(m["chunk_id"]))
        body = json.dumps(m, sort_keys=True).encode()
        storage.create_only(ofs, path, body)
        if rollups is not None:  # what the commit hands the driver, and the driver rolls up
            stamp = store._created_stamp(ofs, path, body)
            with lock:
                rollups.add({"stamp": stamp, "marker": m} if stamp else None)

    with ThreadPoolExecutor(max_workers=32) as pool:
        list(pool.map(put, range(n)))
    if rollups is not None:
        rollups.flush()
    r: dict[str, Any] = {"storage": where, "markers": n, "write_s": round(time.time() - t0, 1),
                         "as_driver": as_driver}  # fmt: skip
    # The commit's stamp on S3 is the MD5 of the marker's bytes: is it what the listing shows?
    first = _marker(0, "f" * 16)
    entry = storage.list_entries(ofs, storage.join(root, store.MARKERS), ".json")[0]
    body = ofs.cat_file(entry["name"])
    r["listing_stamp_matches_commit_stamp"] = store.marker_stamp(entry) == (
        store._created_stamp(ofs, entry["name"], body)
    )
    del first
    t0 = time.time()
    ids = store.list_markers(spec)
    r["list_s"] = round(time.time() - t0, 2)
    if as_driver:  # rollups as after a run: finalize and status as a user meets them
        for tag, code in variants:
            finalize_cmd = [sys.executable, "-c", FINALIZE_CHILD, str(code), str(job)]
            t_status, text = timed(_cli("status", str(job), "--json"), code)
            r[f"{tag}_status_2_s"] = round(t_status, 1)
            r[f"{tag}_status_chunks_done"] = json.loads(text)["chunks_done"]
            r[f"{tag}_finalize_2_s"], r[f"{tag}_finalize_2_peak_mib"] = _finalize(
                finalize_cmd, code
            )
            print(f"    {tag}: {json.dumps(r)}", flush=True)
        return r
    t0 = time.time()
    paths = [storage.join(root, store.marker_name(c)) for c in ids]
    with ThreadPoolExecutor(max_workers=16) as pool:  # the old read_markers: one GET each
        old = list(pool.map(lambda p: storage.read_json(ofs, p), paths))
    r["read_one_by_one_s"] = round(time.time() - t0, 1)  # what the old code does per call
    assert len(old) == n
    for tag, code in variants:  # the old code first: it leaves no rollup behind
        status = _cli("status", str(job), "--json")
        finalize_cmd = [sys.executable, "-c", FINALIZE_CHILD, str(code), str(job)]
        # 1: nothing cached yet; finalize then writes the rollup (new code); 2: with it.
        t_status, text = timed(status, code)
        r[f"{tag}_status_1_s"] = round(t_status, 1)
        r[f"{tag}_status_chunks_done"] = json.loads(text)["chunks_done"]
        r[f"{tag}_finalize_1_s"], r[f"{tag}_finalize_1_peak_mib"] = _finalize(finalize_cmd, code)
        if tag != "before":
            r[f"{tag}_finalize_2_s"], r[f"{tag}_finalize_2_peak_mib"] = _finalize(
                finalize_cmd, code
            )
            r[f"{tag}_status_2_s"] = round(timed(status, code)[0], 1)
        print(f"    {tag}: {json.dumps(r)}", flush=True)
    print(f"    {json.dumps(r)}", flush=True)
    return r


FINALIZE_CHILD = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from batch.spec import parse_spec
from batch import job, plan as planning, storage, store
from batch.progress import NullReporter
import pyarrow as pa
spec = parse_spec(open(sys.argv[2]).read(), source="job")
fs, root = storage.open_fs(spec.output.path, spec.output.storage_options)
record = store.read_job_record(fs, root)
plan = planning.Plan(files=[], chunks=[], done=set(), schema=pa.schema([]), protocol="file")
job.finalize(spec, record, plan, NullReporter(), time.time(), chunks_run=0)
peak = next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM:"))
print(f"peak_kib={peak}")
"""


def _finalize(cmd: list[str], code: Path) -> tuple[float, float]:
    """Seconds and the finalizing process's peak RSS in MiB (VmHWM: imports included)."""
    took, out = timed(cmd, code)
    kib = next(int(x.split("=")[1]) for x in out.splitlines() if x.startswith("peak_kib="))
    return round(took, 1), round(kib / 1024, 1)


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def storages(names: list[str], work: Path) -> Iterator[dict[str, tuple[str, dict[str, Any], Any]]]:
    import fsspec

    out: dict[str, tuple[str, dict[str, Any], Any]] = {}
    with contextlib.ExitStack() as stack:
        if "local" in names:
            out["local"] = (str(work / "local"), {}, fsspec.filesystem("file"))
        if "s3" in names:
            from tests.s3server import seaweedfs

            server = stack.enter_context(seaweedfs(work / "weed"))
            server.make_bucket("bench")
            out["s3"] = ("bench", server.storage_options, server.fs)
        yield out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="1000000:1000", help="rows:chunks,... for real jobs")
    p.add_argument("--storage", default="local", help="local,s3")
    p.add_argument("--plan", default="", help="rows:chunks,... for the driver-side plan only")
    p.add_argument("--markers", type=int, default=0, help="synthetic markers (0: skip)")
    p.add_argument(
        "--as-driver",
        action="store_true",
        help="write the markers' rollups as a run's driver does (one per 2,000 commits), then "
        "time status and finalize as after a run; skips the cold reads (no rollup)",
    )
    p.add_argument(
        "--code",
        default=f"after={ROOT}",
        help="tag=checkout,...: the code each case runs, e.g. before=/tmp/base",
    )
    p.add_argument("--work", default=None)
    a = p.parse_args()
    work = Path(a.work or tempfile.mkdtemp(prefix="orch-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"jobs": [], "plan": [], "markers": []}
    names = [s for s in a.storage.split(",") if s]
    variants = [(v.split("=", 1)[0], Path(v.split("=", 1)[1]).resolve())
                for v in a.code.split(",")]  # fmt: skip
    with storages(names, work) as where:
        import fsspec

        for case in filter(None, a.plan.split(",")):
            rows, chunks = (int(x) for x in case.split(":"))
            for tag, code in variants:
                result["plan"].append(
                    plan_case(
                        rows,
                        chunks,
                        str(work / "local"),
                        fsspec.filesystem("file"),
                        work,
                        tag,
                        code,
                    )
                )
        for name, (base, so, fs) in where.items():
            for case in filter(None, a.cases.split(",")):
                rows, chunks = (int(x) for x in case.split(":"))
                for tag, code in variants:
                    result["jobs"].append(
                        job_case(rows, chunks, name, base, so, fs, work, tag, code)
                    )
            if a.markers:
                result["markers"].append(
                    markers_case(a.markers, name, base, so, fs, work, variants, a.as_driver)
                )
    result["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    result["command"] = "python benchmarks/orchestration.py " + " ".join(sys.argv[1:])
    result["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                   capture_output=True, text=True).stdout.strip()  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "orchestration.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("runs", []).append(result)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    (RESULTS / "orchestration.md").write_text(render(doc))
    print(json.dumps(result, indent=2))


def render(doc: dict[str, Any]) -> str:
    """Every run's figures as tables (``orchestration.md``; notes live in ``doc["notes"]``)."""
    out = ["# Orchestration cost (fake engine taking no time)", ""]
    out += [f"- {n}" for n in doc.get("notes", [])] + [""]
    jobs = ["| run | code | storage | rows | chunks | wall s | plan s | finalize s | CPU s (all "
            "processes) | CPU s per 1M rows | CPU ms/chunk | driver CPU s | driver peak RSS MiB "
            "| driver growth KiB/chunk | object store peak MiB | status s | resubmit s |",
            "|" + "---|" * 17]  # fmt: skip
    memory = ["| run | code | storage | rows | chunks | driver peak RSS MiB | "
              "of it private, peak MiB | "
              "private growth KiB/chunk (from 10%) | private growth KiB/chunk (last half) | "
              "store pages mapped at end MiB | store pages growth KiB/chunk |",
              "|" + "---|" * 11]  # fmt: skip
    plans = ["| run | code | rows | chunks | make_plan s | feed s | peak RSS MiB |",
             "|" + "---|" * 7]  # fmt: skip
    marks = ["| run | storage | markers | code | write s | list s | one GET each s | status "
             "(nothing cached) s | finalize 1 s | finalize 2 s | status 2 s | "
             "finalize 2 peak RSS MiB |",
             "|" + "---|" * 12]  # fmt: skip
    for i, run in enumerate(doc.get("runs", []), 1):
        tag = f"{i} ({run.get('date', '')})"
        for r in run.get("jobs", []):
            jobs.append(
                f"| {tag} | {r['code']} | {r['storage']} | {r['rows']:,} | {r['chunks']:,} | "
                f"{r['wall_s']} | {r['plan_s']} | {r['finalize_s']} | {r['tree_cpu_s']} | "
                f"{r['cpu_s_per_million_rows']} | {r['cpu_ms_per_chunk']} | {r['driver_cpu_s']} | "
                f"{r['driver_peak_rss_mib']} | {r.get('driver_growth_kib_per_chunk', '')} | "
                f"{r['plasma_peak_mib']} | {r['status_s']} | {r['resubmit_s']} |"
            )
            if "driver_private_growth_kib_per_chunk" in r:
                memory.append(
                    f"| {tag} | {r['code']} | {r['storage']} | {r['rows']:,} | {r['chunks']:,} | "
                    f"{r['driver_peak_rss_mib']} | {r['driver_private_peak_mib']} | "
                    f"{r['driver_private_growth_kib_per_chunk']} | "
                    f"{r.get('driver_private_growth_last_half_kib_per_chunk', '')} | "
                    f"{r['driver_store_pages_at_end_mib']} | "
                    f"{r['driver_store_pages_growth_kib_per_chunk']} |"
                )
        for r in run.get("plan", []):
            plans.append(f"| {tag} | {r['code']} | {r['rows']:,} | {r['chunks']:,} | "
                         f"{r['plan_s']} | {r['feed_s']} | {r['peak_rss_mib']} |")  # fmt: skip
        for r in run.get("markers", []):
            for code in ("before", "after"):
                if f"{code}_status_1_s" not in r and f"{code}_status_2_s" not in r:
                    continue
                marks.append(
                    f"| {tag} | {r['storage']} | {r['markers']:,} | {code} | "
                    f"{r.get('write_s', '')} | {r.get('list_s', '')} | "
                    f"{r.get('read_one_by_one_s', '')} | "
                    f"{r.get(f'{code}_status_1_s', 'not run')} | "
                    f"{r.get(f'{code}_finalize_1_s', '')} | "
                    f"{r.get(f'{code}_finalize_2_s', '')} | {r.get(f'{code}_status_2_s', '')} | "
                    f"{r.get(f'{code}_finalize_2_peak_mib', '')} |"
                )
    for title, rows in (("Jobs", jobs),
                        ("Driver memory: its own pages and the object store's", memory),
                        ("Plan and feed, driver side only", plans),
                        ("Finalize and status over many markers", marks)):  # fmt: skip
        if len(rows) > 2:
            out += [f"## {title}", "", *rows, ""]
    out += ["Commands:", ""] + [f"- `{r.get('command')}` (git {r.get('git')})"
                                for r in doc.get("runs", [])]  # fmt: skip
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
