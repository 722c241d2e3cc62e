"""OpenAI batch request files on real vLLM (CPU): SmolLM2 for chat completions, all-MiniLM-L6-v2
for embeddings, run with ``batchinfer submit`` as a user would. One engine start per file.

What a user would check: the output file's every line parses as the official openai SDK's
response types, requests with their own max_tokens, stop, n and response_format get what they
asked for from the real engine, malformed lines are in the error file with their reason, every
custom_id is in exactly one of the two files, and the ledger prices the file at gpt-4o-mini's
batch price.

Both files run at once (two engine starts overlap), in one module fixture.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
from openai.types import BatchError, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

from tests.integration.helpers import cli, run_together

QUESTION = "Name three colours of the rainbow."


def chat_line(cid: str, content: str = QUESTION, **over: Any) -> str:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **over}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": body})  # fmt: skip


def write_job(
    tmp_path: Path, model: str, task: str, requests: list[str], args: str = ""
) -> tuple[Path, Path]:
    inp, out = tmp_path / "requests.jsonl", tmp_path / "out"
    inp.write_text("".join(r + "\n" for r in requests))
    job = tmp_path / "job.yaml"
    job.write_text(
        textwrap.dedent(f"""\
        name: openai-{task}
        input: {{path: "{inp}", format: openai-batch}}
        output: {{path: "{out}"}}
        model:
          path: {model}
          task: {task}
          engine_args: {{enforce_eager: true{args}}}
        sampling: {{max_tokens: 12}}
        resources: {{device: cpu, rows_per_chunk: 4, chunks_in_flight: 2, batch_size: 16}}
        """)
    )
    return job, out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def chat_job(tmp_path: Path) -> tuple[Path, Path]:
    """Chat requests with their own sampling, and malformed lines."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    requests = [
        chat_line("short", max_tokens=2),
        chat_line("longer", max_tokens=10),  # the same messages: its own answer
        "this line is not JSON",
        chat_line(
            "stopped",
            "Count from one to ten in words, separated by commas.",
            max_tokens=30,
            stop=[","],
        ),
        chat_line("two", n=2, temperature=0.8, seed=7, max_tokens=6),
        chat_line(
            "json",
            "Is the sky blue? Answer in JSON.",
            max_tokens=20,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        ),
        json.dumps({"custom_id": "no-body", "method": "POST", "url": "/v1/chat/completions"}),
        chat_line(
            "parts",
            max_completion_tokens=5,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": QUESTION}]},
            ],
        ),
    ]
    return write_job(
        tmp_path, "builtin:smollm2-135m-instruct", "generate", requests, ", max_model_len: 512"
    )


def embeddings_job(tmp_path: Path) -> tuple[Path, Path]:
    """Embeddings requests, one with an unsupported list input, and a broken line."""

    def line(cid: str, text: Any) -> str:
        body = {"model": "text-embedding-3-small", "input": text}
        return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/embeddings",
                           "body": body})  # fmt: skip

    requests = [
        line("kettle", "The kettle boils water quickly."),
        line("list", ["two", "strings"]),
        line("bank", "The central bank raised interest rates."),
        "{",
    ]
    return write_job(tmp_path, "builtin:all-minilm-l6-v2", "embed", requests)


@pytest.fixture(scope="module")
def runs(
    demo_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[subprocess.CompletedProcess[str], Path]]:
    jobs = {"chat": chat_job(tmp_path_factory.mktemp("chat")),
            "embed": embeddings_job(tmp_path_factory.mktemp("embed"))}  # fmt: skip
    done = run_together(*(cli("submit", job) for job, _ in jobs.values()))
    return {name: (res, out) for (name, (_, out)), res in zip(jobs.items(), done, strict=True)}


def test_a_chat_request_file_on_vllm(
    runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]],
) -> None:
    res, out = runs["chat"]
    assert res.returncode == 0, res.stderr[-3000:]
    ok = read_jsonl(out / "openai" / "output.jsonl")
    errors = read_jsonl(out / "openai" / "errors.jsonl")
    assert [x["custom_id"] for x in ok] == ["short", "longer", "stopped", "two", "json", "parts"]
    assert [x["custom_id"] for x in errors] == [None, "no-body"]
    assert {BatchError.model_validate(x["error"]).code for x in errors} == {"MalformedRequest"}
    assert "line 3: the line is not JSON" in errors[0]["error"]["message"]
    bodies = {}
    for x in ok:
        assert x["response"]["status_code"] == 200 and x["error"] is None
        body = ChatCompletion.model_validate(x["response"]["body"])
        assert body.model == "gpt-4o-mini" and body.object == "chat.completion"
        assert body.usage is not None and body.usage.prompt_tokens > 0
        bodies[x["custom_id"]] = body
    short, longer = bodies["short"], bodies["longer"]
    assert short.usage and longer.usage
    assert short.usage.completion_tokens == 2 and short.choices[0].finish_reason == "length"
    assert longer.usage.completion_tokens > 2
    assert longer.choices[0].message.content != short.choices[0].message.content
    assert "," not in (bodies["stopped"].choices[0].message.content or "")
    assert len(bodies["two"].choices) == 2
    assert isinstance(json.loads(bodies["json"].choices[0].message.content or "")["ok"], bool)
    assert bodies["parts"].usage and bodies["parts"].usage.completion_tokens <= 5
    ledger = json.loads((out / "ledger.json").read_text())
    models = {m["model"]: m for m in ledger["file_models"]["models"]}
    mini = models["gpt-4o-mini"]
    assert mini["requests"] == 6 and models["(unknown)"]["failed_requests"] == 2
    assert mini["price_row"]["model"] == "gpt-4o-mini" and mini["batch_usd"] > 0
    assert ledger["file_models"]["file_batch_usd"] == mini["batch_usd"]


def test_an_embeddings_request_file_on_vllm(
    runs: dict[str, tuple[subprocess.CompletedProcess[str], Path]],
) -> None:
    res, out = runs["embed"]
    assert res.returncode == 0, res.stderr[-3000:]
    ok = read_jsonl(out / "openai" / "output.jsonl")
    errors = read_jsonl(out / "openai" / "errors.jsonl")
    assert [x["custom_id"] for x in ok] == ["kettle", "bank"]
    assert [(x["custom_id"], x["error"]["code"]) for x in errors] == [
        ("list", "UnsupportedField"),
        (None, "MalformedRequest"),
    ]
    for x in ok:
        body = CreateEmbeddingResponse.model_validate(x["response"]["body"])
        assert body.model == "text-embedding-3-small" and len(body.data[0].embedding) == 384
        assert body.usage.prompt_tokens > 0
    ledger = json.loads((out / "ledger.json").read_text())
    (small,) = [m for m in ledger["file_models"]["models"] if m["requests"]]
    assert small["model"] == "text-embedding-3-small" and small["batch_usd"] > 0
