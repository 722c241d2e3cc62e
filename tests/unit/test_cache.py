"""The result cache's protocol on real Ray with the fake engine and local folder caches.

What a user would check: a changed prompt, model or parameter never gets a stale answer and a
speed setting never costs a hit; night 2 pays only for changed and new rows and gives the
unchanged ones night 1's bytes; equal prompts get one answer; failures are never cached;
resume, retry-failed and two jobs writing one cache at once stay exactly-once. The fake
engine samples at random here (temperature > 0 with a seed it ignores), so an answer that
was not computed afresh shows: it is byte-equal to the one it was copied from.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from batch import cache
from batch.engine import EngineRequest
from batch.errors import SpecError
from batch.job import retry_failed, run_job
from batch.progress import NullReporter
from batch.runner import ray_session
from batch.spec import JobSpec, SamplingSpec, parse_spec

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_once() -> Iterator[None]:
    with ray_session(None):
        yield


# --------------------------------------------------------------------------- helpers


def spec_of(inp: Path | str, out: Path | str, cache_dir: Path | str | None, *sets: str) -> JobSpec:
    """A random-sampling fake job (seeded, so the cache takes it; the fake ignores the seed)."""
    text = f"""
name: cache-test
input: {{path: "{inp}", id_column: review_id}}
output: {{path: "{out}"}}
model: {{path: fake-model, engine: fake,
         fake_options: {{max_model_len: 40, fail_rows_containing: BROKEN}}}}
prompt: {{template: "Review of {{{{ product }}}}: {{{{ body }}}}"}}
sampling: {{max_tokens: 8, temperature: 0.7, seed: 1}}
resources: {{rows_per_chunk: 10, chunks_in_flight: 3}}
"""
    if cache_dir is not None:
        text += f'cache: {{path: "{cache_dir}"}}\n'
    return parse_spec(text, overrides=sets)


def key_of(spec: JobSpec, row: dict[str, Any]) -> bytes:
    """The row's cache key, made as a run makes it (public functions only)."""
    from pipelines import load_pipeline

    model_input = load_pipeline(spec).prepare(row)
    request = (
        EngineRequest(key=0, text=model_input)
        if isinstance(model_input, str)
        else EngineRequest(key=0, messages=tuple(model_input))
    )
    return cache.row_key(namespace(spec), request)


def namespace(spec: JobSpec) -> str:
    return cache.namespace_of(cache.namespace_fields(spec, cache.model_identity(spec)))


def lookup(spec: JobSpec, keys: list[bytes]) -> dict[bytes, str]:
    assert spec.cache.path
    ctx = cache.CacheContext(root=spec.cache.path, namespace=namespace(spec))
    return cache.lookup(ctx, keys)


def write_rows(folder: Path, name: str, rows: list[tuple[str, str | None]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {
            "review_id": [i for i, _ in rows],
            "product": ["kettle"] * len(rows),
            "body": [b for _, b in rows],
        },
        schema=pa.schema([("review_id", pa.string()), ("product", pa.string()),
                          ("body", pa.string())]),
    )  # fmt: skip
    pq.write_table(table, folder / name)


def read_dir(path: Path) -> pa.Table:
    files = sorted(path.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]) if files else pa.table({})


def by_id(table: pa.Table) -> dict[str, dict[str, Any]]:
    return {r["review_id"]: r for r in table.to_pylist()}


def markers(out: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((out / "_markers").glob("*.json"))]


def every_id_once(out: Path, ids: list[str]) -> tuple[pa.Table, pa.Table]:
    data, failed = read_dir(out / "data"), read_dir(out / "_failed")
    seen = data["review_id"].to_pylist()
    if failed.num_rows:
        seen += failed["review_id"].to_pylist()
    assert sorted(seen) == sorted(ids), "every input id exactly once in data/ + _failed/"
    return data, failed


def fake_tokens(body: str) -> int:
    """The fake engine's input tokens for a row of these jobs: words, plus 4 for chat."""
    return len(f"Review of kettle: {body}".split()) + 4


# --------------------------------------------------------------------------- keys

ROW = {"review_id": "r1", "product": "kettle", "body": "it boils water fast", "rating": 4}
BASE = ("sampling.seed=1",)

# A change of each sampling field (a test below checks that none is missing).
SAMPLING_CHANGES: dict[str, tuple[str, ...]] = {
    "max_tokens": ("sampling.max_tokens=9",),
    "temperature": ("sampling.temperature=0.5",),
    "top_p": ("sampling.top_p=0.9",),
    "top_k": ("sampling.top_k=5",),
    "min_tokens": ("sampling.min_tokens=2",),
    "seed": ("sampling.seed=2",),
    "stop": ("sampling.stop=[END]",),
    "ignore_eos": ("sampling.ignore_eos=true",),
    "repetition_penalty": ("sampling.repetition_penalty=1.1",),
    "n": ("sampling.n=2", "sampling.temperature=0.5"),
    "logprobs": ("sampling.logprobs=2",),
    "extra_args": ("sampling.extra_args={presence_penalty: 0.5}",),
}
CHANGES_ANSWER: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "template": ((), ("prompt.template=Rate {{ product }}: {{ body }}",)),
    "system prompt": ((), ("prompt.system=Answer in French.",)),
    "model": ((), ("model.path=other-fake-model",)),
    "fake engine options": ((), ("model.fake_options={max_model_len: 41}",)),
    "response": ((), ("response.fields={label: [good, bad]}",)),
    "chat_template_kwargs": ((), ("prompt.chat_template_kwargs={enable_thinking: false}",)),
    "pipeline_options": (
        ("pipeline=pipelines.reviews:ReviewTriage", "response.fields={sentiment: [a, b]}"),
        ("pipeline_options={min_confidence: 0.9}",),
    ),
    "engine_args.dtype": ((), ("model.engine_args={dtype: float16}",)),
    "engine_args.max_model_len": ((), ("model.engine_args={max_model_len: 512}",)),
    **{f"sampling.{k}": ((), v) for k, v in SAMPLING_CHANGES.items() if k != "n"},
    "sampling.n": (("sampling.temperature=0.5",), SAMPLING_CHANGES["n"]),
}
KEEPS_ANSWER = {
    "gpu_memory_utilization": "model.engine_args={gpu_memory_utilization: 0.5}",
    "enforce_eager": "model.engine_args={enforce_eager: true}",
    "output path": "output.path=/elsewhere/out",
    "replicas": "resources.replicas=2",
    "rows_per_chunk": "resources.rows_per_chunk=7",
    "chunks_in_flight": "resources.chunks_in_flight=5",
    "job name": "name=another-job",
    "input path": "input.path=/elsewhere/in",
    "cache mode": "cache.mode=read",
}


def key_spec(*sets: str) -> JobSpec:
    text = """
name: keys
input: {path: /data/in, id_column: review_id}
output: {path: /data/out}
model: {path: fake-model, engine: fake}
prompt: {template: "Review of {{ product }}: {{ body }}"}
sampling: {max_tokens: 8}
cache: {path: /data/cache}
"""
    return parse_spec(text, overrides=[*BASE, *sets])


def test_every_sampling_field_is_in_the_key_test() -> None:
    assert set(SAMPLING_CHANGES) == set(SamplingSpec.model_fields)


@pytest.mark.parametrize("what", sorted(CHANGES_ANSWER))
def test_what_changes_the_answer_changes_the_key(what: str) -> None:
    base, change = CHANGES_ANSWER[what]
    before, after = key_spec(*base), key_spec(*base, *change)
    assert key_of(before, ROW) != key_of(after, ROW)


@pytest.mark.parametrize("what", sorted(KEEPS_ANSWER))
def test_speed_and_placement_keep_the_key(what: str) -> None:
    before, after = key_spec(), key_spec(KEEPS_ANSWER[what])
    assert namespace(before) == namespace(after)
    assert key_of(before, ROW) == key_of(after, ROW)


def test_the_row_and_its_prompt_make_the_key() -> None:
    spec = key_spec()
    assert key_of(spec, ROW) == key_of(spec, dict(ROW, review_id="other", rating=1))
    assert key_of(spec, ROW) != key_of(spec, dict(ROW, body="it boils water slowly"))


def test_a_local_model_is_known_by_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCHINFER_HOME", str(tmp_path / "home"))  # the digest memo
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"max_position_embeddings": 2048}')
    (model / "model.safetensors").write_bytes(b"\x01" * 1000)
    spec = key_spec("model.engine=vllm", f"model.path={model}")
    first = key_of(spec, ROW)
    assert key_of(spec, ROW) == first, "the same files, the same key"
    copy = tmp_path / "copy-of-model"
    shutil.copytree(model, copy)
    assert key_of(key_spec("model.engine=vllm", f"model.path={copy}"), ROW) == first, (
        "the files, not the folder's name"
    )
    (model / "model.safetensors").write_bytes(b"\x02" * 1001)  # new weights
    assert key_of(spec, ROW) != first
    second = key_of(spec, ROW)
    (model / "tokenizer_config.json").write_text("{}")  # a file more
    assert key_of(spec, ROW) not in (first, second)


def test_a_hub_model_needs_a_pinned_revision() -> None:
    spec = key_spec("model.engine=vllm", "model.path=Qwen/Qwen3-0.6B")
    with pytest.raises(SpecError) as err:
        cache.model_identity(spec)
    message = str(err.value)
    assert "\n" not in message
    assert "cache.path" in message and "model.engine_args.revision" in message
    with pytest.raises(SpecError, match=r"model\.engine_args\.revision"):
        cache.context(spec)  # what submit calls, before any engine starts
    pinned = key_spec("model.engine=vllm", "model.path=Qwen/Qwen3-0.6B",
                      "model.engine_args={revision: abc123}")  # fmt: skip
    other = key_spec("model.engine=vllm", "model.path=Qwen/Qwen3-0.6B",
                     "model.engine_args={revision: def456}")  # fmt: skip
    assert key_of(pinned, ROW) != key_of(other, ROW)


# --------------------------------------------------------------------------- spec


def test_random_sampling_with_a_cache_is_refused_unless_asked() -> None:
    random = ("sampling.temperature=0.7", "sampling.seed=null")
    with pytest.raises(SpecError) as err:
        key_spec(*random)
    assert "cache.path: sampling.temperature is 0.7 with no sampling.seed" in str(err.value)
    sampled = key_spec(*random, "cache.sampled=true")
    assert sampled.dedup is True, "with cache.sampled, equal prompts share one draw"


RANDOM = ("sampling.temperature=0.7", "sampling.seed=null", "cache.path=null")


@pytest.mark.parametrize(
    ("sets", "dedup"),
    [
        (("sampling.temperature=0", "sampling.seed=null"), True),
        (("sampling.temperature=0.7", "sampling.seed=3"), True),
        (RANDOM, False),
        ((*RANDOM, "cache.sampled=true"), True),
        (("sampling.temperature=0", "cache.dedup=false"), False),
    ],
)
def test_dedup_default_follows_reproducible_sampling(sets: tuple[str, ...], dedup: bool) -> None:
    assert key_spec(*sets).dedup is dedup


# --------------------------------------------------------------------------- two nights


def night_one_rows() -> list[tuple[str, str | None]]:
    rows: list[tuple[str, str | None]] = [
        (f"r{i:02d}", f"night one text number {i} about the kettle") for i in range(40)
    ]
    rows[5] = ("r05", rows[1][1])  # the same prompt as r01, in the same chunk
    rows[15] = ("r15", rows[2][1])  # as r02, in the next chunk
    rows[25] = ("r25", rows[2][1])  # as r02, in the other file
    rows[7] = ("r07", "this one is BROKEN for the engine")
    rows[12] = ("r12", None)  # no text: fails before the engine
    rows[33] = ("r33", "far too long " * 20)  # over the fake max_model_len of 40
    return rows


CHANGED = {"r03", "r21", "r30"}
NEW = [f"r{i}" for i in range(40, 45)]
FAILING = {"r07", "r12", "r33"}
TWINS = {"r05": "r01", "r15": "r02", "r25": "r02"}


def night_two_rows() -> list[tuple[str, str | None]]:
    rows = [
        (i, f"changed on night two, row {i}") if i in CHANGED else (i, b)
        for i, b in night_one_rows()
    ]
    return rows + [(i, f"a new review on night two, row {i}") for i in NEW]


@dataclass
class Nights:
    root: Path
    cache: Path
    night1: JobSpec
    night2: JobSpec
    out1: Path
    out2: Path
    in1: Path
    in2: Path


@pytest.fixture(scope="module")
def nights(ray_once: None, tmp_path_factory: pytest.TempPathFactory) -> Nights:
    root = tmp_path_factory.mktemp("nights")
    in1, in2 = root / "in1", root / "in2"
    one, two = night_one_rows(), night_two_rows()
    write_rows(in1, "a.parquet", one[:20])
    write_rows(in1, "b.parquet", one[20:])
    write_rows(in2, "a.parquet", two[:20])
    write_rows(in2, "b.parquet", two[20:40])
    write_rows(in2, "c.parquet", two[40:])
    c = root / "cache"
    n = Nights(root, c, spec_of(in1, root / "out1", c), spec_of(in2, root / "out2", c),
               root / "out1", root / "out2", in1, in2)  # fmt: skip
    run_job(n.night1, NullReporter())
    run_job(n.night2, NullReporter())
    return n


def test_night_two_computes_only_changed_and_new_rows(nights: Nights) -> None:
    one = by_id(read_dir(nights.out1 / "data"))
    data, failed = every_id_once(nights.out2, [i for i, _ in night_two_rows()])
    assert set(failed["review_id"].to_pylist()) == FAILING
    unchanged = set(one) - CHANGED
    cached = {r["review_id"] for r in data.to_pylist() if r["_cached"]}
    assert cached == unchanged, "_cached is true exactly for the rows night 1 answered"
    # The ledger and the markers count those hits, and the engine's tokens are the others'.
    ledger = json.loads((nights.out2 / "ledger.json").read_text())
    assert ledger["cache"]["hit_rows"] == len(unchanged) == 34
    assert sum(m.get("cache_hits", 0) for m in markers(nights.out2)) == len(unchanged)
    assert ledger["cache"]["dedup_rows"] == 0
    computed = {i: b for i, b in night_two_rows() if i in CHANGED or i in NEW}
    assert ledger["rows"] == 42 and ledger["cache"]["engine_rows"] == len(computed)
    assert ledger["input_tokens"] == sum(fake_tokens(str(b)) for b in computed.values())
    two = by_id(data)
    assert ledger["output_tokens"] == sum(two[i]["output_tokens"] for i in computed)
    assert ledger["cache"]["saved_input_tokens"] == sum(two[i]["input_tokens"] for i in unchanged)


def test_night_two_gives_unchanged_rows_night_ones_bytes(nights: Nights) -> None:
    one = read_dir(nights.out1 / "data")
    two = read_dir(nights.out2 / "data")
    keep = pa.array(sorted(set(one["review_id"].to_pylist()) - CHANGED))

    def unchanged(t: pa.Table) -> pa.Table:
        t = t.filter(pc.is_in(t["review_id"], value_set=keep))
        return t.drop_columns(["_cached"]).sort_by("review_id")

    assert unchanged(one).num_rows == 34
    assert unchanged(two).equals(unchanged(one))
    # the engine does answer at random: the recomputed changed rows end in a random word
    texts = by_id(two)
    assert all("~" in texts[i]["generated_text"] for i in CHANGED)


def test_equal_prompts_get_one_answer_with_a_cache(nights: Nights) -> None:
    data, _ = every_id_once(nights.out1, [i for i, _ in night_one_rows()])
    rows = by_id(data)
    for dup, twin in TWINS.items():
        assert rows[dup]["generated_text"] == rows[twin]["generated_text"]
        assert "~" in rows[dup]["generated_text"], "a random answer, shared, not redrawn"
    served = [m.get("cache_hits", 0) + m.get("dedup_rows", 0) for m in markers(nights.out1)]
    # an empty cache: each copy is a dup, or (the twin's chunk committed first) a hit
    assert sum(served) == len(TWINS)
    ledger = json.loads((nights.out1 / "ledger.json").read_text())
    assert ledger["cache"]["engine_rows"] == 37 - len(TWINS)


def test_failed_rows_are_never_cached_and_run_again(nights: Nights) -> None:
    one = dict(night_one_rows())
    spec = nights.night1
    found = lookup(spec, [key_of(spec, {"product": "kettle", "body": one[i]}) for i in one
                          if one[i] is not None])  # fmt: skip
    for i, body in one.items():
        if body is None:
            continue
        key = key_of(spec, {"product": "kettle", "body": body})
        assert (key in found) is (i not in FAILING), i
    # next night they go to the engine again (the cache has no failure to serve)
    failed = by_id(read_dir(nights.out2 / "_failed"))
    assert failed["r07"]["_error_class"] == "EngineError"
    assert failed["r33"]["_error_class"] == "PromptTooLong"
    assert failed["r12"]["_error_class"] == "NullValue"


def lose_commits(out: Path, chunk_ids: list[str]) -> None:
    """Undo chunks' commits as a crash would have left them (markers, parts, manifest)."""
    (out / "_MANIFEST.json").unlink(missing_ok=True)
    for cid in chunk_ids:
        (out / "_markers" / f"{cid}.json").unlink()
        for kind in ("data", "_failed"):
            for part in (out / kind).glob(f"part-{cid}.*.parquet"):
                part.unlink()


def test_resume_with_a_cache_is_exactly_once_and_served(nights: Nights) -> None:
    out = nights.root / "resumed"
    shutil.copytree(nights.out1, out)
    spec = spec_of(nights.in1, out, nights.cache)
    lost = [m["chunk_id"] for m in markers(out)][::2]  # two of the four chunks
    lose_commits(out, lost)
    summary = run_job(spec, NullReporter())
    assert summary.chunks_run == 2
    data, failed = every_id_once(out, [i for i, _ in night_one_rows()])
    assert set(failed["review_id"].to_pylist()) == FAILING
    redone = [m for m in markers(out) if m["chunk_id"] in lost]
    assert len(redone) == 2
    for m in redone:
        assert m["cache_hits"] == m["rows"] and m["input_tokens"] == 0, "served, not recomputed"
    # the served rows are night 1's answers
    first = by_id(read_dir(nights.out1 / "data"))
    for i, row in by_id(data).items():
        assert row["generated_text"] == first[i]["generated_text"]


def test_retry_failed_with_a_cache(nights: Nights) -> None:
    out = nights.root / "retried"
    shutil.copytree(nights.out1, out)
    opts = "model.fake_options={max_model_len: 200, fail_rows_containing: BROKEN}"
    spec = spec_of(nights.in1, out, nights.cache, opts)
    retry_failed(spec, NullReporter())
    data, failed = every_id_once(out, [i for i, _ in night_one_rows()])
    assert set(failed["review_id"].to_pylist()) == {"r07", "r12"}
    rows = by_id(data)
    assert rows["r33"]["_cached"] is False and rows["r33"]["generated_text"]
    body = dict(night_one_rows())["r33"]
    key = key_of(spec, {"product": "kettle", "body": body})
    stored = lookup(spec, [key])
    assert json.loads(stored[key])["text"] == rows["r33"]["generated_text"]


# --------------------------------------------------------------------------- dedup alone


def test_dedup_without_a_cache_sends_each_prompt_once(ray_once: None, tmp_path: Path) -> None:
    # 30 rows in three chunks of 10: copies in the same chunk (d04, d09) and in later ones
    twins = {"d04": "d01", "d09": "d01", "d13": "d02", "d22": "d02", "d27": "d01"}
    rows: list[tuple[str, str | None]] = [
        (f"d{i:02d}", f"distinct review text {twins.get(f'd{i:02d}', f'd{i:02d}')} here")
        for i in range(30)
    ]
    write_rows(tmp_path / "in", "a.parquet", rows)
    out = tmp_path / "out"
    spec = spec_of(tmp_path / "in", out, None)
    assert spec.dedup, "seeded sampling: dedup by default"
    run_job(spec, NullReporter())
    data, failed = every_id_once(out, [i for i, _ in rows])
    assert failed.num_rows == 0 and "_cached" not in data.column_names
    got = by_id(data)
    for dup, twin in twins.items():
        assert got[dup]["body"] == got[twin]["body"]  # input columns are the row's own
        assert got[dup]["generated_text"] == got[twin]["generated_text"]
        assert "~" in got[dup]["generated_text"], "a random answer, shared, not redrawn"
    assert sum(m["dedup_rows"] for m in markers(out)) == len(twins)
    distinct = {b for _, b in rows}
    assert len(distinct) == 30 - len(twins)
    # the engine's tokens: each distinct prompt once
    assert sum(m["input_tokens"] for m in markers(out)) == sum(
        fake_tokens(str(b)) for b in distinct
    )
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["cache"]["dedup_rows"] == len(twins) and ledger["cache"]["hit_rows"] == 0


# --------------------------------------------------------------------------- two writers


def test_two_jobs_write_one_cache_at_once(ray_once: None, tmp_path: Path) -> None:
    rows: list[tuple[str, str | None]] = [
        (f"w{i:02d}", f"shared review text {i} for both jobs") for i in range(40)
    ]
    write_rows(tmp_path / "in", "a.parquet", rows)
    c = tmp_path / "cache"
    specs = [spec_of(tmp_path / "in", tmp_path / f"out{n}", c, f"name=writer-{n}") for n in (1, 2)]
    procs = []
    for n, spec in enumerate(specs, 1):
        path = tmp_path / f"job{n}.yaml"
        path.write_text(json.dumps(spec.model_dump(mode="json")))
        cmd = [sys.executable, "-m", "batch.cli", "submit", str(path), "--quiet"]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    outputs = [every_id_once(tmp_path / f"out{n}", [i for i, _ in rows])[0] for n in (1, 2)]
    # the cache is readable, and each key resolves to one answer, the same every time
    table = cache.open_table(cache.CacheContext(root=str(c)))
    assert table is not None
    entries = table.to_table(columns=["key", "result", "created_at", "run_id"])
    keys = [key_of(specs[0], {"product": "kettle", "body": b}) for _, b in rows]
    assert set(entries["key"].to_pylist()) == set(keys)
    found = lookup(specs[0], keys)
    assert set(found) == set(keys)
    assert lookup(specs[1], keys) == found
    first: dict[bytes, tuple[Any, str, str]] = {}
    for e in entries.to_pylist():
        mine = (e["created_at"], e["run_id"], e["result"])
        if e["key"] not in first or mine[:2] < first[e["key"]][:2]:
            first[e["key"]] = mine
    for key in keys:
        assert found[key] == first[key][2], "the first committed answer wins"
    # every answer served is one that a job wrote in its output
    texts = {t for out in outputs for t in out["generated_text"].to_pylist()}
    assert {json.loads(found[k])["text"] for k in keys} <= texts


def test_a_job_reading_a_cache_holds_enough_chunks_for_a_full_batch_of_misses(
    tmp_path: Path,
) -> None:
    """A second night sends the engine only a chunk's changed rows: sized for full chunks, its
    batch of 64 ran a fifth full. Reading a cache, an engine holds chunks for a full batch
    when as few as a fifth of their rows miss; writing only, or no cache, as before."""
    from batch.runner import chunks_in_flight
    from batch.spec import parse_spec

    def spec(*sets: str) -> int:
        text = f"""
name: n
input: {{path: {tmp_path}}}
output: {{path: {tmp_path / "o"}}}
model: {{path: m, engine: fake}}
prompt: {{template: "{{{{ t }}}}"}}
resources: {{rows_per_chunk: 16, batch_size: 64, chunks_in_flight: 2}}
"""
        return chunks_in_flight(parse_spec(text, overrides=list(sets)))

    assert spec() == 5  # 64 rows = 4 full chunks, plus one waiting
    assert spec(f"cache.path={tmp_path / 'c'}") == 23  # 64 / int(16 x 0.2) rows, + 1
    assert spec(f"cache.path={tmp_path / 'c'}", "cache.mode=write") == 5
    assert spec(f"cache.path={tmp_path / 'c'}", "resources.batch_size=512") == 64  # bounded
    assert spec(f"cache.path={tmp_path / 'c'}", "resources.chunks_in_flight=80") == 80
