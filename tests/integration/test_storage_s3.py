"""batch.storage against a real S3 server (SeaweedFS): conditional PUTs and lost races."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batch import storage
from tests.s3server import S3Server, seaweedfs

pytestmark = pytest.mark.integration

_bucket_ids = itertools.count()


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def out_url(s3: S3Server) -> str:
    """A fresh bucket per test, with an output prefix in it."""
    return s3.make_bucket(f"storage-test-{next(_bucket_ids)}") + "/out/"


def _payload(i: int, size: int = 256 * 1024) -> bytes:
    return (f"writer-{i:02d}|".encode() * (size // 10 + 1))[:size]


def test_second_create_returns_false_and_keeps_the_first(s3: S3Server, out_url: str) -> None:
    fs, root = storage.open_fs(out_url, s3.storage_options)
    path = storage.join(root, "_markers", "c1.json")

    assert storage.create_only(fs, path, b'{"winner": 1}') is True
    # SeaweedFS answers 412 without a Condition field: must still read as "already exists".
    assert storage.create_only(fs, path, b'{"winner": 2}') is False

    assert s3.new_fs().cat_file(path) == b'{"winner": 1}'
    assert storage.read_json(fs, path) == {"winner": 1}


def test_sixteen_concurrent_creators_exactly_one_winner(s3: S3Server, out_url: str) -> None:
    n = 16
    clients = [s3.new_fs() for _ in range(n)]  # separate clients, separate connections
    _, root = storage.open_fs(out_url, s3.storage_options)
    # SeaweedFS serialises contended conditional PUTs on one key behind a lock it retries about
    # once a second, so a 16-way race takes a few seconds per round: keep the rounds few.
    for round_ in range(2):
        path = storage.join(root, f"part-{round_:05d}.bin")
        barrier = threading.Barrier(n)
        results: dict[int, bool] = {}
        errors: list[BaseException] = []

        def write(
            i: int,
            path: str,
            barrier: threading.Barrier,
            results: dict[int, bool],
            errors: list[BaseException],
        ) -> None:
            try:
                barrier.wait()
                results[i] = storage.create_only(clients[i], path, _payload(i))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [
            threading.Thread(target=write, args=(i, path, barrier, results, errors))
            for i in range(n)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        assert not errors, errors
        winners = [i for i, created in results.items() if created]
        assert len(results) == n
        assert len(winners) == 1, f"round {round_}: winners {winners}"
        assert s3.new_fs().cat_file(path) == _payload(winners[0])


def test_empty_data_is_refused_and_nothing_is_written(s3: S3Server, out_url: str) -> None:
    fs, root = storage.open_fs(out_url, s3.storage_options)
    path = storage.join(root, "empty.json")
    with pytest.raises(ValueError, match="empty"):
        storage.create_only(fs, path, b"")
    assert not s3.new_fs().exists(path)


def test_parquet_part_round_trips_and_is_adopted_not_overwritten(
    s3: S3Server, out_url: str
) -> None:
    fs, root = storage.open_fs(out_url, s3.storage_options)
    path = storage.join(root, "data", "part-00000.parquet")
    table = pa.table({"id": list(range(1000)), "text": [f"row {i}" for i in range(1000)]})

    assert storage.write_parquet_create_only(fs, path, table) is True
    assert storage.write_parquet_create_only(fs, path, table.slice(0, 1)) is False

    with s3.new_fs().open(path, "rb") as fh:
        assert pq.read_table(fh).equals(table)


def test_listing_sees_other_writers_at_once(s3: S3Server, out_url: str) -> None:
    fs, root = storage.open_fs(out_url, s3.storage_options)
    markers = storage.join(root, "_markers")
    assert storage.list_files(fs, markers, ".json") == []  # missing prefix

    other, _ = storage.open_fs(out_url, {**s3.storage_options, "skip_instance_cache": True})
    assert storage.create_only(other, storage.join(markers, "c2.json"), b"{}")
    assert storage.list_files(fs, markers, ".json") == [storage.join(markers, "c2.json")]

    assert storage.create_only(other, storage.join(markers, "c1.json"), b"{}")
    assert storage.create_only(other, storage.join(markers, "c1.txt"), b"x")
    assert storage.list_files(fs, markers, ".json") == [
        storage.join(markers, "c1.json"),
        storage.join(markers, "c2.json"),
    ]


def _listening(pid: int) -> list[tuple[str, int]]:
    """(hex local address, port) of every TCP socket ``pid`` listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6"):
        lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        for line in lines:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if state == "0A" and inode in inodes:  # 0A = LISTEN
                addr, port = local.rsplit(":", 1)
                found.append((addr, int(port, 16)))
    return found


def test_server_listens_on_loopback_only(s3: S3Server) -> None:
    if not Path("/proc/self/net/tcp").exists():
        pytest.skip("needs Linux /proc")
    assert s3.endpoint_url.startswith("http://127.0.0.1:")
    listening = _listening(s3.process.pid)
    assert listening, "weed listens on nothing?"
    assert {addr for addr, _ in listening} == {"0100007F"}  # 127.0.0.1, nothing else
    assert {port for _, port in listening} <= set(s3.ports.values())
