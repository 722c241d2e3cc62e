"""``batchinfer serve`` as a user runs it: a real uvicorn server in a subprocess, driven by the
official openai SDK, its batches on real vLLM on the CPU (SmolLM2 for chat, all-MiniLM-L6-v2
for embeddings).

One test, to share the engine starts: a chat batch during which the server is SIGKILLed and
started again (the batch completes, every custom_id exactly once, each output line a
ChatCompletion), a chat batch cancelled while it waits its turn, and an embeddings batch run
beside the resumed chat batch (each line a CreateEmbeddingResponse).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from openai import OpenAI
from openai.types import Batch, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion

KEY = "sk-integration-1234"
CHAT_JOB = """\
name: serve-chat
input: {openai_models: [gpt-4o-mini]}
model:
  path: builtin:smollm2-135m-instruct
  engine_args: {max_model_len: 512, enforce_eager: true}
sampling: {max_tokens: 8}
resources: {device: cpu, rows_per_chunk: 2, chunks_in_flight: 1, batch_size: 2}
"""
EMBED_JOB = """\
name: serve-embed
model:
  path: builtin:all-minilm-l6-v2
  task: embed
  engine_args: {enforce_eager: true, dtype: float32}
resources: {device: cpu, rows_per_chunk: 4}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(tmp: Path, port: int, *extra: str) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "BATCHINFER_SERVE_KEYS": f"tester:{KEY}"}
    log = (tmp / "server.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "batch.cli", "serve", "--job", str(tmp / "chat.yaml"),
         "--job", str(tmp / "embed.yaml"), "--store", str(tmp / "store"),
         "--port", str(port), *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        end = time.time() + 60
        while True:
            assert proc.poll() is None, (tmp / "server.log").read_text()[-3000:]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert time.time() < end, "the server did not listen within 60s"
            time.sleep(0.2)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


def wait_for(client: OpenAI, batch_id: str, states: set[str], timeout: float = 900) -> Batch:
    end = time.time() + timeout
    while time.time() < end:
        batch = client.batches.retrieve(batch_id)
        if batch.status in states:
            return batch
        time.sleep(0.5)
    raise AssertionError(f"{batch_id} still {batch.status} after {timeout}s")


def lines(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def chat_file(n: int) -> bytes:
    out = []
    for i in range(n):
        body = {"model": "gpt-4o-mini", "max_tokens": 8,
                "messages": [{"role": "user", "content": f"Say a colour. ({i})"}]}  # fmt: skip
        out.append(json.dumps({"custom_id": f"chat-{i}", "method": "POST",
                               "url": "/v1/chat/completions", "body": body}))  # fmt: skip
    return ("\n".join(out) + "\n").encode()


def test_batches_through_the_sdk_survive_a_killed_server(
    demo_models: dict[str, Path], tmp_path: Path
) -> None:
    (tmp_path / "chat.yaml").write_text(CHAT_JOB)
    (tmp_path / "embed.yaml").write_text(EMBED_JOB)
    port = free_port()
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0)
    n = 12

    with server(tmp_path, port) as first:
        up = client.files.create(file=("chat.jsonl", chat_file(n)), purpose="batch")
        chat = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")  # fmt: skip
        # a second batch waits for the first (one job at a time) and is cancelled there
        queued = client.batches.create(input_file_id=up.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")  # fmt: skip
        assert client.batches.cancel(queued.id).status in {"cancelling", "cancelled"}
        cancelled = wait_for(client, queued.id, {"cancelled"}, timeout=60)
        err = lines(client, cancelled.error_file_id)
        assert cancelled.output_file_id is None and len(err) == n
        assert {x["error"]["code"] for x in err} == {"batch_cancelled"}
        end = time.time() + 900  # an engine start; long only on a machine shared with others
        while True:  # mid-batch: some chunks committed, not all
            now = client.batches.retrieve(chat.id)
            if now.request_counts and now.request_counts.completed >= 2:
                break
            assert now.status == "in_progress" and time.time() < end, now
            time.sleep(0.2)
        first.send_signal(signal.SIGKILL)
        first.wait()
        assert now.request_counts.completed < n, "the batch finished before the kill"

    # The restarted server runs two jobs at once: the chat batch it resumes, and an
    # embeddings batch created as soon as it is up (the two engine starts overlap).
    with server(tmp_path, port, "--max-running", "2"):
        texts = ["a red apple", "the blue sea", "green grass", "the night sky"]
        emb_lines = [json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                                 "body": {"model": "text-embedding-3-small", "input": t}})
                     for i, t in enumerate(texts)]  # fmt: skip
        up = client.files.create(file=("emb.jsonl", "\n".join(emb_lines).encode()),
                                 purpose="batch")  # fmt: skip
        emb = client.batches.create(input_file_id=up.id, endpoint="/v1/embeddings",
                                    completion_window="24h")  # fmt: skip

        done = wait_for(client, chat.id, {"completed", "failed"})
        assert done.status == "completed", done.errors
        out, err = lines(client, done.output_file_id), lines(client, done.error_file_id)
        assert err == []
        assert sorted(x["custom_id"] for x in out) == sorted(f"chat-{i}" for i in range(n))
        for x in out:
            reply = ChatCompletion.model_validate(x["response"]["body"])
            assert reply.model == "gpt-4o-mini" and reply.choices[0].message.content
            assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 8
        assert done.request_counts is not None and done.request_counts.completed == n

        done = wait_for(client, emb.id, {"completed", "failed"})
        assert done.status == "completed", done.errors
        out = lines(client, done.output_file_id)
        assert [x["custom_id"] for x in out] == ["e0", "e1", "e2", "e3"]
        for x in out:
            vec = CreateEmbeddingResponse.model_validate(x["response"]["body"]).data[0].embedding
            assert len(vec) == 384
