"""`batchinfer cache stats` and `cache gc` as a user meets them, on a cache built with the
functions jobs use (batch.cache): what stats reports, that gc removes exactly the entries its
criteria name (lookups then miss those and still find the rest), that --dry-run changes
nothing, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import pytest
from typer.testing import CliRunner

from batch import cache
from batch.cli import app
from batch.engine import EngineResult
from batch.spec import parse_spec

DAY = 86400.0
A, B, C = ("a" * 32, "b" * 32, "c" * 32)  # namespaces
MODELS = {A: "m-old", B: "m-keep", C: "m-drop"}


@pytest.fixture(autouse=True)
def _quiet_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    # The commands point the root logger at the stderr of the moment (CliRunner's, here).
    monkeypatch.setattr("batch.cli._configure_logging", lambda verbose, json_lines: None)


def run(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def job_yaml(path: Path, cache_path: str, model: str = "m", options: str = "{}") -> Path:
    path.write_text(
        f"""\
name: job-{model}
input: {{path: in/}}
output: {{path: out/}}
model: {{path: {model}, engine: fake}}
prompt: {{template: "{{{{ body }}}}"}}
cache: {{path: "{cache_path}", storage_options: {options}}}
"""
    )
    return path


@contextmanager
def clock(at: float) -> Iterator[None]:
    """batch.cache's clock set to ``at`` (entries' created_at, records' last_used)."""
    with mock.patch.object(cache, "time", SimpleNamespace(time=lambda: at)):
        yield


def key(ns: str, i: int) -> bytes:
    return bytes.fromhex(ns)[:8] + i.to_bytes(8, "big")


def add_entries(root: str, ns: str, keys: range, *, at: float, options: Any = None) -> None:
    ctx = cache.CacheContext(root=root, storage_options=options or {}, namespace=ns, run_id="r")
    results = [(key(ns, i), EngineResult(key=i, text=f"{ns[0]}{i}", output_tokens=2)) for i in keys]
    with clock(at):
        fragments = cache.write_fragments(ctx, results)
    assert cache.commit_fragments(ctx, fragments) == len(keys)


def record(tmp: Path, root: str, ns: str, *, at: float, options: str = "{}") -> None:
    spec = parse_spec(job_yaml(tmp / f"{ns[0]}.yaml", root, MODELS[ns], options).read_text())
    with clock(at):
        cache.record_namespace(spec, ns, {"model": MODELS[ns]})


def build(tmp: Path, root: str, options: str = "{}", storage: Any = None) -> None:
    """A: used 40 days ago, 3 entries of then. B: used now, 2 entries 40 days old and 4 new.
    C: used now, 3 new entries. The table's key index covers the first write only."""
    now, old = time.time(), time.time() - 40 * DAY
    record(tmp, root, A, at=old, options=options)
    record(tmp, root, B, at=old, options=options)
    add_entries(root, A, range(3), at=old, options=storage)
    add_entries(root, B, range(2), at=old, options=storage)
    cache.maintain(cache.CacheContext(root=root, storage_options=storage or {}))
    record(tmp, root, B, at=now, options=options)
    record(tmp, root, C, at=now, options=options)
    add_entries(root, B, range(2, 6), at=now, options=storage)
    add_entries(root, C, range(3), at=now, options=storage)


def found(root: str, storage: Any = None) -> dict[str, set[int]]:
    """namespace -> entry numbers a lookup finds, over every key build() wrote."""
    ctx = cache.CacheContext(root=root, storage_options=storage or {})
    everything = [key(ns, i) for ns in (A, B, C) for i in range(6)]
    hits = cache.lookup(ctx, everything)
    out: dict[str, set[int]] = {A: set(), B: set(), C: set()}
    for ns in (A, B, C):
        out[ns] = {i for i in range(6) if key(ns, i) in hits}
    return out


ALL = {A: {0, 1, 2}, B: {0, 1, 2, 3, 4, 5}, C: {0, 1, 2}}


@pytest.fixture
def built(tmp_path: Path) -> str:
    root = str(tmp_path / "cache")
    build(tmp_path, root)
    assert found(root) == ALL
    return root


def stats_json(target: str, *extra: str) -> dict[str, Any]:
    res = run("cache", "stats", target, "--json", *extra)
    assert res.exit_code == 0, res.output
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def by_ns(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n["namespace"]: n for n in doc["namespaces"]}


# --------------------------------------------------------------------------- stats


def test_stats_counts_entries_per_namespace_with_their_records(built: str) -> None:
    doc = stats_json(built)
    assert doc["entries"] == 12 and doc["bytes"] > 0
    spaces = by_ns(doc)
    assert {ns: spaces[ns]["entries"] for ns in (A, B, C)} == {A: 3, B: 6, C: 3}
    assert {ns: spaces[ns]["model"] for ns in (A, B, C)} == MODELS
    assert spaces[B]["last_job"] == "job-m-keep" and spaces[B]["task"] == "generate"
    # B was first used 40 days ago, last used now; its entries span the same.
    assert spaces[B]["first_used"] == spaces[A]["last_used"] < spaces[B]["last_used"]
    assert spaces[B]["oldest"] == doc["oldest"] < spaces[B]["newest"] == doc["newest"]
    index = doc["lance"]["index"]
    assert (index["indexed_rows"], index["unindexed_rows"]) == (5, 7)


def test_stats_table_for_people(built: str) -> None:
    res = CliRunner().invoke(app, ["cache", "stats", built], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    for text in ("entries", "12", "m-old", "m-keep", "job-m-drop", "5 rows indexed, 7 not yet"):
        assert text in res.stdout


def test_stats_of_a_job_file_uses_its_cache_path(built: str, tmp_path: Path) -> None:
    job = job_yaml(tmp_path / "job.yaml", "elsewhere/")
    assert stats_json(str(job), "--set", f"cache.path={built}")["entries"] == 12


def test_stats_of_an_empty_cache_says_so(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    res = run("cache", "stats", str(tmp_path / "cache"))
    assert res.exit_code == 0
    assert res.stdout.strip() == f"{tmp_path / 'cache'}: the cache holds no entries yet"


def test_a_missing_cache_is_one_line_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    res = run("cache", "stats", str(missing))
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1 and res.stderr.startswith(f"error: cache {missing}: ")
    assert "does not exist" in res.stderr


def test_a_job_without_cache_path_is_refused(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "name: x\ninput: {path: in/}\noutput: {path: out/}\nmodel: {path: m, engine: fake}\n"
        'prompt: {template: "{{ body }}"}\n'
    )
    res = run("cache", "gc", str(job), "--older-than", "1d")
    assert res.exit_code == 2
    assert res.stderr == f"error: {job}: the job has no cache.path; name the cache folder " \
        "instead, or add --set cache.path=<folder>\n"  # fmt: skip


# --------------------------------------------------------------------------- gc


def test_gc_older_than_removes_exactly_the_old_entries(built: str) -> None:
    res = run("cache", "gc", built, "--older-than", "30d")
    assert res.exit_code == 0, res.output
    assert "removed 5 of 12 entries" in res.stdout and "7 entries left" in res.stdout
    assert found(built) == {A: set(), B: {2, 3, 4, 5}, C: {0, 1, 2}}
    doc = stats_json(built)
    assert doc["entries"] == 7 and set(by_ns(doc)) == {A, B, C}  # records are kept
    assert doc["lance"]["index"]["unindexed_rows"] == 0  # gc folded the new rows in


def test_gc_by_model_removes_that_models_namespaces(built: str) -> None:
    res = run("cache", "gc", built, "--model", "m-drop", "--model", "m-gone", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["entries_removed"] == 3 and doc["entries_after"] == 9
    assert doc["notes"] == [
        "--model m-gone: no namespace of the cache has this model (its models: m-drop, "
        "m-keep, m-old)"
    ]
    assert found(built) == {A: {0, 1, 2}, B: {0, 1, 2, 3, 4, 5}, C: set()}


def test_gc_unused_for_removes_namespaces_and_their_records(built: str) -> None:
    res = run("cache", "gc", built, "--unused-for", "30d")
    assert res.exit_code == 0, res.output
    assert "removed 3 of 12 entries" in res.stdout and "1 namespace record" in res.stdout
    # B's old entries stay: B itself was used today.
    assert found(built) == {A: set(), B: {0, 1, 2, 3, 4, 5}, C: {0, 1, 2}}
    assert not (Path(built) / "namespaces" / f"{A}.json").exists()
    assert set(by_ns(stats_json(built))) == {B, C}


def test_gc_dry_run_changes_nothing(built: str) -> None:
    before = stats_json(built)
    listing = sorted(p.relative_to(built) for p in Path(built).rglob("*"))
    res = run("cache", "gc", built, "--older-than", "30d", "--model", "m-drop", "--dry-run")
    assert res.exit_code == 0, res.output
    assert res.stdout.startswith("would remove 8 of 12 entries (created before ")
    assert "model m-drop: 3" in res.stdout and "nothing changed (--dry-run)" in res.stdout
    assert found(built) == ALL
    assert stats_json(built) == before
    assert sorted(p.relative_to(built) for p in Path(built).rglob("*")) == listing


def test_gc_without_a_criterion_names_the_options(built: str) -> None:
    res = run("cache", "gc", built)
    assert res.exit_code == 2
    assert res.stderr.count("\n") == 1
    for option in ("--older-than", "--model", "--unused-for", "--dry-run"):
        assert option in res.stderr
    assert found(built) == ALL


def test_gc_refuses_a_bad_age(built: str) -> None:
    res = run("cache", "gc", built, "--older-than", "30 days")
    assert res.exit_code == 2
    assert res.stderr == "error: --older-than 30 days: give a number of days or hours, e.g. " \
        "30d or 12h\n"  # fmt: skip


def test_gc_frees_space_with_no_versions_kept(built: str) -> None:
    res = run("cache", "gc", built, "--older-than", "0h", "--keep-versions", "0h", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["entries_removed"] == 12 and doc["entries_after"] == 0
    assert doc["bytes_after"] < doc["bytes_before"] and doc["bytes_freed"] > 0
    assert found(built) == {A: set(), B: set(), C: set()}


def test_errors_through_the_console_script_have_no_traceback(tmp_path: Path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "batch.cli", "cache", "gc", str(tmp_path / "nope"), "--unused-for",
         "1d"], capture_output=True, text=True,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.startswith(f"error: cache {tmp_path / 'nope'}: does not exist")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
