"""Housekeeping of the result cache: what it holds (``batchinfer cache stats``) and removing
what is no longer wanted (``batchinfer cache gc``).

The cache (see :mod:`batch.cache`) is one Lance table, ``<cache>/results.lance``, and a record
per namespace, ``<cache>/namespaces/<ns>.json`` (its model, task, the last job that used it
and when). Statistics read only the ``namespace`` and ``created_at`` columns, batch by batch,
and keep one running count, minimum and maximum per namespace, so memory grows with the
number of namespaces, never with the entries.

Removing entries is a Lance delete (a new version; readers of older versions are unaffected),
then a compaction (fragments left small or full of deleted rows are rewritten), an index
update, and a cleanup of old versions. The cleanup deletes only versions older than a window
(an hour unless asked otherwise) and never files of writes not yet committed (Lance keeps
those for a week), so a job looking up or committing entries at the same time never loses a
file it is using. The space of the versions inside the window is freed by a later gc.

``lance`` is imported inside functions only, like in :mod:`batch.cache`.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from batch import storage
from batch.cache import INDEX, NAMESPACES, TABLE, CacheContext, lance_uri, open_table
from batch.errors import SpecError

if TYPE_CHECKING:
    import fsspec
    import pyarrow.compute as pc

log = logging.getLogger(__name__)

#: Versions younger than this survive a gc's cleanup by default (see the module docstring).
KEEP_VERSIONS = timedelta(hours=1)
_SCAN_BATCH = 64 * 1024
_DURATION = re.compile(r"^\s*(\d+)\s*([dh])\s*$")


@dataclass(frozen=True)
class Criteria:
    """What a gc removes: an entry matching any one criterion goes."""

    older_than: timedelta | None = None  # entries created before now minus this
    models: tuple[str, ...] = ()  # entries of namespaces whose model is one of these
    unused_for: timedelta | None = None  # namespaces (entries and record) last used before

    def check(self) -> None:
        """Raises SpecError if nothing is named: a gc never guesses what to remove."""
        if self.older_than is None and not self.models and self.unused_for is None:
            raise SpecError(
                "cache gc: say what to remove: --older-than 30d (entries created before), "
                "--model NAME (entries of a model), --unused-for 30d (namespaces no job used "
                "since); add --dry-run to see what would go"
            )


def parse_duration(text: str, option: str) -> timedelta:
    """``30d`` or ``12h``; raises SpecError naming the option."""
    m = _DURATION.match(text)
    if not m:
        raise SpecError(f"{option} {text}: give a number of days or hours, e.g. 30d or 12h")
    n, unit = int(m.group(1)), m.group(2)
    return timedelta(days=n) if unit == "d" else timedelta(hours=n)


def resolve(
    target: str, overrides: Sequence[str] = (), storage_options: Mapping[str, Any] | None = None
) -> CacheContext:
    """The cache a command names: a job file (its ``cache.path`` and ``cache.storage_options``,
    after ``--set`` overrides) or the cache folder itself. Raises SpecError."""
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        from batch.spec import load_spec

        spec = load_spec(target, overrides)
        if not spec.cache.path:
            raise SpecError(
                f"{target}: the job has no cache.path; name the cache folder instead, or add "
                "--set cache.path=<folder>"
            )
        options = dict(spec.cache.storage_options)
        if storage_options:
            options.update(storage_options)
        lance_uri(spec.cache.path)  # refuses a filesystem Lance cannot use
        return CacheContext(root=spec.cache.path, storage_options=options)
    if overrides:
        raise SpecError(
            f"--set changes a job file, and {target} is not one; name the job file, or give "
            "the cache's storage options with --storage-options"
        )
    lance_uri(target)
    return CacheContext(root=target, storage_options=dict(storage_options or {}))


# --------------------------------------------------------------------------- reading


def _existing(ctx: CacheContext) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = storage.open_fs(ctx.root, ctx.storage_options)
    if not storage.exists(fs, root):
        raise SpecError(
            f"cache {ctx.root}: does not exist (no job has used this cache yet, or the path is "
            "wrong); check the path and, for object storage, its storage options"
        )
    return fs, root


def read_namespaces(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    """namespace -> its record (``namespaces/<ns>.json``), read 16 at a time."""
    paths = storage.list_files(fs, storage.join(root, NAMESPACES), ".json")
    with ThreadPoolExecutor(max_workers=16) as pool:
        docs = list(pool.map(lambda p: storage.read_json_or_none(fs, p), paths))
    out: dict[str, dict[str, Any]] = {}
    for path, doc in zip(paths, docs, strict=True):
        if isinstance(doc, dict):
            out[str(doc.get("namespace") or Path(path).stem)] = doc
    return out


def _du(fs: fsspec.AbstractFileSystem, path: str) -> int:
    fs.invalidate_cache(path)
    try:
        return int(fs.du(path, total=True))
    except FileNotFoundError:
        return 0


def _scan_namespaces(table: Any) -> dict[str, list[Any]]:
    """namespace -> [entries, oldest, newest], over the table in batches of two columns."""
    import pyarrow as pa

    seen: dict[str, list[Any]] = {}
    for batch in table.to_batches(columns=["namespace", "created_at"], batch_size=_SCAN_BATCH):
        if batch.num_rows == 0:
            continue
        grouped = pa.Table.from_batches([batch]).group_by("namespace").aggregate(
            [("created_at", "count"), ("created_at", "min"), ("created_at", "max")]
        )  # fmt: skip
        for ns, n, lo, hi in zip(
            grouped["namespace"].to_pylist(),
            grouped["created_at_count"].to_pylist(),
            grouped["created_at_min"].to_pylist(),
            grouped["created_at_max"].to_pylist(),
            strict=True,
        ):
            acc = seen.get(ns or "")
            if acc is None:
                seen[ns or ""] = [n, lo, hi]
                continue
            acc[0] += n
            acc[1] = min((x for x in (acc[1], lo) if x is not None), default=None)
            acc[2] = max((x for x in (acc[2], hi) if x is not None), default=None)
    return seen


def _iso(value: datetime | float | None) -> str | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        value = datetime.fromtimestamp(float(value), UTC)
    return value.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _lance_stats(table: Any) -> dict[str, Any]:
    ds = table.stats.dataset_stats()
    index: dict[str, Any] | None = None
    if any(i["name"] == INDEX for i in table.list_indices()):
        st = table.stats.index_stats(INDEX)
        index = {
            "name": INDEX,
            "indexed_rows": int(st.get("num_indexed_rows", 0)),
            "unindexed_rows": int(st.get("num_unindexed_rows", 0)),
        }
    return {
        "version": int(table.version),
        "fragments": int(ds.get("num_fragments", 0)),
        "small_files": int(ds.get("num_small_files", 0)),
        "deleted_rows": int(ds.get("num_deleted_rows", 0)),
        "index": index,
    }


def stats(ctx: CacheContext) -> dict[str, Any]:
    """What the cache holds, as a JSON-able document (see ``batchinfer cache stats``)."""
    fs, root = _existing(ctx)
    records = read_namespaces(fs, root)
    table = open_table(ctx)
    scanned = _scan_namespaces(table) if table is not None else {}
    namespaces = []
    for ns in sorted(set(records) | set(scanned)):
        rec = records.get(ns, {})
        n, lo, hi = scanned.get(ns, [0, None, None])
        namespaces.append(
            {
                "namespace": ns,
                "model": rec.get("model"),
                "task": rec.get("task"),
                "last_job": rec.get("last_job"),
                "first_used": _iso(rec.get("first_used")),
                "last_used": _iso(rec.get("last_used")),
                "entries": n,
                "oldest": _iso(lo),
                "newest": _iso(hi),
            }
        )
    namespaces.sort(key=lambda d: (-d["entries"], d["last_used"] or "", d["namespace"]))
    firsts = [s[1] for s in scanned.values() if s[1] is not None]
    lasts = [s[2] for s in scanned.values() if s[2] is not None]
    entries = sum(s[0] for s in scanned.values())
    size = _du(fs, storage.join(root, TABLE))
    return {
        "cache": ctx.root,
        "table": ctx.table_uri,
        "state": "ok" if entries else "empty",
        "entries": entries,
        "bytes": size,
        "size": human_bytes(size),
        "oldest": _iso(min(firsts)) if firsts else None,
        "newest": _iso(max(lasts)) if lasts else None,
        "lance": _lance_stats(table) if table is not None else None,
        "namespaces": namespaces,
    }


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- removing


def _timestamp(when: datetime) -> Any:
    import pyarrow as pa

    return pa.scalar(int(when.timestamp() * 1000), pa.timestamp("ms", tz="UTC"))


def _last_used(rec: Mapping[str, Any]) -> float:
    try:
        return float(rec.get("last_used") or 0)
    except (TypeError, ValueError):
        return 0.0


def gc(
    ctx: CacheContext,
    criteria: Criteria,
    *,
    dry_run: bool = False,
    keep_versions: timedelta = KEEP_VERSIONS,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Remove the entries ``criteria`` name (with ``unused_for``, their namespace records
    too), compact, update the index and clean up versions older than ``keep_versions``.
    With ``dry_run`` only count. Returns a JSON-able report."""
    import pyarrow.compute as pc

    criteria.check()
    now = now or datetime.now(UTC)
    fs, root = _existing(ctx)
    records = read_namespaces(fs, root)
    parts: list[tuple[str, pc.Expression]] = []
    notes: list[str] = []
    if criteria.older_than is not None:
        cutoff = now - criteria.older_than
        parts.append(
            (f"created before {_iso(cutoff)}", pc.field("created_at") < _timestamp(cutoff))
        )
    for model in criteria.models:
        spaces = sorted(ns for ns, r in records.items() if r.get("model") == model)
        if spaces:
            parts.append((f"model {model}", pc.field("namespace").isin(spaces)))
        else:
            known = sorted({str(r.get("model")) for r in records.values() if r.get("model")})
            notes.append(
                f"--model {model}: no namespace of the cache has this model (its models: "
                f"{', '.join(known) or 'none recorded'})"
            )
    unused: list[str] = []
    if criteria.unused_for is not None:
        cutoff = now - criteria.unused_for
        unused = sorted(ns for ns, r in records.items() if _last_used(r) < cutoff.timestamp())
        if unused:
            parts.append(
                (f"namespaces unused since {_iso(cutoff)}", pc.field("namespace").isin(unused))
            )
    table = open_table(ctx)
    total = int(table.count_rows()) if table is not None else 0
    by_criterion = [
        {"criterion": label, "entries": int(table.count_rows(filter=expr))}
        for label, expr in parts
        if table is not None
    ]
    predicate: pc.Expression | None = None
    for _, expr in parts:
        predicate = expr if predicate is None else predicate | expr
    matched = 0
    if table is not None and predicate is not None:
        matched = int(table.count_rows(filter=predicate))
    table_path = storage.join(root, TABLE)
    before = _du(fs, table_path)
    doc: dict[str, Any] = {
        "cache": ctx.root,
        "dry_run": dry_run,
        "entries_before": total,
        "entries_removed": matched,
        "by_criterion": by_criterion,
        "namespace_records_removed": len(unused),
        "bytes_before": before,
        "notes": notes,
    }
    if dry_run:
        doc["bytes_estimate"] = int(before * matched / total) if total else 0
        return doc
    t0 = time.perf_counter()
    if table is not None and predicate is not None and matched:
        # The rows deleted, not those counted: a job may have added some of a model since.
        doc["entries_removed"] = int(table.delete(predicate)["num_deleted_rows"])
        table = open_table(ctx) or table
        with contextlib.suppress(Exception):  # a job's own maintenance may have won the race
            table.optimize.compact_files()
            table = open_table(ctx) or table
    if table is not None:
        with contextlib.suppress(Exception):  # rows a killed run's commits left unindexed
            table.optimize.optimize_indices()
    cleaned: dict[str, int] = {}
    if table is not None:
        table = open_table(ctx) or table
        st = table.cleanup_old_versions(older_than=keep_versions)
        cleaned = {"old_versions": int(st.old_versions), "bytes_removed": int(st.bytes_removed)}
    if criteria.unused_for is not None:
        cutoff = now - criteria.unused_for
        doc["namespace_records_removed"] = _remove_records(fs, root, unused, cutoff)
    after = _du(fs, table_path)
    doc.update(
        bytes_after=after,
        bytes_freed=max(0, before - after),
        cleanup=cleaned,
        entries_after=int(table.count_rows()) if table is not None else 0,
        keep_versions_seconds=int(keep_versions.total_seconds()),
        seconds=round(time.perf_counter() - t0, 3),
    )
    return doc


def _remove_records(
    fs: fsspec.AbstractFileSystem, root: str, spaces: Sequence[str], cutoff: datetime
) -> int:
    """Remove the records of unused namespaces, each read again first: one a job has just
    used (its last_used moved past the cutoff) is kept."""
    removed = 0
    for ns in spaces:
        path = storage.join(root, NAMESPACES, f"{ns}.json")
        rec = storage.read_json_or_none(fs, path)
        if not isinstance(rec, dict) or _last_used(rec) >= cutoff.timestamp():
            continue
        with contextlib.suppress(FileNotFoundError):
            fs.rm(path)
            removed += 1
    return removed


# --------------------------------------------------------------------------- rendering


def _short(iso: str | None) -> str:
    return iso.replace("T", " ")[:16] if iso else "-"


def print_stats(doc: Mapping[str, Any], console: Any) -> None:
    """``cache stats`` for people: a summary and a table of namespaces (rich)."""
    from rich import box
    from rich.table import Table

    summary = Table(title=f"result cache {doc['cache']}", show_header=False)
    summary.add_row("entries", f"{doc['entries']:,}")
    summary.add_row("on storage", f"{doc['size']} ({doc['bytes']:,} bytes, old versions included)")
    summary.add_row("oldest entry", _short(doc["oldest"]))
    summary.add_row("newest entry", _short(doc["newest"]))
    lance = doc["lance"]
    if lance is not None:
        summary.add_row(
            "lance table",
            f"version {lance['version']}, {lance['fragments']:,} fragments "
            f"({lance['small_files']:,} small), {lance['deleted_rows']:,} deleted rows not yet "
            "compacted away",
        )
        index = lance["index"]
        if index is None:
            summary.add_row("key index", "missing: every lookup scans the table")
        else:
            summary.add_row(
                "key index",
                f"{index['indexed_rows']:,} rows indexed, {index['unindexed_rows']:,} not yet "
                "(lookups scan those; a job's end or a gc folds them in)",
            )
    console.print(summary)
    table = Table(
        title="namespaces (each one model with one set of engine, prompt and sampling settings)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("namespace", no_wrap=True)
    table.add_column("model\ntask, last job", overflow="fold")
    table.add_column("entries", justify="right", no_wrap=True)
    table.add_column("created\noldest, newest", no_wrap=True)
    table.add_column("used\nfirst, last", no_wrap=True)
    for ns in doc["namespaces"]:
        job = f"{ns['task'] or '-'}, last job {ns['last_job'] or '-'}"
        table.add_row(
            ns["namespace"][:8],
            f"{ns['model'] or '(no record)'}\n{job}",
            f"{ns['entries']:,}",
            f"{_day(ns['oldest'])}\n{_day(ns['newest'])}",
            f"{_day(ns['first_used'])}\n{_day(ns['last_used'])}",
            end_section=True,
        )
    console.print(table)


def _day(iso: str | None) -> str:
    return iso[:10] if iso else "-"  # --json has the time to the second


def gc_lines(doc: Mapping[str, Any]) -> list[str]:
    """``cache gc`` for people: what was (or would be) removed and the space freed."""
    lines = list(doc["notes"])
    parts = ", ".join(f"{c['criterion']}: {c['entries']:,}" for c in doc["by_criterion"])
    what = f"{doc['entries_removed']:,} of {doc['entries_before']:,} entries"
    what += f" ({parts})" if parts else ""
    records = doc["namespace_records_removed"]
    if records:
        what += f", {records} namespace record{'s' if records != 1 else ''}"
    if doc["dry_run"]:
        lines.append(
            f"would remove {what}; about {human_bytes(doc['bytes_estimate'])} of "
            f"{human_bytes(doc['bytes_before'])}; nothing changed (--dry-run)"
        )
        return lines
    lines.append(f"removed {what}; {doc['entries_after']:,} entries left")
    keep = doc["keep_versions_seconds"]
    sizes = f"{human_bytes(doc['bytes_before'])} -> {human_bytes(doc['bytes_after'])} on storage"
    freed = f"freed {human_bytes(doc['bytes_freed'])} ({sizes})"
    if doc["bytes_after"] >= doc["bytes_before"]:
        freed = f"nothing freed yet ({sizes})"
    if keep:
        age = f"{keep // 86400}d" if keep % 86400 == 0 else f"{keep / 3600:g}h"
        freed += (
            f"; the table's versions of the last {age} are kept, with the files they use, for "
            "jobs that may be reading them: a gc after that frees them (--keep-versions 0h "
            "frees them now, when no job uses the cache)"
        )
    lines.append(freed)
    return lines
