"""The cost ledger: what a run cost, and what the same tokens cost at API list prices.

Usage comes from the markers (the engine's own token counts, chat template included) and
from the engine actors' lifetimes: accelerator-seconds are held from actor start to release,
model load and idle time included, because that is what a cloud bills. Prices come from the
versioned price table (``batch/data/prices.yaml``) with the job's overrides; every row used
is copied into the ledger with its source and date.

Definitions (also written into the ledger's ``notes``):
- ``run_cost_usd`` = accelerator-hours x rate per accelerator-hour (``gpu_hour_usd``; on the
  CPU default the instance rate).
- per comparator: ``list_usd`` at list price, ``batch_usd`` after the provider's batch
  discount, ``savings_vs_batch`` = 1 - run_cost / batch_usd (0.9: 90% cheaper than the batch
  API; negative: dearer), ``cost_ratio`` = batch_usd / run_cost.
- break-even: a self-hosted accelerator costs rate x 24 a day whether busy or not; at the
  measured throughput and the stated utilisation it can process ``capacity_rows_per_day``;
  it beats a comparator's batch price from ``break_even_rows_per_day`` rows a day on, if
  that is within capacity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from batch import openai_files, store
from batch.spec import JobSpec

TOKENIZER_NOTE = (
    "Token counts are our model's (its tokenizer and chat template); API models tokenize "
    "differently, typically within +-20% for English text, so comparisons are estimates."
)


TYPED_NOTE = (
    "Typed answers (response:): input_tokens and output_tokens are the committed rows'; "
    "re-sampled and discarded tokens (discarded_input_tokens, discarded_output_tokens) are "
    "paid in accelerator time and run_cost_usd and listed apart; generated_output_tokens = "
    "output_tokens + discarded_output_tokens is the engine's real work, which "
    "output_tokens_per_second measures. API comparisons price the committed tokens (an API "
    "would bill its own retries)."
)


CACHE_NOTE = (
    "Result cache and dedup (cache): input_tokens and output_tokens are the tokens our engine "
    "processed; cache.hit_rows were served from the result cache and cache.dedup_rows shared "
    "the answer of an equal prompt in the same run, neither costing engine time. "
    "cache.saved_input_tokens and cache.saved_output_tokens are their tokens; saved_usd_at_"
    "our_rate prices them at this job's usd_per_million_tokens, and saved_batch_usd at each "
    "comparator's batch price (what the same rows would add to a batch API bill). The "
    "comparisons above price only the tokens our engine processed."
)


def cache_savings(
    spec: JobSpec,
    table: Any,
    markers: Sequence[dict[str, Any]],
    *,
    rate: float,
    run_cost: float,
    tokens: int,
) -> dict[str, Any]:
    """What the result cache and dedup saved: rows, tokens, and their price at our rate and at
    each comparator's batch rate. Empty for a job that uses neither."""
    if not spec.cache.path and not any("cache_hits" in m for m in markers):
        return {}
    t = store.totals(markers)
    saved_in, saved_out = t.saved_input_tokens, t.saved_output_tokens
    per_token = run_cost / tokens if tokens else None
    saved_batch, _ = compare(
        spec, table, input_tokens=saved_in, output_tokens=saved_out, run_cost_usd=None,
        rows=t.cache_hits + t.dedup_rows, rows_per_second=0.0, rate=rate,
    )  # fmt: skip
    served = t.cache_hits + t.dedup_rows
    return {
        "path": spec.cache.path,
        "hit_rows": t.cache_hits,
        "dedup_rows": t.dedup_rows,
        "engine_rows": t.rows - served,
        "hit_rate": round(served / t.rows, 4) if t.rows else 0.0,
        "saved_input_tokens": saved_in,
        "saved_output_tokens": saved_out,
        "saved_usd_at_our_rate": round(per_token * (saved_in + saved_out), 10)
        if per_token is not None
        else None,
        "saved_batch_usd": [
            {"provider": c["provider"], "model": c["model"], "batch_usd": c["batch_usd"]}
            for c in saved_batch
        ],
    }


def typed_usage(markers: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Re-sampling of a typed job over every committed chunk; old markers count 0."""
    t = store.totals(markers)
    return {
        "resamples": t.resamples,
        "discarded_input_tokens": t.discarded_input_tokens,
        "discarded_output_tokens": t.discarded_output_tokens,
        "schema_violations": t.schema_violations,
        "generated_output_tokens": t.output_tokens + t.discarded_output_tokens,
    }


def usage(markers: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows, failures and tokens over every committed chunk (all runs, retries included)."""
    t = store.totals(markers)
    starts = [
        m["timings"]["engine_start"] for m in markers if "engine_start" in m.get("timings", {})
    ]
    ends = [m["timings"]["engine_end"] for m in markers if "engine_end" in m.get("timings", {})]
    return {
        "rows": t.rows,
        "failed_rows": t.failed_rows,
        "chunks": t.chunks,
        "input_tokens": t.input_tokens,
        "output_tokens": t.output_tokens,
        "engine_window_seconds": round(max(ends) - min(starts), 3) if starts and ends else 0.0,
        **engine_busy(markers),
    }


def runs_summary(
    runs: Sequence[dict[str, Any]], markers: Sequence[dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per run: wall time, accelerator-seconds of its engines (killed runs too, as far as
    their last heartbeat paid), what it committed; and the work paid for but not committed:
    chunk attempts that reached an engine but whose results were thrown away (a run killed
    around them, an engine that failed them), from each marker's ``attempts_run``.
    """
    committed: dict[str, tuple[int, int]] = {}
    redone_chunks = redone_rows = 0
    for m in markers:
        rows = int(m["rows"]) + int(m["failed_rows"])
        c, r = committed.get(str(m.get("run_id", "")), (0, 0))
        committed[str(m.get("run_id", ""))] = (c + 1, r + rows)
        extra = max(0, int(m.get("attempts_run", 1)) - 1)
        redone_chunks += extra
        redone_rows += extra * rows
    out = []
    for run in runs:
        engines = run.get("engines", [])
        gpu = sum(
            store.engine_seconds(run, e) * float(e.get("accelerators", 1.0)) for e in engines
        )
        chunks, rows = committed.get(str(run["run_id"]), (0, 0))
        out.append(
            {
                "run_id": run["run_id"],
                "kind": run.get("kind", "submit"),
                "state": run.get("state") if run.get("finished_at") else "killed or running",
                "started_at": run.get("started_at"),
                "wall_seconds": round(store.run_wall_seconds(run), 3),
                "gpu_seconds": round(gpu, 3),
                "engine_replicas": len(engines),
                "chunks_committed": chunks,
                "rows_committed": rows,
            }
        )
    unfinished = [r for r in out if r["state"] != "finished"]
    paid_not_committed = {
        "rows": redone_rows,
        "chunk_attempts": redone_chunks,
        "gpu_seconds_of_unfinished_runs": round(sum(r["gpu_seconds"] for r in unfinished), 3),
        "runs_unfinished": len(unfinished),
    }
    return out, paid_not_committed


def engine_busy(markers: Sequence[dict[str, Any]]) -> dict[str, float]:
    """How much of each engine's working window had at least one chunk in it.

    Per engine actor, the window runs from its first chunk reaching the engine to its last
    result; busy time is the union of its chunks' engine intervals. ``engine_idle_fraction``
    is the share of the windows when an engine had nothing to do (model load excluded): the
    gaps continuous batching could not fill because no chunk was ready.
    """
    spans: dict[str, list[tuple[float, float]]] = {}
    for m in markers:
        t = m.get("timings", {})
        if "engine_start" in t and "engine_end" in t:
            actor = str(m.get("engine", {}).get("actor", ""))
            spans.setdefault(actor, []).append((float(t["engine_start"]), float(t["engine_end"])))
    busy = window = 0.0
    for intervals in spans.values():
        intervals.sort()
        window += max(end for _, end in intervals) - intervals[0][0]
        cur_start, cur_end = intervals[0]
        for start, end in intervals[1:]:
            if start > cur_end:
                busy += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        busy += cur_end - cur_start
    idle = 1.0 - busy / window if window > 0 else 0.0
    return {
        "engine_busy_seconds": round(busy, 3),
        "engine_idle_fraction": round(max(0.0, idle), 4),
    }


def accelerators(spec: JobSpec) -> float:
    """Accelerators (or CPU instances) each engine replica holds."""
    return spec.resources.gpus_per_replica if spec.resources.device == "gpu" else 1.0


def price_rate(spec: JobSpec, table: Any) -> tuple[float, dict[str, Any]]:
    """USD per accelerator-hour (instance-hour on cpu), and the price row it came from."""
    led = spec.ledger
    if spec.resources.device == "cpu":
        if led.cpu_hour_usd is not None:
            return led.cpu_hour_usd, {"source": "job: ledger.cpu_hour_usd"}
        row = table.cpu_rate()
        return float(row.usd_per_hour), row.model_dump(mode="json")
    if led.gpu_hour_usd is not None:
        return led.gpu_hour_usd, {"source": "job: ledger.gpu_hour_usd", "gpu": led.gpu}
    default = table.defaults.gpu
    row = table.gpu_rate(led.gpu_provider or default.provider, led.gpu or default.gpu)
    return float(row.usd_per_hour), row.model_dump(mode="json")


def comparator_keys(spec: JobSpec, table: Any) -> list[str]:
    if spec.ledger.comparators is not None:
        return list(spec.ledger.comparators)
    d = table.defaults
    return list(d.embed_comparators if spec.model.task == "embed" else d.generate_comparators)


def load_table(spec: JobSpec) -> Any:
    from batch.prices import load_price_table

    table = load_price_table(spec.ledger.price_table)
    return table.merged(spec.ledger.prices) if spec.ledger.prices else table


def compare(
    spec: JobSpec,
    table: Any,
    *,
    input_tokens: int,
    output_tokens: int,
    run_cost_usd: float | None,
    rows: int,
    rows_per_second: float,
    rate: float,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-comparator costs and break-even, and the price rows used."""
    from batch.prices import api_cost, embedding_cost

    comparisons: list[dict[str, Any]] = []
    used: list[dict[str, Any]] = []
    n_acc = accelerators(spec) * spec.resources.replicas
    day_cost = rate * 24 * n_acc
    capacity = rows_per_second * 86400 * spec.ledger.utilisation
    for key in comparator_keys(spec, table):
        if spec.model.task == "embed":
            eprice = table.embedding_price(key)
            list_usd = embedding_cost(eprice, input_tokens)
            row = eprice.model_dump(mode="json")
        else:
            cprice = table.chat_price(key)
            list_usd = api_cost(cprice, input_tokens, output_tokens)
            row = cprice.model_dump(mode="json")
        discount = table.batch_discount(row["provider"])
        batch_usd = list_usd * (1 - discount)
        used.append(row)
        per_row = batch_usd / rows if rows else 0.0
        break_even = day_cost / per_row if per_row > 0 else None
        comparisons.append(
            {
                "provider": row["provider"],
                "model": row["model"],
                "list_usd": round(list_usd, 10),
                "batch_usd": round(batch_usd, 10),
                "batch_discount": discount,
                "savings_vs_batch": round(1 - run_cost_usd / batch_usd, 4)
                if batch_usd and run_cost_usd is not None
                else None,
                "cost_ratio": round(batch_usd / run_cost_usd, 3) if run_cost_usd else None,
                "break_even_rows_per_day": round(break_even) if break_even else None,
                "beats_batch_within_capacity": bool(break_even and break_even <= capacity),
            }
        )
    return comparisons, used


def check(spec: JobSpec) -> float:
    """Resolve the price table, rate and comparators before any engine starts (a typo in a
    comparator fails now, not after the night's run); returns USD per hour for the whole
    job's accelerators, for the progress bar's running cost."""
    table = load_table(spec)
    rate, _ = price_rate(spec, table)
    for key in comparator_keys(spec, table):
        (table.embedding_price if spec.model.task == "embed" else table.chat_price)(key)
    return rate * accelerators(spec) * spec.resources.replicas


def build_ledger(
    spec: JobSpec,
    markers: Sequence[dict[str, Any]],
    runs: Sequence[dict[str, Any]],
) -> dict[str, Any]:
    """The ledger document (``ledger.json``): usage from the markers, time from every run."""
    use = usage(markers)
    typed = typed_usage(markers) if spec.response is not None else {}
    generated = typed.get("generated_output_tokens", use["output_tokens"])
    per_run, paid_not_committed = runs_summary(runs, markers)
    wall_seconds = sum(r["wall_seconds"] for r in per_run)
    engines = max((r["engine_replicas"] for r in per_run), default=0)
    table = load_table(spec)
    rate, rate_row = price_rate(spec, table)
    accel_seconds = round(sum(r["gpu_seconds"] for r in per_run), 3)
    run_cost = accel_seconds / 3600 * rate  # from the rounded figure: the ledger adds up
    tokens = use["input_tokens"] + use["output_tokens"]
    window = use["engine_window_seconds"] or wall_seconds
    rows_per_second = use["rows"] / window / max(1, engines) if window else 0.0
    comparisons, used = compare(
        spec,
        table,
        input_tokens=use["input_tokens"],
        output_tokens=use["output_tokens"],
        run_cost_usd=run_cost,
        rows=use["rows"],
        rows_per_second=rows_per_second,
        rate=rate,
    )
    cached = cache_savings(spec, table, markers, rate=rate, run_cost=run_cost, tokens=tokens)
    file_models: dict[str, Any] = {}
    if openai_files.applies(spec):  # a request file: priced at its own models too
        file_models = openai_files.file_models(spec, markers, table, run_cost=run_cost)
    return {
        "job": spec.name,
        "model": spec.model.path,
        "task": spec.model.task,
        **use,
        **typed,
        "wall_seconds": round(wall_seconds, 3),
        "gpu_seconds": round(accel_seconds, 3),
        "engine_replicas": engines,
        "device": spec.resources.device,
        "gpu_hour_usd": rate,
        "run_cost_usd": round(run_cost, 10),
        "usd_per_million_tokens": round(run_cost / tokens * 1e6, 8) if tokens else None,
        "output_tokens_per_second": round(generated / wall_seconds, 3)
        if wall_seconds
        else 0.0,
        "rows_per_second_per_replica": round(rows_per_second, 4),
        "utilisation_assumed": spec.ledger.utilisation,
        "price_table_version": table.version,
        "price_rows": {"rate": rate_row, "comparators": used},
        "comparisons": comparisons,
        "runs": per_run,
        "paid_not_committed": paid_not_committed,
        **({"cache": cached} if cached else {}),
        **({"file_models": file_models} if file_models else {}),
        "notes": [
            TOKENIZER_NOTE,
            "gpu_seconds: accelerator-seconds held by the engine actors of every run of "
            "the job (see runs), from actor start (model load included) to release, idle "
            "time included; a run killed before it released its engines counts up to its "
            "engines' last heartbeat, billed ahead in 10 s steps. wall_seconds: the runs' "
            "wall times added up. On device cpu they are instance-seconds and gpu_hour_usd "
            "is the instance rate.",
            "paid_not_committed: chunk attempts (and their rows) that reached an engine but "
            "were not the one committed (runs killed mid-chunk, failed engine attempts): "
            "paid for, done again.",
            "savings_vs_batch = 1 - run_cost_usd / batch_usd; cost_ratio = batch_usd / "
            "run_cost_usd; break_even_rows_per_day: rows a day from which a dedicated "
            "accelerator (rate x 24 h) is cheaper than the batch API, to be compared with "
            "the capacity at the measured throughput and utilisation_assumed.",
            *([TYPED_NOTE] if typed else []),
            *([CACHE_NOTE] if cached else []),
            *([openai_files.FILE_MODELS_NOTE] if file_models else []),
        ],
    }
