"""Result cache: dedup, a second night, and the no-duplicate guard, against raw vLLM and Ray
Data LLM, in one run.

Same model, engine arguments, prompts (checked equal row by row for every table) and sampling
(greedy, ``ignore_eos``, a fixed ``max_tokens``: every row is the same number of tokens) for
every system; each run a fresh process (the runners of ``benchmarks/throughput.py``), rounds
interleaved. Three scenarios:

* ``dups``: a table with a share of duplicate rows (default 30%: copies of other rows' review,
  new ids, at random positions, fixed seed). Raw vLLM (``LLM.chat`` over every row, as a user
  would), Ray Data LLM (every row) and batchinfer (its default: dedup on, no cache path).
  Reported: rows/s over the engine phase (first request at the engine to last result) and over
  the wall time, and batchinfer's over raw vLLM's (issue 14's target: >= 1.35x).
* ``nights``: night 1 is batchinfer over a table of unique rows with a fresh cache folder;
  night 2 the same table with a share of rows changed (default 10%: a sentence added to the
  review) or new (10%: replacing others), the same cache. Reported: night 2's wall time and
  accelerator-seconds (the ledger's ``gpu_seconds``) as a share of night 1's (target <= 30%),
  night 2's ledger ``cache`` block, and raw vLLM and Ray Data LLM doing night 2 in full (they
  have no cache; their engine-held time is engine construction to process exit).
* ``guard``: no duplicates and no cache (batchinfer's default job over night 2's table: dedup
  keys every row and finds nothing to share): steady output tokens/s as in the throughput
  benchmark, against raw vLLM's run of the same table in the same round (target >= 0.95x).

Run from the repository root (CPU default: SmolLM2-135M, 256 rows, max_tokens 32, two rounds
of 8 runs; about 22 minutes on 2 quiet cores)::

    .venv/bin/python benchmarks/cache.py --work /tmp/bench-cache

It prints the tables and writes ``benchmarks/results/cache-<device>.{json,md,png}``.
``--quick`` is a smoke run (32 rows, max_tokens 8, one round) that writes nothing unless
``--results`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.driver_scale import Sampler
from benchmarks.throughput import (
    SYSTEM_PROMPT,
    USER_FORMAT,
    Bench,
    asdict,
    batchinfer_job,
    check_same_work,
    dump_json,
    figures,
    generate_engine_args,
    machine,
    median_figures,
    run_system,
    versions,
    warm_up,
    write_input,
)

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("dups", "nights", "guard")
TARGETS = {"dups": 1.35, "nights": 0.30, "guard": 0.95}
EDIT = " Edit: a month later I still feel the same."  # a changed row's review gains this
COLOURS = {"vllm": "#7f7f7f", "ray-data-llm": "#1f77b4", "batchinfer": "#2ca02c"}


# --------------------------------------------------------------------------- the tables


def _write(table: Any, folder: Path) -> str:
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reviews.parquet"
    pq.write_table(table, path, row_group_size=64)
    return str(path)


def make_tables(
    work: Path, rows: int, dup_share: float, changed_share: float, seed: int
) -> dict[str, Any]:
    """The three tables, each alone in its folder (a batchinfer job reads the folder):

    * ``dups``: ``rows`` rows of which ``round(rows * dup_share)`` repeat another row's review
      (title, body, rating, product; a new review_id), at random positions;
    * ``night1``: ``rows`` different reviews;
    * ``night2``: night 1 with half of ``round(rows * changed_share)`` rows edited (same id, the
      body gains a sentence) and the other half replaced by new reviews, at random positions.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    n_dup = round(rows * dup_share)
    n_changed_total = round(rows * changed_share)
    n_new = n_changed_total // 2
    n_edit = n_changed_total - n_new
    pool = pq.read_table(write_input(work / "pool", rows + n_new)).to_pylist()  # all different

    unique = pool[: rows - n_dup]
    copies = [
        {**rng.choice(unique), "review_id": f"d{i:06d}"} for i in range(n_dup)
    ]  # a copy's id is new; its review is another row's
    dups = unique + copies
    rng.shuffle(dups)

    night1 = pool[:rows]
    night2 = [dict(r) for r in night1]
    touched = rng.sample(range(rows), n_edit + n_new)
    for i in touched[:n_edit]:
        night2[i]["body"] = night2[i]["body"] + EDIT
    for i, new in zip(touched[n_edit:], pool[rows:], strict=True):
        night2[i] = new
    schema = pq.read_schema(work / "pool" / "reviews.parquet")
    return {
        name: _write(pa.Table.from_pylist(table, schema=schema), work / f"data-{name}")
        for name, table in (("dups", dups), ("night1", night1), ("night2", night2))
    } | {"n_dup": n_dup, "n_edit": n_edit, "n_new": n_new}


def messages(row: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat messages raw vLLM and Ray Data LLM send (throughput.run_vllm, run_ray_data_llm)."""
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": USER_FORMAT.format(**row)},
    ]


def check_prompts(bench: Bench, data: str) -> set[str]:
    """Every row's messages in batchinfer's job (its pipeline's ``prepare``) equal the ones the
    other systems send. Returns the distinct prompts (as JSON)."""
    import pyarrow.parquet as pq

    from batch.spec import parse_spec
    from pipelines.generate import Generate

    spec = parse_spec(batchinfer_job(bench, "generate", data, "/tmp/unused"), source="<bench>")
    pipeline = Generate(spec)
    distinct = set()
    for row in pq.read_table(data).to_pylist():
        ours = pipeline.prepare(row)
        assert ours == messages(row), f"prompts differ for {row['review_id']}: {ours}"
        distinct.add(json.dumps(ours, sort_keys=True))
    return distinct


def check_tables(bench: Bench, tables: Mapping[str, Any], rows: int) -> dict[str, Any]:
    """The prompts are equal across systems, and the tables hold what they claim."""
    dups, night1, night2 = (check_prompts(bench, tables[n]) for n in ("dups", "night1", "night2"))
    assert len(dups) == rows - tables["n_dup"], (len(dups), rows, tables["n_dup"])
    assert len(night1) == rows and len(night2) == rows, (len(night1), len(night2))
    assert len(night2 - night1) == tables["n_edit"] + tables["n_new"], len(night2 - night1)
    return {
        "rows": rows,
        "dups_distinct_prompts": len(dups),
        "dups_duplicate_rows": rows - len(dups),
        "night2_changed_rows": tables["n_edit"],
        "night2_new_rows": tables["n_new"],
        "night2_prompts_not_in_night1": len(night2 - night1),
    }


# --------------------------------------------------------------------------- batchinfer runs


def batchinfer_raw(out: str) -> dict[str, Any]:
    """Timings, rows, tokens and the ledger, from batchinfer's own output. Rows served from the
    result cache have no completion time (the engine did not answer them in this run): the
    timed figures count the rows the engine answered or shared in this run."""
    import pyarrow.dataset as pads

    markers = [json.loads(p.read_text()) for p in Path(out, "_markers").rglob("*.json")]
    table = pads.dataset(Path(out, "data"), format="parquet").to_table()
    ledger = json.loads(Path(out, "ledger.json").read_text())
    rows = table.to_pylist()
    timed = [r for r in rows if r["_finished_at"] is not None]
    engines = [m["engine"] for m in markers if m.get("engine")]
    starts = [m["timings"]["engine_start"] for m in markers if "engine_start" in m["timings"]]
    return {
        "engine_created": min(e["created"] for e in engines),
        "engine_ready": min(e["ready"] for e in engines),
        "first_request": min(starts),
        "finished": [r["_finished_at"] for r in timed],
        "tokens": [int(r["output_tokens"]) for r in timed],
        "rows_out": len(rows),
        "all_tokens": sum(int(r["output_tokens"]) for r in rows),
        "cached_rows": sum(1 for r in rows if r.get("_cached")),
        "texts": {r["review_id"]: r["generated_text"] for r in rows},
        "cached_ids": [r["review_id"] for r in rows if r.get("_cached")],
        "cache_s": sorted(round(m["timings"].get("cache_s", 0.0), 4) for m in markers),
        "gpu_seconds": ledger["gpu_seconds"],
        "engine_idle_fraction": ledger["engine_idle_fraction"],
        "failed_rows": ledger["failed_rows"],
        "cache": ledger.get("cache"),
    }


class TreeSampler(threading.Thread):
    """Samples the RSS of every process below the driver (Ray's own, its workers, the engine)
    every second: each one's peak, and the peak of their sum (shared pages counted in each
    process, so an upper bound)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[int, int] = {}
        self.titles: dict[int, set[str]] = {}
        self.sum_peak = 0

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
            while root.is_running() and root.status() != psutil.STATUS_ZOMBIE:
                total = 0
                for child in root.children(recursive=True):
                    try:
                        rss = child.memory_info().rss
                        title = " ".join(child.cmdline())[:60] or child.name()
                    except psutil.Error:
                        continue
                    total += rss
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), rss)
                    self.titles.setdefault(child.pid, set()).add(title)
                self.sum_peak = max(self.sum_peak, total)
                time.sleep(1.0)
        except psutil.Error:
            return

    def report(self, top: int = 5) -> dict[str, Any]:
        largest = sorted(self.peaks, key=lambda pid: -self.peaks[pid])
        engine = ("EngineStage", "VLLM", "EngineCore")
        workers = [p for p in largest if not any(e in t for t in self.titles[p] for e in engine)]
        return {
            "tree_rss_sum_peak_mib": round(self.sum_peak / 2**20, 1),
            "largest_non_engine_peak_rss_mib": round(self.peaks[workers[0]] / 2**20, 1)
            if workers
            else None,
            "largest_non_engine_titles": sorted(self.titles[workers[0]])[:4] if workers else [],
            "largest": [
                {
                    "peak_rss_mib": round(self.peaks[p] / 2**20, 1),
                    "titles": sorted(self.titles[p])[:4],
                }
                for p in largest[:top]
            ],
        }


def run_batchinfer(
    bench: Bench,
    data: str,
    work: Path,
    log: Path,
    name: str,
    *,
    cache: Path | None = None,
    tree: bool = False,
    tries: int = 2,
) -> dict[str, Any]:
    """One ``batchinfer submit`` of the throughput benchmark's job over ``data`` (with
    ``cache.path`` when given), in a fresh process, with the driver's peak RSS sampled (and,
    with ``tree``, every process below it). As throughput.run_system: a run that did its work
    counts (its exit code recorded); one that produced nothing is tried again once."""
    import yaml

    failures: list[int] = []
    for _ in range(tries):
        out = work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        job = yaml.safe_load(batchinfer_job(bench, "generate", str(Path(data).parent), str(out)))
        job["name"] = f"bench-cache-{name}"
        if cache is not None:
            job["cache"] = {"path": str(cache)}
        job_file = work / f"job-{name}.yaml"
        job_file.write_text(yaml.safe_dump(job, sort_keys=False))
        cmd = [str(Path(sys.executable).with_name("batchinfer")), "submit", str(job_file)]
        cmd.append("--quiet")
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        warm_up(bench, "generate")
        spawned = time.time()
        with log.open("a") as f:
            f.write(f"\n===== batchinfer {name}: {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
            sampler = Sampler(proc.pid)
            sampler.start()
            below = TreeSampler(proc.pid)
            if tree:
                below.start()
            proc.wait()
        exited = time.time()
        sampler.join(timeout=2)
        if tree:
            below.join(timeout=3)
        if Path(out, "_MANIFEST.json").exists():
            raw = batchinfer_raw(str(out))
            fig = figures(raw, spawned, exited, "generate", bench.batch_size)
            for key in ("rows_out", "all_tokens", "cached_rows", "texts", "cached_ids",
                        "cache_s", "gpu_seconds", "engine_idle_fraction", "failed_rows",
                        "cache"):  # fmt: skip
                fig[key] = raw[key]
            fig["engine_rows"] = (raw["cache"] or {}).get("engine_rows", raw["rows_out"])
            fig["engine_held_s"] = raw["gpu_seconds"]
            fig["driver_peak_rss_mib"] = round(sampler.hwm_kb / 1024, 1)
            if tree:
                fig["processes"] = below.report()
            if proc.returncode != 0:
                fig["exit_code"] = proc.returncode
            if failures:
                fig["failed_tries"] = failures
            return rows_per_s(fig)
        failures.append(proc.returncode)
        print(f"  batchinfer {name} failed (exit {proc.returncode}); see {log}", flush=True)
    raise SystemExit(f"batchinfer {name} failed {tries} times (exits {failures}); see {log}")


def run_other(system: str, bench: Bench, data: str, work: Path, log: Path) -> dict[str, Any]:
    """Raw vLLM or Ray Data LLM over ``data``: throughput.run_system, plus rows/s, its engine's
    held time (engine construction to process exit) and, for raw vLLM, its answers."""
    fig = run_system(system, bench, "generate", data, work, log)
    fig["engine_rows"] = fig["rows_out"]
    fig["all_tokens"] = fig["tokens"]
    fig["engine_held_s"] = round(fig["wall_s"] - fig["phases_s"]["startup"], 2)
    if system == "vllm":
        import pyarrow.parquet as pq

        answers = pq.read_table(work / "out-vllm-generate").to_pylist()
        fig["texts"] = {r["review_id"]: r["generated_text"] for r in answers}
    return rows_per_s(fig)


def rows_per_s(fig: dict[str, Any]) -> dict[str, Any]:
    phase = fig["phases_s"]["engine phase"]
    fig["rows_per_s_engine"] = round(fig["rows_out"] / phase, 3) if phase > 0 else None
    fig["rows_per_s_wall"] = round(fig["rows_out"] / fig["wall_s"], 3)
    return fig


def shown(fig: Mapping[str, Any]) -> str:
    skip = ("texts", "finished_s", "cached_ids", "cache_s")
    return json.dumps({k: v for k, v in fig.items() if k not in skip})


# --------------------------------------------------------------------------- summaries


def med(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def same_text(ours: Mapping[str, Any], theirs: Mapping[str, Any], ids: Sequence[str]) -> float:
    """Share of ``ids`` whose answer is the same text in both runs."""
    if not ids:
        return 1.0
    return round(sum(ours["texts"].get(i) == theirs["texts"].get(i) for i in ids) / len(ids), 4)


def summarise(
    runs: Mapping[str, Mapping[str, list[dict[str, Any]]]], tables: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Median figures per scenario and system, and each scenario's headline against its
    target (medians over rounds of the per-round ratios)."""
    results: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    if "dups" in runs:
        r = runs["dups"]
        ratios = [b["rows_per_s_engine"] / v["rows_per_s_engine"]
                  for b, v in zip(r["batchinfer"], r["vllm"], strict=True)]  # fmt: skip
        walls = [b["rows_per_s_wall"] / v["rows_per_s_wall"]
                 for b, v in zip(r["batchinfer"], r["vllm"], strict=True)]  # fmt: skip
        summary["dups"] = {
            "rows_per_s_engine_vs_vllm": med(ratios),
            "rows_per_s_wall_vs_vllm": med(walls),
            "per_round": [round(x, 3) for x in ratios],
            "target": TARGETS["dups"],
            "met": (med(ratios) or 0) >= TARGETS["dups"],
        }
    if "nights" in runs:
        r = runs["nights"]
        n1, n2 = r["batchinfer night 1"], r["batchinfer night 2"]
        wall = [b["wall_s"] / a["wall_s"] for a, b in zip(n1, n2, strict=True)]
        gpu = [b["gpu_seconds"] / a["gpu_seconds"] for a, b in zip(n1, n2, strict=True)]
        phase = [b["phases_s"]["engine phase"] / a["phases_s"]["engine phase"]
                 for a, b in zip(n1, n2, strict=True)]  # fmt: skip
        vllm = r["vllm night 2 (full)"]
        # A cached answer is night 1's answer for that review, byte for byte.
        from_night1 = [same_text(b, a, b["cached_ids"]) for a, b in zip(n1, n2, strict=True)]
        cached = [same_text(b, v, b["cached_ids"]) for b, v in zip(n2, vllm, strict=True)]
        every = [same_text(b, v, list(v["texts"])) for b, v in zip(n2, vllm, strict=True)]
        summary["nights"] = {
            "wall_share": med(wall),
            "gpu_seconds_share": med(gpu),
            "engine_phase_share": med(phase),
            "per_round_wall_share": [round(x, 3) for x in wall],
            "per_round_gpu_seconds_share": [round(x, 3) for x in gpu],
            "target": TARGETS["nights"],
            "met": max(med(wall) or 1, med(gpu) or 1) <= TARGETS["nights"],
            "night2_wall_vs_vllm_full": med(
                [b["wall_s"] / v["wall_s"] for b, v in zip(n2, vllm, strict=True)]
            ),
            "night2_cache_block": n2[0]["cache"],
            "cached_rows_same_text_as_night1": min(from_night1),
            "cached_rows_same_text_as_vllm": med(cached),
            "all_rows_same_text_as_vllm": med(every),
            "cache_lookup_s_per_chunk_median": med([med(b["cache_s"]) for b in n2]),
        }
    if "guard" in runs:
        r = runs["guard"]
        steady = [b["steady_per_s"] / v["steady_per_s"]
                  for b, v in zip(r["batchinfer"], r["vllm"], strict=True)
                  if b["steady_per_s"] and v["steady_per_s"]]  # fmt: skip
        phase = [b["engine_phase_per_s"] / v["engine_phase_per_s"]
                 for b, v in zip(r["batchinfer"], r["vllm"], strict=True)]  # fmt: skip
        summary["guard"] = {
            "steady_vs_vllm": med(steady),
            "engine_phase_vs_vllm": med(phase),
            "per_round_steady": [round(x, 3) for x in steady],
            "target": TARGETS["guard"],
            "met": (med(steady) or 0) >= TARGETS["guard"],
            "dedup_rows": r["batchinfer"][0]["cache"]["dedup_rows"]
            if r["batchinfer"][0]["cache"]
            else 0,
        }
    for scenario, per_system in runs.items():
        results[scenario] = {}
        for system, figs in per_system.items():
            for f in figs:
                f.pop("texts", None)
                f.pop("cached_ids", None)
            results[scenario][system] = median_figures(figs)
    return results, summary


# --------------------------------------------------------------------------- reporting


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _met(s: Mapping[str, Any]) -> str:
    return "**met**" if s["met"] else "**missed**"


def markdown(doc: dict[str, Any]) -> str:
    p, t, s, res = doc["parameters"], doc["tables"], doc["summary"], doc["results"]
    lines = [
        "# Result cache: dedup, a second night, and the no-duplicate guard",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}  ",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['logical_cpus']} logical CPUs, "
        f"{doc['machine']['memory_gib']} GiB  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ",
        "Parameters: " + ", ".join(f"{k}={v}" for k, v in p.items() if k != "embed_engine_args"),
        "",
        f"Every system: the same model, engine arguments and prompts (checked equal for every "
        f"row of every table), greedy, ignore_eos, max_tokens {p['max_tokens']} (every row "
        f"the same number of tokens). Each run is a fresh process; each figure is the median of "
        f"{doc['repeat']} runs, interleaved round by round. Engine phase: first request at the "
        "engine to last result. Engine-held s: batchinfer's ledger gpu_seconds (engine actor "
        "start, model load included, to release); raw vLLM and Ray Data LLM: engine "
        "construction to process exit. Wall: process start to exit.",
        "",
    ]
    if "dups" in res:
        lines += [
            f"## Duplicates: {t['rows']} rows, {t['dups_duplicate_rows']} of them repeating "
            f"another row's review ({t['dups_duplicate_rows'] / t['rows']:.0%})",
            "",
            f"batchinfer (default job: dedup on, no cache path) over raw vLLM, rows/s in the "
            f"engine phase: **{_x(s['dups']['rows_per_s_engine_vs_vllm'])}** (target >= "
            f"{s['dups']['target']:.2f}x: {_met(s['dups'])}); over the wall time: "
            f"{_x(s['dups']['rows_per_s_wall_vs_vllm'])}.",
            "",
            "| system | rows | engine rows | wall s | engine phase s | rows/s engine phase "
            "| rows/s wall | engine phase vs vLLM | wall rows/s vs vLLM | engine-held s |",
            "|---|" + "---:|" * 9,
        ]
        base = res["dups"]["vllm"]
        for system, f in res["dups"].items():
            lines.append(
                f"| {system} | {f['rows_out']:.0f} | {f['engine_rows']:.0f} | {f['wall_s']:.1f} "
                f"| {f['phases_s']['engine phase']:.1f} | {f['rows_per_s_engine']:.2f} | "
                f"{f['rows_per_s_wall']:.2f} | "
                f"{f['rows_per_s_engine'] / base['rows_per_s_engine']:.2f}x | "
                f"{f['rows_per_s_wall'] / base['rows_per_s_wall']:.2f}x | "
                f"{f['engine_held_s']:.1f} |"
            )
        lines.append("")
    if "nights" in res:
        n = s["nights"]
        n1, n2 = res["nights"]["batchinfer night 1"], res["nights"]["batchinfer night 2"]
        lines += [
            f"## Two nights: night 2 has {t['night2_changed_rows']} rows changed and "
            f"{t['night2_new_rows']} new of {t['rows']} "
            f"({(t['night2_changed_rows'] + t['night2_new_rows']) / t['rows']:.0%})",
            "",
            f"Night 2 over night 1, batchinfer with the same cache: wall **{n['wall_share']:.0%}**"
            f", accelerator-seconds **{n['gpu_seconds_share']:.0%}** (target <= "
            f"{n['target']:.0%}: {_met(n)}); engine phase {n['engine_phase_share']:.0%}. "
            f"Night 2's wall against raw vLLM doing it in full: "
            f"{_x(n['night2_wall_vs_vllm_full'])}. Night 2's cached answers equal night 1's "
            f"answers for the same reviews: {n['cached_rows_same_text_as_night1']:.1%}; the same "
            f"text as raw vLLM's: {n['cached_rows_same_text_as_vllm']:.1%} (every row: "
            f"{n['all_rows_same_text_as_vllm']:.1%}; greedy answers on the CPU can differ with "
            "the batch a row runs in). Cache lookup per chunk (median of night 2's chunks): "
            f"{n['cache_lookup_s_per_chunk_median'] * 1000:.0f} ms. Fixed costs no hit saves: "
            f"night 2 spent {fixed(n2):.0f} s of its {n2['wall_s']:.0f} s wall in startup, engine "
            f"start and after its last result (night 1: {fixed(n1):.0f} of {n1['wall_s']:.0f} s).",
            "",
            "| run | rows | engine rows | cached rows | wall s | engine start s | engine phase s "
            "| engine-held s | wall vs night 1 | engine-held vs night 1 |",
            "|---|" + "---:|" * 9,
        ]
        for system, f in res["nights"].items():
            lines.append(
                f"| {system} | {f['rows_out']:.0f} | {f['engine_rows']:.0f} | "
                f"{f.get('cached_rows', 0):.0f} | {f['wall_s']:.1f} | {f['engine_start_s']:.1f} "
                f"| {f['phases_s']['engine phase']:.1f} | {f['engine_held_s']:.1f} | "
                f"{f['wall_s'] / n1['wall_s']:.0%} | "
                f"{f['engine_held_s'] / n1['engine_held_s']:.0%} |"
            )
        block = dict(n["night2_cache_block"] or {})
        saved = block.pop("saved_batch_usd", [])
        lines += ["", "Night 2's ledger, `cache` block (first round):", ""]
        lines += [f"- {k}: {v}" for k, v in block.items()]
        lines.append(
            "- saved_batch_usd: "
            + ", ".join(f"{c['provider']} {c['model']} ${c['batch_usd']:.6f}" for c in saved)
        )
        lines.append("")
    if "guard" in res:
        g = s["guard"]
        lines += [
            f"## Guard: {t['rows']} different rows, no cache path (dedup on, nothing to share: "
            f"{g['dedup_rows']} rows shared)",
            "",
            f"batchinfer's steady output tokens/s over raw vLLM's: **{_x(g['steady_vs_vllm'])}**"
            f" (target >= {g['target']:.2f}x: {_met(g)}); engine phase "
            f"{_x(g['engine_phase_vs_vllm'])}. Raw vLLM's runs are its night-2 runs above (the "
            "same table, the same round).",
            "",
            "| system | wall s | steady tok/s | steady range | engine phase tok/s | "
            "steady vs vLLM | engine phase vs vLLM | engine idle |",
            "|---|" + "---:|" * 7,
        ]
        base = res["guard"]["vllm"]
        for system, f in res["guard"].items():
            lo, hi = f.get("steady_range") or (0.0, 0.0)
            idle = f.get("engine_idle_fraction")
            lines.append(
                f"| {system} | {f['wall_s']:.1f} | {f['steady_per_s'] or 0:.1f} | "
                f"{lo:.0f}-{hi:.0f} | {f['engine_phase_per_s'] or 0:.1f} | "
                f"{(f['steady_per_s'] or 0) / (base['steady_per_s'] or 1):.2f}x | "
                f"{(f['engine_phase_per_s'] or 0) / (base['engine_phase_per_s'] or 1):.2f}x | "
                f"{'' if idle is None else f'{idle:.1%}'} |"
            )
        lines.append("")
    lines += ["## Where the wall time goes (s)", ""]
    phases = ["startup", "engine start", "to first request", "engine phase", "after last result"]
    lines += ["| scenario | system | " + " | ".join(phases) + " |", "|---|---|" + "---:|" * 5]
    for scenario, per_system in res.items():
        for system, f in per_system.items():
            lines.append(
                f"| {scenario} | {system} | "
                + " | ".join(f"{f['phases_s'][k]:.1f}" for k in phases)
                + " |"
            )
    return "\n".join(lines) + "\n"


def fixed(f: Mapping[str, Any]) -> float:
    """Seconds of a run's wall time outside the engine phase."""
    return float(f["wall_s"] - f["phases_s"]["engine phase"])


def _colour(system: str) -> str:
    return next((c for name, c in COLOURS.items() if system.startswith(name)), "#999999")


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = doc["results"]
    panels = []
    if "dups" in res:
        panels.append(("dups", "rows_per_s_engine", "duplicates: rows/s, engine phase\n"
                       "(higher is better)", "{:.2f}"))  # fmt: skip
    if "nights" in res:
        panels.append(("nights", "wall_s", "night 2 vs night 1: wall s\n(lower is better)",
                       "{:.0f}"))  # fmt: skip
        panels.append(("nights", "engine_held_s", "engine-held s (accelerator-seconds)\n"
                       "(lower is better)", "{:.0f}"))  # fmt: skip
    if "guard" in res:
        panels.append(("guard", "steady_per_s", "no duplicates, no cache:\nsteady output "
                       "tokens/s (higher is better)", "{:.0f}"))  # fmt: skip
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (scenario, key, title, fmt) in zip(axes[0], panels, strict=True):
        names = list(res[scenario])
        values = [float(res[scenario][n][key] or 0.0) for n in names]
        bars = ax.barh(names, values, color=[_colour(n) for n in names])
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + fmt.format(v),
                    va="center", fontsize=8)  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlim(0, max([*values, 1e-9]) * 1.35)
        ax.tick_params(axis="y", labelsize=8)
        ax.invert_yaxis()
    p = doc["parameters"]
    fig.suptitle(f"Result cache, {p['rows']} rows, {p['model']}, max_tokens {p['max_tokens']}, "
                 f"{doc['machine']['logical_cpus']} CPUs", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dup-share", type=float, default=0.3, help="duplicate rows (dups table)")
    p.add_argument("--changed-share", type=float, default=0.2,
                   help="rows changed or new in night 2 (half each)")  # fmt: skip
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--batch-size", type=int, default=64, help="vLLM max_num_seqs, for all")
    p.add_argument("--rows-per-chunk", type=int, default=16,
                   help="batchinfer rows_per_chunk = Ray Data LLM batch_size")  # fmt: skip
    p.add_argument(
        "--chunks-in-flight",
        type=int,
        default=4,
        help="batchinfer chunks_in_flight = Ray Data LLM max_concurrent_batches",
    )
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a vLLM engine argument (YAML value), every system")  # fmt: skip
    p.add_argument("--scenarios", default=",".join(SCENARIOS))
    p.add_argument("--repeat", type=int, default=2,
                   help="rounds; figures are medians")  # fmt: skip
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--results", default=None, help="where results go (default benchmarks/results)")
    p.add_argument("--name", default="", help="results file stem (default cache-<device>)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 32 rows, max_tokens 8, one round; writes nothing unless "
                   "--results")  # fmt: skip
    a = p.parse_args(argv)
    scenarios = [s for s in SCENARIOS if s in a.scenarios.split(",")]
    if a.quick:
        a.rows, a.max_tokens, a.repeat = 32, 8, 1

    import tempfile

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
    resolve_model(bench.model)  # prepare a bundled model once, outside every timing
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-cache-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    print(f"scratch and logs: {work}", flush=True)
    tables = make_tables(work, a.rows, a.dup_share, a.changed_share, a.seed)
    checked = check_tables(bench, tables, a.rows)
    print(f"prompts equal for every row of every table: {json.dumps(checked)}", flush=True)

    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}

    def record(scenario: str, system: str, fig: dict[str, Any]) -> dict[str, Any]:
        runs.setdefault(scenario, {}).setdefault(system, []).append(fig)
        print(f"  {shown(fig)}", flush=True)
        return fig

    for r in range(a.repeat):

        def say(what: str) -> None:
            print(f"{what} (round {r + 1} of {a.repeat}) ...", flush=True)  # noqa: B023

        if "dups" in scenarios:
            for system in ("vllm", "ray-data-llm"):
                say(f"dups: {system}")
                record("dups", system, run_other(system, bench, tables["dups"], work, log))
            say("dups: batchinfer")
            record("dups", "batchinfer", run_batchinfer(bench, tables["dups"], work, log, "dups"))
        vllm_night2 = None
        if "nights" in scenarios:
            cache = work / "cache"
            shutil.rmtree(cache, ignore_errors=True)  # a fresh cache each round
            for night in (1, 2):
                say(f"nights: batchinfer night {night}")
                fig = run_batchinfer(bench, tables[f"night{night}"], work, log, f"night{night}",
                                     cache=cache)  # fmt: skip
                record("nights", f"batchinfer night {night}", fig)
            for system in ("vllm", "ray-data-llm"):
                say(f"nights: {system} night 2 in full")
                fig = run_other(system, bench, tables["night2"], work, log)
                record("nights", f"{system} night 2 (full)", fig)
                if system == "vllm":
                    vllm_night2 = fig
        if "guard" in scenarios:
            if vllm_night2 is None:
                say("guard: vllm")
                vllm_night2 = run_other("vllm", bench, tables["night2"], work, log)
                print(f"  {shown(vllm_night2)}", flush=True)
            runs.setdefault("guard", {}).setdefault("vllm", []).append(vllm_night2)
            say("guard: batchinfer")
            record("guard", "batchinfer", run_batchinfer(bench, tables["night2"], work, log,
                                                          "plain"))  # fmt: skip

    # Every system did the same work: all rows, the same tokens (cached rows keep theirs).
    if "dups" in runs:
        check_same_work("dups", runs["dups"])
    for scenario in ("nights", "guard"):
        for system, figs in runs.get(scenario, {}).items():
            for f in figs:
                if f["rows_out"] != a.rows or f["all_tokens"] != a.rows * a.max_tokens:
                    raise SystemExit(f"{scenario} {system}: {f['rows_out']} rows, "
                                     f"{f['all_tokens']} tokens, not {a.rows} rows of "
                                     f"{a.max_tokens}")  # fmt: skip
    # the guard's vLLM runs are the nights' (the same dicts): copy before summarising pops
    if "guard" in runs and "nights" in runs:
        runs["guard"]["vllm"] = [dict(f) for f in runs["guard"]["vllm"]]
    results, summary = summarise(runs, tables)
    doc = {
        "command": " ".join(["python", "benchmarks/cache.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "parameters": {
            **{k: v for k, v in asdict(bench).items() if not k.startswith("embed")},
            "dup_share": a.dup_share,
            "changed_share": a.changed_share,
            "seed": a.seed,
        },
        "repeat": a.repeat,
        "tables": checked,
        "summary": summary,
        "results": results,
    }
    (work / "cache.json").write_text(dump_json(doc))  # always, to re-render from
    text = markdown(doc)
    print(text)
    if a.quick and not a.results:
        return
    out = Path(a.results or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / (a.name or f"cache-{bench.device}")
    stem.with_suffix(".json").write_text(dump_json(doc))
    stem.with_suffix(".md").write_text(text)
    chart(doc, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
