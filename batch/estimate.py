"""A dry run before any GPU starts: how big the job is and what it will cost.

Rows and chunks come from the plan (listing and footers). Input tokens are estimated by
tokenizing a sample of rows with the model's own tokenizer, prompt template and chat
template, exactly as the engine will; output tokens are bounded by ``max_tokens``. With a
measured sample (``--sample N``), N rows run for real on the engine in a scratch output,
which gives the output length and the throughput, and so GPU-hours and the run's cost.
With ``cache.path`` the sampled rows are also looked up in the result cache (read only), and
the token, time and cost estimates count only the rows the engine would compute.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from batch import cache
from batch import plan as planning
from batch.engine import EngineRequest
from batch.errors import RowError
from batch.prompt import chat_token_ids
from batch.spec import JobSpec
from batch.store import Chunk

#: Chunks a sample is spread over at most (each is one more read on object storage).
SAMPLE_SPREAD = 16


def sample_rows(spec: JobSpec, plan: planning.Plan, n: int) -> pa.Table:
    """Up to ``n`` rows spread over the input: the first rows of up to SAMPLE_SPREAD chunks,
    evenly spaced from the first chunk to the last. Deterministic, and spread so that rows
    added at the end of the input (a new file) are in it too."""
    if not plan.chunks or n <= 0:
        return pa.table({})
    k = min(len(plan.chunks), n, SAMPLE_SPREAD)
    last = len(plan.chunks) - 1
    picks = sorted({round(i * last / (k - 1)) if k > 1 else 0 for i in range(k)})
    takes: list[tuple[Chunk, int]] = []
    left = n
    for i, index in enumerate(picks):
        chunk = plan.chunks[index]
        take = min(chunk.rows, -(-left // (len(picks) - i)))  # a short chunk's share moves on
        if take <= 0:
            break
        takes.append((chunk, take))
        left -= take

    def read(item: tuple[Chunk, int]) -> pa.Table:
        # Whole chunks (of any input format), read in parallel, then cut.
        return planning.read_chunk(spec, item[0], plan.protocol).slice(0, item[1])

    with ThreadPoolExecutor(max_workers=8) as pool:
        tables = list(pool.map(read, takes))
    return pa.concat_tables(tables, promote_options="default")


def _tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _context_length(spec: JobSpec, model_dir: str, tokenizer: Any) -> int:
    if "max_model_len" in spec.model.engine_args:
        return int(spec.model.engine_args["max_model_len"])
    cfg = Path(model_dir) / "config.json"
    if cfg.exists():
        import json

        doc = json.loads(cfg.read_text())
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            if key in doc:
                return int(doc[key])
    return int(getattr(tokenizer, "model_max_length", 2048))


def estimate(spec: JobSpec, *, sample: int = 64, measure: int = 0) -> dict[str, Any]:
    """The plan's document (``batchinfer plan --json``). With ``cache.path``, the sampled rows
    are also looked up in the result cache (read only), and the token, time and cost
    estimates count only the rows the engine would compute (the ``cache`` block)."""
    from batch.ledger import compare, load_table, price_rate
    from batch.models import resolve_model
    from pipelines import load_pipeline

    pipeline = load_pipeline(spec)
    # What the model is for the cache, first: a hub model without a pinned revision is refused
    # here as by submit, before its tokenizer is fetched.
    identity = cache.model_identity(spec) if spec.cache.path else None
    plan = planning.make_plan(spec, required_columns=pipeline.required_columns())
    rows_total = plan.total_rows
    model_dir = resolve_model(spec.model.path)
    tok = _tokenizer(model_dir)
    context = _context_length(spec, model_dir, tok)
    table = sample_rows(spec, plan, sample)
    lengths: list[int] = []
    requests: list[EngineRequest] = []  # the usable sampled rows, as the engine would get them
    bad = too_long = 0
    for row in table.to_pylist():
        try:
            model_input = pipeline.prepare(row)
        except RowError:
            bad += 1
            continue
        own: tuple[tuple[str, Any], ...] = ()
        if isinstance(model_input, EngineRequest):  # a request with its own sampling
            own = model_input.sampling
            model_input = (
                model_input.text
                if model_input.text is not None
                else list(model_input.messages or ())
            )
        if isinstance(model_input, str):
            n = len(tok.encode(model_input))
            request = EngineRequest(key=len(requests), text=model_input, sampling=own)
        else:
            n = len(chat_token_ids(tok, model_input, spec.prompt.chat_template_kwargs))
            request = EngineRequest(key=len(requests), messages=tuple(model_input), sampling=own)
        if n > context or (spec.model.task == "generate" and n >= context):
            too_long += 1
            continue
        lengths.append(n)
        requests.append(request)
    sampled = table.num_rows
    ok_share = len(lengths) / sampled if sampled else 0.0
    rows_ok = round(rows_total * ok_share)
    mean_in = statistics.fmean(lengths) if lengths else 0.0
    est_in = round(mean_in * rows_ok)
    max_out = spec.sampling.max_tokens if spec.model.task == "generate" else 0
    samples = spec.sampling.n if spec.model.task == "generate" else 1
    # The rows (and input tokens) the engine computes: all of them, unless the cache has some.
    probe = cache_probe(spec, identity, requests, lengths) if identity is not None else None
    rows_engine, in_engine = rows_ok, est_in
    if probe is not None:
        rows_engine = round(rows_ok * probe["engine_share"])
        in_engine = round(est_in * probe["engine_input_token_share"])
        probe["est_engine_rows"] = rows_engine
        probe["uncached"] = {
            "est_input_tokens": est_in,
            "est_output_tokens_max": rows_ok * max_out * samples,
        }
    est_out_bound = rows_engine * max_out * samples
    response, warnings = response_plan(spec, tok)
    doc: dict[str, Any] = {
        "job": spec.name,
        "files": len(plan.files),
        "rows": rows_total,
        "chunks": len(plan.chunks),
        "committed_chunks": len(plan.chunks) - len(plan.pending),
        "sampled_rows": sampled,
        "context_length": context,
        "sample_failed_rows": bad,
        "sample_too_long_rows": too_long,
        "est_failed_rows": round(rows_total * (bad + too_long) / sampled) if sampled else 0,
        "est_input_tokens": in_engine,
        "mean_input_tokens_per_row": round(mean_in, 1),
        "est_output_tokens_max": est_out_bound,
        "est_output_tokens": est_out_bound,
        "samples_per_row": samples,
        "measured": None,
        "warnings": warnings,
    }
    if probe is not None:
        doc["cache"] = probe
        if probe.get("error"):
            warnings.append(f"the result cache could not be read: {probe['error']}")
    if response is not None:
        doc["response"] = response
        doc["est_output_tokens_worst"] = est_out_bound * (1 + response["max_resamples"])
    ledger_table = load_table(spec)
    rate, _ = price_rate(spec, ledger_table)
    doc["gpu_hour_usd"] = rate
    rows_per_second = 0.0
    run_cost: float | None = None
    if measure > 0:
        m = _measure(spec, plan, measure)
        doc["measured"] = m
        if m["rows"]:
            doc["est_output_tokens"] = round(m["output_tokens"] / m["rows"] * rows_engine)
        rows_per_second = m["rows_per_second_per_replica"]
        if rows_per_second > 0:
            replicas = spec.resources.replicas
            # The rows that would fail are tried too; the rows the cache answers are not.
            computed = rows_total - (rows_ok - rows_engine)
            hours = (m["engine_load_seconds"] + computed / rows_per_second / replicas) / 3600
            from batch.ledger import accelerators

            doc["est_accelerator_hours"] = round(hours * replicas * accelerators(spec), 4)
            doc["est_wall_hours"] = round(hours, 4)
            run_cost = doc["est_accelerator_hours"] * rate
            doc["est_run_cost_usd"] = round(run_cost, 6)
    comparisons, _ = compare(
        spec,
        ledger_table,
        input_tokens=in_engine,
        output_tokens=doc["est_output_tokens"],
        run_cost_usd=run_cost,
        rows=rows_ok,
        rows_per_second=rows_per_second,
        rate=rate,
    )
    doc["comparisons"] = comparisons
    doc["price_table_version"] = ledger_table.version
    return doc


def cache_probe(
    spec: JobSpec,
    identity: dict[str, Any],
    requests: Sequence[EngineRequest],
    tokens: Sequence[int],
) -> dict[str, Any]:
    """How much of the sample the result cache already answers, without changing the cache.

    ``identity`` is :func:`batch.cache.model_identity`, ``requests`` are the usable sampled
    rows as the engine would get them and ``tokens`` their input tokens. Each is keyed as a
    run keys it (same namespace, same model input) and the keys are looked up in one query;
    nothing is written (not even the namespace record a run leaves). Rows the cache lacks
    whose prompt an earlier sampled row has are counted apart when dedup is on: a run sends
    them to the engine once. That share is the sample's own, so it says little about
    duplicates spread over a large input.
    """
    assert spec.cache.path
    ns = cache.namespace_of(cache.namespace_fields(spec, identity))
    ctx = cache.CacheContext(
        root=spec.cache.path,
        storage_options=dict(spec.cache.storage_options),
        namespace=ns,
        write=False,
        dedup=spec.dedup,
    )
    keys = [cache.row_key(ns, r) for r in requests]
    doc: dict[str, Any] = {"path": spec.cache.path, "namespace": ns, "mode": spec.cache.mode}
    found: dict[bytes, str] = {}
    if spec.cache.mode == "write":
        doc["note"] = "cache.mode is write: the run adds answers to the cache but uses none"
    else:
        cache.lance_uri(spec.cache.path)  # a filesystem the cache cannot live on: one line
        try:
            if keys and cache.open_table(ctx) is None:
                doc["note"] = f"the cache at {spec.cache.path} holds no answers yet"
            else:
                found = cache.lookup(ctx, keys)
        except Exception as exc:  # a dry run reports it; the run itself would go on uncached
            doc["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
    probed = len(keys)
    hits = dups = 0
    engine_tokens = 0
    seen: set[bytes] = set()
    for key, n in zip(keys, tokens, strict=True):
        if key in found:
            hits += 1
        elif ctx.dedup and key in seen:
            dups += 1
        else:
            seen.add(key)
            engine_tokens += n
    total_tokens = sum(tokens)
    doc.update(
        sample_rows=probed,
        hits=hits,
        hit_rate=round(hits / probed, 4) if probed else 0.0,
        dedup=ctx.dedup,
    )
    if ctx.dedup:
        doc.update(duplicate_rows=dups, duplicate_share=round(dups / probed, 4) if probed else 0.0)
    doc["engine_share"] = round((probed - hits - dups) / probed, 4) if probed else 1.0
    doc["engine_input_token_share"] = (
        round(engine_tokens / total_tokens, 4) if total_tokens else doc["engine_share"]
    )
    return doc


def cache_line(doc: dict[str, Any]) -> str | None:
    """The plan's line about the result cache (None without ``cache.path``)."""
    c = doc.get("cache")
    if not c:
        return None
    line = (
        f"result cache {c['path']}: {c['hits']} of {c['sample_rows']} sampled rows cached "
        f"(hit rate {c['hit_rate']:.1%})"
    )
    if c.get("duplicate_rows"):
        line += (
            f", {c['duplicate_rows']} more repeat a sampled prompt ({c['duplicate_share']:.1%}, "
            "sent once with dedup)"
        )
    line += f"; ~{c['est_engine_rows']:,} rows to compute, the estimates below count only those"
    if c.get("note"):
        line += f" ({c['note']})"
    return line


def response_plan(spec: JobSpec, tok: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """What a typed answer adds to the plan, and warnings about budgets that cannot work.

    Returns ``(None, [])`` without ``response``. The instruction line is already in the
    prompt (``prepare`` adds it), so its tokens are in the input estimate; they are listed
    apart here so the cost of the format is visible.
    """
    if spec.response is None:
        return None, []
    from batch.response import Response

    r = Response.from_spec(spec.response)
    rs = spec.response
    kind = next(
        k for k in ("fields", "json_schema", "choice", "regex") if getattr(rs, k) is not None
    )
    instruction = len(tok.encode(r.instruction(), add_special_tokens=False)) if r.instruct else 0
    skeleton = r.skeleton()
    min_out = (len(tok.encode(skeleton, add_special_tokens=False)) if skeleton else 0) + 1
    doc = {
        "kind": kind,
        "instruction_tokens_per_row": instruction,
        "min_output_tokens_per_row": min_out,
        "max_resamples": rs.max_resamples,
    }
    warnings: list[str] = []
    max_tokens = spec.sampling.max_tokens
    if min_out > max_tokens:
        warnings.append(
            f"the shortest valid answer takes {min_out} tokens but sampling.max_tokens is "
            f"{max_tokens}: every row would fail as SchemaViolation; raise sampling.max_tokens "
            f"to at least {min_out}"
        )
    unbounded = _unbounded_strings(r.schema) if r.schema is not None else []
    if unbounded and max_tokens < 64:
        warnings.append(
            f"string fields without maxLength ({', '.join(unbounded)}) with sampling.max_tokens "
            f"{max_tokens}: answers may be cut off and fail as SchemaViolation; bound them with "
            "maxLength or raise sampling.max_tokens"
        )
    return doc, warnings


def _unbounded_strings(schema: dict[str, Any], prefix: str = "") -> list[str]:
    """Paths of string fields with no maxLength, enum or pattern (free text of any length)."""
    found: list[str] = []
    for key, node in (schema.get("properties") or {}).items():
        path = f"{prefix}{key}"
        t = node.get("type")
        types = t if isinstance(t, list) else [t]
        if "string" in types and not ({"maxLength", "enum", "pattern"} & set(node)):
            found.append(path)
        elif "object" in types:
            found += _unbounded_strings(node, f"{path}.")
        elif "array" in types and isinstance(node.get("items"), dict):
            item = node["items"]
            item_types = (
                item.get("type") if isinstance(item.get("type"), list) else [item.get("type")]
            )
            if "string" in item_types and not ({"maxLength", "enum", "pattern"} & set(item)):
                found.append(f"{path}[]")
            elif "object" in item_types:
                found += _unbounded_strings(item, f"{path}[].")
    return found


def _measure(spec: JobSpec, plan: planning.Plan, n: int) -> dict[str, Any]:
    """Run ``n`` sampled rows for real in a scratch output; return usage and throughput."""
    from batch.job import run_job
    from batch.progress import NullReporter

    rows = sample_rows(spec, plan, n)
    with tempfile.TemporaryDirectory(prefix="batchinfer-plan-") as tmp:
        inp = Path(tmp) / "in"
        inp.mkdir()
        for col in ("_source_file", "_source_row"):
            if col in rows.column_names:
                rows = rows.drop_columns([col])
        pq.write_table(rows, inp / "sample.parquet")
        doc = spec.model_dump(mode="json")
        doc["input"].update(path=str(inp), storage_options={})
        doc["output"].update(path=str(Path(tmp) / "out"), storage_options={})
        doc["name"] = f"{spec.name}-sample"
        # Every sampled row is computed, to measure the engine: no cache (which the dry run
        # must not change, nor read to skip the work) and no dedup.
        doc["cache"] = {"path": None, "dedup": False}
        scratch = JobSpec.model_validate(doc)
        t0 = time.time()
        summary = run_job(scratch, NullReporter())
        from batch import store

        markers = store.read_markers(scratch, store.list_markers(scratch))
        ledger = store.read_output_json(scratch, store.LEDGER) or {}
    loads = [m["engine"]["ready"] - m["engine"]["created"] for m in markers if m.get("engine")]
    return {
        "rows": summary.rows,
        "failed_rows": summary.failed_rows,
        "input_tokens": summary.input_tokens,
        "output_tokens": summary.output_tokens,
        "wall_seconds": round(time.time() - t0, 2),
        "engine_load_seconds": round(max(loads), 2) if loads else 0.0,
        "rows_per_second_per_replica": ledger.get("rows_per_second_per_replica", 0.0),
        "output_tokens_per_row": round(summary.output_tokens / summary.rows, 2)
        if summary.rows
        else 0.0,
    }
