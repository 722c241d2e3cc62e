"""Structured output: what constraining costs, and batchinfer against Ray Data LLM, in one run.

The demo job (``jobs/enrich.yaml``: a sentiment label and a one-sentence summary per review)
over N clean demo reviews, run as four systems, each in a fresh process, interleaved round by
round:

* ``batchinfer-text``: the job without ``response:``, free text. Its prompt ends with the same
  instruction line the schema job adds, so the two prompts are identical; only the constraint
  differs;
* ``batchinfer-schema``: the demo's ``response.fields`` (JSON, typed columns, confidence);
* ``batchinfer-choice``: ``response.choice`` with the sentiment labels (classification; its
  prompt asks for the sentiment alone, with the choice instruction line);
* ``ray-data-llm-schema``: Ray Data LLM's vLLM processor with the same JSON Schema as
  ``batchinfer-schema`` (``sampling_params.structured_outputs.json``), the same prompts.

Same model, engine arguments (plus xgrammar without free whitespace for the constrained
systems, batchinfer's default), rows, ``max_tokens``; greedy and no ``ignore_eos``: with a
grammar the answer's length is the model's. The messages of every row are checked equal
(batchinfer's ``Generate.prepare`` against the Ray path's formatting) before anything runs.

Reported per system: wall time (process start to exit), engine start, the engine phase (first
request at the engine to last result) and its rows/s and output tokens/s, the ratios to
``batchinfer-text`` (the cost of constraining), the share of rows whose final answer is
schema-valid (checked here with ``jsonschema``, for every system alike; Ray Data LLM has no
check or retry, so its share is what the grammar alone gives), the rows that land in typed
columns (Ray: none, the user parses), and batchinfer's re-samples and discarded tokens from its
ledger. Output tokens/s counts the committed answers' tokens; ``generated`` adds the discarded
ones (the engine's real work).

Run from the repository root (CPU default, SmolLM2-135M, 128 rows, about 8 minutes)::

    .venv/bin/python benchmarks/structured.py

It prints a table and writes ``benchmarks/results/structured-<device>.{json,md,png}``. It
reuses ``benchmarks/throughput.py``'s helpers (engine arguments, input rows, figures, warm-up).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.throughput import (
    Bench,
    asdict,
    dump_json,
    figures,
    machine,
    median_figures,
    parse_engine_args,
    versions,
    warm_up,
    write_input,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO_JOB = ROOT / "jobs" / "enrich.yaml"
SYSTEMS = ("batchinfer-text", "batchinfer-schema", "batchinfer-choice", "ray-data-llm-schema")
BASE = "batchinfer-text"
# batchinfer's default for a job with response: (batch/engine/vllm.py), given to Ray too.
STRUCTURED_CONFIG = {"backend": "xgrammar", "disable_any_whitespace": True}
TYPED = {"batchinfer-schema": ("sentiment", "summary"), "batchinfer-choice": ("label",)}


# --------------------------------------------------------------------------- the jobs


def demo() -> dict[str, Any]:
    """The demo job's prompt, response fields and max_tokens."""
    import yaml

    return dict(yaml.safe_load(DEMO_JOB.read_text()))


def setups(demo_job: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per system: the user template (jinja), the response section, and for the schema the
    normalised JSON Schema that both batchinfer and Ray get."""
    from batch.response import Response
    from batch.spec import ResponseSpec

    template = str(demo_job["prompt"]["template"])
    fields = dict(demo_job["response"]["fields"])
    schema_response = Response.from_spec(ResponseSpec(fields=fields))
    assert schema_response.schema is not None
    labels = list(schema_response.schema["properties"]["sentiment"]["enum"])
    instruction = schema_response.instruction()
    assert "{" not in instruction, "the instruction line would need escaping in a template"
    choice_template = template.replace(" and a one-sentence summary", "")
    assert choice_template != template, "the demo prompt changed: adapt the choice prompt"
    return {
        "batchinfer-text": {
            "template": f"{template.rstrip()}\n\n{instruction}",
            "response": None,
        },
        "batchinfer-schema": {"template": template, "response": {"fields": fields}},
        "batchinfer-choice": {"template": choice_template, "response": {"choice": labels}},
        "ray-data-llm-schema": {
            # str.format of the same template, then the instruction line, as Generate does
            "format": _to_format(template).rstrip() + "\n\n" + instruction,
            "schema": schema_response.schema,
        },
        "_check": {"schema": schema_response.schema, "labels": labels},
    }


def _to_format(jinja: str) -> str:
    """``{{ name }}`` -> ``{name}`` (the demo template uses nothing else)."""
    out = re.sub(r"\{\{\s*(\w+)\s*\}\}", r"{\1}", jinja)
    assert "{{" not in out and "{%" not in out, "the demo template uses more than {{ name }}"
    return out


def ray_messages(row: Mapping[str, Any], system: str, user_format: str) -> list[dict[str, str]]:
    """The chat messages of the Ray Data LLM path (also used by the equality check)."""
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": user_format.format(**row)},
    ]


def batchinfer_job(
    bench: Bench, demo_job: Mapping[str, Any], setup: Mapping[str, Any], data: str, out: str
) -> str:
    """The batchinfer job (YAML): the demo's, over the benchmark rows, with timed rows."""
    import yaml

    job: dict[str, Any] = {
        "name": "bench-structured",
        "input": {"path": data, "id_column": "review_id"},
        "output": {"path": out},
        "model": {
            "path": bench.model,
            "task": "generate",
            "engine_args": bench.args_for("generate"),
        },
        "pipeline": "benchmarks.timed:TimedGenerate",
        "prompt": {"system": demo_job["prompt"]["system"], "template": setup["template"]},
        "sampling": {"max_tokens": bench.max_tokens, "temperature": 0},
        "resources": {
            "device": bench.device,
            "batch_size": bench.batch_size,
            "rows_per_chunk": bench.rows_per_chunk,
            "chunks_in_flight": bench.chunks_in_flight,
        },
    }
    if setup["response"] is not None:
        job["response"] = setup["response"]
    return yaml.safe_dump(job, sort_keys=False)


def check_same_prompts(
    bench: Bench, demo_job: Mapping[str, Any], sets: Mapping[str, Any], data: str
) -> int:
    """Every row's messages are the same for the text job, the schema job and Ray Data LLM
    (the choice job's are checked to render). Returns the number of rows checked."""
    import pyarrow.parquet as pq

    from batch.spec import parse_spec
    from pipelines.generate import Generate

    def pipeline(system: str) -> Generate:
        text = batchinfer_job(bench, demo_job, sets[system], data, "/tmp/unused")
        return Generate(parse_spec(text, source=f"<{system}>"))

    text, schema, choice = (pipeline(s) for s in SYSTEMS[:3])
    system_prompt = str(demo_job["prompt"]["system"])
    rows = pq.read_table(data).to_pylist()
    for row in rows:
        want = schema.prepare(row)
        assert text.prepare(row) == want, f"text and schema prompts differ: {row['review_id']}"
        ray = ray_messages(row, system_prompt, sets["ray-data-llm-schema"]["format"])
        assert ray == want, f"Ray Data LLM's prompt differs: {row['review_id']}: {ray} {want}"
        asked = choice.prepare(row)
        assert isinstance(asked, list) and asked[-1]["content"].endswith(choice.instruction)
    return len(rows)


# --------------------------------------------------------------------------- Ray Data LLM


def run_ray(bench: Bench, model_path: str, data: str, out: str, setup: dict[str, Any]) -> dict:
    """Ray Data LLM's processor with the schema (runs in its own process), set up as in the
    throughput harness (light stages, one engine actor on one CPU, same instrumentation)."""
    import pyarrow.parquet as pq
    import ray
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from benchmarks.throughput import _instrument_ray_data_llm

    trace = tempfile.mkdtemp(prefix="bench-trace-")
    ray.init(
        runtime_env={
            "worker_process_setup_hook": _instrument_ray_data_llm,
            "env_vars": {"BENCH_TRACE_DIR": trace},
        },
        log_to_driver=False,
        # see throughput.run_ray_data_llm: 2 logical CPUs deadlock Ray Data LLM on 2 cores
        num_cpus=max(4, os.cpu_count() or 1) if bench.device == "cpu" else None,
    )
    light = {"num_cpus": 0.25}
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs={
            **bench.engine_kwargs("generate"),
            "structured_outputs_config": dict(STRUCTURED_CONFIG),
        },
        task_type="generate",
        batch_size=bench.rows_per_chunk,
        max_concurrent_batches=bench.chunks_in_flight,
        concurrency=1,
        log_engine_metrics=False,
        placement_group_config={"bundles": [{"CPU": 1}]} if bench.device == "cpu" else None,
        chat_template_stage={"enabled": True, "chat_template_kwargs": {}, **light},
        tokenize_stage=light,
        detokenize_stage={"enabled": True, **light},
        should_continue_on_error=True,
    )
    system, user_format, max_tokens = setup["system"], setup["format"], bench.max_tokens
    # A JSON string: Ray Data keeps sampling_params as an Arrow struct, and a nested schema
    # dict would come back with every property padded with the others' keys set to null.
    schema_json = json.dumps(setup["schema"])

    def pre(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "review_id": row["review_id"],
            "messages": ray_messages(row, system, user_format),
            "sampling_params": {
                "max_tokens": max_tokens,
                "temperature": 0,
                "structured_outputs": {"json": schema_json},
            },
        }

    def post(row: dict[str, Any]) -> dict[str, Any]:
        return {
            "review_id": row["review_id"],
            "generated_text": row.get("generated_text"),
            "output_tokens": row.get("num_generated_tokens") or 0,
            "error": row.get("__inference_error__") or None,
            "started_at": row.get("started_at"),
            "finished_at": row.get("finished_at"),
        }

    processor = build_processor(
        config,
        preprocess=pre,
        postprocess=post,
        preprocess_map_kwargs=light,
        postprocess_map_kwargs=light,
    )
    processor(ray.data.read_parquet(data)).write_parquet(out)
    ray.shutdown()
    rows = pq.read_table(out).to_pylist()
    done = [r for r in rows if r["finished_at"] is not None]
    engines = [json.loads(p.read_text()) for p in Path(trace).glob("engine-*.json")]
    return {
        "engine_created": min(e["created"] for e in engines),
        "engine_ready": min(e["ready"] for e in engines),
        "first_request": min(r["started_at"] for r in done),
        "finished": [r["finished_at"] for r in done],
        "tokens": [int(r["output_tokens"]) for r in done],
        "rows_out": len(rows),
        "texts": {r["review_id"]: r["generated_text"] for r in rows},
        "errors": sum(1 for r in rows if r["error"]),
    }


# --------------------------------------------------------------------------- batchinfer


def batchinfer_result(out: str, system: str) -> dict[str, Any]:
    """Timings, texts, typed rows and the re-sampling account, from batchinfer's own output."""
    import pyarrow.dataset as pads

    markers = [json.loads(p.read_text()) for p in Path(out, "_markers").rglob("*.json")]
    data = pads.dataset(Path(out, "data"), format="parquet").to_table().to_pylist()
    failed_dir = Path(out, "_failed")
    failed = (
        pads.dataset(failed_dir, format="parquet").to_table().to_pylist()
        if failed_dir.exists() and any(failed_dir.rglob("*.parquet"))
        else []
    )
    ledger = json.loads(Path(out, "ledger.json").read_text())
    typed = TYPED.get(system, ())
    timed = [r for r in data if r["_finished_at"] is not None]
    texts = {r["review_id"]: r["generated_text"] for r in data}
    texts.update({r["review_id"]: r.get("_output_text") for r in failed})
    return {
        "engine_created": min(m["engine"]["created"] for m in markers),
        "engine_ready": min(m["engine"]["ready"] for m in markers),
        "first_request": min(m["timings"]["engine_start"] for m in markers),
        "finished": [r["_finished_at"] for r in timed],
        "tokens": [int(r["output_tokens"]) for r in timed],
        "rows_out": len(data) + len(failed),
        "texts": texts,
        "typed_rows": (
            sum(1 for r in data if all(r.get(c) is not None for c in typed)) if typed else 0
        ),
        "failed_by_class": dict(Counter(str(r.get("_error_class")) for r in failed)),
        "resamples": int(ledger.get("resamples", 0)),
        "discarded_output_tokens": int(ledger.get("discarded_output_tokens", 0)),
        "discarded_input_tokens": int(ledger.get("discarded_input_tokens", 0)),
        "schema_violations": int(ledger.get("schema_violations", 0)),
        "engine_idle_fraction": ledger.get("engine_idle_fraction"),
    }


# --------------------------------------------------------------------------- one run


def run_system(
    system: str,
    bench: Bench,
    demo_job: Mapping[str, Any],
    sets: Mapping[str, Any],
    data: str,
    work: Path,
    log: Path,
    *,
    tries: int = 2,
) -> dict[str, Any]:
    """One run of one system in a fresh process (as throughput.run_system: a run that did its
    work but exited non-zero afterwards counts, with its exit code; one that produced nothing
    is tried again once)."""
    failures: list[int] = []
    for _ in range(tries):
        out = str(work / f"out-{system}")
        shutil.rmtree(out, ignore_errors=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        result_file = work / f"raw-{system}.json"
        result_file.unlink(missing_ok=True)
        if system.startswith("batchinfer"):
            job = work / f"job-{system}.yaml"
            job.write_text(
                batchinfer_job(bench, demo_job, sets[system], str(Path(data).parent), out)
            )
            cmd = [str(Path(sys.executable).with_name("batchinfer")), "submit", str(job), "--quiet"]
        else:
            setup = {"system": demo_job["prompt"]["system"], **sets[system]}
            cmd = [sys.executable, __file__, "--one", system, "--data", data, "--out", out]
            cmd += ["--raw", str(result_file), "--bench", json.dumps(asdict(bench))]
            cmd += ["--setup", json.dumps(setup)]
        warm_up(bench, "generate")
        spawned = time.time()
        with log.open("a") as f:
            f.write(f"\n===== {system}: {' '.join(cmd[:4])} ...\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        exited = time.time()
        if system.startswith("batchinfer"):
            raw = batchinfer_result(out, system) if Path(out, "_MANIFEST.json").exists() else None
        else:
            raw = json.loads(result_file.read_text()) if result_file.exists() else None
        if raw is not None:
            fig = figures(raw, spawned, exited, "generate", bench.batch_size)
            fig.update(quality(system, raw, sets["_check"], bench.rows))
            fig["texts"] = raw["texts"]  # compared across systems, then dropped
            for key in ("resamples", "discarded_output_tokens", "discarded_input_tokens",
                        "schema_violations", "engine_idle_fraction", "failed_by_class",
                        "errors"):  # fmt: skip
                if key in raw:
                    fig[key] = raw[key]
            phase = fig["phases_s"]["engine phase"]
            fig["engine_phase_rows_per_s"] = round(fig["rows_out"] / phase, 3) if phase else None
            generated = fig["tokens"] + int(raw.get("discarded_output_tokens", 0))
            fig["generated_tokens"] = generated
            fig["generated_per_s"] = round(generated / phase, 2) if phase else None
            fig["mean_output_tokens"] = round(fig["tokens"] / max(1, len(raw["tokens"])), 1)
            if proc.returncode != 0:
                fig["exit_code"] = proc.returncode
            if failures:
                fig["failed_tries"] = failures
            return fig
        failures.append(proc.returncode)
        print(f"  {system} failed (exit {proc.returncode}); see {log}", flush=True)
    raise SystemExit(f"{system} failed {tries} times (exits {failures}); see {log}")


def quality(
    system: str, raw: Mapping[str, Any], check: Mapping[str, Any], rows: int
) -> dict[str, Any]:
    """Schema-valid share of every system's final answers, checked here with jsonschema (the
    choice job against its labels), and the sentiment labels they give."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(check["schema"])
    valid = 0
    labels: Counter[str] = Counter()
    for text in raw["texts"].values():
        if system == "batchinfer-choice":
            if text in check["labels"]:
                valid += 1
                labels[text] += 1
            continue
        try:
            doc = json.loads(text or "")
        except json.JSONDecodeError:
            continue
        if validator.is_valid(doc):
            valid += 1
            labels[doc["sentiment"]] += 1
    return {
        "rows": rows,
        "schema_valid_rows": valid,
        "schema_valid_share": round(valid / rows, 4),
        "typed_rows": int(raw.get("typed_rows", 0)),
        "labels": dict(sorted(labels.items())),
    }


def same_answers(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Share of rows whose first-run answer equals batchinfer-schema's (greedy, same grammar)."""
    if "batchinfer-schema" not in runs:
        return {}
    ref = runs["batchinfer-schema"][0]["texts"]
    out = {}
    for system, figs in runs.items():
        if system in ("batchinfer-schema", "batchinfer-choice"):
            continue
        texts = figs[0]["texts"]
        out[system] = round(sum(texts.get(k) == v for k, v in ref.items()) / len(ref), 4)
    return out


# --------------------------------------------------------------------------- reporting


def ratios(results: dict[str, dict[str, Any]]) -> None:
    base = results.get(BASE)
    if not base:
        return
    for fig in results.values():
        for key in ("engine_phase_rows_per_s", "engine_phase_per_s"):
            if fig.get(key) and base.get(key):
                fig[f"{key}_vs_text"] = round(fig[key] / base[key], 3)
        fig["wall_vs_text"] = round(fig["wall_s"] / base["wall_s"], 3)


def markdown(doc: dict[str, Any]) -> str:
    p = doc["parameters"]
    lines = [
        "# Structured output: the cost of constraining, batchinfer vs Ray Data LLM",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}  ",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['logical_cpus']} logical CPUs, "
        f"{doc['machine']['memory_gib']} GiB  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ",
        "Parameters: " + ", ".join(f"{k}={v}" for k, v in p.items()),
        "",
        f"The demo job (jobs/enrich.yaml) over {p['rows']} clean demo reviews; greedy, "
        f"max_tokens {p['max_tokens']}, no ignore_eos; the prompts of the text job, the schema "
        f"job and Ray Data LLM were checked equal for all {doc['prompts_checked']} rows. "
        "Engine phase: first request at the engine to last result; tokens/s counts the "
        "committed answers (generated adds the tokens of discarded draws). Schema-valid: the "
        "final answer parses and validates against the JSON Schema (choice: is one of the "
        "labels), checked by the harness with jsonschema for every system alike. "
        f"Each figure is the median of {doc['repeat']} runs per system, interleaved round by "
        "round.",
        "",
        "| system | wall s | engine start s | engine phase s | rows/s | output tokens/s "
        "| generated tokens/s | mean tokens/row | rows/s vs text | tokens/s vs text "
        "| wall vs text | schema-valid | typed rows | re-samples | discarded tokens |",
        "|---|" + "---:|" * 14,
    ]
    for system, f in doc["results"].items():
        resamples = f.get("resamples")
        discarded = f.get("discarded_output_tokens")
        lines.append(
            f"| {system} | {f['wall_s']:.1f} | {f['engine_start_s']:.1f} | "
            f"{f['phases_s']['engine phase']:.1f} | {f['engine_phase_rows_per_s'] or 0:.2f} | "
            f"{f['engine_phase_per_s'] or 0:.1f} | {f['generated_per_s'] or 0:.1f} | "
            f"{f['mean_output_tokens']:.1f} | "
            f"{f.get('engine_phase_rows_per_s_vs_text', 1.0):.2f}x | "
            f"{f.get('engine_phase_per_s_vs_text', 1.0):.2f}x | "
            f"{f.get('wall_vs_text', 1.0):.2f}x | "
            f"{f['schema_valid_share']:.1%} ({f['schema_valid_rows']:.0f}/{f['rows']:.0f}) | "
            f"{f['typed_rows']:.0f} | {'' if resamples is None else f'{resamples:.0f}'} | "
            f"{'' if discarded is None else f'{discarded:.0f}'} |"
        )
    lines += ["", "Sentiment labels (first run; text and Ray: of the schema-valid answers):", ""]
    for system, f in doc["results"].items():
        lines.append(f"- {system}: " + ", ".join(f"{k} {v}" for k, v in f["labels"].items()))
    if doc.get("same_answer_as_schema"):
        lines += ["", "Rows whose answer is the same text as batchinfer-schema's (first run):", ""]
        for system, share in doc["same_answer_as_schema"].items():
            lines.append(f"- {system}: {share:.1%}")
    lines += ["", "Where the wall time goes (s):", ""]
    phases = list(next(iter(doc["results"].values()))["phases_s"])
    lines += ["| system | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
    for system, f in doc["results"].items():
        lines.append(
            f"| {system} | " + " | ".join(f"{f['phases_s'][k]:.1f}" for k in phases) + " |"
        )
    return "\n".join(lines) + "\n"


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = doc["results"]
    names = list(results)
    colours = ["#7f7f7f", "#2ca02c", "#98df8a", "#1f77b4"][: len(names)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    panels = [
        ("engine_phase_rows_per_s", "rows/s (engine phase), higher is better", "{:.2f}"),
        ("wall_s", "wall time s, lower is better", "{:.0f}"),
        ("schema_valid_share", "schema-valid share of rows", "{:.0%}"),
    ]
    for ax, (key, title, fmt) in zip(axes, panels, strict=True):
        values = [float(results[n][key] or 0.0) for n in names]
        bars = ax.barh(names, values, color=colours)
        for bar, v in zip(bars, values, strict=True):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + fmt.format(v),
                    va="center")  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlim(0, max([*values, 1e-9]) * 1.3)
        ax.invert_yaxis()
    for ax in axes[1:]:
        ax.set_yticklabels([])
    fig.suptitle(f"Demo job, {doc['parameters']['rows']} rows, {doc['parameters']['model']} on "
                 f"{doc['machine']['logical_cpus']} CPUs: with and without the schema")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="default: the demo job's model")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=None, help="default: the demo job's")
    p.add_argument("--batch-size", type=int, default=64, help="vLLM max_num_seqs, for all")
    p.add_argument("--rows-per-chunk", type=int, default=16,
                   help="batchinfer rows_per_chunk = Ray Data LLM batch_size")  # fmt: skip
    p.add_argument(
        "--chunks-in-flight",
        type=int,
        default=4,
        help="batchinfer chunks_in_flight = Ray Data LLM max_concurrent_batches",
    )
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--repeat", type=int, default=1, help="runs per system, interleaved")
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--results", default=None, help="where results go (default benchmarks/results)")
    # internal: run Ray Data LLM in this process
    p.add_argument("--one", choices=["ray-data-llm-schema"], help=argparse.SUPPRESS)
    for name in ("--data", "--out", "--raw", "--bench", "--setup"):
        p.add_argument(name, help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    from batch.models import resolve_model

    if a.one:
        bench = Bench(**json.loads(a.bench))
        raw = run_ray(bench, resolve_model(bench.model), a.data, a.out, json.loads(a.setup))
        Path(a.raw).write_text(json.dumps(raw))
        return

    demo_job = demo()
    engine_args: dict[str, Any] = {"max_model_len": 2048, "dtype": "bfloat16"}
    if a.device == "cpu":
        engine_args.update(enforce_eager=True, gpu_memory_utilization=0.4)
    engine_args.update(parse_engine_args(a.engine_arg))
    bench = Bench(
        model=a.model or demo_job["model"]["path"],
        embed_model="",
        device=a.device,
        rows=a.rows,
        embed_rows=0,
        max_tokens=a.max_tokens or int(demo_job["sampling"]["max_tokens"]),
        batch_size=a.batch_size,
        rows_per_chunk=a.rows_per_chunk,
        embed_rows_per_chunk=0,
        chunks_in_flight=a.chunks_in_flight,
        engine_args=engine_args,
        embed_engine_args={},
    )
    resolve_model(bench.model)  # prepare a bundled model once, outside every timing
    sets = setups(demo_job)
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-structured-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    print(f"scratch and logs: {work}", flush=True)
    data = write_input(work / "data", bench.rows)
    checked = check_same_prompts(bench, demo_job, sets, data)
    print(f"prompts equal for all {checked} rows", flush=True)
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in a.systems.split(",")}
    for r in range(a.repeat):
        for system in runs:
            print(f"{system} (run {r + 1} of {a.repeat}) ...", flush=True)
            fig = run_system(system, bench, demo_job, sets, data, work, log)
            runs[system].append(fig)
            shown = {k: v for k, v in fig.items() if k not in ("texts", "finished_s")}
            print(f"  {json.dumps(shown)}", flush=True)
    for system, figs in runs.items():
        if any(f["rows_out"] != bench.rows for f in figs):
            raise SystemExit(f"{system} did not answer every row: {[f['rows_out'] for f in figs]}")
    same = same_answers(runs)
    for figs in runs.values():
        for f in figs:
            f.pop("texts")
    results = {system: median_figures(figs) for system, figs in runs.items()}
    ratios(results)
    params = {k: v for k, v in asdict(bench).items() if not k.startswith("embed")}
    params["structured_outputs_config"] = STRUCTURED_CONFIG
    doc = {
        "command": " ".join(["python", "benchmarks/structured.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "parameters": params,
        "repeat": a.repeat,
        "prompts_checked": checked,
        "same_answer_as_schema": same,
        "results": results,
    }
    text = markdown(doc)
    print(text)
    out = Path(a.results or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"structured-{bench.device}"
    stem.with_suffix(".json").write_text(dump_json(doc))
    stem.with_suffix(".md").write_text(text)
    chart(doc, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
