"""OpenAI batch files in, OpenAI batch files out (pipeline openai), with the fake engine.

What a user would check: each request line answered as the provider would answer it (the
official openai SDK's types parse every output line), requests with their own max_tokens, n
and stop get what they asked for, bad requests fail as rows with the reason and land in the
error file, every custom_id is in exactly one of the two files, in input order, a resumed run
writes the same bytes, and the ledger prices the file at its own models' batch prices.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai.types import BatchError, BatchRequestCounts, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from batch import cache
from batch.engine import EngineRequest, EngineResult, Sample, sampling_overrides
from batch.errors import RowError, SpecError
from batch.spec import JobSpec, parse_spec
from pipelines import load_pipeline

CHAT = "/v1/chat/completions"


def line(cid: str, body: dict[str, Any], url: str = CHAT) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body}


def chat(
    content: Any = "one two three four five six seven eight nine ten", **over: Any
) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **over}


def job(inp: Path, out: Path, *sets: str, task: str = "generate", models: str = "") -> JobSpec:
    extra = f", openai_models: [{models}]" if models else ""
    text = f"""
name: openai-test
input: {{path: "{inp}", format: openai-batch{extra}}}
output: {{path: "{out}"}}
model: {{path: fake-model, engine: fake, task: {task}}}
sampling: {{max_tokens: 16}}
resources: {{rows_per_chunk: 3, chunks_in_flight: 2}}
"""
    return parse_spec(text, overrides=sets)


def write_lines(path: Path, lines: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def row_of(doc: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": doc["custom_id"], "url": doc["url"], "body": json.dumps(doc["body"]),
            "_line": 1}  # fmt: skip


# --------------------------------------------------------------------------- spec


def test_a_request_file_without_a_prompt_runs_its_own_requests(tmp_path: Path) -> None:
    spec = job(tmp_path / "r.jsonl", tmp_path / "o")
    assert spec.pipeline_name == "openai"
    assert type(load_pipeline(spec)).__name__ == "OpenAIChat"
    embed = job(tmp_path / "r.jsonl", tmp_path / "o", task="embed")
    assert type(load_pipeline(embed)).__name__ == "OpenAIEmbeddings"
    with pytest.raises(SpecError, match="remove prompt"):
        job(tmp_path / "r.jsonl", tmp_path / "o", "pipeline=openai", "prompt.template=x")
    with pytest.raises(SpecError, match=r"set input\.format: openai-batch"):
        job(tmp_path / "r.jsonl", tmp_path / "o", "pipeline=openai", "input.format=jsonl")


# --------------------------------------------------------------------------- prepare


def test_a_chat_body_becomes_messages_and_its_own_sampling(tmp_path: Path) -> None:
    pipeline = load_pipeline(job(tmp_path / "r.jsonl", tmp_path / "o"))
    body = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello "},
                                         {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "Again", "name": "bob"},
        ],
        "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
        "stop": "END", "n": 2, "user": "u1", "metadata": {"a": "b"}, "store": False,
        "response_format": {"type": "json_schema",
                            "json_schema": {"name": "x", "schema": {"type": "object"}}},
    }  # fmt: skip
    req = pipeline.prepare(row_of(line("a", body)))
    assert isinstance(req, EngineRequest)
    assert req.messages == (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again"},
    )
    assert dict(req.sampling) == {
        "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": ("END",),
        "n": 2, "json_schema": '{"type":"object"}',
    }  # fmt: skip
    plain = pipeline.prepare(row_of(line("b", chat(max_tokens=4, stop=["x", "y"]))))
    assert dict(plain.sampling) == {"max_tokens": 4, "stop": ("x", "y")}
    obj = pipeline.prepare(row_of(line("c", chat(response_format={"type": "json_object"}))))
    assert dict(obj.sampling) == {"json_object": True}


@pytest.mark.parametrize(
    ("body", "url", "kind", "says"),
    [
        (chat(tools=[{"type": "function"}]), CHAT, "UnsupportedField", "body.tools"),
        (chat(logit_bias={"1": 5}), CHAT, "UnsupportedField", "body.logit_bias"),
        (chat(logprobs=True), CHAT, "UnsupportedField", "body.logprobs"),
        (chat([{"type": "image_url", "image_url": {}}]), CHAT, "UnsupportedField", "image_url"),
        ({**chat(), "model": "gpt-9"}, CHAT, "ModelNotServed",
         "model gpt-9 is not served by this job; map it in the job file"),
        ({"messages": []}, CHAT, "InvalidRequest", "body.model"),
        (chat(max_tokens=0), CHAT, "InvalidRequest", "body.max_tokens must be at least 1"),
        (chat(temperature="hot"), CHAT, "InvalidRequest", "body.temperature must be a number"),
        (chat(stop=["a", "b", "c", "d", "e"]), CHAT, "InvalidRequest", "at most 4"),
        (chat(n=2), CHAT, "InvalidRequest", "body.n is 2 but the temperature is 0 (the job's"),
        ({"model": "gpt-4o-mini", "input": "x"}, "/v1/embeddings", "WrongEndpoint",
         "does not fit this job's model.task generate"),
    ],
)  # fmt: skip
def test_a_request_the_job_cannot_answer_as_asked_fails_with_its_reason(
    tmp_path: Path, body: dict[str, Any], url: str, kind: str, says: str
) -> None:
    pipeline = load_pipeline(job(tmp_path / "r.jsonl", tmp_path / "o", models="gpt-4o-mini"))
    with pytest.raises(RowError) as caught:
        pipeline.prepare(row_of(line("a", body, url)))
    assert caught.value.kind == kind
    assert says in caught.value.message


def test_an_embeddings_list_input_is_refused_with_what_to_do(tmp_path: Path) -> None:
    pipeline = load_pipeline(job(tmp_path / "r.jsonl", tmp_path / "o", task="embed"))
    url = "/v1/embeddings"
    req = pipeline.prepare(row_of(line("a", {"model": "text-embedding-3-small", "input": "hi"},
                                       url)))  # fmt: skip
    assert req.text == "hi" and req.sampling == ()
    with pytest.raises(RowError, match="one request line per string"):
        pipeline.prepare(row_of(line("b", {"model": "m", "input": ["a", "b"]}, url)))


def test_response_bodies_parse_as_the_sdk_types(tmp_path: Path) -> None:
    pipeline = load_pipeline(job(tmp_path / "r.jsonl", tmp_path / "o"))
    result = EngineResult(
        key=0, text="a", finish_reason="stop", input_tokens=9, output_tokens=5,
        samples=[Sample("a", "stop", 2), Sample("b c d", "length", 3)],
    )  # fmt: skip
    out = pipeline.finish(row_of(line("a", chat(n=2))), result)
    completion = ChatCompletion.model_validate(json.loads(out["response_body"]))
    assert [c.message.content for c in completion.choices] == ["a", "b c d"]
    assert [c.finish_reason for c in completion.choices] == ["stop", "length"]
    assert completion.model == "gpt-4o-mini" and completion.usage is not None
    assert completion.usage.total_tokens == 14
    again = pipeline.finish(row_of(line("a", chat(n=2))), result)
    assert again == out  # ids are the job's and the custom_id's, not random
    embed = load_pipeline(job(tmp_path / "r.jsonl", tmp_path / "o", task="embed"))
    vec = EngineResult(key=0, input_tokens=3, embedding=[0.5, -0.25])
    body = {"model": "text-embedding-3-small", "input": "x"}
    got = embed.finish(row_of(line("e", body, "/v1/embeddings")), vec)
    parsed = CreateEmbeddingResponse.model_validate(json.loads(got["response_body"]))
    assert parsed.model == "text-embedding-3-small" and parsed.usage.prompt_tokens == 3
    assert parsed.data[0].embedding == [0.5, -0.25]
    # base64: little-endian float32 on the wire, as the provider sends it (the SDK decodes it)
    got = embed.finish(row_of(line("e", {**body, "encoding_format": "base64"},
                                   "/v1/embeddings")), vec)  # fmt: skip
    raw = json.loads(got["response_body"])["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(raw), dtype="<f4").tolist() == [0.5, -0.25]


# --------------------------------------------------------------------------- engine and cache


def test_the_fake_engine_applies_a_requests_own_sampling(tmp_path: Path) -> None:
    from batch.engine.fake import FakeEngine

    engine = FakeEngine(job(tmp_path / "r.jsonl", tmp_path / "o"))
    words = tuple([{"role": "user", "content": "a b c d e f g h i j k l"}])
    requests = [
        EngineRequest(key=0, messages=words),
        EngineRequest(key=1, messages=words, sampling=sampling_overrides(max_tokens=2)),
        EngineRequest(key=2, messages=words, sampling=sampling_overrides(n=3)),
        EngineRequest(key=3, messages=words, sampling=sampling_overrides(stop="d")),
    ]
    plain, short, three, stopped = asyncio.run(engine.run(requests))
    assert plain.text == "a b c d e f" and plain.output_tokens == 6
    assert short.text == "a b" and short.finish_reason == "length" and short.output_tokens == 2
    assert len(three.samples) == 3 and three.output_tokens == 18
    assert stopped.text == "a b c" and stopped.finish_reason == "stop"


def test_the_vllm_engine_builds_a_requests_own_sampling_params() -> None:
    from tests.unit.test_engine_vllm import ManyAsyncLLM, WordTokenizer, engine
    from tests.unit.test_engine_vllm import job as vllm_job

    llm = ManyAsyncLLM({"r0": [["plain"]], "r1": [["one", "two"]]})
    spec = vllm_job()
    own = sampling_overrides(max_tokens=3, n=2, temperature=0.5, stop="x", seed=1,
                             json_schema='{"type":"object"}')  # fmt: skip
    message = ({"role": "user", "content": "hi"},)
    requests = [EngineRequest(key=0, messages=message),
                EngineRequest(key=1, messages=message, sampling=own)]  # fmt: skip
    plain, two = asyncio.run(engine(WordTokenizer(), llm, spec).run(requests))
    params = {rid: p for rid, p, _ in llm.calls}
    assert params["r0"].kwargs["max_tokens"] == 32 and "n" not in params["r0"].kwargs
    kw = params["r1"].kwargs
    assert (kw["max_tokens"], kw["n"], kw["temperature"], kw["stop"], kw["seed"]) == (
        3, 2, 0.5, ["x"], 1
    )  # fmt: skip
    assert kw["structured_outputs"].json == {"type": "object"}
    assert kw["top_p"] == 1.0  # the spec's, where the request sets nothing
    assert [s.text for s in two.samples] == ["one", "two"] and plain.text == "plain"


def test_a_requests_own_sampling_is_part_of_its_cache_key() -> None:
    messages = ({"role": "user", "content": "same words"},)
    ns = "00" * 16

    def key(**sampling: Any) -> bytes:
        req = EngineRequest(key=0, messages=messages, sampling=sampling_overrides(**sampling))
        return cache.row_key(ns, req)

    assert key(max_tokens=5) != key(max_tokens=50)
    assert key(max_tokens=5) != key()
    assert key(n=2) != key(n=3) != key(stop="x")
    assert key(max_tokens=5, stop=["a"]) == key(stop="a", max_tokens=5)
    # a request without its own sampling keeps the key it always had (caches stay valid)
    h = hashlib.blake2b(digest_size=16)
    h.update(bytes.fromhex(ns))
    h.update(json.dumps({"messages": list(messages)}, sort_keys=True,
                        separators=(",", ":")).encode())  # fmt: skip
    assert key() == h.digest()


# --------------------------------------------------------------------------- output files


def test_output_files_follow_input_lines_across_chunks_and_retries(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from batch import openai_files

    out = tmp_path / "out"
    spec = job(tmp_path / "r.jsonl", out)

    def part(name: str, rows: list[dict[str, Any]]) -> str:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), out / name)
        return name

    def ok(line_no: int) -> dict[str, Any]:
        body = {"id": f"c{line_no}", "object": "chat.completion"}
        return {"custom_id": f"r{line_no}", "_line": line_no, "response_body": json.dumps(body)}

    def bad(line_no: int, cls: str) -> dict[str, Any]:
        return {"custom_id": f"r{line_no}", "_line": line_no, "_error_class": cls,
                "_error_message": f"reason {line_no}"}  # fmt: skip

    def marker(cid: str, start: int, data: str | None, failed: str | None,
               supersedes: str | None = None) -> dict[str, Any]:  # fmt: skip
        return {"chunk_id": cid, "file": "r.jsonl", "row_start": start, "rows": 1,
                "failed_rows": 1, "input_tokens": 0, "output_tokens": 0, "data_part": data,
                "failed_part": failed, "supersedes": supersedes}  # fmt: skip

    markers = [
        # the second chunk first (markers come in any order), its part unsorted
        marker("r.000000003-000000006.x", 3, part("data/b.parquet", [ok(6), ok(4)]),
               part("_failed/b.parquet", [bad(5, "ModelNotServed")])),
        # the first chunk: line 2 failed, then a retry answered it and line 3 failed again
        marker("r.000000000-000000003.y", 0, part("data/a.parquet", [ok(1)]),
               part("_failed/a.parquet", [bad(2, "EngineError"), bad(3, "EngineError")])),
        marker("r.000000000-000000003.y.retry1", 0, part("data/a1.parquet", [ok(2)]),
               part("_failed/a1.parquet", [bad(3, "ChunkFailed")]),
               supersedes="_failed/a.parquet"),
    ]  # fmt: skip
    counts = openai_files.write_files(spec, {"fingerprint": "f00"}, markers)
    assert counts == {"output": 4, "errors": 2}
    ok_lines = read_jsonl(out / "openai" / "output.jsonl")
    err_lines = read_jsonl(out / "openai" / "errors.jsonl")
    assert [x["custom_id"] for x in ok_lines] == ["r1", "r2", "r4", "r6"]
    assert [x["response"]["body"]["id"] for x in ok_lines] == ["c1", "c2", "c4", "c6"]
    assert [(x["custom_id"], x["error"]["code"]) for x in err_lines] == [
        ("r3", "ChunkFailed"), ("r5", "ModelNotServed")
    ]  # fmt: skip
    # a request the provider would refuse is a 400 with its error body; an engine failure not
    assert err_lines[0]["response"] is None
    assert err_lines[1]["response"]["status_code"] == 400
    assert err_lines[1]["response"]["body"]["error"]["message"] == "reason 5"
    first = (out / "openai" / "output.jsonl").read_bytes()
    openai_files.write_files(spec, {"fingerprint": "f00"}, list(reversed(markers)))
    assert (out / "openai" / "output.jsonl").read_bytes() == first
    assert sorted(p.name for p in (out / "openai").iterdir()) == ["errors.jsonl", "output.jsonl"]


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def ray_once() -> Iterator[None]:
    from batch.runner import ray_session

    with ray_session(None):
        yield


SOURCE = "one two three four five six seven eight nine ten"


def request_file(path: Path) -> tuple[Path, list[str | None]]:
    """A request file of 12 lines (and one blank): what each line's custom_id is."""
    lines: list[Any] = [
        line("a-short", chat(max_tokens=2)),
        line("b-long", chat(max_tokens=5)),  # the same messages: not a's answer
        line("j-plain", chat("a b c d e f g h")),
        line("d-stop", chat(stop=["five"])),
        "{broken",
        line("e-unknown", {**chat(), "model": "gpt-9"}),
        line("f-tools", chat(tools=[{"type": "function", "function": {"name": "x"}}])),
        line("g-parts", {"model": "gpt-4o", "messages": [
            {"role": "system", "content": "Answer."},
            {"role": "user", "content": [{"type": "text", "text": "alpha beta gamma delta"}]}]}),
        line("h-embed", {"model": "text-embedding-3-small", "input": "x"}, "/v1/embeddings"),
        line("i-json", chat(response_format={"type": "json_schema", "json_schema": {
            "name": "a", "schema": {"type": "object"}}})),
        line("c-three", chat(n=3, temperature=0.7)),  # random: in the last chunk
        {"custom_id": "k-get", "method": "GET", "url": CHAT, "body": chat()},
    ]  # fmt: skip
    write_lines(path, lines)
    ids = [x["custom_id"] if isinstance(x, dict) else None for x in lines]
    return path, ids


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_request_file_gives_the_providers_output_and_error_files(
    ray_once: None, tmp_path: Path
) -> None:
    from batch.job import run_job
    from batch.progress import NullReporter

    path, ids = request_file(tmp_path / "requests.jsonl")
    out = tmp_path / "out"
    spec = job(path, out, models="gpt-4o-mini, gpt-4o")
    summary = run_job(spec, NullReporter())
    assert summary.rows == 7 and summary.failed_rows == 5
    ok = read_jsonl(out / "openai" / "output.jsonl")
    errors = read_jsonl(out / "openai" / "errors.jsonl")
    # every custom_id once across the two files, each file in input line order
    assert sorted([x["custom_id"] or "" for x in ok + errors]) == sorted(c or "" for c in ids)
    order = {cid: i for i, cid in enumerate(ids)}
    assert [x["custom_id"] for x in ok] == sorted((x["custom_id"] for x in ok), key=order.get)
    assert [x["custom_id"] for x in errors if x["custom_id"]] == sorted(
        (x["custom_id"] for x in errors if x["custom_id"]), key=order.get
    )
    counts = BatchRequestCounts(completed=len(ok), failed=len(errors), total=len(ids))
    assert counts.total == counts.completed + counts.failed
    bodies = {}
    for x in ok:
        assert x["id"].startswith("batch_req_") and x["error"] is None
        assert x["response"]["status_code"] == 200 and x["response"]["request_id"]
        bodies[x["custom_id"]] = ChatCompletion.model_validate(x["response"]["body"])
    assert set(bodies) == {"a-short", "b-long", "c-three", "d-stop", "g-parts", "i-json",
                           "j-plain"}  # fmt: skip
    short, long = bodies["a-short"], bodies["b-long"]
    assert short.choices[0].message.content == "one two"
    assert short.choices[0].finish_reason == "length"
    assert long.choices[0].message.content == "one two three four five"
    assert short.usage and long.usage and short.usage.completion_tokens == 2
    assert long.usage.completion_tokens == 5
    assert [c.index for c in bodies["c-three"].choices] == [0, 1, 2]
    assert bodies["d-stop"].choices[0].message.content == "one two three four"
    assert bodies["g-parts"].model == "gpt-4o" and bodies["a-short"].model == "gpt-4o-mini"
    assert len({b.id for b in bodies.values()}) == len(bodies)
    failed = {x["custom_id"]: x for x in errors}
    assert {k: BatchError.model_validate(v["error"]).code for k, v in failed.items()} == {
        None: "MalformedRequest", "e-unknown": "ModelNotServed", "f-tools": "UnsupportedField",
        "h-embed": "WrongEndpoint", "k-get": "MalformedRequest",
    }  # fmt: skip
    assert "map it in the job file" in failed["e-unknown"]["error"]["message"]
    assert failed["f-tools"]["response"]["status_code"] == 400
    assert failed["f-tools"]["response"]["body"]["error"]["code"] == "UnsupportedField"
    # the ledger prices the file at its own models' batch prices
    ledger = json.loads((out / "ledger.json").read_text())
    models = {m["model"]: m for m in ledger["file_models"]["models"]}
    mini = models["gpt-4o-mini"]
    assert mini["requests"] == 6 and mini["failed_requests"] == 1  # f-tools
    assert models["(unknown)"]["failed_requests"] == 2  # lines without a readable body
    assert mini["price_row"]["model"] == "gpt-4o-mini"
    expected = (mini["input_tokens"] * 0.15 + mini["output_tokens"] * 0.60) / 1e6 * 0.5
    assert mini["batch_usd"] == pytest.approx(expected)
    assert models["gpt-9"]["requests"] == 0 and models["gpt-9"]["batch_usd"] is None
    total = ledger["file_models"]["file_batch_usd"]
    assert total == pytest.approx(mini["batch_usd"] + models["gpt-4o"]["batch_usd"])
    assert sum(m["run_cost_share_usd"] for m in models.values()) == pytest.approx(
        ledger["run_cost_usd"], abs=1e-9
    )
    assert ledger["comparisons"]  # the usual comparators stay


def test_a_resumed_run_writes_the_same_files(ray_once: None, tmp_path: Path) -> None:
    from batch.job import run_job
    from batch.progress import NullReporter

    path, _ = request_file(tmp_path / "requests.jsonl")
    out = tmp_path / "out"
    spec = job(path, out)
    run_job(spec, NullReporter())
    before = [(out / "openai" / n).read_bytes() for n in ("output.jsonl", "errors.jsonl")]
    # a crash lost two chunks' commits: the rerun redoes them and writes the files again
    (out / "_MANIFEST.json").unlink()
    for marker in sorted((out / "_markers").glob("*.json"))[:2]:
        marker.unlink()
        for kind in ("data", "_failed"):
            for part in (out / kind).glob(f"part-{marker.stem}.*.parquet"):
                part.unlink()
    (out / "openai" / "output.jsonl").unlink()
    again = run_job(spec, NullReporter())
    assert again.chunks_run == 2
    after = [(out / "openai" / n).read_bytes() for n in ("output.jsonl", "errors.jsonl")]
    assert after == before
