"""``batchinfer serve`` in-process (FastAPI's TestClient under the official openai SDK), its
batches run as real ``batchinfer submit`` subprocesses on the fake engine.

What a client would notice: every answer parses as the SDK's types; a missing or wrong key is
401 and another owner's batch or file is 404; the list pages; a cancel or an expired window
stops the job and gives back what was done, the rest in the error file with OpenAI's code;
a new server over the same store finishes a batch the last one left in progress.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from openai import OpenAI
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion

from batch.errors import SpecError
from batch.serve import ServeConfig, create_app, read_bases, read_keys
from batch.serve_jobs import Supervisor
from batch.serve_state import Store

KEYS = {"sk-alice-123456": "alice", "sk-bob-12345678": "bob"}
BASE = """\
name: serve-fake
model:
  path: fake-model
  engine: fake
  fake_options: {{delay_per_token: {delay}}}
sampling: {{max_tokens: 6}}
resources: {{device: cpu, rows_per_chunk: 2, chunks_in_flight: 1, batch_size: 2}}
"""


def requests_file(n: int, model: str = "gpt-4o-mini") -> bytes:
    lines = []
    for i in range(n):
        body = {"model": model, "messages": [{"role": "user", "content": f"say {i} now"}]}
        lines.append(json.dumps({"custom_id": f"r{i}", "method": "POST",
                                 "url": "/v1/chat/completions", "body": body}))  # fmt: skip
    return ("\n".join(lines) + "\n").encode()


class Server:
    """An app over a store, its supervisor on a clock the test can move."""

    def __init__(
        self, store: Path, jobs: Path, delay: float = 0.0, *, jobs_at_once: int = 1
    ) -> None:
        jobs.write_text(BASE.format(delay=delay))
        self.offset = 0.0
        config = ServeConfig(store=Store(str(store), {}), keys=KEYS,
                             bases=read_bases([jobs]), poll_s=0.2)  # fmt: skip
        self.supervisor = Supervisor(config.store, config.bases, poll_s=0.2,
                                     max_running=jobs_at_once,
                                     clock=lambda: time.time() + self.offset)  # fmt: skip
        self.http = TestClient(create_app(config, self.supervisor))

    def __enter__(self) -> Server:
        self.http.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.__exit__(*exc)

    def client(self, key: str = "sk-alice-123456") -> OpenAI:
        return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=self.http,
                      max_retries=0)  # fmt: skip


def wait_for(client: OpenAI, batch_id: str, states: set[str], timeout: float = 600) -> Batch:
    end = time.time() + timeout
    while time.time() < end:
        batch = client.batches.retrieve(batch_id)
        if batch.status in states:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"{batch_id} still {batch.status} after {timeout}s")


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A server that validates batches but starts no job (the API alone)."""
    with Server(tmp_path / "store", tmp_path / "serve.yaml", jobs_at_once=0) as s:
        yield s


def test_a_batch_runs_to_completed_in_the_sdks_shapes(tmp_path: Path) -> None:
    with Server(tmp_path / "store", tmp_path / "serve.yaml") as server:
        completed_in_the_sdks_shapes(server.client())


def completed_in_the_sdks_shapes(client: OpenAI) -> None:
    f = client.files.create(file=("req.jsonl", requests_file(5)), purpose="batch")
    assert isinstance(f, FileObject) and f.bytes > 0 and f.purpose == "batch"
    assert client.files.retrieve(f.id).filename == "req.jsonl"
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"team": "a"})  # fmt: skip
    assert batch.status == "validating" and batch.metadata == {"team": "a"}
    assert batch.expires_at == batch.created_at + 24 * 3600
    done = wait_for(client, batch.id, {"completed", "failed"})
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (5, 5)
    assert done.error_file_id is None and done.completed_at is not None
    out = lines_of(client, done.output_file_id)
    assert [x["custom_id"] for x in out] == [f"r{i}" for i in range(5)]
    for x in out:
        ChatCompletion.model_validate(x["response"]["body"])


def test_keys_are_checked_and_owners_kept_apart(server: Server) -> None:
    alice, bob = server.client(), server.client("sk-bob-12345678")
    f = alice.files.create(file=("req.jsonl", requests_file(1)), purpose="batch")
    batch = alice.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")  # fmt: skip
    with pytest.raises(openai.AuthenticationError) as wrong:
        server.client("sk-nobody-000000").batches.retrieve(batch.id)
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    missing = server.http.get(f"/v1/batches/{batch.id}")
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError):
        bob.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        bob.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                           completion_window="24h")  # fmt: skip
    assert [b.id for b in bob.batches.list()] == []
    with pytest.raises(openai.BadRequestError) as window:
        alice.batches.create(
            input_file_id=f.id,
            endpoint="/v1/chat/completions",
            completion_window="1h",  # type: ignore[arg-type]
        )
    assert window.value.param == "completion_window"
    with pytest.raises(openai.BadRequestError) as endpoint:
        alice.batches.create(input_file_id=f.id, endpoint="/v1/embeddings",
                             completion_window="24h")  # fmt: skip
    assert endpoint.value.param == "endpoint"


def test_the_list_pages_newest_first(server: Server) -> None:
    client = server.client()
    f = client.files.create(file=("req.jsonl", requests_file(1)), purpose="batch")
    made = []
    for _ in range(5):
        made.append(client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                          completion_window="24h").id)  # fmt: skip
        time.sleep(1.01)  # created_at has whole seconds
    page = client.batches.list(limit=2)
    assert [b.id for b in page.data] == made[::-1][:2] and page.has_more
    assert [b.id for b in client.batches.list(limit=2)] == made[::-1]  # auto-paging
    assert [b.id for b in client.batches.list(limit=3, after=made[2]).data] == made[1::-1]


def test_a_cancel_keeps_what_was_done_and_an_expiry_stops_the_rest(tmp_path: Path) -> None:
    with Server(tmp_path / "store", tmp_path / "serve.yaml", delay=0.4) as server:
        client = server.client()
        f = client.files.create(file=("req.jsonl", requests_file(12)), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        first = wait_for(client, batch.id, {"in_progress"})
        while first.request_counts is None or first.request_counts.completed < 2:
            time.sleep(0.3)
            first = client.batches.retrieve(batch.id)
        cancelled = client.batches.cancel(batch.id)
        assert cancelled.status == "cancelling" and cancelled.cancelling_at is not None
        done = wait_for(client, batch.id, {"cancelled"})
        out, err = lines_of(client, done.output_file_id), lines_of(client, done.error_file_id)
        assert len(out) >= 2 and len(out) + len(err) == 12
        assert {x["custom_id"] for x in out + err} == {f"r{i}" for i in range(12)}
        assert {x["error"]["code"] for x in err} == {"batch_cancelled"}
        assert done.request_counts is not None and done.request_counts.completed == len(out)

        second = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")  # fmt: skip
        wait_for(client, second.id, {"in_progress"})
        server.offset = 25 * 3600  # the window has passed
        expired = wait_for(client, second.id, {"expired"})
        err = lines_of(client, expired.error_file_id)
        out = lines_of(client, expired.output_file_id)
        assert len(out) + len(err) == 12 and expired.expired_at is not None
        assert {x["error"]["code"] for x in err} == {"batch_expired"}
        with pytest.raises(openai.ConflictError):
            client.batches.cancel(second.id)


def test_a_new_server_over_the_store_finishes_a_batch_in_progress(tmp_path: Path) -> None:
    store, jobs = tmp_path / "store", tmp_path / "serve.yaml"
    with Server(store, jobs, delay=0.3) as server:
        client = server.client()
        f = client.files.create(file=("req.jsonl", requests_file(8)), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        wait_for(client, batch.id, {"in_progress"})
        while not server.supervisor.is_running(batch.id):
            time.sleep(0.2)
    # the first server is gone (its job stopped with it); a new one resumes the batch
    with Server(store, jobs) as again:
        client = again.client()
        assert client.batches.retrieve(batch.id).status == "in_progress"
        done = wait_for(client, batch.id, {"completed", "failed"})
        assert done.status == "completed", done.errors
        ids = [x["custom_id"] for x in lines_of(client, done.output_file_id)]
        assert ids == [f"r{i}" for i in range(8)]


def test_a_file_with_a_custom_id_twice_fails_validation(server: Server) -> None:
    client = server.client()
    data = requests_file(2).replace(b'"r1"', b'"r0"')
    f = client.files.create(file=("req.jsonl", data), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")  # fmt: skip
    done = wait_for(client, batch.id, {"failed", "completed"})
    assert done.status == "failed" and done.errors and done.errors.data
    assert done.errors.data[0].code == "duplicate_custom_id" and done.errors.data[0].line == 2


def test_no_keys_no_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BATCHINFER_SERVE_KEYS", raising=False)
    with pytest.raises(SpecError, match="no API keys"):
        read_keys(None)
    keys = tmp_path / "keys.txt"
    keys.write_text("# owners\nalice: sk-alice-123456\n")
    monkeypatch.setenv("BATCHINFER_SERVE_KEYS", "bob:sk-bob-12345678")
    assert read_keys(keys) == KEYS


# --------------------------------------------------------------------------- submit requests.jsonl


def test_a_request_file_gets_the_default_cpu_job_for_its_endpoint(tmp_path: Path) -> None:
    from batch.request_files import default_spec, is_request_file

    chat = tmp_path / "nightly.jsonl"
    chat.write_bytes(b"not json\n" + requests_file(2))
    spec = default_spec(chat, None, [])
    assert spec.model.path == "builtin:smollm2-135m-instruct" and spec.model.task == "generate"
    assert spec.input.format == "openai-batch" and spec.pipeline_name == "openai"
    assert spec.output.path == str(tmp_path / "nightly-out")
    emb = tmp_path / "emb.jsonl"
    emb.write_text(json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
                               "body": {"model": "m", "input": "x"}}) + "\n")  # fmt: skip
    spec = default_spec(emb, str(tmp_path / "o"), ["sampling.max_tokens=3"])
    assert spec.model.path == "builtin:all-minilm-l6-v2" and spec.model.task == "embed"
    assert spec.output.path == str(tmp_path / "o")
    other = tmp_path / "rows.jsonl"
    other.write_text('{"id": 1, "text": "a row, not a request"}\n')
    assert is_request_file(chat) and not is_request_file(other)


def test_submit_runs_a_request_file_without_a_job(tmp_path: Path) -> None:
    import subprocess
    import sys

    requests = tmp_path / "requests.jsonl"
    requests.write_bytes(requests_file(3))
    run = subprocess.run(
        [sys.executable, "-m", "batch.cli", "submit", str(requests), "--set",
         "model.engine=fake", "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    out = (tmp_path / "requests-out" / "openai" / "output.jsonl").read_text().splitlines()
    assert [json.loads(x)["custom_id"] for x in out] == ["r0", "r1", "r2"]
    refused = subprocess.run(
        [sys.executable, "-m", "batch.cli", "submit", "jobs/enrich.yaml", "--output", "x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "--output is for an OpenAI request file" in refused.stderr
