"""Result cache at scale: a cache of 10,000,000 entries, and what it adds to a run that misses
every entry.

1. Builds a synthetic cache of ``--entries`` entries (default 10,000,000) in a local folder, as
   the result cache stores them (``batch.cache.schema()``: random 16-byte keys, a result JSON of
   ``--result-bytes`` (300) that ``batch.cache.result_from_json`` reads, one namespace), appended
   to ``<cache>/results.lance`` in large batches with ``lance.write_dataset``, then one B-tree
   index ``key_idx`` on the key (as ``batch.cache.ensure_table`` makes it). Reports the time of
   each step and the size on disk.
2. Runs the throughput benchmark's job (real vLLM, SmolLM2-135M, greedy, ignore_eos) over
   ``--rows`` different reviews twice per round, interleaved and in alternating order: with
   ``cache.path`` on that cache (read-write, as a nightly job has it: every lookup misses,
   every answer is written and folded into the index at the end), and without a cache path.
   After each cached run the cache is restored to its built version, so every run meets the
   same 10,000,000 entries and misses them all.

Reported per run: wall time (process start to exit), the driver's peak RSS (``VmHWM`` of the
``batchinfer submit`` process alone; Ray's processes and workers are separate), the largest
Ray worker's peak RSS apart from the engine (lookups run in the read tasks), and each chunk's
cache time from its marker (``timings.cache_s``: keying, in-chunk dedup and the lookup). The
targets (issue 14): the cache adds less than 200 MB to the driver and less than 5% to the wall
time.

Run from the repository root (about 10 minutes on 2 quiet cores: two to build the cache,
then 6 runs of a little over a minute)::

    .venv/bin/python benchmarks/cache_scale.py

It writes ``benchmarks/results/cache-scale.{json,md}``. ``--quick`` is a smoke run (200,000
entries, 32 rows, one round) that writes nothing unless ``--results`` is given. ``--cache DIR``
keeps the cache in DIR; a cache already there with the right number of entries is reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.cache import med, run_batchinfer, shown
from benchmarks.throughput import (
    Bench,
    asdict,
    dump_json,
    generate_engine_args,
    machine,
    versions,
    write_input,
)

ROOT = Path(__file__).resolve().parent.parent
TARGET_DRIVER_MIB = 200
TARGET_WALL = 0.05
ALPHABET = b"abcdefghijklmnopqrstuvwxyz      "  # 32 symbols: a random byte & 31 picks one


# --------------------------------------------------------------------------- the cache


def synthetic_entries(n: int, rng: Any, result_bytes: int, namespace: str) -> Any:
    """``n`` cache rows in ``batch.cache.schema()``: random keys, and results of exactly
    ``result_bytes`` bytes (``{"text": <random words>, ...}``), built without a Python loop."""
    import numpy as np
    import pyarrow as pa

    from batch import cache

    prefix = b'{"text":"'
    suffix = b'","finish_reason":"length","input_tokens":70,"output_tokens":32}'
    body = result_bytes - len(prefix) - len(suffix)
    if body < 1:
        raise SystemExit(f"--result-bytes must be more than {len(prefix) + len(suffix)}")
    keys = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(16), n, [None, pa.py_buffer(rng.bytes(16 * n))]
    )
    text = np.empty((n, result_bytes), np.uint8)
    text[:, : len(prefix)] = np.frombuffer(prefix, np.uint8)
    letters = np.frombuffer(rng.bytes(n * body), np.uint8).reshape(n, body) & 31
    text[:, len(prefix) : len(prefix) + body] = np.frombuffer(ALPHABET, np.uint8)[letters]
    text[:, len(prefix) + body :] = np.frombuffer(suffix, np.uint8)
    offsets = np.arange(0, (n + 1) * result_bytes, result_bytes, dtype=np.int64)
    results = pa.LargeStringArray.from_buffers(
        n, pa.py_buffer(offsets), pa.py_buffer(text.reshape(-1))
    ).cast(pa.string())
    now = int(time.time() * 1000)
    return pa.table(
        {
            cache.KEY: keys,
            "namespace": pa.repeat(pa.scalar(namespace, pa.string()), n),
            "result": results,
            "input_tokens": pa.array(np.full(n, 70, np.int32)),
            "output_tokens": pa.array(np.full(n, 32, np.int32)),
            "created_at": pa.array(np.full(n, now, np.int64), pa.timestamp("ms", tz="UTC")),
            "run_id": pa.repeat(pa.scalar("synthetic", pa.string()), n),
        },
        schema=cache.schema(),
    )


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def table_uri(folder: Path) -> str:
    from batch.cache import CacheContext

    return CacheContext(root=str(folder)).table_uri


def existing(folder: Path, entries: int) -> dict[str, Any] | None:
    """A cache built before with ``entries`` rows and the key index, or None."""
    import lance

    from batch.cache import INDEX

    try:
        ds = lance.dataset(table_uri(folder))
    except (ValueError, FileNotFoundError, OSError):
        return None
    if ds.count_rows() != entries or not any(i["name"] == INDEX for i in ds.list_indices()):
        return None
    return {"version": ds.version, "fragments": len(ds.get_fragments())}


def build(folder: Path, entries: int, batch_rows: int, result_bytes: int, seed: int) -> dict:
    """Write the synthetic cache (appends of ``batch_rows``), then index it. Timed apart."""
    import lance
    import numpy as np

    from batch.cache import INDEX, KEY, schema

    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    uri = table_uri(folder)
    rng = np.random.default_rng(seed)
    namespace = rng.bytes(16).hex()
    t0 = time.perf_counter()
    generate_s = 0.0
    for i, start in enumerate(range(0, entries, batch_rows)):
        g = time.perf_counter()
        table = synthetic_entries(min(batch_rows, entries - start), rng, result_bytes, namespace)
        generate_s += time.perf_counter() - g
        lance.write_dataset(table, uri, schema=schema(), mode="create" if i == 0 else "append")
        done = start + table.num_rows
        if i % 10 == 9 or done == entries:
            print(f"  {done:,} entries written ({time.perf_counter() - t0:.0f} s)", flush=True)
    t1 = time.perf_counter()
    ds = lance.dataset(uri)
    ds.create_scalar_index(KEY, "BTREE", name=INDEX)
    t2 = time.perf_counter()
    ds = lance.dataset(uri)
    return {
        "entries": ds.count_rows(),
        "result_bytes": result_bytes,
        "batch_rows": batch_rows,
        "write_s": round(t1 - t0, 1),
        "of_which_generating_s": round(generate_s, 1),
        "index_s": round(t2 - t1, 1),
        "total_s": round(t2 - t0, 1),
        "bytes": folder_bytes(folder),
        "fragments": len(ds.get_fragments()),
        "version": ds.version,
    }


def restore(folder: Path, version: int) -> int:
    """Make ``version`` the cache's newest again (a cached run added its answers); returns the
    rows the run had added."""
    import lance

    uri = table_uri(folder)
    added = int(lance.dataset(uri).count_rows()) - int(
        lance.dataset(uri, version=version).count_rows()
    )
    lance.dataset(uri, version=version).restore()
    return added


# --------------------------------------------------------------------------- reporting


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for mode, figs in runs.items():
        chunks = [s for f in figs for s in f["cache_s"]]
        out[mode] = {
            "wall_s": med([f["wall_s"] for f in figs]),
            "engine_phase_s": med([f["phases_s"]["engine phase"] for f in figs]),
            "after_last_result_s": med([f["phases_s"]["after last result"] for f in figs]),
            "gpu_seconds": med([f["gpu_seconds"] for f in figs]),
            "driver_peak_rss_mib": med([f["driver_peak_rss_mib"] for f in figs]),
            "largest_non_engine_peak_rss_mib": med(
                [f["processes"]["largest_non_engine_peak_rss_mib"] for f in figs]
            ),
            "tree_rss_sum_peak_mib": med([f["processes"]["tree_rss_sum_peak_mib"] for f in figs]),
            "chunk_cache_s_median": percentile(chunks, 0.5),
            "chunk_cache_s_p90": percentile(chunks, 0.9),
            "chunk_cache_s_max": max(chunks) if chunks else None,
            "chunks_per_run": len(figs[0]["cache_s"]),
        }
    c, n = out["cache"], out["none"]
    paired = [
        a["wall_s"] / b["wall_s"] - 1 for a, b in zip(runs["cache"], runs["none"], strict=True)
    ]
    out["overhead"] = {
        "wall": round(c["wall_s"] / n["wall_s"] - 1, 4),
        "wall_paired_median": med(paired),
        "wall_per_round": [round(x, 4) for x in paired],
        "driver_mib": round(c["driver_peak_rss_mib"] - n["driver_peak_rss_mib"], 1),
        "largest_worker_mib": round(
            (c["largest_non_engine_peak_rss_mib"] or 0)
            - (n["largest_non_engine_peak_rss_mib"] or 0),
            1,
        ),
        "targets": {"driver_mib": TARGET_DRIVER_MIB, "wall": TARGET_WALL},
    }
    o = out["overhead"]
    o["driver_met"] = o["driver_mib"] < TARGET_DRIVER_MIB
    o["wall_met"] = o["wall"] < TARGET_WALL
    return out


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(doc: dict[str, Any]) -> str:
    b, s, p = doc["build"], doc["summary"], doc["parameters"]
    o = s["overhead"]
    met = {True: "**met**", False: "**missed**"}
    titles = doc["runs"]["cache"][0]["processes"]["largest_non_engine_titles"]
    ray_titles = ", ".join(t.strip() for t in titles if t.startswith("ray::")) or "?"
    lines = [
        f"# Result cache at scale: {b['entries']:,} entries, a run that misses every one",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}  ",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['logical_cpus']} logical CPUs, "
        f"{doc['machine']['memory_gib']} GiB  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ",
        "Parameters: " + ", ".join(f"{k}={v}" for k, v in p.items()),
        "",
        "## The cache",
        "",
        f"{b['entries']:,} synthetic entries (random 16-byte keys, {b['result_bytes']}-byte "
        f"results), local disk, {b['fragments']} fragment(s), one B-tree key index"
        + (" (reused from an earlier build)" if b.get("reused") else "")
        + ".",
        "",
        "| entries | write s (generating) | index s | total s | size on disk |",
        "|---:|---:|---:|---:|---:|",
        f"| {b['entries']:,} | {b.get('write_s', 0):.1f} ({b.get('of_which_generating_s', 0):.1f}) "
        f"| {b.get('index_s', 0):.1f} | {b.get('total_s', 0):.1f} | {size(b['bytes'])} |",
        "",
        f"## A run of {p['rows']} rows with and without it",
        "",
        f"With the cache (read-write; every lookup misses, every answer is written and indexed "
        f"at the end) against no cache path, {doc['repeat']} rounds, alternating order; "
        "medians. The cache is restored to its built version after each cached run.",
        "",
        f"- wall time: **{o['wall']:+.1%}** (paired per round: median "
        f"{o['wall_paired_median']:+.1%}, "
        f"{', '.join(f'{x:+.1%}' for x in o['wall_per_round'])}); target < "
        f"{TARGET_WALL:.0%}: {met[o['wall_met']]}",
        f"- driver peak RSS: **{o['driver_mib']:+.1f} MiB**; target < {TARGET_DRIVER_MIB} MB: "
        f"{met[o['driver_met']]}",
        f"- largest Ray worker apart from the engine (the read tasks look up): "
        f"{o['largest_worker_mib']:+.1f} MiB (with the cache, that worker ran: {ray_titles})",
        "",
        "| run | wall s | engine phase s | after last result s | gpu_seconds | driver peak RSS MiB "
        "| largest worker MiB | all processes MiB | chunks | cache_s per chunk: median "
        "| p90 | max |",
        "|---|" + "---:|" * 11,
    ]
    for mode in ("cache", "none"):
        f = s[mode]
        name = f"cache.path: {b['entries']:,} entries" if mode == "cache" else "no cache path"
        lines.append(
            f"| {name} | {f['wall_s']:.1f} | {f['engine_phase_s']:.1f} | "
            f"{f['after_last_result_s']:.1f} | {f['gpu_seconds']:.1f} | "
            f"{f['driver_peak_rss_mib']:.0f} | {f['largest_non_engine_peak_rss_mib'] or 0:.0f} | "
            f"{f['tree_rss_sum_peak_mib']:.0f} | {f['chunks_per_run']} | "
            f"{f['chunk_cache_s_median'] * 1000:.0f} ms | {f['chunk_cache_s_p90'] * 1000:.0f} ms "
            f"| {f['chunk_cache_s_max'] * 1000:.0f} ms |"
        )
    lines += [
        "",
        "cache_s is the read task's time for keying the chunk's rows, dedup within the chunk and "
        "(with the cache) the indexed lookup, from each chunk's marker; without a cache path it "
        "is the keying alone (dedup is on by default). All processes: the peak of the summed "
        "RSS of every process below the driver (shared pages counted in each).",
        "",
        "Every run (wall s, driver MiB):",
        "",
    ]
    for mode, figs in doc["runs"].items():
        lines.append(
            f"- {mode}: "
            + ", ".join(f"{f['wall_s']:.1f} s / {f['driver_peak_rss_mib']:.0f}" for f in figs)
        )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=10_000_000)
    p.add_argument("--result-bytes", type=int, default=300)
    p.add_argument("--batch-rows", type=int, default=500_000, help="entries per append")
    p.add_argument("--cache", default=None, help="the cache folder (default: in --work)")
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64, help="vLLM max_num_seqs")
    p.add_argument("--rows-per-chunk", type=int, default=16)
    p.add_argument("--chunks-in-flight", type=int, default=4)
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--repeat", type=int, default=3, help="rounds (one run of each per round)")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--results", default=None, help="where results go (default benchmarks/results)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 200,000 entries, 32 rows, max_tokens 8, one round; "
                   "writes nothing unless --results")  # fmt: skip
    a = p.parse_args(argv)
    if a.quick:
        a.entries, a.rows, a.max_tokens, a.repeat = 200_000, 32, 8, 1

    from batch.models import resolve_model

    bench = Bench(
        model=a.model,
        embed_model="",
        device=a.device,
        rows=a.rows,
        embed_rows=0,
        max_tokens=a.max_tokens,
        batch_size=a.batch_size,
        rows_per_chunk=a.rows_per_chunk,
        embed_rows_per_chunk=0,
        chunks_in_flight=a.chunks_in_flight,
        engine_args=generate_engine_args(a.device, a.engine_arg),
        embed_engine_args={},
    )
    resolve_model(bench.model)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-cache-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    print(f"scratch and logs: {work}", flush=True)
    folder = Path(a.cache) if a.cache else work / "cache"

    found = existing(folder, a.entries)
    if found:
        print(f"reusing the cache in {folder} ({a.entries:,} entries)", flush=True)
        built = {"entries": a.entries, "result_bytes": a.result_bytes, "reused": True,
                 "bytes": folder_bytes(folder), **found}  # fmt: skip
    else:
        print(f"building a cache of {a.entries:,} entries in {folder} ...", flush=True)
        built = build(folder, a.entries, a.batch_rows, a.result_bytes, a.seed)
    print(f"  {json.dumps(built)}", flush=True)
    version = int(built["version"])

    data = write_input(work / "data", a.rows)
    runs: dict[str, list[dict[str, Any]]] = {"cache": [], "none": []}
    for r in range(a.repeat):
        for mode in ("cache", "none") if r % 2 == 0 else ("none", "cache"):
            print(f"{mode} (round {r + 1} of {a.repeat}) ...", flush=True)
            fig = run_batchinfer(bench, data, work, log, f"scale-{mode}", tree=True,
                                 cache=folder if mode == "cache" else None)  # fmt: skip
            if mode == "cache":
                fig["entries_added"] = restore(folder, version)
                if fig["cached_rows"]:
                    raise SystemExit(f"{fig['cached_rows']} rows were cache hits: not a miss run")
            for key in ("texts", "cached_ids"):
                fig.pop(key, None)
            runs[mode].append(fig)
            print(f"  {shown(fig)}", flush=True)
    for mode, figs in runs.items():
        for f in figs:
            if f["rows_out"] != a.rows or f["failed_rows"]:
                raise SystemExit(f"{mode}: {f['rows_out']} rows, {f['failed_rows']} failed")
    summary = summarise(runs)
    doc = {
        "command": " ".join(["python", "benchmarks/cache_scale.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "parameters": {
            **{k: v for k, v in asdict(bench).items() if not k.startswith("embed")},
            "entries": a.entries,
        },
        "repeat": a.repeat,
        "build": built,
        "summary": summary,
        "runs": runs,
    }
    (work / "cache-scale.json").write_text(dump_json(doc))  # always, to re-render from
    text = markdown(doc)
    print(text)
    if a.quick and not a.results:
        return
    out = Path(a.results or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cache-scale.json").write_text(dump_json(doc))
    (out / "cache-scale.md").write_text(text)
    print(f"wrote {out / 'cache-scale.json'} and .md")


if __name__ == "__main__":
    main()
