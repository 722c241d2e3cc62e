"""The output's memory between runs: job record, lease and attempt counts."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from batch import store
from batch.errors import SpecError
from batch.runner import retry_chunk_id
from batch.spec import JobSpec, parse_spec


def spec(out: Path, **over: str) -> JobSpec:
    text = f"""
name: t
input: {{path: in/}}
output: {{path: "{out}", storage_options: {{secret_thing: hunter2}}}}
model: {{path: m, engine: fake}}
prompt: {{template: "{{{{ body }}}}"}}
"""
    return parse_spec(text, overrides=[f"{k}={v}" for k, v in over.items()])


def record(s: JobSpec, listing: str = "abc", rows: int = 10) -> dict[str, object]:
    fp = store.job_fingerprint(s, listing)
    return store.job_record(s, fingerprint=fp, listing=listing, files=1, rows=rows, chunks=1)


def test_same_job_resumes_changed_job_is_refused_with_what_changed(tmp_path: Path) -> None:
    s = spec(tmp_path)
    store.ensure_job_record(s, record(s))
    store.ensure_job_record(s, record(s))  # the same job: fine
    changed = spec(tmp_path, **{"sampling.max_tokens": "64", "prompt.template": "{{ title }}"})
    with pytest.raises(SpecError) as info:
        store.ensure_job_record(changed, record(changed))
    msg = str(info.value)
    assert "sampling.max_tokens: 128 -> 64" in msg
    assert 'prompt.template: "{{ body }}" -> "{{ title }}"' in msg
    assert "--set output.path=" in msg and "delete" in msg
    with pytest.raises(SpecError, match=r"input listing: 1 files/10 rows -> 1 files/20 rows"):
        store.ensure_job_record(s, record(s, listing="new", rows=20))


def test_where_the_output_goes_and_secrets_are_not_part_of_the_record(tmp_path: Path) -> None:
    s = spec(tmp_path)
    store.ensure_job_record(s, record(s))
    text = (tmp_path / store.JOB_RECORD).read_text()
    assert "hunter2" not in text
    faster = spec(tmp_path, **{"resources.replicas": "4", "resources.chunks_in_flight": "8"})
    store.ensure_job_record(faster, record(faster))  # speed settings may change


def test_lease_is_exclusive_until_released(tmp_path: Path) -> None:
    s = spec(tmp_path)
    with (
        store.hold_lease(s, ttl=30),
        pytest.raises(store.LeaseHeld, match="another run holds"),
    ):
        store.acquire_lease(s, ttl=30)
    lease = store.acquire_lease(s, ttl=30)  # free again
    store.release_lease(lease)


def test_expired_lease_is_taken_over(tmp_path: Path) -> None:
    s = spec(tmp_path)
    store.acquire_lease(s, ttl=0.2)  # a run that died without releasing
    time.sleep(0.3)
    lease = store.acquire_lease(s, ttl=30)
    assert lease.number == 2


def test_lease_of_a_dead_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    s = spec(tmp_path)
    first = store.acquire_lease(s, ttl=300)
    first.holder["pid"] = 2**22 + 12345  # no such process
    (tmp_path / store.LEASE_DIR / "00000001.json").write_text(json.dumps(first.holder))
    assert store.acquire_lease(s, ttl=30).number == 2


def test_wait_takes_the_lease_when_the_holder_releases(tmp_path: Path) -> None:
    s = spec(tmp_path)
    held = store.acquire_lease(s, ttl=30)
    threading.Timer(0.5, store.release_lease, args=(held,)).start()
    t0 = time.time()
    lease = store.acquire_lease(s, ttl=30, wait=True, poll=0.1)
    assert lease.number == 2 and time.time() - t0 >= 0.4


def test_concurrent_acquirers_exactly_one_wins(tmp_path: Path) -> None:
    s = spec(tmp_path)
    wins: list[int] = []
    losses: list[str] = []

    def grab() -> None:
        try:
            wins.append(store.acquire_lease(s, ttl=30).number)
        except store.LeaseHeld as exc:
            losses.append(str(exc))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7


def test_attempts_count_up_and_clear(tmp_path: Path) -> None:
    fs, root = store.storage.open_fs(str(tmp_path))
    assert [store.begin_attempt(fs, root, "c1", {}) for _ in range(3)] == [1, 2, 3]
    assert store.attempts_so_far(fs, root, "c1") == 3
    store.clear_attempts(fs, root, "c1", 3)
    assert store.attempts_so_far(fs, root, "c1") == 0


def test_retry_chunk_ids_count_up() -> None:
    assert retry_chunk_id("_failed/part-a.000-010.ff.parquet") == "a.000-010.ff.retry1"
    assert retry_chunk_id("_failed/part-a.000-010.ff.retry1.parquet") == "a.000-010.ff.retry2"
