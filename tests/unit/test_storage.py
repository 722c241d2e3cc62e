"""batch.storage on local disk: create-only writes, races, Parquet, listings, error triage."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import ClientError

from batch import storage


def _payload(i: int, size: int = 256 * 1024) -> bytes:
    """Distinct, large-ish payloads, so a torn or mixed write would show."""
    return (f"writer-{i:02d}|".encode() * (size // 10 + 1))[:size]


def test_create_only_creates_once_then_reports_existing(tmp_path: Path) -> None:
    fs, root = storage.open_fs(str(tmp_path))
    path = storage.join(root, "parts", "part-0001.bin")  # parent does not exist yet

    assert storage.create_only(fs, path, b"first") is True
    assert storage.create_only(fs, path, b"second") is False

    assert Path(path).read_bytes() == b"first"
    assert os.listdir(Path(path).parent) == ["part-0001.bin"]  # no temp files left behind


def test_sixteen_racing_writers_one_winner_content_intact(tmp_path: Path) -> None:
    fs, root = storage.open_fs(str(tmp_path))
    n = 16
    for round_ in range(5):
        path = storage.join(root, f"race-{round_}.bin")
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
                results[i] = storage.create_only(fs, path, _payload(i))
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

        assert not errors
        winners = [i for i, created in results.items() if created]
        assert len(results) == n
        assert len(winners) == 1, winners
        assert Path(path).read_bytes() == _payload(winners[0])
    assert sorted(os.listdir(tmp_path)) == [f"race-{r}.bin" for r in range(5)]


def test_empty_data_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    fs, root = storage.open_fs(str(tmp_path))
    path = storage.join(root, "empty.json")
    with pytest.raises(ValueError, match="empty"):
        storage.create_only(fs, path, b"")
    assert not Path(path).exists()


def test_write_parquet_create_only_round_trips_and_keeps_the_first(tmp_path: Path) -> None:
    fs, root = storage.open_fs(str(tmp_path))
    path = storage.join(root, "data", "part-00000.parquet")
    table = pa.table({"id": [1, 2, 3], "text": ["a", "b", None]})

    assert storage.write_parquet_create_only(fs, path, table) is True
    other = pa.table({"id": [9], "text": ["z"]})
    assert storage.write_parquet_create_only(fs, path, other) is False

    back = pq.read_table(path)
    assert back.equals(table)
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_other_filesystems_refuse_rather_than_overwrite() -> None:
    fs, root = storage.open_fs("memory://batchinfer-test-storage")
    with pytest.raises(NotImplementedError, match="create-if-absent"):
        storage.create_only(fs, storage.join(root, "x.json"), b"{}")


def test_open_fs_and_join(tmp_path: Path) -> None:
    fs, root = storage.open_fs(f"file://{tmp_path}/out/")
    assert root == str(tmp_path / "out")
    assert "file" in fs.protocol
    assert (
        storage.join("s3://bucket/out/", "_markers", "/c1.json")
        == "s3://bucket/out/_markers/c1.json"
    )
    assert storage.join("bucket/out", "a/", "b") == "bucket/out/a/b"
    assert storage.join("/", "a") == "/a"


def test_open_fs_turns_off_s3_listing_cache() -> None:
    fs, root = storage.open_fs(
        "s3://some-bucket/prefix/", {"key": "k", "secret": "s", "skip_instance_cache": True}
    )
    assert root == "some-bucket/prefix"
    assert fs.dircache.use_listings_cache is False


def test_read_json_and_list_files(tmp_path: Path) -> None:
    fs, root = storage.open_fs(str(tmp_path))
    markers = storage.join(root, "_markers")
    assert storage.list_files(fs, markers, ".json") == []  # missing root

    for name in ("c2", "c10", "c1"):
        assert storage.create_only(fs, storage.join(markers, f"{name}.json"), b'{"n": 1}')
    (tmp_path / "_markers" / ".c3.json.abc.tmp").write_bytes(b"partial")  # a writer's temp file
    (tmp_path / "_markers" / ".hidden.json").write_bytes(b"{}")
    (tmp_path / "_markers" / "notes.txt").write_bytes(b"x")
    (tmp_path / "_markers" / "sub").mkdir()
    (tmp_path / "_markers" / "sub" / "deep.json").write_bytes(b"{}")

    listed = storage.list_files(fs, markers, ".json")
    assert listed == sorted(storage.join(markers, f"{n}.json") for n in ("c1", "c10", "c2"))
    assert storage.join(markers, "sub", "deep.json") in storage.list_files(
        fs, markers, ".json", recursive=True
    )
    assert storage.read_json(fs, listed[0]) == {"n": 1}


# --------------------------------------------------------------------------- S3 error triage


def _client_error(code: str, status: int, op: str = "PutObject") -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        op,
    )


def _as_s3fs_raises(err: ClientError) -> OSError:
    """What s3fs raises for such a ClientError: an OSError carrying it as ``__cause__``."""
    code = err.response["Error"]["Code"]
    if code == "PreconditionFailed":  # SeaweedFS's answer to a lost If-None-Match race
        exc = OSError(errno.EINVAL, "At least one of the pre-conditions you specified did not hold")
    else:
        exc = OSError(errno.EIO, f"{code}: m")
    exc.__cause__ = err
    return exc


def test_seaweedfs_style_412_counts_as_precondition_failed() -> None:
    # SeaweedFS sends no "Condition" field, so s3fs raises OSError(EINVAL), not FileExistsError.
    seaweed = _as_s3fs_raises(_client_error("PreconditionFailed", 412))
    assert storage.is_precondition_failed(seaweed)
    assert not storage.is_transient(seaweed)
    assert storage.is_precondition_failed(FileExistsError("aws style"))
    assert not storage.is_precondition_failed(OSError(errno.EIO, "boom"))


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError(104, "reset"),
        TimeoutError(),
        _as_s3fs_raises(_client_error("SlowDown", 503)),
        _as_s3fs_raises(_client_error("InternalError", 500)),
        _as_s3fs_raises(_client_error("ConditionalRequestConflict", 409)),
    ],
)
def test_transient_errors_are_recognised(exc: BaseException) -> None:
    assert storage.is_transient(exc)


@pytest.mark.parametrize(
    "exc",
    [
        FileNotFoundError("nope"),
        PermissionError("denied"),
        _as_s3fs_raises(_client_error("AccessDenied", 403)),
        ValueError("bad"),
    ],
)
def test_terminal_errors_are_not_retried(exc: BaseException) -> None:
    assert not storage.is_transient(exc)


class _FlakyS3:
    """Just enough of s3fs for create_only: fails with the given errors, then succeeds."""

    protocol = ("s3", "s3a")

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.objects: dict[str, bytes] = {}
        self.calls: list[dict[str, Any]] = []

    async def _pipe_file(self, path: str, data: bytes, mode: str = "overwrite", **kw: Any) -> None:
        raise AssertionError("signature only")

    def pipe_file(self, path: str, data: bytes, **kwargs: Any) -> None:
        self.calls.append(kwargs)
        if self.failures:
            raise self.failures.pop(0)
        if path in self.objects:
            raise _as_s3fs_raises(_client_error("PreconditionFailed", 412))
        self.objects[path] = data


def test_s3_create_only_retries_transient_then_succeeds() -> None:
    fs = _FlakyS3(
        ConnectionResetError(104, "reset"), _as_s3fs_raises(_client_error("SlowDown", 503))
    )
    assert storage.create_only(fs, "bkt/p.bin", b"data") is True
    assert fs.objects == {"bkt/p.bin": b"data"}
    assert len(fs.calls) == 3
    assert all(c["mode"] == "create" for c in fs.calls)


def test_s3_precondition_failure_is_not_retried() -> None:
    fs = _FlakyS3()
    fs.objects["bkt/p.bin"] = b"theirs"
    assert storage.create_only(fs, "bkt/p.bin", b"ours") is False
    assert len(fs.calls) == 1
    assert fs.objects["bkt/p.bin"] == b"theirs"


def test_s3_lost_response_then_412_reports_not_created() -> None:
    # The first PUT landed but its response was lost; the retry sees 412. Documented choice:
    # report False (adopt), never claim ownership from a byte comparison.
    fs = _FlakyS3()

    def landed_then_reset(path: str, data: bytes, **kwargs: Any) -> None:
        fs.calls.append(kwargs)
        if path not in fs.objects:
            fs.objects[path] = data
            raise ConnectionResetError(104, "reset after the write")
        raise _as_s3fs_raises(_client_error("PreconditionFailed", 412))

    fs.pipe_file = landed_then_reset  # type: ignore[method-assign]
    assert storage.create_only(fs, "bkt/p.bin", b"ours") is False
    assert fs.objects["bkt/p.bin"] == b"ours"
    assert len(fs.calls) == 2
