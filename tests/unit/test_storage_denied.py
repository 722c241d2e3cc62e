"""Storage that says "access denied" for what is not there, as S3 does for a prefix-only role.

S3 answers a HEAD or GET of a missing key with 403, not 404, unless the caller holds
s3:ListBucket on the whole bucket; the Ray pods' role in infra/terraform/access.tf may list only
under the input and output prefixes. A first run (no ``_job.json``, no manifest yet) must work
there, an existing object must still be found, and a credential that may not even list the
output must fail with a message that says what to grant.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

import pytest
import s3fs
from botocore.exceptions import ClientError
from fsspec.implementations.local import LocalFileSystem
from fsspec.registry import _registry
from s3fs.errors import translate_boto_error

from batch import storage, store
from batch.spec import JobSpec, parse_spec

PROTOCOL = "refusing"


class RefusingLocalFS(LocalFileSystem):
    """Local disk answering like S3 for a role without bucket-wide s3:ListBucket.

    Looking at or reading a missing path raises PermissionError (s3fs's translation of S3's
    403); listing works, except for the folders in ``refuse_listing``. Paths in
    ``refuse_reading`` are there but may not be read.
    """

    protocol = (PROTOCOL,)

    def __init__(
        self, refuse_listing: tuple[str, ...] = (), refuse_reading: tuple[str, ...] = (), **kw: Any
    ) -> None:
        super().__init__(**kw)
        self.refuse_listing = {p.rstrip("/") for p in refuse_listing}
        self.refuse_reading = {p.rstrip("/") for p in refuse_reading}

    def _refused(self, path: Any) -> bool:
        p = self._strip_protocol(path)
        return not os.path.lexists(p) or p in self.refuse_reading

    def info(self, path: Any, **kwargs: Any) -> dict[str, Any]:
        if not isinstance(path, os.DirEntry) and self._refused(path):
            raise PermissionError("Forbidden")
        info: dict[str, Any] = super().info(path, **kwargs)
        return info

    def exists(self, path: Any, **kwargs: Any) -> bool:  # as s3fs's: a missing key raises
        return bool(self.info(path))

    def _open(self, path: Any, mode: str = "rb", **kwargs: Any) -> Any:
        if "r" in mode and self._refused(path):
            raise PermissionError("Access Denied")
        return super()._open(path, mode, **kwargs)

    def ls(self, path: Any, detail: bool = False, **kwargs: Any) -> list[Any]:
        p = self._strip_protocol(path)
        if p in self.refuse_listing:
            raise PermissionError("Access Denied")
        if not os.path.lexists(p):
            raise FileNotFoundError(p)
        listing: list[Any] = super().ls(path, detail=detail, **kwargs)
        return listing


@pytest.fixture(autouse=True)
def refusing_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """``refusing://`` URLs open a RefusingLocalFS, so job specs can point at one."""
    monkeypatch.setitem(_registry, PROTOCOL, RefusingLocalFS)


def spec(out: str, **options: Any) -> JobSpec:
    opts = "{" + ", ".join(f"{k}: {list(v)!r}" for k, v in options.items()) + "}"
    return parse_spec(
        f"""
name: t
input: {{path: in/}}
output: {{path: "{out}", storage_options: {opts}}}
model: {{path: m, engine: fake}}
prompt: {{template: "{{{{ body }}}}"}}
"""
    )


def record(s: JobSpec) -> dict[str, Any]:
    fp = store.job_fingerprint(s, "abc")
    return store.job_record(s, fingerprint=fp, listing="abc", files=1, rows=10, chunks=1)


def test_first_run_and_resume_where_missing_objects_are_access_denied(tmp_path: Path) -> None:
    s = spec(f"{PROTOCOL}://{tmp_path}/out")
    fs, root = storage.open_fs(s.output.path, s.output.storage_options)
    job_path = storage.join(root, store.JOB_RECORD)
    with pytest.raises(PermissionError):
        fs.exists(job_path)  # what a plain existence check does here

    assert store.read_job_record(fs, root) is None  # a first run: no record yet
    assert store.read_output_json(s, store.MANIFEST) is None
    assert not storage.exists(fs, job_path)
    rec = store.ensure_job_record(s, record(s))

    # The next run finds what the first one wrote.
    found = store.read_job_record(fs, root)
    assert found is not None and found["fingerprint"] == rec["fingerprint"]
    assert storage.exists(fs, job_path)
    assert store.write_json(s, store.MANIFEST, {"rows": 10}, create_only=True)
    assert store.read_output_json(s, store.MANIFEST) == {"rows": 10}
    store.write_json(s, store.LEDGER, {"rows": 9}, create_only=False)
    store.write_json(s, store.LEDGER, {"rows": 10}, create_only=False)
    assert store.read_output_json(s, store.LEDGER) == {"rows": 10}
    assert store.list_markers(s) == []


def test_retries_cut_short_are_finished_and_removed_parts_are_skipped(tmp_path: Path) -> None:
    s = spec(f"{PROTOCOL}://{tmp_path}/out")
    fs, root = storage.open_fs(s.output.path, s.output.storage_options)
    storage.create_only(fs, storage.join(root, "_failed/part-a.0123456789ab.parquet"), b"rows")
    storage.create_only(fs, storage.join(root, "_failed/part-c.0123456789ab.parquet"), b"rows")
    markers: list[dict[str, Any]] = [
        # a retry cut short: the failed part it supersedes is still there
        {"chunk_id": "a", "rows": 1, "failed_rows": 0, "input_tokens": 0, "output_tokens": 0,
         "failed_part": None, "supersedes": None},
        {"chunk_id": "a.retry1", "rows": 1, "failed_rows": 0, "input_tokens": 0,
         "output_tokens": 0, "supersedes": "_failed/part-a.0123456789ab.parquet"},
        # a finished retry: its failed part was removed long ago (403 on S3)
        {"chunk_id": "b.retry1", "rows": 1, "failed_rows": 0, "input_tokens": 0,
         "output_tokens": 0, "supersedes": "_failed/part-b.0123456789ab.parquet"},
        {"chunk_id": "c", "rows": 0, "failed_rows": 1, "input_tokens": 0, "output_tokens": 0,
         "failed_part": "_failed/part-c.0123456789ab.parquet", "supersedes": None},
    ]  # fmt: skip
    assert store.collect_garbage(s, markers).removed == 1
    assert sorted(p.name for p in (tmp_path / "out" / "_failed").iterdir()) == [
        "part-c.0123456789ab.parquet"
    ]


def test_a_refused_listing_fails_naming_the_path_and_the_permission(tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = spec(f"{PROTOCOL}://{out}", refuse_listing=[str(out), str(out / "_markers")])
    fs, root = storage.open_fs(s.output.path, s.output.storage_options)

    with pytest.raises(PermissionError) as info:
        store.read_job_record(fs, root)
    msg = str(info.value)
    assert f"cannot tell whether {PROTOCOL}://{out}/_job.json exists" in msg
    assert f"listing {PROTOCOL}://{out}/ (Access Denied)" in msg
    assert "permission to list" in msg
    # Nor is a refused listing of the markers taken for "nothing committed yet".
    with pytest.raises(PermissionError, match=f"listing {PROTOCOL}://{out}/_markers/ was refused"):
        store.list_markers(s)


def test_an_object_that_is_there_but_unreadable_is_not_taken_for_missing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = spec(f"{PROTOCOL}://{out}", refuse_reading=[str(out / store.MANIFEST)])
    fs, root = storage.open_fs(s.output.path, s.output.storage_options)
    assert store.write_json(s, store.MANIFEST, {"rows": 1}, create_only=True)

    assert storage.exists(fs, storage.join(root, store.MANIFEST))
    with pytest.raises(PermissionError, match=r"_MANIFEST.json is there but reading it was"):
        store.read_output_json(s, store.MANIFEST)


# --------------------------------------------------------------------------- real s3fs


class _Body:
    def __init__(self, data: bytes) -> None:
        self.data = data

    async def read(self) -> bytes:
        return self.data

    def close(self) -> None:
        pass


def _s3_error(code: str, status: int, op: str, **extra: str) -> BaseException:
    """What s3fs's own S3 call raises for such an answer (it translates before returning)."""
    err = {"Code": code, "Message": code, **extra}
    return translate_boto_error(
        ClientError({"Error": err, "ResponseMetadata": {"HTTPStatusCode": status}}, op)
    )


class PrefixOnlyS3(s3fs.S3FileSystem):
    """s3fs over one in-memory bucket ``bkt`` that answers the access.tf role as AWS does.

    The role may read and write keys under ``out/`` and list only prefixes matching
    ``list_prefixes`` (its s3:prefix condition); with no bucket-wide s3:ListBucket, a HEAD or
    GET of a missing key is refused (403), and so are HeadBucket, GetBucketLocation and
    CreateBucket. Everything above the S3 calls is s3fs's own code.
    """

    def __init__(self, list_prefixes: tuple[str, ...] = ("out", "out/", "out/*")) -> None:
        super().__init__(key="k", secret="s", use_listings_cache=False)
        self.list_prefixes = list_prefixes
        self.objects: dict[str, bytes] = {}

    async def _call_s3(self, method: str, *akwargs: dict[str, Any], **kwargs: Any) -> Any:
        kw = {k: v for d in akwargs for k, v in d.items()} | kwargs
        op = "".join(w.title() for w in method.split("_"))
        key = kw.get("Key", "")
        may_touch = kw.get("Bucket") == "bkt" and key.startswith("out/")
        if method in ("head_object", "get_object"):
            if not may_touch or key not in self.objects:
                # A HEAD has no body, so botocore's error code is the bare status.
                raise _s3_error("403" if method == "head_object" else "AccessDenied", 403, op)
            data = self.objects[key]
            return {"ContentLength": len(data), "ETag": '"e"', "Body": _Body(data)}
        if method == "put_object" and may_touch:
            if kw.get("IfNoneMatch") == "*" and key in self.objects:
                raise _s3_error("PreconditionFailed", 412, op, Condition="If-None-Match")
            self.objects[key] = bytes(kw["Body"])
            return {"ETag": '"e"'}
        if method == "delete_objects":
            gone = [o["Key"] for o in kw["Delete"]["Objects"] if o["Key"].startswith("out/")]
            for k in gone:
                self.objects.pop(k, None)
            return {"Deleted": [{"Key": k} for k in gone]}
        if method == "list_objects_v2":
            prefix, delimiter = kw.get("Prefix", ""), kw.get("Delimiter", "")
            if not any(fnmatch.fnmatchcase(prefix, p) for p in self.list_prefixes):
                raise _s3_error("AccessDenied", 403, op)
            return self._listing(prefix, delimiter)
        raise _s3_error("AccessDenied", 403, op)  # bucket-level calls, writes elsewhere

    def _listing(self, prefix: str, delimiter: str) -> dict[str, Any]:
        contents, folders = [], set()
        for key in sorted(k for k in self.objects if k.startswith(prefix)):
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                folders.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
            else:
                contents.append({"Key": key, "Size": len(self.objects[key]), "ETag": '"e"'})
        return {
            "Contents": contents,
            "CommonPrefixes": [{"Prefix": p} for p in sorted(folders)],
            "KeyCount": len(contents) + len(folders),
            "IsTruncated": False,
        }


def prefix_only_s3(*list_prefixes: str) -> PrefixOnlyS3:
    """A fresh one each time (fsspec would otherwise hand back a cached instance)."""
    prefixes = list_prefixes or ("out", "out/", "out/*")
    fs: PrefixOnlyS3 = PrefixOnlyS3(list_prefixes=prefixes, skip_instance_cache=True)  # type: ignore[call-arg]
    return fs


def test_s3_prefix_only_role_first_run_resume_and_ledger() -> None:
    s3 = prefix_only_s3()
    root = "bkt/out/enrich"
    job_path = f"{root}/{store.JOB_RECORD}"
    with pytest.raises(PermissionError):
        s3.exists(job_path)  # s3fs as it is: the 403 for a missing key

    assert store.read_job_record(s3, root) is None
    assert storage.read_json_or_none(s3, f"{root}/{store.MANIFEST}") is None
    assert storage.list_files(s3, f"{root}/_markers", ".json") == []
    assert storage.create_only(s3, job_path, b'{"fingerprint": "f1"}')
    assert not storage.create_only(s3, job_path, b'{"fingerprint": "f1"}')  # a second run
    assert store.read_job_record(s3, root) == {"fingerprint": "f1"}
    assert storage.exists(s3, job_path)

    # The ledger is rewritten on every run. makedirs, as it used to be written, probes the
    # bucket and then tries CreateBucket, both refused to this role.
    with pytest.raises(PermissionError):
        s3.makedirs(root, exist_ok=True)
    storage.overwrite(s3, f"{root}/{store.LEDGER}", b'{"rows": 1}')
    storage.overwrite(s3, f"{root}/{store.LEDGER}", b'{"rows": 2}')
    assert storage.read_json(s3, f"{root}/{store.LEDGER}") == {"rows": 2}


def test_s3_role_that_may_not_list_the_output_is_told_what_to_grant() -> None:
    s3 = prefix_only_s3("inputs", "inputs/", "inputs/*")  # the output prefix left out

    with pytest.raises(PermissionError) as info:
        store.read_job_record(s3, "bkt/out/enrich")
    msg = str(info.value)
    assert "cannot tell whether s3://bkt/out/enrich/_job.json exists" in msg
    assert "s3:ListBucket on arn:aws:s3:::bkt for the prefix 'out/enrich/'" in msg
    assert "'out/*'" in msg and "access.tf" in msg
    with pytest.raises(PermissionError, match=r"listing s3://bkt/out/enrich/_markers/ was refused"):
        storage.list_files(s3, "bkt/out/enrich/_markers", ".json")


def test_s3_object_that_is_listed_but_unreadable_names_get_object() -> None:
    s3 = prefix_only_s3("*")
    s3.objects["elsewhere/_MANIFEST.json"] = b"{}"  # listable, but outside what it may read

    with pytest.raises(PermissionError) as info:
        storage.read_json_or_none(s3, "bkt/elsewhere/_MANIFEST.json")
    assert "s3:GetObject on arn:aws:s3:::bkt/elsewhere/_MANIFEST.json" in str(info.value)
