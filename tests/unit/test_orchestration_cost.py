"""Orchestration cost (issue 16): marker rollups, the streaming plan and the gated chunk feed.

The rollup is a cache of markers: whatever it says, a reader's answer is the markers' answer.
The plan and the feed hold files and runs of chunk numbers, never a list of every chunk.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from batch import plan as planning
from batch import runner, storage, store
from batch.spec import JobSpec, parse_spec


def spec(out: Path) -> JobSpec:
    text = f"""
name: t
input: {{path: in/}}
output: {{path: "{out}"}}
model: {{path: m, engine: fake}}
prompt: {{template: "{{{{ body }}}}"}}
"""
    return parse_spec(text)


def commit(s: JobSpec, n: int, rollup: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    chunk = store.Chunk(f"c{n:04d}", "in/f.parquet", "f.parquet", n * 2, n * 2 + 2)
    data = pa.table({"body": ["a", "b"], "output": ["x", "y"]})
    return store.commit_chunk(s, chunk, data, None, {}, fingerprint="f", rollup=rollup)


def rollup_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every marker read one by one (storage.read_json on a marker)."""
    reads: list[str] = []
    real = storage.read_json

    def spy(fs: Any, path: str) -> Any:
        if f"/{store.MARKERS}/" in path:
            reads.append(path)
        return real(fs, path)

    monkeypatch.setattr(storage, "read_json", spy)
    return reads


def committed(s: JobSpec, count: int) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for n in range(count):
        commit(s, n, entries)
    return entries


def test_markers_come_from_the_rollup_and_equal_the_markers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spec(tmp_path)
    entries = committed(s, 80)
    truth = store.read_markers(s)  # no rollup yet: every marker read
    fs, root = storage.open_fs(s.output.path)
    assert store.write_rollup(fs, root, entries)
    reads = rollup_reads(monkeypatch)
    assert store.read_markers(s) == truth
    assert reads == []  # one rollup read instead of 80 markers


def test_a_marker_missing_from_the_rollup_is_still_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spec(tmp_path)
    entries = committed(s, 70)
    fs, root = storage.open_fs(s.output.path)
    store.write_rollup(fs, root, entries[:-1])  # the last chunk's marker is in no rollup
    reads = rollup_reads(monkeypatch)
    markers = store.read_markers(s)
    assert len(markers) == 70 and {m["chunk_id"] for m in markers} == {
        f"c{n:04d}" for n in range(70)
    }
    assert [r.rsplit("/", 1)[-1] for r in reads] == ["c0069.json"]


def test_a_rollup_entry_without_its_marker_is_ignored(tmp_path: Path) -> None:
    s = spec(tmp_path)
    entries = committed(s, 70)
    fs, root = storage.open_fs(s.output.path)
    ghost = json.loads(json.dumps(entries[0]))
    ghost["marker"]["chunk_id"] = "never-committed"
    store.write_rollup(fs, root, [*entries, ghost])
    markers = store.read_markers(s)
    assert "never-committed" not in {m["chunk_id"] for m in markers}
    assert store.totals(markers).chunks == 70


def test_a_marker_created_anew_is_not_read_from_a_stale_rollup(tmp_path: Path) -> None:
    """A user deleted a marker (the chunk re-ran and committed other parts): the rollup still
    names the old parts; the reader must take the new marker, or the new parts would be
    collected as garbage and the manifest would list deleted files."""
    s = spec(tmp_path)
    entries = committed(s, 70)
    fs, root = storage.open_fs(s.output.path)
    store.write_rollup(fs, root, entries)
    os.remove(tmp_path / store.marker_name("c0003"))
    time.sleep(0.01)
    fresh: list[dict[str, Any]] = []
    again = commit(s, 3, fresh)
    markers = {m["chunk_id"]: m for m in store.read_markers(s)}
    assert markers["c0003"]["data_part"] == again["data_part"]
    assert markers["c0003"]["data_part"] != entries[3]["marker"]["data_part"]
    # Both the stale and the fresh entry in rollups, in either order: the fresh one is used.
    store.write_rollup(fs, root, fresh)
    store.write_rollup(fs, root, entries[3:4])
    markers = {m["chunk_id"]: m for m in store.read_markers(s)}
    assert markers["c0003"]["data_part"] == again["data_part"]


def test_damaged_rollups_and_two_writers(tmp_path: Path) -> None:
    s = spec(tmp_path)
    entries = committed(s, 90)
    fs, root = storage.open_fs(s.output.path)
    # Two drivers (a run and the finalize of another) write overlapping rollups at once.
    threads = [
        threading.Thread(target=store.write_rollup, args=(fs, root, entries[:60])),
        threading.Thread(target=store.write_rollup, args=(fs, root, entries[30:])),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (tmp_path / store.ROLLUP / "zz-damaged.jsonl.gz").write_bytes(b"not gzip")
    (tmp_path / store.ROLLUP / "zz-lies.jsonl.gz").write_bytes(
        gzip.compress(b'{"stamp": "1:2:3", "marker": {"chunk_id": "c0001", "rows": 999}}\n')
    )
    assert len(storage.list_files(fs, storage.join(root, store.ROLLUP), ".jsonl.gz")) == 4
    markers = store.read_markers(s)
    assert len(markers) == 90 and store.totals(markers).rows == 180


def test_finalize_writes_back_what_it_read_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = spec(tmp_path)
    committed(s, 70)
    first = store.read_markers(s, write_back=True)  # no rollup: reads all, writes them back
    reads = rollup_reads(monkeypatch)
    assert store.read_markers(s) == first
    assert reads == []


def test_the_rollup_writer_batches_and_the_commit_reports_entries(tmp_path: Path) -> None:
    s = spec(tmp_path)
    writer = store.RollupWriter(s, every=25)
    for n in range(60):
        entries: list[dict[str, Any]] = []
        commit(s, n, entries)
        assert len(entries) == 1 and entries[0]["marker"]["chunk_id"] == f"c{n:04d}"
        writer.add(entries[0])
    adopted: list[dict[str, Any]] = []
    commit(s, 0, adopted)  # lost to the marker already there: no entry (not this attempt's)
    assert adopted == []
    assert writer.written == 2 and len(writer.pending) == 10
    writer.flush()
    fs, root = storage.open_fs(s.output.path)
    assert len(store.read_rollups(fs, root)) == 60


# --------------------------------------------------------------------------- plan and feed


def files(count: int, rows: int) -> list[planning.InputFile]:
    return [planning.InputFile(f"/in/f{n}.parquet", f"f{n}.parquet", rows) for n in range(count)]


def test_chunk_list_is_the_list_of_chunks_without_holding_it() -> None:
    fs = files(3, 1050)
    cut = list(planning.cut_chunks(fs, 100))
    done = {cut[i].chunk_id for i in (0, 5, 6, 11, 32)}
    lazy = planning.ChunkList(fs, 100, done=done)
    expected = [c for c in cut if c.chunk_id not in done]
    assert lazy == expected and len(lazy) == len(expected) == 28
    assert lazy[0] == expected[0] and lazy[-1] == expected[-1] and lazy[13] == expected[13]
    assert lazy.rows == sum(c.rows for c in expected)
    assert lazy[4:9] == expected[4:9]
    # What it holds: the files and runs of pending chunk numbers, not chunks.
    assert len(lazy._runs) == 4
    assert not any(isinstance(v, planning.Chunk) for v in vars(lazy).values())
    for a, b in ((0, 28), (3, 17), (10, 11), (27, 28)):
        part = lazy.part(a, b)
        assert list(part) == expected[a:b]
        assert len(pickle.dumps(part)) < 2000  # a read task carries files and runs only


def test_plan_is_lazy_and_the_feed_streams(tmp_path: Path) -> None:
    s = spec(tmp_path)
    fs = files(10, 100_000)  # a million chunks of one row
    s = s.model_copy(update={"resources": s.resources.model_copy(update={"rows_per_chunk": 1})})
    plan = planning.plan_chunks(s, fs, set())
    assert len(plan.chunks) == len(plan.pending) == 1_000_000
    assert isinstance(plan.pending, planning.ChunkList)
    feed = runner.chunk_feed(plan)
    assert iter(feed) is feed  # a generator: the rows are made as Ray Data pulls them
    first = next(feed)
    assert pickle.loads(first["chunk"]) == plan.pending[0]
    parts = list(runner._feed_task_parts(plan))
    assert len(parts) == 1_000_000 // runner.FEED_TASK
    assert all(isinstance(p, planning.ChunkList) and len(p.files) <= 2 for _, p in parts)


def test_the_feed_waits_for_commits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read task hands out chunk n only when fewer than the window are in flight; a gate
    that cannot be reached opens rather than stall the job."""
    import asyncio

    import ray

    gate = runner.FeedGate(window=3)
    asked: list[int] = []
    held: list[int] = []

    class Room:
        def remote(self, position: int) -> int:
            asked.append(position)

            async def answer() -> int:
                waiting = asyncio.ensure_future(gate.room(position))
                await asyncio.sleep(0)
                if not waiting.done():  # no room: the gate holds the read task back...
                    held.append(position)
                    await gate.set_committed(gate.committed + 1)  # ...until a commit
                return await waiting

            return asyncio.run(answer())

    class Handle:
        room = Room()

    monkeypatch.setattr(ray, "get", lambda value, timeout=None: value)
    chunks = list(planning.cut_chunks(files(1, 10), 1))
    handed = 0
    for n, _ in enumerate(runner._feed_rows(chunks, {}, Handle(), 0)):
        assert n < gate.committed + gate.window  # never more than the window ahead
        handed += 1
    assert handed == 10 and asked == [0, 3, 4, 5, 6, 7, 8, 9] and held == asked[1:]

    class Broken:
        class room:
            @staticmethod
            def remote(position: int) -> int:
                raise RuntimeError("actor died")

    assert len(list(runner._feed_rows(chunks, {}, Broken(), 0))) == 10


def test_ray_data_keeps_a_bounded_number_of_block_stats(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Data's map operators keep one BlockStats per output block for the dataset's life
    (ray-project/ray#66016): with one block per chunk the driver grew with every chunk. After
    bound_block_stats an operator keeps at most 2 x KEPT_BLOCK_STATS, and hands on every
    bundle unchanged."""
    from types import SimpleNamespace

    from ray.data._internal.execution.operators.task_pool_map_operator import (
        TaskPoolMapOperator,
    )
    from ray.data.block import BlockMetadata

    assert runner.bound_block_stats()
    monkeypatch.setattr(runner, "KEPT_BLOCK_STATS", 10)
    bundles = [
        SimpleNamespace(metadata=[BlockMetadata(num_rows=i, size_bytes=1, exec_stats=None,
                                                input_files=None)])
        for i in range(100)
    ]  # fmt: skip
    queue = iter(bundles)
    op = object.__new__(TaskPoolMapOperator)  # the operator's state the method touches
    op._started = True
    op._output_queue = SimpleNamespace(get_next=lambda: next(queue))
    op._metrics = SimpleNamespace(on_output_dequeued=lambda bundle: None)
    op._output_blocks_stats = []
    handed = [op._get_next_inner() for _ in range(100)]
    assert handed == bundles
    kept = op._output_blocks_stats
    assert 10 <= len(kept) <= 20, len(kept)
    assert kept[-1].num_rows == 99, "the newest stats are the ones kept"
