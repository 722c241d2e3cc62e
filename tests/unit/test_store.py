"""The output's memory between runs: job record, lease and attempt counts."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pyarrow as pa
import pytest

from batch import store
from batch.errors import InputChanged, SpecError
from batch.job import retry_chunk_id
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


def test_retry_chunk_ids_count_up() -> None:
    assert retry_chunk_id("a.000-010.ff") == "a.000-010.ff.retry1"
    assert retry_chunk_id("a.000-010.ff.retry1") == "a.000-010.ff.retry2"


def test_attempts_count_engine_failures_not_runs_killed_around_them(tmp_path: Path) -> None:
    fs, root = store.storage.open_fs(str(tmp_path))
    # Three runs were killed while the chunk was in flight: none of them was the engine's fault.
    for run in ("killed-1", "killed-2", "killed-3"):
        store.begin_attempt(fs, root, "c1", {"run": run})
    assert store.prior_failures(fs, root, "c1", "now")[0] == 0
    # The engine raised on it: that counts, with its error.
    n = store.begin_attempt(fs, root, "c1", {"run": "now"})
    store.fail_attempt(fs, root, "c1", n, "FakeEngineCrash: boom")
    assert store.prior_failures(fs, root, "c1", "now") == (1, "FakeEngineCrash: boom")
    # The actor died with it (no failure record) and Ray resubmitted it in the same run.
    store.begin_attempt(fs, root, "c1", {"run": "now"})
    assert store.prior_failures(fs, root, "c1", "now")[0] == 2
    # A later run cannot tell whether that last attempt died with the engine or with the
    # run killed around it, so it counts only the failure it knows of.
    assert store.prior_failures(fs, root, "c1", "later")[0] == 1
    store.clear_attempts(fs, root, "c1")
    assert store.prior_failures(fs, root, "c1", "later")[0] == 0


def _chunk(rows: int = 3) -> store.Chunk:
    return store.Chunk("f.000000000-000000003.abc", "in/f.parquet", "f.parquet", 0, rows)


def _tables(ok: int, bad: int) -> tuple[pa.Table, pa.Table]:
    return (
        pa.table({"id": list(range(ok)), "output_tokens": [2] * ok}),
        pa.table({"id": list(range(ok, ok + bad)), "_error_class": ["E"] * bad}),
    )


def test_two_attempts_at_a_chunk_commit_one_and_leave_no_stray_part(tmp_path: Path) -> None:
    """Attempts with different row splits (sampling, rows that fail at random): the marker
    names exactly one attempt's parts; the loser's parts do not stay in data/ or _failed/."""
    s = spec(tmp_path / "out")
    first = store.commit_chunk(s, _chunk(), *_tables(3, 0), {}, fingerprint="f", run_id="a")
    second = store.commit_chunk(s, _chunk(), *_tables(1, 2), {}, fingerprint="f", run_id="b")
    assert second["adopted"] and second["data_part"] == first["data_part"]
    assert second["rows"] == 3 and second["failed_rows"] == 0
    parts = sorted(p.relative_to(tmp_path / "out").as_posix()
                   for p in (tmp_path / "out").glob("*/part-*.parquet"))  # fmt: skip
    assert parts == [first["data_part"]]


def test_commit_refuses_a_chunk_whose_rows_do_not_add_up(tmp_path: Path) -> None:
    s = spec(tmp_path / "out")
    with pytest.raises(InputChanged, match="came back as 2 rows, not 3"):
        store.commit_chunk(s, _chunk(), *_tables(1, 1), {}, fingerprint="f")
    assert not (tmp_path / "out" / "_markers").exists()


def test_garbage_parts_of_committed_chunks_go_at_once_others_after_the_grace(
    tmp_path: Path,
) -> None:
    s = spec(tmp_path / "out")
    out = tmp_path / "out"
    marker = store.commit_chunk(s, _chunk(), *_tables(2, 1), {}, fingerprint="f")
    (out / "data").mkdir(exist_ok=True)
    stray = out / "data" / "part-f.000000000-000000003.abc.0123456789ab.parquet"  # committed
    young = out / "data" / "part-g.000000003-000000006.abd.0123456789ab.parquet"  # in flight?
    old = out / "_failed" / "part-h.000000006-000000009.abe.0123456789ab.parquet"  # long dead
    for p in (stray, young, old):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    markers = store.read_markers(s)
    found = store.find_garbage(s, markers)
    assert sorted(found.removable) == sorted(
        ["data/" + stray.name, "_failed/" + old.name]
    ) and found.young == ["data/" + young.name]
    store.collect_garbage(s, markers)
    assert sorted(p.name for p in out.glob("*/part-*.parquet")) == sorted(
        [Path(marker["data_part"]).name, Path(marker["failed_part"]).name, young.name]
    )
    store.collect_garbage(s, markers, grace=0)  # status --repair --force
    assert not young.exists()


def test_a_stale_manifest_is_replaced_and_a_current_one_left_alone(tmp_path: Path) -> None:
    s = spec(tmp_path / "out")
    store.commit_chunk(s, _chunk(), *_tables(3, 0), {}, fingerprint="f")
    record = {"fingerprint": "f", "chunks": 1, "input": {"files": 1}}
    store.write_json(s, store.MANIFEST, {"data_parts": [], "rows": 0}, create_only=True)
    t = store.totals(store.read_markers(s))
    assert store.publish_manifest(s, store.manifest_doc(s, record, t, started=0.0))
    manifest = store.read_output_json(s, store.MANIFEST)
    assert manifest is not None and manifest["rows"] == 3 and len(manifest["data_parts"]) == 1
    assert not store.publish_manifest(s, store.manifest_doc(s, record, t, started=0.0))


def test_engine_clock_bills_ahead_so_a_killed_engine_has_counted_its_time(tmp_path: Path) -> None:
    fs, root = store.storage.open_fs(str(tmp_path))
    s = spec(tmp_path)
    run = store.start_run(s, "submit")
    clock = store.EngineClock(fs, root, run.run_id, "actor1", accelerators=1.0, beat=0.2)
    clock.start()
    clock.started_chunk(10)
    time.sleep(1.0)
    killed_at = time.time()  # the process dies here: no finish, no release
    (doc,) = store.read_runs(s)
    assert doc["state"] == "running" and doc["engines"][0]["rows_started"] == 10
    held = killed_at - clock.doc["created"]
    assert store.engine_seconds(doc, doc["engines"][0]) >= held
